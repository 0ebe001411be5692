//! The identity graph of one client for one batch or edit, over the `graph` tree (as the
//! commit pipeline shows it: its buffer, then sled): records are read and decoded once, writes
//! are kept in memory and handed over whole at the end.

use std::{collections::HashMap, net::IpAddr};

use census_proto::convert::MacAddr;
use serde::{Serialize, de::DeserializeOwned};

use super::{
    DEVICE, EVENT, FORMAT_DEVICE, FORMAT_V1, KEY, OWNER, StoreError, VMAC,
    commit::{Pipeline, Writes},
    counts::Changes,
    counts::OwnedSummary,
    decode, device_summary, encode_device_into, engine, graph_key, postcard_into, push_graph_key,
};
use crate::{
    identity::{AddressOwner, Event, Graph, KeyRecord, VirtualMacRecord},
    model::DeviceRecord,
    policy::DeviceSummary,
};

/// One client's identity graph for one batch or edit. Each record is read (from the commit
/// pipeline's buffer or sled) and decoded once, then kept; writes stay here until [`Overlay::into_writes`] hands them over,
/// to be committed as one atomic batch (see [`super::commit`]). Dropped without that, it wrote
/// nothing.
pub(super) struct Overlay<'a> {
    graph: &'a Pipeline,
    db: &'a sled::Db,
    client: &'a [u8],
    keys: HashMap<String, Slot<KeyRecord>>,
    devices: HashMap<String, Slot<DeviceRecord>>,
    /// Devices read only for their id and keys (see [`Graph::device_keys`]), not in `devices`.
    heads: HashMap<String, Option<(String, Vec<String>)>>,
    /// Where records read from the write buffer are copied to be decoded.
    scratch: Vec<u8>,
    /// These three by their `graph` key.
    owners: HashMap<Vec<u8>, Slot<AddressOwner>>,
    vmacs: HashMap<Vec<u8>, Slot<VirtualMacRecord>>,
    events: HashMap<Vec<u8>, Slot<Event>>,
}

/// A record as an overlay knows it: `None` when absent or deleted; `dirty` once written.
struct Slot<T> {
    value: Option<T>,
    dirty: bool,
}

fn load<T: DeserializeOwned>(
    graph: &Pipeline,
    client: &[u8],
    k: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<Slot<T>, StoreError> {
    let value = graph
        .read(client, k, scratch, |v| v.map(|v| decode(k, v)))?
        .transpose()?;
    Ok(Slot {
        value,
        dirty: false,
    })
}

/// The first fields of a [`DeviceRecord`], in its order: decoding them reads only the front of
/// a stored record.
#[derive(serde::Deserialize)]
struct DeviceHead {
    id: String,
    keys: Vec<String>,
}

/// A stored device record's id and keys.
fn decode_head(k: &[u8], v: &[u8]) -> Result<(String, Vec<String>), StoreError> {
    let record = match v.first() {
        Some(&FORMAT_DEVICE) => &v[device_summary(k, v)?.1..],
        // Not a device record as this version writes them: decode it whole.
        _ => {
            let d: DeviceRecord = decode(k, v)?;
            return Ok((d.id, d.keys));
        }
    };
    let head: DeviceHead = postcard::from_bytes(record).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).replace('\0', "/"),
        reason: e.to_string(),
    })?;
    Ok((head.id, head.keys))
}

/// A record by name, read into the overlay if it was not yet.
fn slot_named<'m, T: DeserializeOwned>(
    map: &'m mut HashMap<String, Slot<T>>,
    graph: &Pipeline,
    client: &[u8],
    scratch: &mut Vec<u8>,
    k: &str,
    storage_key: impl FnOnce() -> Vec<u8>,
) -> Result<&'m Slot<T>, StoreError> {
    if !map.contains_key(k) {
        let slot = load(graph, client, &storage_key(), scratch)?;
        map.insert(k.to_owned(), slot);
    }
    map.get(k)
        .ok_or_else(|| StoreError::Engine("overlay lost a record it just read".into()))
}

fn write_named<T>(map: &mut HashMap<String, Slot<T>>, k: &str, value: Option<T>) {
    match map.get_mut(k) {
        Some(slot) => {
            slot.value = value;
            slot.dirty = true;
        }
        None => {
            map.insert(k.to_owned(), Slot { value, dirty: true });
        }
    }
}

/// Reads a record by its `graph` key through the overlay.
fn read_keyed<T: Clone + DeserializeOwned>(
    map: &mut HashMap<Vec<u8>, Slot<T>>,
    graph: &Pipeline,
    client: &[u8],
    scratch: &mut Vec<u8>,
    k: Vec<u8>,
) -> Result<Option<T>, StoreError> {
    if let Some(slot) = map.get(&k) {
        return Ok(slot.value.clone());
    }
    let slot = load(graph, client, &k, scratch)?;
    let value = slot.value.clone();
    map.insert(k, slot);
    Ok(value)
}

fn write_keyed<T: Clone>(map: &mut HashMap<Vec<u8>, Slot<T>>, k: Vec<u8>, value: &T) {
    map.insert(
        k,
        Slot {
            value: Some(value.clone()),
            dirty: true,
        },
    );
}

/// The `graph` key of who answers on `ip` at `site`: `o client\0site\0address`.
fn owner_key(client: &[u8], site: &str, ip: IpAddr) -> Vec<u8> {
    use std::io::Write as _;
    let mut k = Vec::with_capacity(client.len() + site.len() + 48);
    push_graph_key(&mut k, OWNER, &[client, site.as_bytes(), b""]);
    // The address as text, written in place rather than into a string of its own. Writing to
    // a vector cannot fail.
    let _ = write!(k, "{ip}");
    k
}

/// Writes a key held whole.
fn bytes(k: &[u8]) -> impl FnOnce(&mut Vec<u8>) + '_ {
    move |out| out.extend_from_slice(k)
}

/// Adds a record's write (or removal) to a writer's batch: its key as `key` writes it.
fn stage<T: Serialize>(
    writes: &mut Writes,
    key: impl FnOnce(&mut Vec<u8>),
    value: Option<&T>,
) -> Result<(), StoreError> {
    match value {
        Some(v) => writes.set(key, |out| {
            out.push(FORMAT_V1);
            postcard_into(v, out)
        }),
        None => writes.remove(key),
    }
}

impl<'a> Overlay<'a> {
    pub(super) fn new(graph: &'a Pipeline, db: &'a sled::Db, client: &'a [u8]) -> Self {
        Self::with_capacity(graph, db, client, 0)
    }

    /// An overlay with room for about `observations` observations' records.
    pub(super) fn with_capacity(
        graph: &'a Pipeline,
        db: &'a sled::Db,
        client: &'a [u8],
        observations: usize,
    ) -> Self {
        Overlay {
            graph,
            db,
            client,
            keys: HashMap::with_capacity(observations * 2),
            devices: HashMap::with_capacity(observations),
            heads: HashMap::with_capacity(observations),
            scratch: Vec::with_capacity(1024),
            owners: HashMap::with_capacity(observations),
            vmacs: HashMap::new(),
            events: HashMap::new(),
        }
    }

    fn owner_key(&self, site: &str, ip: IpAddr) -> Vec<u8> {
        owner_key(self.client, site, ip)
    }

    fn vmac_key(&self, mac: MacAddr) -> Vec<u8> {
        graph_key(VMAC, &[self.client, mac.to_string().as_bytes()])
    }

    fn event_key(&self, seq: u64) -> Vec<u8> {
        graph_key(EVENT, &[self.client, &seq.to_be_bytes()])
    }

    /// Every write, and what changed for counting: each written device's summary (`None`
    /// for a deleted one).
    pub(super) fn into_writes(self) -> Result<(Writes, Changes), StoreError> {
        // Room for typical records, so the frame is not grown step by step.
        let mut writes =
            Writes::with_capacity((self.keys.len() + self.devices.len() + self.owners.len()) * 320);
        let mut changes = Changes::new();
        let c = self.client;
        for (k, slot) in self.keys.iter().filter(|(_, s)| s.dirty) {
            stage(
                &mut writes,
                |out| push_graph_key(out, KEY, &[c, k.as_bytes()]),
                slot.value.as_ref(),
            )?;
        }
        for (id, slot) in self.devices.into_iter().filter(|(_, s)| s.dirty) {
            let key = |out: &mut Vec<u8>| push_graph_key(out, DEVICE, &[c, id.as_bytes()]);
            match &slot.value {
                Some(d) => {
                    writes.set(key, |out| encode_device_into(d, out))?;
                    changes.push((id, Some(OwnedSummary::of(&DeviceSummary::of(d)))));
                }
                None => {
                    writes.remove(key)?;
                    changes.push((id, None));
                }
            }
        }
        for (k, slot) in self.owners.iter().filter(|(_, s)| s.dirty) {
            stage(&mut writes, bytes(k), slot.value.as_ref())?;
        }
        for (k, slot) in self.vmacs.iter().filter(|(_, s)| s.dirty) {
            stage(&mut writes, bytes(k), slot.value.as_ref())?;
        }
        for (k, slot) in self.events.iter().filter(|(_, s)| s.dirty) {
            stage(&mut writes, bytes(k), slot.value.as_ref())?;
        }
        Ok((writes, changes))
    }
}

impl Graph for Overlay<'_> {
    type Error = StoreError;

    fn key(&mut self, k: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.with_key(k, |r| r.cloned())
    }
    fn put_key(&mut self, k: &str, record: &KeyRecord) -> Result<(), StoreError> {
        write_named(&mut self.keys, k, Some(record.clone()));
        Ok(())
    }
    fn device(&mut self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.with_device(id, |d| d.cloned())
    }
    fn put_device(&mut self, device: &DeviceRecord) -> Result<(), StoreError> {
        write_named(&mut self.devices, &device.id, Some(device.clone()));
        Ok(())
    }
    fn delete_device(&mut self, id: &str) -> Result<(), StoreError> {
        write_named(&mut self.devices, id, None);
        Ok(())
    }
    fn address_owner(
        &mut self,
        site: &str,
        ip: IpAddr,
    ) -> Result<Option<AddressOwner>, StoreError> {
        let k = self.owner_key(site, ip);
        read_keyed(
            &mut self.owners,
            self.graph,
            self.client,
            &mut self.scratch,
            k,
        )
    }
    fn put_address_owner(
        &mut self,
        site: &str,
        ip: IpAddr,
        owner: &AddressOwner,
    ) -> Result<(), StoreError> {
        let k = self.owner_key(site, ip);
        write_keyed(&mut self.owners, k, owner);
        Ok(())
    }
    fn update_address_owner(
        &mut self,
        site: &str,
        ip: IpAddr,
        f: impl FnOnce(&mut Option<AddressOwner>) -> bool,
    ) -> Result<(), StoreError> {
        let k = self.owner_key(site, ip);
        let slot = match self.owners.entry(k) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let slot = load(self.graph, self.client, e.key(), &mut self.scratch)?;
                e.insert(slot)
            }
        };
        if f(&mut slot.value) {
            slot.dirty = true;
        }
        Ok(())
    }
    fn virtual_mac(&mut self, mac: MacAddr) -> Result<Option<VirtualMacRecord>, StoreError> {
        let k = self.vmac_key(mac);
        read_keyed(
            &mut self.vmacs,
            self.graph,
            self.client,
            &mut self.scratch,
            k,
        )
    }
    fn put_virtual_mac(
        &mut self,
        mac: MacAddr,
        record: &VirtualMacRecord,
    ) -> Result<(), StoreError> {
        let k = self.vmac_key(mac);
        write_keyed(&mut self.vmacs, k, record);
        Ok(())
    }
    fn event(&mut self, seq: u64) -> Result<Option<Event>, StoreError> {
        let k = self.event_key(seq);
        read_keyed(
            &mut self.events,
            self.graph,
            self.client,
            &mut self.scratch,
            k,
        )
    }
    fn with_key<R>(
        &mut self,
        k: &str,
        f: impl FnOnce(Option<&KeyRecord>) -> R,
    ) -> Result<R, StoreError> {
        let c = self.client;
        let slot = slot_named(&mut self.keys, self.graph, c, &mut self.scratch, k, || {
            graph_key(KEY, &[c, k.as_bytes()])
        })?;
        Ok(f(slot.value.as_ref()))
    }
    fn with_device<R>(
        &mut self,
        id: &str,
        f: impl FnOnce(Option<&DeviceRecord>) -> R,
    ) -> Result<R, StoreError> {
        let c = self.client;
        let slot = slot_named(
            &mut self.devices,
            self.graph,
            c,
            &mut self.scratch,
            id,
            || graph_key(DEVICE, &[c, id.as_bytes()]),
        )?;
        Ok(f(slot.value.as_ref()))
    }
    fn device_keys(&mut self, id: &str) -> Result<Option<(String, Vec<String>)>, StoreError> {
        if let Some(slot) = self.devices.get(id) {
            return Ok(slot.value.as_ref().map(|d| (d.id.clone(), d.keys.clone())));
        }
        if let Some(head) = self.heads.get(id) {
            return Ok(head.clone());
        }
        let k = graph_key(DEVICE, &[self.client, id.as_bytes()]);
        let head = self
            .graph
            .read(self.client, &k, &mut self.scratch, |v| {
                v.map(|v| decode_head(&k, v))
            })?
            .transpose()?;
        self.heads.insert(id.to_owned(), head.clone());
        Ok(head)
    }
    fn put_key_owned(&mut self, k: &str, record: KeyRecord) -> Result<(), StoreError> {
        write_named(&mut self.keys, k, Some(record));
        Ok(())
    }
    fn put_device_owned(&mut self, device: DeviceRecord) -> Result<(), StoreError> {
        match self.devices.get_mut(&device.id) {
            Some(slot) => {
                slot.value = Some(device);
                slot.dirty = true;
            }
            None => {
                let id = device.id.clone();
                self.devices.insert(
                    id,
                    Slot {
                        value: Some(device),
                        dirty: true,
                    },
                );
            }
        }
        Ok(())
    }
    fn take_key(&mut self, k: &str) -> Result<Option<KeyRecord>, StoreError> {
        let c = self.client;
        slot_named(&mut self.keys, self.graph, c, &mut self.scratch, k, || {
            graph_key(KEY, &[c, k.as_bytes()])
        })?;
        // Moved out: until it is put back the key reads as absent (see [`Graph::take_key`]).
        Ok(self.keys.get_mut(k).and_then(|slot| slot.value.take()))
    }
    fn put_event(&mut self, event: &mut Event) -> Result<(), StoreError> {
        if event.seq == 0 {
            // Unique and increasing across the database; ids start at 0, events at 1.
            event.seq = self.db.generate_id().map_err(engine)? + 1;
        }
        let k = self.event_key(event.seq);
        write_keyed(&mut self.events, k, event);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_key_names_the_address_as_text() {
        for ip in ["198.18.0.10", "2001:db8::1", "::ffff:198.18.0.1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(
                owner_key(b"acme", "hq", ip),
                graph_key(OWNER, &[b"acme", b"hq", ip.to_string().as_bytes()])
            );
        }
    }

    #[test]
    fn a_device_head_is_the_front_of_its_record() {
        let d = DeviceRecord {
            id: "00112233445566778899".into(),
            keys: vec!["1mac:00:16:3e:00:00:01".into(), "3serial:ABC".into()],
            category: "computer".into(),
            category_reason: "vendor".into(),
            category_ms: 5,
            client: "acme".into(),
            site: "hq".into(),
            sites: vec!["hq".into()],
            macs: vec!["00:16:3e:00:00:01".parse().expect("mac")],
            addresses: Vec::new(),
            names: vec!["pc".into()],
            first_seen_ms: 1,
            last_seen_ms: 9,
            evidence: Vec::new(),
            weak_only: false,
            anomalies: Vec::new(),
        };
        let k = graph_key(DEVICE, &[b"acme", d.id.as_bytes()]);
        let stored = super::super::encode_device(&d).expect("encode");
        assert_eq!(
            decode_head(&k, &stored).expect("head"),
            (d.id.clone(), d.keys.clone())
        );
        // A record of the plain format is decoded whole.
        let plain = super::super::encode(&d).expect("encode");
        assert_eq!(decode_head(&k, &plain).expect("head"), (d.id, d.keys));
        assert!(matches!(
            decode_head(&k, &[FORMAT_DEVICE, 0, 0]),
            Err(StoreError::Corrupt { .. })
        ));
    }
}

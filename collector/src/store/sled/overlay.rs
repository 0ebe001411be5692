//! The identity graph of one client for one batch or edit, over the `graph` tree: records are
//! read and decoded once, writes are kept in memory and handed over whole at the end.

use std::{collections::HashMap, net::IpAddr};

use census_proto::convert::MacAddr;
use serde::{Serialize, de::DeserializeOwned};

use super::{
    DEVICE, EVENT, KEY, OWNER, StoreError, VMAC, commit::Writes, counts::Changes,
    counts::OwnedSummary, decode, encode, encode_device, engine, graph_key,
};
use crate::{
    identity::{AddressOwner, Event, Graph, KeyRecord, VirtualMacRecord},
    model::DeviceRecord,
    policy::DeviceSummary,
};

/// One client's identity graph for one batch or edit. Each record is read from `graph` and
/// decoded once, then kept; writes stay here until [`Overlay::into_writes`] hands them over,
/// to be committed as one atomic batch (see [`super::commit`]). Dropped without that, it wrote
/// nothing.
pub(super) struct Overlay<'a> {
    graph: &'a sled::Tree,
    db: &'a sled::Db,
    client: &'a [u8],
    keys: HashMap<String, Slot<KeyRecord>>,
    devices: HashMap<String, Slot<DeviceRecord>>,
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

fn load<T: DeserializeOwned>(graph: &sled::Tree, k: &[u8]) -> Result<Slot<T>, StoreError> {
    let value = graph
        .get(k)
        .map_err(engine)?
        .map(|v| decode(k, &v))
        .transpose()?;
    Ok(Slot {
        value,
        dirty: false,
    })
}

/// Reads a record by name through the overlay.
fn read_named<T: Clone + DeserializeOwned>(
    map: &mut HashMap<String, Slot<T>>,
    graph: &sled::Tree,
    k: &str,
    storage_key: impl FnOnce() -> Vec<u8>,
) -> Result<Option<T>, StoreError> {
    if let Some(slot) = map.get(k) {
        return Ok(slot.value.clone());
    }
    let slot = load(graph, &storage_key())?;
    let value = slot.value.clone();
    map.insert(k.to_owned(), slot);
    Ok(value)
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
    graph: &sled::Tree,
    k: Vec<u8>,
) -> Result<Option<T>, StoreError> {
    if let Some(slot) = map.get(&k) {
        return Ok(slot.value.clone());
    }
    let slot = load(graph, &k)?;
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

/// Adds a record's write (or removal) to a writer's batch.
fn stage<T: Serialize>(
    writes: &mut Writes,
    k: Vec<u8>,
    value: Option<&T>,
) -> Result<(), StoreError> {
    writes.push((k, value.map(encode).transpose()?));
    Ok(())
}

impl<'a> Overlay<'a> {
    pub(super) fn new(graph: &'a sled::Tree, db: &'a sled::Db, client: &'a [u8]) -> Self {
        Overlay {
            graph,
            db,
            client,
            keys: HashMap::new(),
            devices: HashMap::new(),
            owners: HashMap::new(),
            vmacs: HashMap::new(),
            events: HashMap::new(),
        }
    }

    fn owner_key(&self, site: &str, ip: IpAddr) -> Vec<u8> {
        graph_key(
            OWNER,
            &[self.client, site.as_bytes(), ip.to_string().as_bytes()],
        )
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
        let mut writes = Writes::new();
        let mut changes = Changes::new();
        let c = self.client;
        for (k, slot) in self.keys.iter().filter(|(_, s)| s.dirty) {
            stage(
                &mut writes,
                graph_key(KEY, &[c, k.as_bytes()]),
                slot.value.as_ref(),
            )?;
        }
        for (id, slot) in self.devices.into_iter().filter(|(_, s)| s.dirty) {
            let k = graph_key(DEVICE, &[c, id.as_bytes()]);
            match &slot.value {
                Some(d) => {
                    writes.push((k, Some(encode_device(d)?)));
                    changes.push((id, Some(OwnedSummary::of(&DeviceSummary::of(d)))));
                }
                None => {
                    writes.push((k, None));
                    changes.push((id, None));
                }
            }
        }
        for (k, slot) in self.owners.into_iter().filter(|(_, s)| s.dirty) {
            stage(&mut writes, k, slot.value.as_ref())?;
        }
        for (k, slot) in self.vmacs.into_iter().filter(|(_, s)| s.dirty) {
            stage(&mut writes, k, slot.value.as_ref())?;
        }
        for (k, slot) in self.events.into_iter().filter(|(_, s)| s.dirty) {
            stage(&mut writes, k, slot.value.as_ref())?;
        }
        Ok((writes, changes))
    }
}

impl Graph for Overlay<'_> {
    type Error = StoreError;

    fn key(&mut self, k: &str) -> Result<Option<KeyRecord>, StoreError> {
        let c = self.client;
        read_named(&mut self.keys, self.graph, k, || {
            graph_key(KEY, &[c, k.as_bytes()])
        })
    }
    fn put_key(&mut self, k: &str, record: &KeyRecord) -> Result<(), StoreError> {
        write_named(&mut self.keys, k, Some(record.clone()));
        Ok(())
    }
    fn device(&mut self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let c = self.client;
        read_named(&mut self.devices, self.graph, id, || {
            graph_key(DEVICE, &[c, id.as_bytes()])
        })
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
        read_keyed(&mut self.owners, self.graph, k)
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
    fn virtual_mac(&mut self, mac: MacAddr) -> Result<Option<VirtualMacRecord>, StoreError> {
        let k = self.vmac_key(mac);
        read_keyed(&mut self.vmacs, self.graph, k)
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
        read_keyed(&mut self.events, self.graph, k)
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

//! The write buffer: every `graph` record committed since the last checkpoint, as stored
//! (encoded), by client. Readers look here before sled; a checkpoint writes it to sled whole
//! (see [`super::commit`]), so a record rewritten many times between two checkpoints costs sled
//! one write.
//!
//! Records live in slabs of [`SLAB`] bytes, each in a slot with room to grow a little, so a
//! record rewritten with a value of about its size (the usual case: a device seen again) is
//! rewritten in place, and the buffer costs a few large allocations instead of two small ones a
//! record: less memory, less work for the allocator, and its memory goes back to the system
//! as soon as a checkpoint drops it. Each client has an index from a 64-bit hash of a key
//! (SipHash with a random key) to its slot; keys whose hashes collide (never seen in practice,
//! but possible) are kept in a map of their own.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasher, BuildHasherDefault, Hasher},
};

/// Bytes of one slab. Larger than the allocator's largest size class, so each slab is a
/// mapping of its own, given back whole when freed.
const SLAB: usize = 1 << 20;
/// A slot: key length, capacity and value length (u32 LE each), a tag (1 set, 0 removed),
/// then the key and room for the value.
const SLOT_HEADER: usize = 13;
/// Room a slot keeps beyond its value, to take the same record a little larger in place.
const SLACK: usize = 16;
/// Bytes counted for a record in its client's index.
const INDEX_ENTRY: usize = 32;

/// Where a slot is: slab number (high 32 bits) and offset.
type Handle = u64;

/// The records of many clients.
#[derive(Debug)]
pub(super) struct Memtable {
    slabs: Vec<Vec<u8>>,
    clients: HashMap<Box<[u8]>, ClientIndex>,
    hasher: std::collections::hash_map::RandomState,
    /// Slab bytes taken (including slots left behind by records that outgrew them) and index
    /// entries: what [`Memtable::bytes`] reports.
    slab_bytes: usize,
    records: usize,
}

#[derive(Debug, Default)]
struct ClientIndex {
    by_hash: HashMap<u64, Handle, BuildHasherDefault<Prehashed>>,
    /// Keys whose hash another key of this client already has.
    collided: HashMap<Box<[u8]>, Handle>,
}

/// The index's keys are hashes already.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64s are hashed; a fold keeps this total anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Default for Memtable {
    fn default() -> Self {
        Memtable {
            slabs: Vec::new(),
            clients: HashMap::new(),
            hasher: std::collections::hash_map::RandomState::new(),
            slab_bytes: 0,
            records: 0,
        }
    }
}

fn read_u32(b: &[u8], at: usize) -> usize {
    let mut n = [0u8; 4];
    n.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(n) as usize
}

fn write_u32(b: &mut [u8], at: usize, n: usize) {
    // Lengths are checked against u32 before a slot is made.
    b[at..at + 4].copy_from_slice(&(n as u32).to_le_bytes());
}

/// A slot's parts: key and value (`None`: removed).
struct View<'a> {
    key: &'a [u8],
    value: Option<&'a [u8]>,
}

impl Memtable {
    fn slot(&self, h: Handle) -> &[u8] {
        &self.slabs[(h >> 32) as usize][(h & 0xffff_ffff) as usize..]
    }

    fn view(&self, h: Handle) -> View<'_> {
        let s = self.slot(h);
        let (klen, len) = (read_u32(s, 0), read_u32(s, 8));
        let key = &s[SLOT_HEADER..SLOT_HEADER + klen];
        let value = (s[12] == 1).then(|| &s[SLOT_HEADER + klen..SLOT_HEADER + klen + len]);
        View { key, value }
    }

    /// The handle of `key` in `index`, if it has one.
    fn find(&self, index: &ClientIndex, hash: u64, key: &[u8]) -> Option<Handle> {
        let h = *index.by_hash.get(&hash)?;
        if self.view(h).key == key {
            return Some(h);
        }
        index.collided.get(key).copied()
    }

    /// Writes a new slot for `key` and `value`; returns its handle.
    fn place(&mut self, key: &[u8], value: Option<&[u8]>) -> Handle {
        let len = value.map_or(0, <[u8]>::len);
        let cap = len + SLACK;
        let size = SLOT_HEADER + key.len() + cap;
        let fits = self
            .slabs
            .last()
            .is_some_and(|s| s.capacity() - s.len() >= size);
        if !fits {
            self.slabs.push(Vec::with_capacity(size.max(SLAB)));
        }
        let n = self.slabs.len() - 1;
        let slab = &mut self.slabs[n];
        let at = slab.len();
        slab.extend_from_slice(&[0; SLOT_HEADER]);
        slab.extend_from_slice(key);
        slab.extend_from_slice(value.unwrap_or_default());
        slab.resize(at + size, 0);
        write_u32(slab, at, key.len());
        write_u32(slab, at + 4, cap);
        write_u32(slab, at + 8, len);
        slab[at + 12] = u8::from(value.is_some());
        self.slab_bytes += size;
        ((n as u64) << 32) | at as u64
    }

    /// Sets (or removes, with `None`) a record of `client`. Keys and values must be shorter
    /// than 4 GiB (the log's frames already are).
    pub(super) fn insert(&mut self, client: &[u8], key: &[u8], value: Option<&[u8]>) {
        let hash = self.hasher.hash_one(key);
        self.insert_hashed(client, hash, key, value);
    }

    fn insert_hashed(&mut self, client: &[u8], hash: u64, key: &[u8], value: Option<&[u8]>) {
        let found = self
            .clients
            .get(client)
            .and_then(|index| self.find(index, hash, key));
        if let Some(h) = found {
            let (n, at) = ((h >> 32) as usize, (h & 0xffff_ffff) as usize);
            let slab = &mut self.slabs[n];
            let klen = read_u32(slab, at);
            let cap = read_u32(slab, at + 4);
            let len = value.map_or(0, <[u8]>::len);
            if len <= cap {
                let start = at + SLOT_HEADER + klen;
                slab[start..start + len].copy_from_slice(value.unwrap_or_default());
                write_u32(slab, at + 8, len);
                slab[at + 12] = u8::from(value.is_some());
                return;
            }
        }
        let h = self.place(key, value);
        let index = match self.clients.get_mut(client) {
            Some(index) => index,
            None => self.clients.entry(client.into()).or_default(),
        };
        match found {
            // Outgrew its slot: the same entry points to the new one.
            Some(old) => {
                if index.by_hash.get(&hash) == Some(&old) {
                    index.by_hash.insert(hash, h);
                } else {
                    index.collided.insert(key.into(), h);
                }
            }
            None => {
                self.records += 1;
                self.slab_bytes += INDEX_ENTRY;
                match index.by_hash.entry(hash) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(h);
                    }
                    std::collections::hash_map::Entry::Occupied(_) => {
                        index.collided.insert(key.into(), h);
                    }
                }
            }
        }
    }

    /// The record under `key`: `None` when the buffer does not have it (sled may), `Some(None)`
    /// when it was removed.
    pub(super) fn get(&self, client: &[u8], key: &[u8]) -> Option<Option<&[u8]>> {
        self.get_hashed(client, self.hasher.hash_one(key), key)
    }

    fn get_hashed(&self, client: &[u8], hash: u64, key: &[u8]) -> Option<Option<&[u8]>> {
        let index = self.clients.get(client)?;
        let h = self.find(index, hash, key)?;
        Some(self.view(h).value)
    }

    /// Adds the client's records under `prefix` to `out` (`None`: removed), replacing what it
    /// holds for them.
    pub(super) fn scan_into(
        &self,
        client: &[u8],
        prefix: &[u8],
        out: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    ) {
        let Some(index) = self.clients.get(client) else {
            return;
        };
        for h in index.by_hash.values().chain(index.collided.values()) {
            let v = self.view(*h);
            if v.key.starts_with(prefix) {
                out.insert(v.key.to_vec(), v.value.map(<[u8]>::to_vec));
            }
        }
    }

    /// Every record (`None`: removed), in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.clients
            .values()
            .flat_map(|index| index.by_hash.values().chain(index.collided.values()))
            .map(|h| {
                let v = self.view(*h);
                (v.key, v.value)
            })
    }

    /// Roughly the memory held: slabs used and index entries.
    pub(super) fn bytes(&self) -> usize {
        self.slab_bytes
    }

    pub(super) fn records(&self) -> usize {
        self.records
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_kept_by_client_replaced_and_grown() {
        let mut m = Memtable::default();
        m.insert(b"acme", b"da\0x", Some(b"one"));
        m.insert(b"acme", b"da\0y", None);
        m.insert(b"acme", b"ka\0x", Some(b"k"));
        m.insert(b"zed", b"dz\0x", Some(b"z"));
        let before = m.bytes();
        // In place: no more room taken.
        m.insert(b"acme", b"da\0x", Some(b"three"));
        assert_eq!(m.bytes(), before);
        assert_eq!(m.records(), 4);
        assert_eq!(m.get(b"acme", b"da\0x"), Some(Some(&b"three"[..])));
        assert_eq!(m.get(b"acme", b"da\0y"), Some(None));
        assert_eq!(m.get(b"acme", b"dz\0x"), None);
        assert_eq!(m.get(b"nobody", b"da\0x"), None);
        // Outgrowing the slot moves the record.
        let big = vec![7u8; 100];
        m.insert(b"acme", b"da\0x", Some(&big));
        assert!(m.bytes() > before);
        assert_eq!(m.get(b"acme", b"da\0x"), Some(Some(&big[..])));
        m.insert(b"acme", b"da\0x", None);
        assert_eq!(m.get(b"acme", b"da\0x"), Some(None));
        let mut out = BTreeMap::new();
        m.scan_into(b"acme", b"da\0", &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(m.iter().count(), 4);
        assert_eq!(m.records(), 4);
        assert!(!m.is_empty() && Memtable::default().is_empty());
        // A record larger than a slab gets one of its own.
        let huge = vec![1u8; SLAB + 5];
        m.insert(b"zed", b"big", Some(&huge));
        m.insert(b"zed", b"after", Some(b"a"));
        assert_eq!(m.get(b"zed", b"big"), Some(Some(&huge[..])));
        assert_eq!(m.get(b"zed", b"after"), Some(Some(&b"a"[..])));
    }

    #[test]
    fn colliding_hashes_keep_both_records() {
        let mut m = Memtable::default();
        // Two keys filed under one hash, as if SipHash had collided.
        m.insert_hashed(b"acme", 42, b"first", Some(b"1"));
        m.insert_hashed(b"acme", 42, b"second", Some(b"2"));
        assert_eq!(m.records(), 2);
        assert_eq!(m.get_hashed(b"acme", 42, b"first"), Some(Some(&b"1"[..])));
        assert_eq!(m.get_hashed(b"acme", 42, b"second"), Some(Some(&b"2"[..])));
        assert_eq!(m.get_hashed(b"acme", 42, b"third"), None);
        // Rewritten in place, then grown out of their slots: each stays itself.
        m.insert_hashed(b"acme", 42, b"second", Some(b"3"));
        m.insert_hashed(b"acme", 42, b"first", Some(&[9u8; 64]));
        m.insert_hashed(b"acme", 42, b"second", Some(&[8u8; 64]));
        assert_eq!(
            m.get_hashed(b"acme", 42, b"first"),
            Some(Some(&[9u8; 64][..]))
        );
        assert_eq!(
            m.get_hashed(b"acme", 42, b"second"),
            Some(Some(&[8u8; 64][..]))
        );
        assert_eq!(m.records(), 2);
        assert_eq!(m.iter().count(), 2);
        let mut out = BTreeMap::new();
        m.scan_into(b"acme", b"", &mut out);
        assert_eq!(out.len(), 2);
    }
}

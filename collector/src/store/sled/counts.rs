//! The count index: for each client counted since the collector started, every device's
//! counting summary in memory (about 50 bytes a device), so `GetCounts` reads no record.
//!
//! It is a cache of what the store holds, never a source: a client's index is read from the
//! summaries at the head of its device records on its first count, and kept in step by every
//! commit of that client afterwards. Both happen under the client's writer lock (see
//! `ClientLocks`), so no commit falls between reading the store and publishing the index.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use crate::policy::{DeviceSummary, Policy, Tally};

/// A summary with its own category label, as a commit hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OwnedSummary {
    pub last_seen_ms: u64,
    pub category: String,
    pub weak_only: bool,
    pub named: bool,
}

impl OwnedSummary {
    pub(super) fn of(s: &DeviceSummary<'_>) -> Self {
        OwnedSummary {
            last_seen_ms: s.last_seen_ms,
            category: s.category.to_owned(),
            weak_only: s.weak_only,
            named: s.named,
        }
    }
}

/// What a commit changed: device id and its summary now (`None`: deleted).
pub(super) type Changes = Vec<(String, Option<OwnedSummary>)>;

#[derive(Debug, Default)]
pub(super) struct CountIndex {
    clients: Mutex<HashMap<String, Arc<RwLock<ClientIndex>>>>,
    /// Bumped by [`CountIndex::clear`]: an index read from the store before a clear may hold
    /// what the clear was for, and is not published.
    generation: std::sync::atomic::AtomicU64,
}

impl CountIndex {
    /// Forgets every client's index (after a failed write was dropped from the store: the
    /// indexes may count it); each is read again on its client's next count.
    pub(super) fn clear(&self) {
        let mut clients = self.lock();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        clients.clear();
    }

    /// The generation to hand [`CountIndex::insert`] for an index about to be read.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The client's index, if it has been read.
    pub(super) fn get(&self, client: &str) -> Option<Arc<RwLock<ClientIndex>>> {
        self.lock().get(client).cloned()
    }

    /// Publishes a client's index read from the store (under the client's writer lock), unless
    /// the indexes were cleared since `generation`: then `None`, and it must be read again.
    pub(super) fn insert(
        &self,
        client: &str,
        index: ClientIndex,
        generation: u64,
    ) -> Option<Arc<RwLock<ClientIndex>>> {
        let mut clients = self.lock();
        if self.generation() != generation {
            return None;
        }
        let index = Arc::new(RwLock::new(index));
        clients.insert(client.to_owned(), Arc::clone(&index));
        Some(index)
    }

    /// Applies a commit's changes (under the client's writer lock); a client whose index was
    /// never read has nothing to update: its first count reads the store, commit included.
    pub(super) fn update(&self, client: &str, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        if let Some(index) = self.get(client) {
            let mut index = index.write().unwrap_or_else(|p| p.into_inner());
            for (id, summary) in changes {
                match summary {
                    Some(s) => index.put(&id, &s),
                    None => index.remove(&id),
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<RwLock<ClientIndex>>>> {
        // Inserts and lookups only: a panic cannot leave the map half-changed.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One client's summaries. Device ids are 20 hex digits (see [`crate::identity::device_id`]),
/// kept as their 10 bytes; any other id is kept as it is.
#[derive(Debug, Default)]
pub(super) struct ClientIndex {
    by_id: HashMap<[u8; 10], Compact>,
    other: HashMap<Box<str>, Compact>,
    /// Category labels, interned: a client's devices have a handful.
    categories: Vec<Box<str>>,
}

#[derive(Debug, Clone, Copy)]
struct Compact {
    last_seen_ms: u64,
    category: u16,
    weak_only: bool,
    named: bool,
}

fn short_id(id: &str) -> Option<[u8; 10]> {
    let mut out = [0u8; 10];
    hex::decode_to_slice(id, &mut out).ok()?;
    // Upper-case digits would decode too; only the canonical form maps back to the same id.
    (id.bytes().all(|b| !b.is_ascii_uppercase())).then_some(out)
}

impl ClientIndex {
    pub(super) fn put(&mut self, id: &str, s: &OwnedSummary) {
        self.put_summary(
            id,
            &DeviceSummary {
                last_seen_ms: s.last_seen_ms,
                category: &s.category,
                weak_only: s.weak_only,
                named: s.named,
            },
        );
    }

    pub(super) fn put_summary(&mut self, id: &str, s: &DeviceSummary<'_>) {
        let category = match self.categories.iter().position(|c| **c == *s.category) {
            Some(i) => i,
            None => {
                self.categories.push(s.category.into());
                self.categories.len() - 1
            }
        };
        let compact = Compact {
            last_seen_ms: s.last_seen_ms,
            // Labels come from a fixed list of categories; u16 is far beyond it.
            category: u16::try_from(category).unwrap_or(u16::MAX),
            weak_only: s.weak_only,
            named: s.named,
        };
        match short_id(id) {
            Some(k) => {
                self.by_id.insert(k, compact);
            }
            None => {
                self.other.insert(id.into(), compact);
            }
        }
    }

    fn remove(&mut self, id: &str) {
        match short_id(id) {
            Some(k) => self.by_id.remove(&k),
            None => self.other.remove(id),
        };
    }

    /// The client's counts under `policy` at `now_ms`.
    pub(super) fn tally(&self, policy: &Policy, now_ms: u64) -> Tally {
        let mut tally = Tally::default();
        for c in self.by_id.values().chain(self.other.values()) {
            let category = self
                .categories
                .get(usize::from(c.category))
                .map_or("unknown", |c| c);
            tally.add_summary(
                policy,
                &DeviceSummary {
                    last_seen_ms: c.last_seen_ms,
                    category,
                    weak_only: c.weak_only,
                    named: c.named,
                },
                now_ms,
            );
        }
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_counts_what_it_was_told() {
        let summary = |seen: u64, category: &str, weak_only: bool| OwnedSummary {
            last_seen_ms: seen,
            category: category.into(),
            weak_only,
            named: false,
        };
        let mut i = ClientIndex::default();
        i.put("00112233445566778899", &summary(100, "computer", false));
        i.put("aabbccddeeff00112233", &summary(100, "printer", true));
        i.put("odd id", &summary(100, "computer", false));
        i.put("00112233445566778899", &summary(200, "computer", false));
        let t = i.tally(&Policy::default(), 300);
        assert_eq!(t.devices, 3);
        assert_eq!(t.by_category.get("computer"), Some(&2));
        i.remove("odd id");
        i.remove("AABBCCDDEEFF00112233");
        assert_eq!(i.tally(&Policy::default(), 300).devices, 2);
        i.remove("aabbccddeeff00112233");
        assert_eq!(i.tally(&Policy::default(), 300).devices, 1);
        assert_eq!(short_id("AABBCCDDEEFF00112233"), None);
    }
}

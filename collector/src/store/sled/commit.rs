//! Group commit: many writers' batches applied together, then made durable by one flush.
//!
//! sled guards every write batch with a process-wide lock that also stops readers, and its
//! flush holds the read side of that lock until the `fsync` returns. So a flush and a batch
//! waiting for it stop every other thread's reads for the length of the `fsync`. The
//! [`Pipeline`] takes turns instead: one thread at a time either applies every batch queued so
//! far (one atomic sled batch for all of them) or flushes everything applied so far, never both
//! at once; whichever writer finds the pipeline idle does the next turn for everyone. Writers
//! work out their batches meanwhile (reads only), on every core.

use std::{
    collections::HashMap,
    sync::{Condvar, Mutex, MutexGuard},
};

use super::{StoreError, engine};

/// One writer's batch: `graph` keys and their new values (`None` removes).
pub(super) type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A writer's place in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ticket(u64);

#[derive(Debug, Default)]
pub(super) struct Pipeline {
    state: Mutex<State>,
    turn_over: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Batches waiting to be applied, in ticket order, from ticket `applied` on.
    queue: Vec<Writes>,
    /// The next ticket to hand out.
    issued: u64,
    /// Every ticket below this has been applied (or failed).
    applied: u64,
    /// Every ticket below this is durable (or failed).
    durable: u64,
    /// A turn (an apply or a flush) is under way.
    busy: bool,
    /// Why tickets failed to apply, until their writers learn it.
    failed: HashMap<u64, String>,
}

impl Pipeline {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is a few assignments made whole under the lock; a panic
        // elsewhere cannot leave it half-made.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.turn_over
            .wait(state)
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a batch; it is applied after every batch queued before it.
    pub(super) fn submit(&self, writes: Writes) -> Ticket {
        let mut s = self.lock();
        let t = s.issued;
        s.issued += 1;
        s.queue.push(writes);
        Ticket(t)
    }

    /// Returns once the ticket's batch is applied (visible to readers, not yet durable),
    /// applying the queue itself when no one else is taking a turn.
    pub(super) fn wait_applied(&self, graph: &sled::Tree, t: Ticket) -> Result<(), StoreError> {
        let mut s = self.lock();
        loop {
            if s.applied > t.0 {
                return match s.failed.remove(&t.0) {
                    Some(reason) => Err(StoreError::Engine(reason)),
                    None => Ok(()),
                };
            }
            if s.busy {
                s = self.wait(s);
                continue;
            }
            s.busy = true;
            let group = std::mem::take(&mut s.queue);
            drop(s);
            let result = apply(graph, &group);
            s = self.lock();
            let first = s.applied;
            if let Err(e) = result {
                for ticket in first..first + group.len() as u64 {
                    s.failed.insert(ticket, e.to_string());
                }
            }
            s.applied = first + group.len() as u64;
            s.busy = false;
            self.turn_over.notify_all();
        }
    }

    /// Returns once the ticket's (applied) batch is durable, flushing when no one else is
    /// taking a turn.
    pub(super) fn wait_durable(&self, db: &sled::Db, t: Ticket) -> Result<(), StoreError> {
        let mut s = self.lock();
        while s.durable <= t.0 {
            if s.busy {
                s = self.wait(s);
                continue;
            }
            s = self.flush_turn(db, s)?;
        }
        Ok(())
    }

    /// Makes every write made so far durable, also writes made outside the pipeline: the flush
    /// starts after this call does, in a turn of its own.
    pub(super) fn flush_all(&self, db: &sled::Db) -> Result<(), StoreError> {
        let mut s = self.lock();
        while s.busy {
            s = self.wait(s);
        }
        self.flush_turn(db, s).map(drop)
    }

    /// One flush, covering every batch applied before it starts.
    fn flush_turn<'a>(
        &'a self,
        db: &sled::Db,
        mut s: MutexGuard<'a, State>,
    ) -> Result<MutexGuard<'a, State>, StoreError> {
        s.busy = true;
        let covers = s.applied;
        drop(s);
        let result = db.flush();
        let mut s = self.lock();
        s.busy = false;
        if result.is_ok() {
            s.durable = s.durable.max(covers);
        }
        self.turn_over.notify_all();
        // A failed flush is reported to the writer that ran it; the others try again.
        result.map_err(engine)?;
        Ok(s)
    }
}

/// Applies batches as one atomic sled batch. Batches of one client come one at a time (the
/// client's lock is held until its batch is applied), and different clients' keys never meet,
/// so their order inside the group does not matter.
fn apply(graph: &sled::Tree, group: &[Writes]) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    for (k, v) in group.iter().flatten() {
        match v {
            Some(v) => batch.insert(k.as_slice(), v.as_slice()),
            None => batch.remove(k.as_slice()),
        }
    }
    graph.apply_batch(batch).map_err(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_apply_in_order_and_become_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("open");
        let graph = db.open_tree("graph").expect("tree");
        let p = std::sync::Arc::new(Pipeline::default());
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let (p, db, graph) = (std::sync::Arc::clone(&p), db.clone(), graph.clone());
                std::thread::spawn(move || {
                    for n in 0..50u8 {
                        let t = p.submit(vec![(vec![i, n], Some(vec![n])), (vec![i, n, 0], None)]);
                        p.wait_applied(&graph, t).expect("applied");
                        assert_eq!(graph.get([i, n]).expect("get").as_deref(), Some(&[n][..]));
                        p.wait_durable(&db, t).expect("durable");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(graph.len(), 8 * 50);
        let s = p.lock();
        assert_eq!((s.issued, s.applied), (400, 400));
        assert!(s.durable <= 400 && s.durable >= 1 && s.failed.is_empty() && !s.busy);
    }
}

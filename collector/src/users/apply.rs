//! Applying reads of a source to a client's stored accounts, once for every store: the stores
//! give access to their records through [`Tables`] and commit what it wrote atomically.
//!
//! An agent sends an Active Directory read in parts ([`ReadPart`], one per batch); parts wait
//! (staged, durably) until every part of their read has arrived, and the complete read is then
//! applied as one ([`apply_read`]). A read older than the source's latest applied read changes
//! nothing (an agent resending an old read after a newer one from another agent of the site).
//! Staged parts of unfinished reads are dropped once a newer read completes, and at most
//! [`MAX_PENDING_READS`] unfinished reads wait per source.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Account, MAX_TEXT, SourceKind, SourceStatus, cap};
use crate::graph::SubscribedSku;

/// Most parts a read may have (100 users a part: a million accounts).
pub const MAX_PARTS: u32 = 10_000;
/// Most unfinished reads kept per source.
pub const MAX_PENDING_READS: usize = 3;
/// Longest read id.
pub const MAX_READ_ID: usize = 128;
/// Longest error kept.
pub const MAX_ERROR: usize = 1024;

/// One part of a read, as an agent sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPart {
    pub source: String,
    pub read_id: String,
    /// From 1 to `parts`.
    pub part: u32,
    pub parts: u32,
    pub read_at_ms: u64,
    /// The read failed: no accounts, and the source turns stale.
    pub error: Option<String>,
    pub accounts: Vec<Account>,
}

impl ReadPart {
    /// Checks what the store relies on; the error is one line for the agent.
    pub fn check(&self) -> Result<(), String> {
        if self.read_id.is_empty()
            || self.read_id.len() > MAX_READ_ID
            || self.read_id.chars().any(|c| c.is_control())
        {
            return Err(format!(
                "directory read_id must be 1 to {MAX_READ_ID} characters without control characters"
            ));
        }
        if self.parts == 0 || self.parts > MAX_PARTS || self.part == 0 || self.part > self.parts {
            return Err(format!(
                "directory read part {} of {} is out of range (parts 1 to {MAX_PARTS})",
                self.part, self.parts
            ));
        }
        if self.error.is_some() && (self.parts != 1 || !self.accounts.is_empty()) {
            return Err("a failed directory read is one part without users".into());
        }
        Ok(())
    }
}

/// A complete read of a source, or a failed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub source: String,
    pub kind: SourceKind,
    pub read_id: String,
    pub read_at_ms: u64,
    pub outcome: Result<ReadData, String>,
}

/// What a complete read found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadData {
    pub accounts: Vec<Account>,
    pub skus: Vec<SubscribedSku>,
}

/// A part waiting for the rest of its read, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedPart {
    pub read_id: String,
    pub part: u32,
    pub parts: u32,
    pub read_at_ms: u64,
    pub accounts: Vec<Account>,
}

/// What applying a part or a read did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The part is stored; its read waits for `missing` more parts.
    Staged { missing: u32 },
    /// A complete read replaced the source's accounts.
    Applied {
        present: u64,
        added: u64,
        removed: u64,
    },
    /// A failed read: the source is stale, its accounts unchanged.
    Failed,
    /// Older than (or the same as) the source's latest read: nothing changed.
    Outdated,
}

/// A client's user records, as a store gives them to [`apply_part`] and [`apply_read`]. Writes
/// are committed by the store, atomically, after the call returns `Ok`.
pub trait Tables {
    type Error;
    fn status(&mut self, source: &str) -> Result<Option<SourceStatus>, Self::Error>;
    /// Every staged part of the source.
    fn staged(&mut self, source: &str) -> Result<Vec<StagedPart>, Self::Error>;
    /// Every stored account of the source, present or not.
    fn accounts(&mut self, source: &str) -> Result<Vec<Account>, Self::Error>;
    fn put_staged(&mut self, source: &str, part: &StagedPart) -> Result<(), Self::Error>;
    fn remove_staged(&mut self, source: &str, read_id: &str, part: u32) -> Result<(), Self::Error>;
    fn put_account(&mut self, account: &Account) -> Result<(), Self::Error>;
    fn put_status(&mut self, status: &SourceStatus) -> Result<(), Self::Error>;
}

fn outdated(status: Option<&SourceStatus>, read_id: &str, read_at_ms: u64) -> bool {
    status.is_some_and(|s| s.read_id == read_id || s.read_ms.is_some_and(|r| read_at_ms < r))
}

/// Applies one part of an Active Directory read (checked with [`ReadPart::check`]).
pub fn apply_part<T: Tables>(t: &mut T, part: ReadPart) -> Result<Outcome, T::Error> {
    let status = t.status(&part.source)?;
    if outdated(status.as_ref(), &part.read_id, part.read_at_ms) {
        return Ok(Outcome::Outdated);
    }
    let read = |outcome| Read {
        source: part.source.clone(),
        kind: SourceKind::ActiveDirectory,
        read_id: part.read_id.clone(),
        read_at_ms: part.read_at_ms,
        outcome,
    };
    if let Some(error) = &part.error {
        return apply_read(t, read(Err(error.clone())));
    }
    let staged = t.staged(&part.source)?;
    let mut mine: BTreeMap<u32, &StagedPart> = staged
        .iter()
        .filter(|s| s.read_id == part.read_id && s.parts == part.parts)
        .map(|s| (s.part, s))
        .collect();
    let this = StagedPart {
        read_id: part.read_id.clone(),
        part: part.part,
        parts: part.parts,
        read_at_ms: part.read_at_ms,
        accounts: part.accounts.clone(),
    };
    mine.insert(part.part, &this);
    let have = u32::try_from(mine.len()).unwrap_or(u32::MAX);
    if have < part.parts {
        t.put_staged(&part.source, &this)?;
        drop_excess_reads(t, &part.source, &staged, &part.read_id)?;
        return Ok(Outcome::Staged {
            missing: part.parts - have,
        });
    }
    let accounts: Vec<Account> = mine
        .into_values()
        .flat_map(|s| s.accounts.iter().cloned())
        .collect();
    // The read is complete: its staged parts, and those of every read it supersedes, go.
    for s in &staged {
        if s.read_id == part.read_id || s.read_at_ms <= part.read_at_ms {
            t.remove_staged(&part.source, &s.read_id, s.part)?;
        }
    }
    apply_read(
        t,
        read(Ok(ReadData {
            accounts,
            skus: Vec::new(),
        })),
    )
}

/// Keeps at most [`MAX_PENDING_READS`] unfinished reads (the newest) per source.
fn drop_excess_reads<T: Tables>(
    t: &mut T,
    source: &str,
    staged: &[StagedPart],
    current: &str,
) -> Result<(), T::Error> {
    let mut reads: BTreeMap<&str, u64> = BTreeMap::new();
    for s in staged.iter().filter(|s| s.read_id != current) {
        reads.insert(&s.read_id, s.read_at_ms);
    }
    if reads.len() < MAX_PENDING_READS {
        return Ok(());
    }
    let mut by_age: Vec<(u64, &str)> = reads.into_iter().map(|(id, at)| (at, id)).collect();
    by_age.sort_unstable();
    let drop: BTreeSet<&str> = by_age
        .iter()
        .take(by_age.len() + 1 - MAX_PENDING_READS)
        .map(|(_, id)| *id)
        .collect();
    for s in staged.iter().filter(|s| drop.contains(s.read_id.as_str())) {
        t.remove_staged(source, &s.read_id, s.part)?;
    }
    Ok(())
}

/// Applies a complete read (or records a failed one) to the source's accounts.
pub fn apply_read<T: Tables>(t: &mut T, read: Read) -> Result<Outcome, T::Error> {
    let previous = t.status(&read.source)?;
    if outdated(previous.as_ref(), &read.read_id, read.read_at_ms) {
        return Ok(Outcome::Outdated);
    }
    let mut status = previous.unwrap_or_else(|| SourceStatus::new(&read.source, read.kind));
    status.attempt_ms = status.attempt_ms.max(read.read_at_ms);
    let data = match read.outcome {
        Err(e) => {
            let e = cap(&e, MAX_ERROR);
            status.error = Some(if e.is_empty() {
                "the read failed".into()
            } else {
                e
            });
            t.put_status(&status)?;
            return Ok(Outcome::Failed);
        }
        Ok(data) => data,
    };
    let mut old: BTreeMap<String, Account> = t
        .accounts(&read.source)?
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    let (mut added, mut removed, mut present) = (0, 0, 0);
    let mut seen = BTreeSet::new();
    for mut account in data.accounts {
        if account.source != read.source || !seen.insert(account.id.clone()) {
            continue;
        }
        present += 1;
        account.present = true;
        account.removed_ms = None;
        account.last_seen_ms = read.read_at_ms;
        match old.remove(&account.id) {
            Some(before) => account.first_seen_ms = before.first_seen_ms.min(read.read_at_ms),
            None => {
                account.first_seen_ms = read.read_at_ms;
                added += 1;
            }
        }
        t.put_account(&account)?;
    }
    for (_, mut gone) in old {
        if gone.present {
            gone.present = false;
            gone.removed_ms = Some(read.read_at_ms);
            removed += 1;
            t.put_account(&gone)?;
        }
    }
    status.read_id = cap(&read.read_id, MAX_TEXT);
    status.read_ms = Some(read.read_at_ms);
    status.accounts = present;
    status.error = None;
    status.skus = data.skus;
    t.put_status(&status)?;
    Ok(Outcome::Applied {
        present,
        added,
        removed,
    })
}

/// [`Tables`] over maps, for the memory store and tests.
#[derive(Debug, Default, Clone)]
pub struct MemTables {
    pub statuses: BTreeMap<String, SourceStatus>,
    /// By (source, read id, part).
    pub staged: BTreeMap<(String, String, u32), StagedPart>,
    /// By (source, account id).
    pub accounts: BTreeMap<(String, String), Account>,
}

impl Tables for MemTables {
    type Error = std::convert::Infallible;

    fn status(&mut self, source: &str) -> Result<Option<SourceStatus>, Self::Error> {
        Ok(self.statuses.get(source).cloned())
    }

    fn staged(&mut self, source: &str) -> Result<Vec<StagedPart>, Self::Error> {
        Ok(self
            .staged
            .iter()
            .filter(|((s, _, _), _)| s == source)
            .map(|(_, p)| p.clone())
            .collect())
    }

    fn accounts(&mut self, source: &str) -> Result<Vec<Account>, Self::Error> {
        Ok(self
            .accounts
            .iter()
            .filter(|((s, _), _)| s == source)
            .map(|(_, a)| a.clone())
            .collect())
    }

    fn put_staged(&mut self, source: &str, part: &StagedPart) -> Result<(), Self::Error> {
        self.staged.insert(
            (source.to_owned(), part.read_id.clone(), part.part),
            part.clone(),
        );
        Ok(())
    }

    fn remove_staged(&mut self, source: &str, read_id: &str, part: u32) -> Result<(), Self::Error> {
        self.staged
            .remove(&(source.to_owned(), read_id.to_owned(), part));
        Ok(())
    }

    fn put_account(&mut self, account: &Account) -> Result<(), Self::Error> {
        self.accounts.insert(
            (account.source.clone(), account.id.clone()),
            account.clone(),
        );
        Ok(())
    }

    fn put_status(&mut self, status: &SourceStatus) -> Result<(), Self::Error> {
        self.statuses.insert(status.source.clone(), status.clone());
        Ok(())
    }
}

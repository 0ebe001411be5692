//! Which target is asked in which round, and what identifies each request on the wire.
//!
//! Round 0 asks every target once; each later round asks again only the targets that stayed
//! silent, up to `1 + retries` rounds, and stops early once every target has answered. A
//! round starts after every request of the previous one has been answered or has timed out,
//! so each re-ask comes at least one timeout after the last. Pure: no I/O, no clock.

use std::net::Ipv4Addr;

/// The plan of one sweep: the unique targets, sorted, and who has answered so far.
#[derive(Debug)]
pub(crate) struct Rounds {
    targets: Vec<Ipv4Addr>,
    answered: Vec<bool>,
    answered_count: usize,
    total_rounds: u32,
    next_round: u32,
}

/// The requests of one round: `(index, address)` of each target to ask, in address order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Round {
    pub(crate) number: u32,
    pub(crate) targets: Vec<(usize, Ipv4Addr)>,
}

/// What an answer from an address means to the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// A target's first answer.
    New,
    /// A target that had already answered.
    Duplicate,
    /// Not one of ours: ignored.
    NotATarget,
}

impl Rounds {
    /// `targets` deduplicated and sorted; `1 + retries` rounds at most.
    pub(crate) fn new(targets: &[Ipv4Addr], retries: u32) -> Self {
        let mut targets = targets.to_vec();
        targets.sort_unstable();
        targets.dedup();
        let n = targets.len();
        Rounds {
            targets,
            answered: vec![false; n],
            answered_count: 0,
            total_rounds: retries.saturating_add(1),
            next_round: 0,
        }
    }

    /// The number of unique targets.
    pub(crate) fn len(&self) -> usize {
        self.targets.len()
    }

    /// The number of targets that have answered.
    pub(crate) fn answered(&self) -> usize {
        self.answered_count
    }

    /// The rounds started so far.
    pub(crate) fn rounds_started(&self) -> u32 {
        self.next_round
    }

    /// The next round, or `None` when the rounds are used up or nobody is left to ask.
    pub(crate) fn next_round(&mut self) -> Option<Round> {
        if self.next_round >= self.total_rounds || self.answered_count == self.targets.len() {
            return None;
        }
        let number = self.next_round;
        self.next_round += 1;
        let targets = self
            .targets
            .iter()
            .zip(&self.answered)
            .enumerate()
            .filter(|(_, (_, answered))| !**answered)
            .map(|(i, (ip, _))| (i, *ip))
            .collect();
        Some(Round { number, targets })
    }

    /// Records that `ip` answered.
    pub(crate) fn mark_answered(&mut self, ip: Ipv4Addr) -> Mark {
        let Ok(i) = self.targets.binary_search(&ip) else {
            return Mark::NotATarget;
        };
        match self.answered.get_mut(i) {
            Some(a) if !*a => {
                *a = true;
                self.answered_count += 1;
                Mark::New
            }
            Some(_) => Mark::Duplicate,
            None => Mark::NotATarget,
        }
    }
}

/// Identifier and sequence number of every request of one sweep.
///
/// On a raw socket every ICMP packet reaching the host is delivered to every raw socket, and
/// surge-ping routes a reply to its waiter by `(address, identifier, sequence)`: random bases
/// keep this sweep's requests apart from other pingers on the host (including other sweeps
/// of this agent), and stale replies of an earlier sweep from matching this one. Each target
/// gets its own identifier (at most 65 536 targets, so they never repeat within a sweep) and
/// each round its own sequence number, so a late reply to round 0 never satisfies round 1.
/// On a Linux ping (DGRAM) socket the kernel sets the identifier itself and only the
/// sequence number is ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestIds {
    pub(crate) ident_base: u16,
    pub(crate) seq_base: u16,
}

impl RequestIds {
    pub(crate) fn random() -> Self {
        RequestIds {
            ident_base: rand::random(),
            seq_base: rand::random(),
        }
    }

    /// `(identifier, sequence)` of the request to target `index` in round `round`.
    pub(crate) fn request(&self, index: usize, round: u32) -> (u16, u16) {
        // Truncation is the point: identifiers and sequence numbers wrap at 16 bits.
        let ident = self.ident_base.wrapping_add((index & 0xffff) as u16);
        let seq = self.seq_base.wrapping_add((round & 0xffff) as u16);
        (ident, seq)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 9, last)
    }

    fn ips(r: &Round) -> Vec<Ipv4Addr> {
        r.targets.iter().map(|(_, ip)| *ip).collect()
    }

    #[test]
    fn targets_are_deduplicated_and_sorted() {
        let mut r = Rounds::new(&[ip(3), ip(1), ip(3), ip(2), ip(1)], 0);
        assert_eq!(r.len(), 3);
        let round = r.next_round().expect("one round");
        assert_eq!(round.number, 0);
        assert_eq!(round.targets, vec![(0, ip(1)), (1, ip(2)), (2, ip(3))]);
        assert_eq!(r.next_round(), None, "no retries");
    }

    #[test]
    fn later_rounds_ask_only_the_silent_targets() {
        let mut r = Rounds::new(&[ip(1), ip(2), ip(3), ip(4)], 2);
        let first = r.next_round().expect("round 0");
        assert_eq!(ips(&first), vec![ip(1), ip(2), ip(3), ip(4)]);
        assert_eq!(r.mark_answered(ip(2)), Mark::New);
        assert_eq!(r.mark_answered(ip(4)), Mark::New);

        let second = r.next_round().expect("round 1");
        assert_eq!(second.number, 1);
        // Indices stay those of the full plan, so identifiers stay per target.
        assert_eq!(second.targets, vec![(0, ip(1)), (2, ip(3))]);
        assert_eq!(r.mark_answered(ip(3)), Mark::New);

        let third = r.next_round().expect("round 2");
        assert_eq!(ips(&third), vec![ip(1)]);
        assert_eq!(r.next_round(), None, "1 + 2 retries = 3 rounds");
        assert_eq!(r.rounds_started(), 3);
        assert_eq!(r.answered(), 3);
    }

    #[test]
    fn stops_early_when_everyone_answered() {
        let mut r = Rounds::new(&[ip(1), ip(2)], 5);
        assert!(r.next_round().is_some());
        r.mark_answered(ip(1));
        r.mark_answered(ip(2));
        assert_eq!(r.next_round(), None);
        assert_eq!(r.rounds_started(), 1);
    }

    #[test]
    fn no_targets_means_no_rounds() {
        let mut r = Rounds::new(&[], 3);
        assert_eq!(r.len(), 0);
        assert_eq!(r.next_round(), None);
    }

    #[test]
    fn duplicates_and_strangers_are_told_apart() {
        let mut r = Rounds::new(&[ip(1)], 1);
        assert_eq!(r.mark_answered(ip(9)), Mark::NotATarget);
        assert_eq!(r.mark_answered(ip(1)), Mark::New);
        assert_eq!(r.mark_answered(ip(1)), Mark::Duplicate);
        assert_eq!(r.answered(), 1);
    }

    #[test]
    fn retries_do_not_overflow() {
        let mut r = Rounds::new(&[ip(1)], u32::MAX);
        assert!(r.next_round().is_some());
        assert!(r.next_round().is_some());
    }

    #[test]
    fn request_ids_are_unique_per_target_and_round() {
        let ids = RequestIds {
            ident_base: 0xfff0,
            seq_base: 0xfffe,
        };
        // Identifiers wrap but never repeat across 65 536 targets.
        let idents: HashSet<u16> = (0..65_536).map(|i| ids.request(i, 0).0).collect();
        assert_eq!(idents.len(), 65_536);
        assert_eq!(ids.request(0x10, 0).0, 0x0000);
        // Each round has its own sequence number, also across the wrap.
        let seqs: HashSet<u16> = (0..11).map(|round| ids.request(5, round).1).collect();
        assert_eq!(seqs.len(), 11);
        assert_eq!(ids.request(5, 2).1, 0x0000);
        assert_eq!(ids.request(7, 1).0, 0xfff7);
    }
}

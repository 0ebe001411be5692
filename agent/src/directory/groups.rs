//! Nested group membership, without I/O: a user's memberOf in Active Directory names only the
//! groups the user is a direct member of, but a user in "Contractors", itself a member of
//! "Billing Exclusions", is a member of "Billing Exclusions" too, and the collector's policy
//! must see that. A read therefore also searches for every group under the base DN with its
//! own memberOf; [`GroupGraph`] holds the group → parent groups map and [`GroupGraph::closure`]
//! expands a user's direct groups to every group they are in, nested included.
//!
//! AD allows membership cycles (A in B, B in A): the closure is a breadth-first walk with a
//! visited set, so a cycle is walked once. Everything is bounded: the groups read
//! ([`MAX_DIRECTORY_GROUPS`]), the parent links kept ([`MAX_GROUP_LINKS`]), and the groups a
//! user is sent with ([`MAX_MEMBER_OF`]).
//!
//! DNs are compared as the directory compares them, case-insensitively: [`normalise`] is the
//! capped text ([`cap_text`]) lowercased and trimmed. The DNs a user is sent with are the
//! directory's own spelling (the first one seen).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use super::convert::cap_text;
use super::entry::{MAX_MEMBER_OF, RawEntry};

/// The filter for group objects (security and distribution groups, any scope).
pub const GROUP_FILTER: &str = "(objectClass=group)";

/// What a search for groups asks for: the group's own groups.
pub const GROUP_ATTRIBUTES: [&str; 1] = ["memberOf"];

/// The most groups a read accepts; past it the read fails rather than resolve nesting from
/// part of the directory (which could miss an exclusion group and miscount).
pub const MAX_DIRECTORY_GROUPS: usize = 250_000;

/// The most group → parent links kept over the whole directory (4 bytes each).
pub const MAX_GROUP_LINKS: usize = 2_000_000;

/// The key a DN is compared by: its capped text, lowercased (AD compares DNs without regard to
/// ASCII case) and without surrounding spaces.
pub fn normalise(dn: &str) -> String {
    cap_text(dn.trim().as_bytes()).to_ascii_lowercase()
}

/// Why a group could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// More than [`MAX_DIRECTORY_GROUPS`] groups.
    Groups,
    /// More than [`MAX_GROUP_LINKS`] parent links.
    Links,
}

/// Every group of a directory and the groups each is a direct member of.
#[derive(Debug, Default, Clone)]
pub struct GroupGraph {
    /// Every DN seen (groups and their parents), as the directory spells it.
    names: Vec<String>,
    /// [`normalise`]d DN → index in `names`.
    index: HashMap<String, u32>,
    /// Group index → its parents' indices.
    parents: HashMap<u32, Vec<u32>>,
    groups: usize,
    links: usize,
}

/// A user's groups, nested included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closure {
    /// Sorted (by DN, as the user's direct memberOf is), at most [`MAX_MEMBER_OF`].
    pub groups: Vec<String>,
    /// How many groups there are in all: more than `groups.len()` when the cap cut some.
    pub total: usize,
}

impl GroupGraph {
    pub fn new() -> Self {
        Self::default()
    }

    /// Groups added.
    pub fn groups(&self) -> usize {
        self.groups
    }

    fn intern(&mut self, dn: &str) -> u32 {
        let key = normalise(dn);
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        let i = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(cap_text(dn.trim().as_bytes()));
        self.index.insert(key, i);
        i
    }

    /// Adds group `dn`, a direct member of `parents`. A group seen twice (a server that repeats
    /// an entry across pages) has its parents merged.
    pub fn add_group<'a>(
        &mut self,
        dn: &str,
        parents: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Full> {
        if dn.trim().is_empty() {
            return Ok(());
        }
        let group = self.intern(dn);
        if !self.parents.contains_key(&group) {
            if self.groups >= MAX_DIRECTORY_GROUPS {
                return Err(Full::Groups);
            }
            self.groups += 1;
            self.parents.insert(group, Vec::new());
        }
        for parent in parents {
            if parent.trim().is_empty() {
                continue;
            }
            if self.links >= MAX_GROUP_LINKS {
                return Err(Full::Links);
            }
            let p = self.intern(parent);
            let list = self.parents.entry(group).or_default();
            if p != group && !list.contains(&p) {
                list.push(p);
                self.links += 1;
            }
        }
        Ok(())
    }

    /// Adds a group entry of the group search (its DN, its memberOf).
    pub fn add_entry(&mut self, entry: &RawEntry) -> Result<(), Full> {
        let dn = String::from_utf8_lossy(&entry.dn).into_owned();
        let parents: Vec<String> = entry
            .values("memberOf")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        self.add_group(&dn, parents.iter().map(String::as_str))
    }

    /// Every group a member of the groups `direct` is in: `direct` itself and, transitively,
    /// every group each is a member of. Groups the graph does not know (outside the base DN,
    /// or read before they existed) are kept as they are, with no parents.
    pub fn closure<'a>(&self, direct: impl IntoIterator<Item = &'a str>) -> Closure {
        let mut unknown: HashSet<String> = HashSet::new();
        // The spelling sent, sorted as `to_user` sorts direct groups.
        let mut out: BTreeSet<String> = BTreeSet::new();
        let mut queue: VecDeque<u32> = VecDeque::new();
        let mut visited: HashSet<u32> = HashSet::new();
        for dn in direct {
            if dn.trim().is_empty() {
                continue;
            }
            let key = normalise(dn);
            match self.index.get(&key) {
                Some(&i) => {
                    if visited.insert(i) {
                        queue.push_back(i);
                    }
                }
                None => {
                    if unknown.insert(key) {
                        out.insert(cap_text(dn.trim().as_bytes()));
                    }
                }
            }
        }
        while let Some(i) = queue.pop_front() {
            if let Some(name) = self.names.get(i as usize) {
                out.insert(name.clone());
            }
            for &p in self.parents.get(&i).map(Vec::as_slice).unwrap_or_default() {
                if visited.insert(p) {
                    queue.push_back(p);
                }
            }
        }
        let total = out.len();
        Closure {
            groups: out.into_iter().take(MAX_MEMBER_OF).collect(),
            total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> GroupGraph {
        let mut g = GroupGraph::new();
        for (dn, parents) in edges {
            g.add_group(dn, parents.iter().copied()).expect("room");
        }
        g
    }

    const EXCL: &str = "CN=Billing Exclusions,CN=Users,DC=lab";
    const MID: &str = "CN=Contractors,CN=Users,DC=lab";
    const INNER: &str = "CN=Contractors EU,CN=Users,DC=lab";

    #[test]
    fn nesting_is_followed_to_any_depth() {
        let g = graph(&[(EXCL, &[]), (MID, &[EXCL]), (INNER, &[MID])]);
        let c = g.closure([INNER]);
        assert_eq!(c.groups, [EXCL, INNER, MID], "sorted, all three");
        assert_eq!(c.total, 3);
        // A chain of 500 groups, each in the next.
        let names: Vec<String> = (0..500).map(|i| format!("CN=G{i:03},DC=lab")).collect();
        let mut g = GroupGraph::new();
        for w in names.windows(2) {
            g.add_group(&w[0], [w[1].as_str()]).expect("room");
        }
        let c = g.closure([names[0].as_str()]);
        assert_eq!(c.total, 500);
        assert_eq!(c.groups, names);
    }

    #[test]
    fn cycles_end_and_count_each_group_once() {
        let a = "CN=A,DC=lab";
        let b = "CN=B,DC=lab";
        let c = "CN=C,DC=lab";
        let g = graph(&[(a, &[b]), (b, &[a, c]), (c, &[a, c])]);
        for start in [a, b, c] {
            let closure = g.closure([start, start]);
            assert_eq!(closure.groups, [a, b, c], "from {start}");
            assert_eq!(closure.total, 3);
        }
        // A group that names itself.
        let g = graph(&[(a, &[a])]);
        assert_eq!(g.closure([a]).groups, [a]);
    }

    #[test]
    fn dns_match_whatever_their_case_and_keep_the_directorys_spelling() {
        let g = graph(&[(MID, &[EXCL]), (EXCL, &[])]);
        let c = g.closure(["cn=contractors,cn=users,dc=LAB ", MID]);
        assert_eq!(
            c.groups,
            [EXCL, MID],
            "one group, spelt as the directory does"
        );
        assert_eq!(normalise(" CN=A,DC=Lab "), "cn=a,dc=lab");
        // A parent named in another case is the same group.
        let g = graph(&[("CN=X,DC=lab", &["cn=y,dc=lab"]), ("CN=Y,DC=lab", &[EXCL])]);
        let c = g.closure(["CN=X,DC=lab"]);
        assert_eq!(c.groups, [EXCL, "CN=X,DC=lab", "cn=y,dc=lab"]);
        // Groups the graph does not know are kept as they are; empty ones are dropped.
        let c = g.closure(["CN=Elsewhere,DC=other", "", "  "]);
        assert_eq!(c.groups, ["CN=Elsewhere,DC=other"]);
        // Hostile lengths are capped as every other string is.
        let long = format!("CN={},DC=lab", "x".repeat(1000));
        let g = graph(&[(&long, &[EXCL])]);
        let c = g.closure([long.as_str()]);
        assert_eq!(c.total, 2);
        assert!(
            c.groups
                .iter()
                .all(|g| g.len() <= super::super::convert::MAX_TEXT_BYTES)
        );
        assert!(c.groups.contains(&EXCL.to_owned()));
    }

    #[test]
    fn a_user_is_sent_with_at_most_the_cap_and_the_total_says_so() {
        let hub = "CN=Hub,DC=lab";
        let many: Vec<String> = (0..MAX_MEMBER_OF + 10)
            .map(|i| format!("CN=P{i:05},DC=lab"))
            .collect();
        let mut g = GroupGraph::new();
        g.add_group(hub, many.iter().map(String::as_str))
            .expect("room");
        let c = g.closure([hub]);
        assert_eq!(c.total, MAX_MEMBER_OF + 11);
        assert_eq!(c.groups.len(), MAX_MEMBER_OF);
        assert!(
            c.groups.windows(2).all(|w| w[0] < w[1]),
            "the first N, sorted"
        );
    }

    #[test]
    fn the_graph_is_bounded() {
        let mut g = GroupGraph::new();
        for i in 0..MAX_DIRECTORY_GROUPS {
            g.add_group(&format!("CN={i}"), []).expect("room");
        }
        assert_eq!(g.groups(), MAX_DIRECTORY_GROUPS);
        // A group seen again is no new group.
        g.add_group("cn=0", ["CN=1"]).expect("the same group");
        assert_eq!(g.add_group("CN=one too many", []), Err(Full::Groups));
    }
}

//! Where chunk data lives in a cluster: the members (data nodes), the replication factor R,
//! and for every chunk the nodes holding a copy ("holders") and which of those copies are out
//! of date ("stale"). Part of the replicated state, so every replica agrees on it; pure (no
//! I/O, no clock), so the simulator runs it.
//!
//! The target placement of a chunk is a deterministic function of the chunk id and the
//! membership: rendezvous (highest random weight) hashing, one node per failure domain first
//! ([`place`]). Holders normally equal the target; after a membership change they differ and
//! [`Placement::plan`] lists the moves that bring them back: add the missing target nodes as
//! stale holders (the leader then copies the data and records them current), and once every
//! target node holds a current copy, drop the holders outside the target. A chunk therefore
//! never has fewer current copies during a move than before it.
//!
//! A single-node server (no cluster) has no members; chunks then have no recorded holders.

use crate::codec::{Reader, Writer};
use crate::types::{ChunkId, Errno};
use std::collections::{BTreeMap, BTreeSet};

/// Largest replication factor.
pub const MAX_REPLICAS: usize = 5;

/// A data node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// RPC address (`host:port`).
    pub addr: String,
    /// Failure domain (rack, host, ...): copies of a chunk go to distinct domains first.
    pub domain: String,
}

/// A change [`Placement::plan`] proposes for one chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Move {
    /// Target nodes without a copy: record them as (stale) holders, then copy the data.
    Add {
        /// The chunk.
        chunk: ChunkId,
        /// Nodes to add.
        nodes: Vec<u64>,
    },
    /// Holders outside the target, now that every target node is current: forget them (and
    /// delete their copies).
    Drop {
        /// The chunk.
        chunk: ChunkId,
        /// Nodes to drop.
        nodes: Vec<u64>,
    },
}

/// Counts for status displays.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Chunks with recorded holders.
    pub chunks: u64,
    /// Chunks with fewer current copies than the effective replication factor.
    pub under_replicated: u64,
    /// Chunks with no current copy at all (data lost unless a removed node comes back).
    pub lost: u64,
    /// Chunks whose holders differ from their target placement (moves pending).
    pub misplaced: u64,
    /// Stale copies (to repair).
    pub stale_copies: u64,
}

/// The placement state (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    members: BTreeMap<u64, Member>,
    /// Ids of removed members: never reused (a returning old node must join afresh).
    removed: BTreeSet<u64>,
    replicas: usize,
    holders: BTreeMap<ChunkId, Vec<u64>>,
    stale: BTreeMap<ChunkId, BTreeSet<u64>>,
    /// Per chunk, how many times a holder was marked stale or added (absent: 0). Changes to the
    /// chunk's data carry it, so a node refuses a change older than its latest repair.
    gens: BTreeMap<ChunkId, u64>,
}

/// splitmix64: a fixed, well-mixed 64-bit hash (placement must never depend on a per-process
/// hasher seed).
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The rendezvous weight of `node` for `chunk`.
pub fn weight(chunk: ChunkId, node: u64) -> u64 {
    mix(chunk.0 ^ mix(node))
}

/// The target nodes of `chunk`: the `replicas` highest-weight members, taking the best node
/// of each failure domain before a second node of any domain. Deterministic; adding a member
/// only moves chunks onto it, removing one only moves chunks off it (rendezvous property).
pub fn place(chunk: ChunkId, members: &BTreeMap<u64, Member>, replicas: usize) -> Vec<u64> {
    let mut ranked: Vec<(u64, u64)> = members.keys().map(|&n| (weight(chunk, n), n)).collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    let mut out = Vec::with_capacity(replicas);
    let mut domains = BTreeSet::new();
    for (_, n) in &ranked {
        if out.len() == replicas {
            break;
        }
        if domains.insert(members[n].domain.as_str()) {
            out.push(*n);
        }
    }
    for (_, n) in &ranked {
        if out.len() == replicas {
            break;
        }
        if !out.contains(n) {
            out.push(*n);
        }
    }
    out
}

impl Placement {
    /// A cluster of `members` keeping `replicas` copies of each chunk (clamped to 1..=5).
    pub fn new(members: BTreeMap<u64, Member>, replicas: usize) -> Placement {
        Placement {
            members,
            replicas: replicas.clamp(1, MAX_REPLICAS),
            ..Placement::default()
        }
    }

    /// Whether this is a cluster (a single-node server has no members).
    pub fn is_cluster(&self) -> bool {
        !self.members.is_empty()
    }

    /// The members.
    pub fn members(&self) -> &BTreeMap<u64, Member> {
        &self.members
    }

    /// Ids removed from the cluster.
    pub fn removed(&self) -> &BTreeSet<u64> {
        &self.removed
    }

    /// The configured replication factor R.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Copies a chunk should have: R, or every member when there are fewer.
    pub fn effective_replicas(&self) -> usize {
        self.replicas.min(self.members.len())
    }

    /// The target placement of `chunk` under the current membership.
    pub fn target(&self, chunk: ChunkId) -> Vec<u64> {
        place(chunk, &self.members, self.replicas)
    }

    /// Records a new chunk on its target nodes (no-op outside a cluster).
    pub fn new_chunk(&mut self, chunk: ChunkId) {
        if self.is_cluster() {
            let t = self.target(chunk);
            self.holders.insert(chunk, t);
        }
    }

    /// Forgets a chunk no file maps any more.
    pub fn forget(&mut self, chunk: ChunkId) {
        self.holders.remove(&chunk);
        self.stale.remove(&chunk);
        self.gens.remove(&chunk);
    }

    /// The chunk's generation (see the field's documentation).
    pub fn generation(&self, chunk: ChunkId) -> u64 {
        self.gens.get(&chunk).copied().unwrap_or(0)
    }

    /// Chunks with a generation recorded.
    pub fn generations(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.gens.keys().copied()
    }

    fn bump(&mut self, chunk: ChunkId) {
        *self.gens.entry(chunk).or_insert(0) += 1;
    }

    /// The nodes holding a copy of `chunk` (current or stale); `None` if none are recorded
    /// (single node, or a chunk from before placement was recorded: every member).
    pub fn holders(&self, chunk: ChunkId) -> Option<&[u64]> {
        self.holders.get(&chunk).map(Vec::as_slice)
    }

    /// Every chunk with its holders.
    pub fn all_holders(&self) -> impl Iterator<Item = (ChunkId, &[u64])> + '_ {
        self.holders.iter().map(|(c, h)| (*c, h.as_slice()))
    }

    /// Nodes whose copy of `chunk` is out of date.
    pub fn stale_nodes(&self, chunk: ChunkId) -> BTreeSet<u64> {
        self.stale.get(&chunk).cloned().unwrap_or_default()
    }

    /// Every (chunk, stale nodes) pair.
    pub fn all_stale(&self) -> impl Iterator<Item = (ChunkId, &BTreeSet<u64>)> + '_ {
        self.stale.iter().map(|(c, n)| (*c, n))
    }

    /// Records that `nodes` missed a change to `chunk` (it must be live).
    pub fn mark_stale(&mut self, chunk: ChunkId, nodes: &[u64]) {
        let nodes: Vec<u64> = match self.holders.get(&chunk) {
            // Only holders can be stale: a node dropped meanwhile has nothing to repair.
            Some(h) => nodes.iter().copied().filter(|n| h.contains(n)).collect(),
            None => nodes.to_vec(),
        };
        if !nodes.is_empty() {
            self.stale.entry(chunk).or_default().extend(nodes);
            self.bump(chunk);
        }
    }

    /// `node`'s copy of `chunk` is current again.
    pub fn repaired(&mut self, chunk: ChunkId, node: u64) {
        if let Some(s) = self.stale.get_mut(&chunk) {
            s.remove(&node);
            if s.is_empty() {
                self.stale.remove(&chunk);
            }
        }
    }

    /// Adds a member (adding an existing member again with the same address and domain is a
    /// no-op: a learner's promotion carries it). A removed id cannot come back, and an id in
    /// use cannot change address.
    pub fn add_member(&mut self, id: u64, member: Member) -> Result<(), Errno> {
        if id == 0 || self.removed.contains(&id) {
            return Err(Errno::Inval);
        }
        if self.members.get(&id).is_some_and(|m| *m != member) {
            return Err(Errno::Exist);
        }
        self.members.insert(id, member);
        Ok(())
    }

    /// Whether `member` may be added as `id` (see [`Placement::add_member`]).
    pub fn may_add(&self, id: u64, member: &Member) -> bool {
        id != 0 && !self.removed.contains(&id) && self.members.get(&id).is_none_or(|m| m == member)
    }

    /// Removes a member for good: it holds nothing any more (its copies count as lost; the
    /// plan re-replicates them). Refused for the last member.
    pub fn remove_member(&mut self, id: u64) -> Result<(), Errno> {
        if !self.members.contains_key(&id) {
            return Ok(());
        }
        if self.members.len() == 1 {
            return Err(Errno::Inval);
        }
        self.members.remove(&id);
        self.removed.insert(id);
        for h in self.holders.values_mut() {
            h.retain(|n| *n != id);
        }
        self.stale.retain(|_, s| {
            s.remove(&id);
            !s.is_empty()
        });
        Ok(())
    }

    /// Adds target nodes of `chunk` as stale holders (step one of a move). Nodes that are not
    /// members, not in the target, or already holders are ignored.
    pub fn add_holders(&mut self, chunk: ChunkId, nodes: &[u64]) {
        let target = self.target(chunk);
        let Some(h) = self.holders.get_mut(&chunk) else {
            return;
        };
        let mut added = false;
        for n in nodes {
            if target.contains(n) && !h.contains(n) {
                h.push(*n);
                self.stale.entry(chunk).or_default().insert(*n);
                added = true;
            }
        }
        if added {
            self.bump(chunk);
        }
    }

    /// Drops holders of `chunk` outside its target (step two of a move), only once every
    /// target node holds a current copy: a move never lowers the number of current copies.
    /// Returns the nodes dropped (their copies may be deleted).
    pub fn drop_holders(&mut self, chunk: ChunkId, nodes: &[u64]) -> Vec<u64> {
        let target = self.target(chunk);
        let stale = self.stale_nodes(chunk);
        let Some(h) = self.holders.get_mut(&chunk) else {
            return Vec::new();
        };
        if !target.iter().all(|t| h.contains(t) && !stale.contains(t)) {
            return Vec::new();
        }
        let gone: Vec<u64> = h
            .iter()
            .copied()
            .filter(|n| nodes.contains(n) && !target.contains(n))
            .collect();
        h.retain(|n| !gone.contains(n));
        if let Some(s) = self.stale.get_mut(&chunk) {
            s.retain(|n| !gone.contains(n));
            if s.is_empty() {
                self.stale.remove(&chunk);
            }
        }
        gone
    }

    /// Up to `limit` moves that bring holders back to the target placement (see the module
    /// documentation). Chunks are visited in id order starting after `after` (so a caller
    /// can walk all chunks in rounds).
    pub fn plan(&self, after: ChunkId, limit: usize) -> Vec<Move> {
        let mut out = Vec::new();
        let range = self
            .holders
            .range(ChunkId(after.0.saturating_add(1))..)
            .chain(self.holders.range(..=after));
        for (c, h) in range {
            if out.len() >= limit {
                break;
            }
            let target = self.target(*c);
            let missing: Vec<u64> = target.iter().copied().filter(|t| !h.contains(t)).collect();
            if !missing.is_empty() {
                out.push(Move::Add {
                    chunk: *c,
                    nodes: missing,
                });
                continue;
            }
            let stale = self.stale.get(c);
            let all_current = target.iter().all(|t| stale.is_none_or(|s| !s.contains(t)));
            let extra: Vec<u64> = h.iter().copied().filter(|n| !target.contains(n)).collect();
            if all_current && !extra.is_empty() {
                out.push(Move::Drop {
                    chunk: *c,
                    nodes: extra,
                });
            }
        }
        out
    }

    /// Counts for status.
    pub fn health(&self) -> Health {
        let want = self.effective_replicas();
        let mut h = Health::default();
        for (c, holders) in &self.holders {
            h.chunks += 1;
            let stale = self.stale.get(c).map_or(0, |s| s.len());
            let current = holders.len() - stale.min(holders.len());
            if current < want {
                h.under_replicated += 1;
            }
            if current == 0 {
                h.lost += 1;
            }
            let target = self.target(*c);
            if target.len() != holders.len() || target.iter().any(|t| !holders.contains(t)) {
                h.misplaced += 1;
            }
            h.stale_copies += stale as u64;
        }
        h
    }

    /// Checks the invariants: holders are distinct members, stale nodes are holders, R in
    /// range.
    pub fn check(&self) -> Result<(), String> {
        if self.is_cluster() && !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(format!("replication factor {} out of range", self.replicas));
        }
        for (c, h) in &self.holders {
            let set: BTreeSet<u64> = h.iter().copied().collect();
            if set.len() != h.len() {
                return Err(format!("{c} has duplicate holders {h:?}"));
            }
            if let Some(n) = h.iter().find(|n| !self.members.contains_key(n)) {
                return Err(format!("{c} held by non-member {n}"));
            }
        }
        for (c, s) in &self.stale {
            if let Some(h) = self.holders.get(c) {
                if let Some(n) = s.iter().find(|n| !h.contains(n)) {
                    return Err(format!("{c} stale on non-holder {n}"));
                }
            }
            if s.is_empty() {
                return Err(format!("{c} has an empty stale set"));
            }
        }
        if let Some(n) = self.members.keys().find(|n| self.removed.contains(n)) {
            return Err(format!("member {n} is also recorded as removed"));
        }
        Ok(())
    }

    /// Encodes: `u8 replicas | u32 n x (u64 id | bytes addr | bytes domain) | u32 n x u64
    /// removed | u32 n x (u64 chunk | u32 m x u64 holder) | u32 n x (u64 chunk | u32 m x u64
    /// stale node) | u32 n x (u64 chunk | u64 generation)`.
    pub fn encode(&self, w: &mut Writer) {
        w.u8(self.replicas as u8);
        w.u32(self.members.len() as u32);
        for (id, m) in &self.members {
            w.u64(*id);
            w.bytes(m.addr.as_bytes());
            w.bytes(m.domain.as_bytes());
        }
        w.u32(self.removed.len() as u32);
        for id in &self.removed {
            w.u64(*id);
        }
        w.u32(self.holders.len() as u32);
        for (c, h) in &self.holders {
            w.u64(c.0);
            w.u32(h.len() as u32);
            for n in h {
                w.u64(*n);
            }
        }
        Self::encode_stale(&self.stale, w);
        w.u32(self.gens.len() as u32);
        for (c, g) in &self.gens {
            w.u64(c.0);
            w.u64(*g);
        }
    }

    /// The stale list alone (namespace snapshot version 2 stored only this).
    pub(crate) fn encode_stale(stale: &BTreeMap<ChunkId, BTreeSet<u64>>, w: &mut Writer) {
        w.u32(stale.len() as u32);
        for (c, nodes) in stale {
            w.u64(c.0);
            w.u32(nodes.len() as u32);
            for n in nodes {
                w.u64(*n);
            }
        }
    }

    pub(crate) fn decode_stale(r: &mut Reader) -> Option<BTreeMap<ChunkId, BTreeSet<u64>>> {
        let n = r.u32()? as usize;
        let mut stale = BTreeMap::new();
        for _ in 0..n {
            let c = ChunkId(r.u64()?);
            let m = r.u32()? as usize;
            let mut nodes = BTreeSet::new();
            for _ in 0..m {
                nodes.insert(r.u64()?);
            }
            stale.insert(c, nodes);
        }
        Some(stale)
    }

    /// Decodes what [`Placement::encode`] wrote.
    pub fn decode(r: &mut Reader) -> Option<Placement> {
        Placement::decode_versioned(r, true)
    }

    /// Decodes a placement, with or without generations (namespace snapshots before version 5
    /// had none).
    pub(crate) fn decode_versioned(r: &mut Reader, with_gens: bool) -> Option<Placement> {
        let replicas = r.u8()? as usize;
        let n = r.u32()? as usize;
        let mut members = BTreeMap::new();
        for _ in 0..n {
            let id = r.u64()?;
            let addr = String::from_utf8(r.bytes()?).ok()?;
            let domain = String::from_utf8(r.bytes()?).ok()?;
            members.insert(id, Member { addr, domain });
        }
        let n = r.u32()? as usize;
        let mut removed = BTreeSet::new();
        for _ in 0..n {
            removed.insert(r.u64()?);
        }
        let n = r.u32()? as usize;
        let mut holders = BTreeMap::new();
        for _ in 0..n {
            let c = ChunkId(r.u64()?);
            let m = r.u32()? as usize;
            let mut h = Vec::with_capacity(m.min(MAX_REPLICAS * 2));
            for _ in 0..m {
                h.push(r.u64()?);
            }
            holders.insert(c, h);
        }
        let stale = Self::decode_stale(r)?;
        let mut gens = BTreeMap::new();
        if with_gens {
            let n = r.u32()? as usize;
            for _ in 0..n {
                gens.insert(ChunkId(r.u64()?), r.u64()?);
            }
        }
        Some(Placement {
            members,
            removed,
            replicas,
            holders,
            stale,
            gens,
        })
    }

    /// Replaces the stale list (decoding an older snapshot).
    pub(crate) fn set_stale(&mut self, stale: BTreeMap<ChunkId, BTreeSet<u64>>) {
        self.stale = stale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(ids: &[u64], domains: usize) -> BTreeMap<u64, Member> {
        ids.iter()
            .map(|&i| {
                (
                    i,
                    Member {
                        addr: format!("10.0.0.{i}:7411"),
                        domain: format!("d{}", i as usize % domains.max(1)),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn place_prefers_distinct_domains() {
        // Six nodes in three domains: three copies always land in three domains.
        let m = members(&[1, 2, 3, 4, 5, 6], 3);
        for c in 0..500 {
            let t = place(ChunkId(c), &m, 3);
            let d: BTreeSet<&str> = t.iter().map(|n| m[n].domain.as_str()).collect();
            assert_eq!(d.len(), 3, "chunk {c}: {t:?}");
        }
    }

    #[test]
    fn place_spreads_evenly() {
        let m = members(&[1, 2, 3, 4], 4);
        let mut count = BTreeMap::new();
        for c in 0..4000 {
            for n in place(ChunkId(c), &m, 3) {
                *count.entry(n).or_insert(0u32) += 1;
            }
        }
        // 3000 expected per node.
        for (n, k) in count {
            assert!(
                (2700..3300).contains(&k),
                "node {n} holds {k} of 12000 copies"
            );
        }
    }

    #[test]
    fn remove_then_plan_restores_copies() {
        let mut p = Placement::new(members(&[1, 2, 3, 4], 4), 3);
        for c in 1..=50 {
            p.new_chunk(ChunkId(c));
        }
        assert_eq!(p.health().under_replicated, 0);
        p.remove_member(2).unwrap();
        let before = p.health();
        assert!(before.under_replicated > 0);
        // Run the plan as the leader would: add, "copy" (repaired), drop.
        for _ in 0..10 {
            for m in p.plan(ChunkId(0), 1000) {
                match m {
                    Move::Add { chunk, nodes } => {
                        p.add_holders(chunk, &nodes);
                        for n in nodes {
                            p.repaired(chunk, n);
                        }
                    }
                    Move::Drop { chunk, nodes } => {
                        p.drop_holders(chunk, &nodes);
                    }
                }
            }
        }
        let h = p.health();
        assert_eq!((h.under_replicated, h.misplaced, h.lost), (0, 0, 0));
        p.check().unwrap();
        assert!(p
            .all_holders()
            .all(|(_, h)| h.len() == 3 && !h.contains(&2)));
        assert!(p.add_member(2, members(&[2], 1)[&2].clone()).is_err());
    }

    #[test]
    fn drop_waits_for_current_copies() {
        let mut p = Placement::new(members(&[1, 2, 3], 3), 3);
        p.new_chunk(ChunkId(9));
        p.add_member(4, members(&[4], 1)[&4].clone()).unwrap();
        let t = p.target(ChunkId(9));
        if !t.contains(&4) {
            return; // this chunk does not move
        }
        p.add_holders(ChunkId(9), &[4]);
        let out: Vec<u64> = [1, 2, 3].into_iter().filter(|n| !t.contains(n)).collect();
        // 4 is still stale: nothing may be dropped yet.
        assert!(p.drop_holders(ChunkId(9), &out).is_empty());
        p.repaired(ChunkId(9), 4);
        assert_eq!(p.drop_holders(ChunkId(9), &out), out);
    }

    proptest! {
        #[test]
        fn rendezvous_moves_only_what_it_must(
            ids in proptest::collection::btree_set(1u64..50, 2..8),
            new in 50u64..60,
            r in 1usize..=5,
            chunks in proptest::collection::vec(any::<u64>(), 1..40),
        ) {
            let ids: Vec<u64> = ids.into_iter().collect();
            let m = members(&ids, 1);
            let mut grown = m.clone();
            grown.insert(new, Member { addr: String::new(), domain: "d0".into() });
            for c in chunks {
                let c = ChunkId(c);
                let before = place(c, &m, r);
                prop_assert_eq!(before.len(), r.min(ids.len()));
                prop_assert_eq!(&before, &place(c, &m, r));
                let after = place(c, &grown, r);
                // A join moves copies only onto the new node.
                for n in &after {
                    prop_assert!(*n == new || before.contains(n));
                }
                // Removing a node only replaces that node's copy.
                let mut shrunk = m.clone();
                shrunk.remove(&ids[0]);
                let s = place(c, &shrunk, r);
                for n in &before {
                    prop_assert!(*n == ids[0] || s.contains(n));
                }
            }
        }

        #[test]
        fn encoding_round_trips(
            ids in proptest::collection::btree_set(1u64..20, 1..6),
            chunks in proptest::collection::vec(1u64..1000, 0..30),
            gone in 0usize..6,
        ) {
            let ids: Vec<u64> = ids.into_iter().collect();
            let mut p = Placement::new(members(&ids, 2), 3);
            for c in &chunks {
                p.new_chunk(ChunkId(*c));
            }
            if let Some(first) = chunks.first() {
                p.mark_stale(ChunkId(*first), &ids);
            }
            if gone < ids.len() {
                let _ = p.remove_member(ids[gone]);
            }
            p.check().map_err(TestCaseError::fail)?;
            let mut w = Writer::default();
            p.encode(&mut w);
            let mut r = Reader::new(&w.0);
            let q = Placement::decode(&mut r).expect("decodes");
            prop_assert!(r.end().is_some());
            prop_assert_eq!(p, q);
        }
    }
}

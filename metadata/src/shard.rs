//! Which metadata shard owns what. The namespace is split over `count` shards (each its own
//! Raft group) so that no shard is a hot spot for a directory tree:
//!
//! - an inode lives on shard `ino % count`: the mapping is predictable from the number alone,
//!   so a client routes `getattr`, `open` or `write` of a known inode without asking anyone;
//! - a directory entry `(parent, name)` lives with its parent directory's inode (so `readdir`,
//!   `lookup` and a create touch one shard, and the parent's mtime and link count change with the
//!   entry, atomically);
//! - a new regular file, symlink or device lives on its parent's shard (create is one-shard);
//! - a new directory lives on shard `hash(parent, name) % count`: the subdirectories of a
//!   directory, and therefore the entries below them, spread over all shards.
//!
//! A chunk id follows the same rule as an inode number (`chunk % count` is the shard of the
//! inode that maps it), so ids handed out by different shards never collide.

use crate::types::InodeId;

/// Most shards a cluster may have.
pub const MAX_SHARDS: u16 = 64;

/// One shard's place in the shard map: its index and how many shards there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardSlot {
    /// This shard, `0..count`.
    pub index: u16,
    /// Shards in the cluster (fixed when the cluster is made).
    pub count: u16,
}

impl ShardSlot {
    /// The whole namespace in one shard (a one-node file system, or a cluster with one shard).
    pub const SINGLE: ShardSlot = ShardSlot { index: 0, count: 1 };

    /// Shard `index` of `count`; `None` unless `index < count <= MAX_SHARDS`.
    pub fn new(index: u16, count: u16) -> Option<ShardSlot> {
        ((1..=MAX_SHARDS).contains(&count) && index < count).then_some(ShardSlot { index, count })
    }

    /// Whether the namespace is split at all.
    pub fn is_sharded(self) -> bool {
        self.count > 1
    }

    /// Whether this shard owns inode `ino` (and the entries of it, if a directory).
    pub fn owns(self, ino: InodeId) -> bool {
        shard_of_id(self.count, ino.0) == self.index
    }

    /// The smallest id `>= floor` this shard may hand out (ids are `index` modulo `count`).
    pub fn align(self, floor: u64) -> u64 {
        let c = u64::from(self.count);
        let rem = floor % c;
        let want = u64::from(self.index);
        if rem <= want {
            floor + (want - rem)
        } else {
            floor + (c - rem) + want
        }
    }
}

/// The shard of an inode number or chunk id.
pub fn shard_of_id(count: u16, id: u64) -> u16 {
    assert!(count >= 1, "a shard map has at least one shard");
    (id % u64::from(count)) as u16
}

/// The shard a new directory `parent/name` is made on.
pub fn shard_of_new_dir(count: u16, parent: InodeId, name: &[u8]) -> u16 {
    (entry_hash(parent, name) % u64::from(count.max(1))) as u16
}

/// A stable 64-bit hash of an entry key (FNV-1a, then a splitmix64 finaliser so that close
/// names spread): part of the shard map, so it must never change.
pub fn entry_hash(parent: InodeId, name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parent.0.to_le_bytes().iter().chain(name) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The voter that should lead `shard`'s group when several shards share the nodes: the
/// voters in id order, shard k on the (k mod n)-th, so S shards on n nodes spread their
/// leaders (and so their proposals, reads and transaction work) over min(S, n) nodes.
pub fn preferred_leader(shard: u16, voters: &[u64]) -> Option<u64> {
    let mut v = voters.to_vec();
    v.sort_unstable();
    v.dedup();
    (!v.is_empty()).then(|| v[usize::from(shard) % v.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_owns_everything() {
        let s = ShardSlot::SINGLE;
        assert!(s.owns(InodeId(1)) && s.owns(InodeId(77)));
        assert_eq!(s.align(5), 5);
        assert_eq!(shard_of_new_dir(1, InodeId(1), b"x"), 0);
    }

    #[test]
    fn bad_slots_are_refused() {
        assert!(ShardSlot::new(3, 3).is_none());
        assert!(ShardSlot::new(0, 0).is_none());
        assert!(ShardSlot::new(0, MAX_SHARDS + 1).is_none());
        assert!(ShardSlot::new(2, 3).is_some());
    }

    /// `entry_hash(1, "home")`, computed independently (Python, same FNV-1a + splitmix64).
    const GOLDEN_HOME: u64 = 0x9505_9d28_4ce7_9df5;

    #[test]
    fn hash_is_stable() {
        // Part of the on-disk layout: a change here moves directories between shards.
        assert_eq!(
            entry_hash(InodeId(1), b"home"),
            entry_hash(InodeId(1), b"home")
        );
        assert_ne!(
            entry_hash(InodeId(1), b"home"),
            entry_hash(InodeId(2), b"home")
        );
        assert_eq!(entry_hash(InodeId(1), b"home"), GOLDEN_HOME);
    }

    #[test]
    fn new_dirs_spread() {
        let count = 4u16;
        let mut per = [0u32; 4];
        for i in 0..4000u32 {
            per[shard_of_new_dir(count, InodeId(1), format!("d{i}").as_bytes()) as usize] += 1;
        }
        for n in per {
            assert!((800..1200).contains(&n), "uneven spread {per:?}");
        }
    }

    proptest! {
        #[test]
        fn align_gives_the_next_owned_id(index in 0u16..8, extra in 1u16..8, floor in 0u64..10_000) {
            let s = ShardSlot::new(index, index + extra).unwrap();
            let a = s.align(floor);
            prop_assert!(a >= floor);
            prop_assert!(a - floor < u64::from(s.count));
            prop_assert!(s.owns(InodeId(a)));
        }
    }

    #[test]
    fn preferred_leaders_spread_over_the_voters() {
        assert_eq!(preferred_leader(0, &[]), None);
        let voters = [7, 3, 5];
        let leaders: Vec<u64> = (0..6)
            .filter_map(|k| preferred_leader(k, &voters))
            .collect();
        assert_eq!(leaders, vec![3, 5, 7, 3, 5, 7]);
        // The order of the list does not matter: every node computes the same.
        assert_eq!(preferred_leader(4, &[5, 7, 3]), Some(5));
    }
}

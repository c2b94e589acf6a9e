//! Blocks of evicted extents read from the object store lately, already checked against their
//! CRCs, so that reads smaller than a block (the kernel asks 128 KiB at a time) and the
//! background restore of the same chunk do not fetch the same block again and again.
//!
//! Keyed by (blob, blob offset of the block): blobs never change once written, so an entry is
//! never stale, only unused. Bounded in bytes; the oldest insertion goes first (reads of an
//! evicted file are mostly sequential, so recency of use would buy little). It also knows
//! which ranges are being fetched, so that a reader waits for the restore's GET of the blocks
//! it wants instead of fetching them a second time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// See the module documentation.
#[derive(Debug)]
pub struct BlockCache {
    capacity_bytes: u64,
    bytes: u64,
    blocks: HashMap<(u128, u64), Arc<[u8]>>,
    order: VecDeque<(u128, u64)>,
    /// Ranges of blobs being fetched now (one per fetching thread).
    fetching: Vec<(u128, std::ops::Range<u64>)>,
}

/// Fetches in flight at once (each is a thread blocked on the store): more is a leak.
const MAX_FETCHING: usize = 4096;

impl BlockCache {
    /// A cache of at most `capacity_bytes` (0: nothing is kept).
    pub fn new(capacity_bytes: u64) -> BlockCache {
        BlockCache {
            capacity_bytes,
            bytes: 0,
            blocks: HashMap::new(),
            order: VecDeque::new(),
            fetching: Vec::new(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The block of `blob` starting at `blob_offset`, if held.
    pub fn get(&self, blob: u128, blob_offset: u64) -> Option<Arc<[u8]>> {
        self.blocks.get(&(blob, blob_offset)).cloned()
    }

    /// The bytes `range` of `blob` if every block of `block_bytes` in it (the last may be
    /// short: it ends the range) is held.
    pub fn get_range(
        &self,
        blob: u128,
        range: std::ops::Range<u64>,
        block_bytes: u64,
    ) -> Option<Vec<u8>> {
        assert!(block_bytes > 0, "blocks have a size");
        let mut out = Vec::with_capacity(range.end.saturating_sub(range.start) as usize);
        let mut at = range.start;
        while at < range.end {
            let b = self.blocks.get(&(blob, at))?;
            let want = (range.end - at).min(block_bytes);
            if b.len() as u64 != want {
                return None;
            }
            out.extend_from_slice(b);
            at += want;
        }
        Some(out)
    }

    /// Whether a fetch in flight covers `range` of `blob` whole.
    pub fn being_fetched(&self, blob: u128, range: &std::ops::Range<u64>) -> bool {
        self.fetching
            .iter()
            .any(|(b, r)| *b == blob && r.start <= range.start && range.end <= r.end)
    }

    /// Records a fetch of `range` of `blob` starting; [`BlockCache::fetched`] ends it.
    pub fn fetching(&mut self, blob: u128, range: std::ops::Range<u64>) {
        assert!(
            self.fetching.len() < MAX_FETCHING,
            "block fetches never ended"
        );
        self.fetching.push((blob, range));
    }

    /// Records a fetch [`BlockCache::fetching`] began as over (done or failed).
    pub fn fetched(&mut self, blob: u128, range: &std::ops::Range<u64>) {
        let i = self
            .fetching
            .iter()
            .position(|(b, r)| *b == blob && r == range);
        assert!(i.is_some(), "a fetch ended that never began");
        if let Some(i) = i {
            self.fetching.swap_remove(i);
        }
    }

    /// Keeps `bytes` (checked blocks of `block_bytes` starting at blob offset `start` of
    /// `blob`; the last may be short), dropping the oldest blocks past the capacity.
    pub fn insert_range(&mut self, blob: u128, start: u64, bytes: &[u8], block_bytes: u64) {
        assert!(block_bytes > 0, "blocks have a size");
        for (i, b) in bytes.chunks(block_bytes as usize).enumerate() {
            self.insert(blob, start + i as u64 * block_bytes, b);
        }
    }

    fn insert(&mut self, blob: u128, blob_offset: u64, block: &[u8]) {
        let len = block.len() as u64;
        if len > self.capacity_bytes {
            return;
        }
        let key = (blob, blob_offset);
        if let Some(old) = self.blocks.get(&key) {
            // Blobs never change: a block fetched twice is the same bytes.
            assert_eq!(old.len(), block.len(), "block {key:?} changed size");
            return;
        }
        while self.bytes + len > self.capacity_bytes {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.blocks.remove(&k) {
                self.bytes -= b.len() as u64;
            }
        }
        self.blocks.insert(key, Arc::from(block));
        self.order.push_back(key);
        self.bytes += len;
        assert!(
            self.bytes <= self.capacity_bytes,
            "block cache over its capacity"
        );
        assert_eq!(
            self.blocks.len(),
            self.order.len(),
            "block cache index out of step"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_come_back_whole_or_not_at_all() {
        let mut c = BlockCache::new(10);
        c.insert_range(1, 100, &[1, 2, 3, 4, 5], 2);
        assert_eq!(c.bytes(), 5);
        assert_eq!(c.get_range(1, 100..105, 2), Some(vec![1, 2, 3, 4, 5]));
        assert_eq!(c.get_range(1, 102..104, 2), Some(vec![3, 4]));
        assert_eq!(c.get_range(1, 104..105, 2), Some(vec![5]));
        // Not block-aligned, another blob, past the end: not held.
        assert_eq!(c.get_range(1, 101..103, 2), None);
        assert_eq!(c.get_range(2, 100..102, 2), None);
        assert_eq!(c.get_range(1, 104..106, 2), None);
        assert_eq!(c.get_range(1, 100..100, 2), Some(vec![]));
        // Past the capacity the oldest go first.
        c.insert_range(1, 200, &[9; 8], 2);
        assert_eq!(c.bytes(), 9);
        assert_eq!(c.get(1, 100), None);
        assert_eq!(c.get(1, 102), None);
        assert_eq!(c.get_range(1, 200..208, 2), Some(vec![9; 8]));
        assert_eq!(c.get_range(1, 104..105, 2), Some(vec![5]));
        // Fetches in flight: covered whole, or not.
        c.fetching(3, 0..8);
        assert!(c.being_fetched(3, &(2..4)) && c.being_fetched(3, &(0..8)));
        assert!(!c.being_fetched(3, &(6..10)) && !c.being_fetched(4, &(2..4)));
        c.fetched(3, &(0..8));
        assert!(!c.being_fetched(3, &(2..4)));
        // A cache of nothing keeps nothing.
        let mut z = BlockCache::new(0);
        z.insert_range(1, 0, &[1; 4], 2);
        assert_eq!((z.bytes(), z.get(1, 0)), (0, None));
    }

    proptest! {
        /// Whatever is inserted, the cache stays within its capacity and every block it
        /// answers with is the one inserted at that place.
        #[test]
        fn bounded_and_never_wrong(cap in 0u64..64, ops in proptest::collection::vec((0u128..3, 0u64..12, 1u64..6), 0..40)) {
            let mut c = BlockCache::new(cap);
            let block = 4u64;
            // Blob `b` is `40 + 3b` bytes; byte i of it is `31b + i`.
            let byte = |b: u128, i: u64| (b as u64 * 31 + i) as u8;
            let len = |b: u128| 40 + 3 * b as u64;
            for (blob, first, n) in ops {
                let start = (first * block).min(len(blob));
                let end = ((first + n) * block).min(len(blob));
                let bytes: Vec<u8> = (start..end).map(|i| byte(blob, i)).collect();
                c.insert_range(blob, start, &bytes, block);
                prop_assert!(c.bytes() <= cap);
                for b in 0..3u128 {
                    for k in 0..12u64 {
                        if let Some(got) = c.get(b, k * block) {
                            let want: Vec<u8> = (k * block..((k + 1) * block).min(len(b))).map(|i| byte(b, i)).collect();
                            prop_assert_eq!(&got[..], &want[..]);
                        }
                    }
                    if let Some(got) = c.get_range(b, 0..len(b), block) {
                        prop_assert_eq!(got, (0..len(b)).map(|i| byte(b, i)).collect::<Vec<u8>>());
                    }
                }
            }
        }
    }
}

//! Free-space allocator for one shard's data area: a bitmap with a next-fit cursor.
//!
//! Pure logic, no I/O. Its durable form is the committed block map (checkpoint + journal): on
//! recovery the bitmap is rebuilt from the map, so it can never disagree with what is live, and
//! blocks freed by a commit are only reused once that commit is durable (see `shard`).

/// A run of contiguous data blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First block (index within the shard's data area).
    pub start: u32,
    /// Number of blocks.
    pub len: u32,
}

/// Bitmap allocator.
#[derive(Clone, Debug)]
pub struct Allocator {
    words: Vec<u64>,
    blocks: u32,
    free: u32,
    cursor: u32,
}

impl Allocator {
    /// All `blocks` free.
    pub fn new(blocks: u32) -> Allocator {
        Allocator {
            words: vec![0; (blocks as usize).div_ceil(64)],
            blocks,
            free: blocks,
            cursor: 0,
        }
    }

    /// Blocks managed.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// Blocks free.
    pub fn free_blocks(&self) -> u32 {
        self.free
    }

    /// Whether `b` is in use.
    pub fn is_used(&self, b: u32) -> bool {
        assert!(
            b < self.blocks,
            "block {b} beyond allocator ({})",
            self.blocks
        );
        self.words[(b / 64) as usize] >> (b % 64) & 1 == 1
    }

    /// Marks `b` used; it must be free (a double allocation is a broken invariant).
    pub fn mark_used(&mut self, b: u32) {
        assert!(!self.is_used(b), "block {b} allocated twice");
        self.words[(b / 64) as usize] |= 1 << (b % 64);
        self.free -= 1;
    }

    /// Marks `b` free; it must be used.
    pub fn release(&mut self, b: u32) {
        assert!(self.is_used(b), "block {b} freed twice");
        self.words[(b / 64) as usize] &= !(1 << (b % 64));
        self.free += 1;
    }

    /// Allocates `n` blocks, as few extents as it can find by next-fit; all or nothing.
    pub fn alloc(&mut self, n: u32) -> Option<Vec<Extent>> {
        if n == 0 || n > self.free {
            return None;
        }
        let mut out: Vec<Extent> = Vec::new();
        let mut need = n;
        let mut b = if self.cursor >= self.blocks {
            0
        } else {
            self.cursor
        };
        let mut scanned = 0u64;
        while need > 0 {
            assert!(
                scanned <= u64::from(self.blocks) * 2,
                "allocator scan did not terminate"
            );
            if b >= self.blocks {
                b = 0;
            }
            // Skip full words quickly.
            let w = self.words[(b / 64) as usize];
            if b % 64 == 0 && w == u64::MAX {
                b += 64;
                scanned += 64;
                continue;
            }
            if self.is_used(b) {
                b += 1;
                scanned += 1;
                continue;
            }
            self.mark_used(b);
            match out.last_mut() {
                Some(e) if e.start + e.len == b => e.len += 1,
                _ => out.push(Extent { start: b, len: 1 }),
            }
            need -= 1;
            b += 1;
            scanned += 1;
        }
        self.cursor = b;
        Some(out)
    }

    /// Frees every block of `extents`.
    pub fn free_extents(&mut self, extents: &[Extent]) {
        for e in extents {
            for b in e.start..e.start + e.len {
                self.release(b);
            }
        }
    }

    /// Serialises the bitmap (little-endian words, `ceil(blocks/8)` bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate((self.blocks as usize).div_ceil(8));
        out
    }

    /// Rebuilds from [`Allocator::to_bytes`]; `None` if the length is wrong or bits beyond
    /// `blocks` are set.
    pub fn from_bytes(blocks: u32, bytes: &[u8]) -> Option<Allocator> {
        if bytes.len() != (blocks as usize).div_ceil(8) {
            return None;
        }
        let mut a = Allocator::new(blocks);
        for (i, w) in a.words.iter_mut().enumerate() {
            let mut raw = [0u8; 8];
            let start = i * 8;
            let end = (start + 8).min(bytes.len());
            raw[..end - start].copy_from_slice(&bytes[start..end]);
            *w = u64::from_le_bytes(raw);
        }
        let tail = blocks % 64;
        if tail != 0 {
            let last = a.words.len() - 1;
            if a.words[last] >> tail != 0 {
                return None;
            }
        }
        let used: u32 = a.words.iter().map(|w| w.count_ones()).sum();
        a.free = blocks - used;
        Some(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u32),
        Free(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![
                (1u32..40).prop_map(Op::Alloc),
                any::<usize>().prop_map(Op::Free)
            ],
            1..200,
        )
    }

    proptest! {
        /// Against a model: never hands out a live block, all-or-nothing, free count exact,
        /// and the bitmap round-trips through its byte form.
        #[test]
        fn allocator_matches_model(blocks in 1u32..700, ops in ops()) {
            let mut a = Allocator::new(blocks);
            let mut live: Vec<Vec<Extent>> = Vec::new();
            let mut model = vec![false; blocks as usize];
            for op in ops {
                match op {
                    Op::Alloc(n) => {
                        let free_before = a.free_blocks();
                        match a.alloc(n) {
                            Some(exts) => {
                                let total: u32 = exts.iter().map(|e| e.len).sum();
                                prop_assert_eq!(total, n);
                                for e in &exts {
                                    for b in e.start..e.start + e.len {
                                        prop_assert!(!model[b as usize], "live block {} handed out", b);
                                        model[b as usize] = true;
                                    }
                                }
                                live.push(exts);
                            }
                            None => {
                                prop_assert!(n > free_before);
                                prop_assert_eq!(a.free_blocks(), free_before);
                            }
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let exts = live.swap_remove(i % live.len());
                        a.free_extents(&exts);
                        for e in &exts {
                            for b in e.start..e.start + e.len {
                                model[b as usize] = false;
                            }
                        }
                    }
                    Op::Free(_) => {}
                }
                let used = model.iter().filter(|&&u| u).count() as u32;
                prop_assert_eq!(a.free_blocks(), blocks - used);
            }
            let back = Allocator::from_bytes(blocks, &a.to_bytes()).unwrap();
            for b in 0..blocks {
                prop_assert_eq!(back.is_used(b), model[b as usize]);
            }
            prop_assert_eq!(back.free_blocks(), a.free_blocks());
        }
    }

    #[test]
    fn contiguous_when_possible() {
        let mut a = Allocator::new(100);
        assert_eq!(a.alloc(10).unwrap(), vec![Extent { start: 0, len: 10 }]);
        assert_eq!(a.alloc(5).unwrap(), vec![Extent { start: 10, len: 5 }]);
        a.free_extents(&[Extent { start: 2, len: 3 }]);
        assert!(a.alloc(200).is_none());
    }
}

//! One shard of the chunk store: its checkpoint slots, journal and data area on one device,
//! owned by one reactor (no locks; tasks of that reactor share it through `Rc`).
//!
//! Write protocol (why an acknowledged write survives any crash):
//! 1. New data always goes to free blocks (copy-on-write); live blocks are never overwritten,
//!    so a torn data write can only damage blocks nothing points at yet.
//! 2. The write's record (new locations and CRC32C of every block) joins the next journal batch.
//!    One task at a time commits: it writes the batch's journal blocks, then issues one flush,
//!    which covers the batch's data writes too (they completed before the flush was issued).
//! 3. Only after the flush completes are the records applied in memory and the writers
//!    acknowledged, and only then do the blocks they replaced become free (and even then not
//!    while a read that might still be reading them is in flight).
//!
//! Recovery loads the newest valid checkpoint and replays complete journal batches in sequence.
//! Only the last batch can be partly durable (the next batch is not started before the previous
//! flush completes), so the data CRCs of its records are verified and the batch dropped if any
//! block is missing; nothing in it had been acknowledged. Recovery then writes a fresh
//! checkpoint, so stale blocks of a dropped batch can never be mistaken for a later one.

use super::alloc::{Allocator, Extent};
use super::format::{
    crc, decode_ckpt_body, decode_journal_block, encode_ckpt_body, encode_journal_block, BlockRef,
    ChunkId, CkptChunk, CkptHeader, JournalHeader, Record, ShardLayout, BLOCK, CKPT_RECENT_MAX,
    JOURNAL_PAYLOAD, MAX_BATCH_BLOCKS,
};
use super::{DevIo, StoreError};
use crate::exec::{LocalOneshot, Notify};
use crate::io::{Buffers, IoFuture};
use cfs_hugepages::DmaBuf;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

/// A chunk's current state.
#[derive(Clone, Debug, Default)]
struct ChunkMap {
    len: u64,
    blocks: BTreeMap<u32, BlockRef>,
}

/// Public facts about a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Length in bytes (highest byte written or truncated to).
    pub len: u64,
    /// Data blocks allocated to it.
    pub blocks: u64,
}

/// Counters for status and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShardStats {
    /// Chunks stored.
    pub chunks: u64,
    /// Data blocks in use.
    pub live_blocks: u64,
    /// Data blocks free.
    pub free_blocks: u64,
    /// Journal batches committed since open.
    pub batches: u64,
    /// Checkpoints written since open.
    pub checkpoints: u64,
    /// Checksum errors seen by reads.
    pub checksum_errors: u64,
}

type Waiter = Rc<LocalOneshot<Result<(), StoreError>>>;

struct Pending {
    records: Vec<Record>,
    bytes: usize,
    done: Waiter,
}

struct State {
    chunks: HashMap<ChunkId, ChunkMap>,
    alloc: Allocator,
    next_seq: u64,
    journal_pos: u32,
    ckpt_generation: u64,
    ckpt_slot: usize,
    pending: VecDeque<Pending>,
    committing: bool,
    failed: Option<String>,
    locked: Vec<(ChunkId, u32, u32)>,
    read_epoch: u64,
    readers: BTreeMap<u64, u32>,
    limbo: VecDeque<(u64, Vec<u32>)>,
    stats: ShardStats,
    /// Distinct chunks changed last, oldest first (at most `CKPT_RECENT_MAX`): written into
    /// every checkpoint header, so a restart knows them even after a checkpoint absorbed
    /// their journal records.
    recent: VecDeque<ChunkId>,
    /// What recovery found changed last (the checkpoint's list and the replayed journal).
    boot_suspects: Vec<ChunkId>,
}

/// Records `chunk` as changed last (moving it to the back if listed already).
fn note_recent(recent: &mut VecDeque<ChunkId>, chunk: ChunkId) {
    if recent.back() == Some(&chunk) {
        return;
    }
    if let Some(i) = recent.iter().rposition(|c| *c == chunk) {
        recent.remove(i);
    }
    if recent.len() == CKPT_RECENT_MAX {
        recent.pop_front();
    }
    recent.push_back(chunk);
}

/// One shard, opened and recovered.
pub struct Shard {
    /// Global shard index.
    pub index: u32,
    device: Arc<str>,
    layout: ShardLayout,
    lbas_per_block: u64,
    store_tag: u64,
    max_chunk_blocks: u32,
    dev: DevIo,
    bufs: Rc<Buffers>,
    st: RefCell<State>,
    locks_changed: Notify,
    closed: Cell<bool>,
}

/// Releases a range lock when dropped.
struct RangeGuard<'a> {
    shard: &'a Shard,
    key: (ChunkId, u32, u32),
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shard.st.borrow_mut();
        if let Some(i) = st.locked.iter().position(|k| *k == self.key) {
            st.locked.swap_remove(i);
        }
        drop(st);
        self.shard.locks_changed.notify_all();
    }
}

/// Marks a read in flight so blocks it may be reading are not reused under it.
struct ReadGuard<'a> {
    shard: &'a Shard,
    epoch: u64,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.shard.st.borrow_mut();
        if let Some(c) = st.readers.get_mut(&self.epoch) {
            *c -= 1;
            if *c == 0 {
                st.readers.remove(&self.epoch);
            }
        }
        release_limbo(&mut st);
    }
}

/// Frees limbo blocks that no in-flight read can still be reading.
fn release_limbo(st: &mut State) {
    let oldest_reader = st.readers.keys().next().copied();
    while let Some((tag, _)) = st.limbo.front() {
        if oldest_reader.is_some_and(|r| r <= *tag) {
            break;
        }
        let Some((_, blocks)) = st.limbo.pop_front() else {
            break;
        };
        for b in blocks {
            st.alloc.release(b);
        }
    }
}

/// Parameters for opening a shard.
pub struct ShardSpec {
    /// Global index.
    pub index: u32,
    /// Device name for errors.
    pub device: Arc<str>,
    /// Where it lives.
    pub layout: ShardLayout,
    /// Device LBAs per store block.
    pub lbas_per_block: u64,
    /// Store tag for journal and checkpoint blocks.
    pub store_tag: u64,
    /// Largest chunk in blocks.
    pub max_chunk_blocks: u32,
}

impl Shard {
    fn new(spec: ShardSpec, dev: DevIo) -> Shard {
        let bufs = Rc::clone(&dev.bufs);
        assert!(bufs.buf_bytes() >= BLOCK && bufs.buf_bytes().is_multiple_of(BLOCK));
        Shard {
            index: spec.index,
            device: spec.device,
            layout: spec.layout,
            lbas_per_block: spec.lbas_per_block,
            store_tag: spec.store_tag,
            max_chunk_blocks: spec.max_chunk_blocks,
            dev,
            bufs,
            st: RefCell::new(State {
                chunks: HashMap::new(),
                alloc: Allocator::new(spec.layout.data_blocks),
                next_seq: 1,
                journal_pos: 0,
                ckpt_generation: 0,
                ckpt_slot: 1,
                pending: VecDeque::new(),
                committing: false,
                failed: None,
                locked: Vec::new(),
                read_epoch: 0,
                readers: BTreeMap::new(),
                limbo: VecDeque::new(),
                stats: ShardStats::default(),
                recent: VecDeque::new(),
                boot_suspects: Vec::new(),
            }),
            locks_changed: Notify::default(),
            closed: Cell::new(false),
        }
    }

    fn buf_blocks(&self) -> u32 {
        (self.bufs.buf_bytes() / BLOCK) as u32
    }

    fn submit_rw(&self, write: bool, dev_block: u64, nblocks: u32, buf: DmaBuf) -> IoFuture {
        self.dev.submit_rw(write, dev_block, nblocks, buf)
    }

    /// Awaits an I/O; on error the buffer has already gone back to the pool.
    async fn finish(&self, f: IoFuture) -> Result<DmaBuf, StoreError> {
        self.dev.finish(f).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.dev.flush().await
    }

    async fn read_meta(&self, dev_block: u64, n: u64) -> Result<Vec<u8>, StoreError> {
        self.dev.read_meta(dev_block, n).await
    }

    async fn write_meta(&self, dev_block: u64, data: &[u8]) -> Result<(), StoreError> {
        self.dev.write_meta(dev_block, data).await
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.closed.get() {
            return Err(StoreError::Closed);
        }
        if let Some(why) = &self.st.borrow().failed {
            return Err(StoreError::ShardFailed {
                shard: self.index,
                reason: why.clone(),
            });
        }
        Ok(())
    }

    async fn lock_range(&self, chunk: ChunkId, start: u32, end: u32) -> RangeGuard<'_> {
        loop {
            let notified = self.locks_changed.notified();
            {
                let mut st = self.st.borrow_mut();
                let busy = st
                    .locked
                    .iter()
                    .any(|&(c, s, e)| c == chunk && s < end && start < e);
                if !busy {
                    st.locked.push((chunk, start, end));
                    return RangeGuard {
                        shard: self,
                        key: (chunk, start, end),
                    };
                }
            }
            notified.await;
        }
    }

    fn begin_read(&self) -> ReadGuard<'_> {
        let mut st = self.st.borrow_mut();
        let epoch = st.read_epoch;
        *st.readers.entry(epoch).or_insert(0) += 1;
        ReadGuard { shard: self, epoch }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let max = u64::from(self.max_chunk_blocks) * BLOCK as u64;
        if offset.checked_add(len).is_none_or(|end| end > max) {
            return Err(StoreError::OutOfRange { offset, len, max });
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `chunk`; unwritten ranges read as zeros. Every block
    /// is verified against its stored CRC32C: a mismatch is an error, never wrong data.
    pub async fn read(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.check_open()?;
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = (offset / BLOCK as u64) as u32;
        let last = ((offset + len as u64 - 1) / BLOCK as u64) as u32;
        let _reader = self.begin_read();
        let refs: Vec<Option<BlockRef>> = {
            let st = self.st.borrow();
            let Some(map) = st.chunks.get(&chunk) else {
                return Err(StoreError::NotFound { chunk });
            };
            (first..=last)
                .map(|l| map.blocks.get(&l).copied())
                .collect()
        };
        // Group into runs of physically consecutive blocks, at most one buffer each.
        let per = self.buf_blocks();
        let mut runs: Vec<(usize, u32, u32)> = Vec::new(); // (index in refs, phys, count)
        for (i, r) in refs.iter().enumerate() {
            let Some(r) = r else { continue };
            match runs.last_mut() {
                Some((s, p, n)) if *s + *n as usize == i && *p + *n == r.phys && *n < per => {
                    *n += 1
                }
                _ => runs.push((i, r.phys, 1)),
            }
        }
        let mut out = vec![0u8; len];
        let mut result = Ok(());
        let data_start = self.layout.data_start;
        let r = self
            .dev
            .pipeline(
                &runs,
                16,
                |(_, phys, n), buf| self.submit_rw(false, data_start + u64::from(phys), n, buf),
                |(start, phys, n), r| {
                    let Ok(buf) = r else { return };
                    for j in 0..n as usize {
                        let i = start + j;
                        let block = &buf.as_slice()[j * BLOCK..(j + 1) * BLOCK];
                        let expected = refs[i].map_or(0, |r| r.crc);
                        let actual = crc(block);
                        let logical = u64::from(first) + i as u64;
                        if actual != expected {
                            self.st.borrow_mut().stats.checksum_errors += 1;
                            if result.is_ok() {
                                result = Err(StoreError::Checksum {
                                    device: self.device.to_string(),
                                    chunk,
                                    offset: logical * BLOCK as u64,
                                    lba: (data_start + u64::from(phys) + j as u64)
                                        * self.lbas_per_block,
                                    expected,
                                    actual,
                                });
                            }
                            continue;
                        }
                        copy_block_part(block, logical, offset, &mut out);
                    }
                },
            )
            .await;
        r?;
        result.map(|()| out)
    }

    /// Reads one logical block's current content (for read-modify-write), verified.
    async fn read_block(&self, chunk: ChunkId, logical: u32) -> Result<Vec<u8>, StoreError> {
        let r = self
            .st
            .borrow()
            .chunks
            .get(&chunk)
            .and_then(|m| m.blocks.get(&logical).copied());
        let Some(r) = r else {
            return Ok(vec![0u8; BLOCK]);
        };
        let buf = self.bufs.get().await;
        let dev_block = self.layout.data_start + u64::from(r.phys);
        let buf = self
            .finish(self.submit_rw(false, dev_block, 1, buf))
            .await?;
        let block = buf.as_slice()[..BLOCK].to_vec();
        self.bufs.put(buf);
        let actual = crc(&block);
        if actual != r.crc {
            self.st.borrow_mut().stats.checksum_errors += 1;
            return Err(StoreError::Checksum {
                device: self.device.to_string(),
                chunk,
                offset: u64::from(logical) * BLOCK as u64,
                lba: dev_block * self.lbas_per_block,
                expected: r.crc,
                actual,
            });
        }
        Ok(block)
    }

    /// Writes `data` at `offset` of `chunk` (creating it) and returns once it is durable.
    pub async fn write(&self, chunk: ChunkId, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.check_open()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let first = (offset / BLOCK as u64) as u32;
        let last = ((end - 1) / BLOCK as u64) as u32;
        let n = last - first + 1;
        let _lock = self.lock_range(chunk, first, last + 1).await;
        // Edges that are only partly overwritten keep their old bytes.
        let head = if !offset.is_multiple_of(BLOCK as u64)
            || (first == last && !end.is_multiple_of(BLOCK as u64))
        {
            Some(self.read_block(chunk, first).await?)
        } else {
            None
        };
        let tail = if last != first && !end.is_multiple_of(BLOCK as u64) {
            Some(self.read_block(chunk, last).await?)
        } else {
            None
        };
        let (refs, _) = self
            .write_new_blocks(chunk, first, n, |logical, block| {
                if logical == first {
                    if let Some(h) = &head {
                        block.copy_from_slice(h);
                    }
                }
                if logical == last && logical != first {
                    if let Some(t) = &tail {
                        block.copy_from_slice(t);
                    }
                }
                let bstart = u64::from(logical) * BLOCK as u64;
                let s = offset.max(bstart);
                let e = end.min(bstart + BLOCK as u64);
                block[(s - bstart) as usize..(e - bstart) as usize]
                    .copy_from_slice(&data[(s - offset) as usize..(e - offset) as usize]);
            })
            .await?;
        self.commit(vec![Record::Write {
            chunk,
            first,
            len_after: end,
            blocks: refs,
        }])
        .await
    }

    /// Allocates `n` blocks, fills each with `fill(logical, block)`, writes them and returns
    /// their references. On failure the blocks are freed again (nothing points at them).
    async fn write_new_blocks(
        &self,
        chunk: ChunkId,
        first: u32,
        n: u32,
        mut fill: impl FnMut(u32, &mut [u8]),
    ) -> Result<(Vec<BlockRef>, Vec<Extent>), StoreError> {
        let extents = {
            let mut st = self.st.borrow_mut();
            if !st.chunks.contains_key(&chunk)
                && st.chunks.len() as u64 >= u64::from(self.layout.data_blocks)
            {
                return Err(StoreError::NoSpace {
                    shard: self.index,
                    need: n,
                    free: 0,
                });
            }
            let free = st.alloc.free_blocks();
            st.alloc.alloc(n).ok_or(StoreError::NoSpace {
                shard: self.index,
                need: n,
                free,
            })?
        };
        // One job per buffer-sized piece of each extent: (first phys block, blocks, first logical).
        let per = self.buf_blocks();
        let mut jobs = Vec::new();
        let mut logical = first;
        for e in &extents {
            let mut done = 0;
            while done < e.len {
                let k = (e.len - done).min(per);
                jobs.push((e.start + done, k, logical));
                logical += k;
                done += k;
            }
        }
        let mut refs = vec![BlockRef { phys: 0, crc: 0 }; n as usize];
        let data_start = self.layout.data_start;
        let r = self
            .dev
            .pipeline(
                &jobs,
                16,
                |(phys, k, logical), mut buf| {
                    for j in 0..k {
                        let block =
                            &mut buf.as_mut_slice()[j as usize * BLOCK..(j as usize + 1) * BLOCK];
                        block.fill(0);
                        fill(logical + j, block);
                        refs[(logical + j - first) as usize] = BlockRef {
                            phys: phys + j,
                            crc: crc(block),
                        };
                    }
                    self.submit_rw(true, data_start + u64::from(phys), k, buf)
                },
                |_, _| {},
            )
            .await;
        if let Err(e) = r {
            self.st.borrow_mut().alloc.free_extents(&extents);
            return Err(e);
        }
        Ok((refs, extents))
    }

    /// Makes `[offset, offset+len)` of `chunk` read as zeros (durably, before returning): whole
    /// blocks in the range are unmapped (their space freed), partly covered edge blocks are
    /// rewritten with the range zeroed. The chunk's length is unchanged; a missing chunk is
    /// already all hole.
    pub async fn punch(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_open()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = (offset / BLOCK as u64) as u32;
        let last = ((end - 1) / BLOCK as u64) as u32;
        let _lock = self.lock_range(chunk, first, last + 1).await;
        let (mapped_edges, chunk_len) = {
            let st = self.st.borrow();
            let Some(m) = st.chunks.get(&chunk) else {
                return Ok(());
            };
            let mut edges = Vec::new();
            for l in [first, last] {
                let bstart = u64::from(l) * BLOCK as u64;
                let whole = offset <= bstart && end >= bstart + BLOCK as u64;
                if !whole && m.blocks.contains_key(&l) && !edges.contains(&l) {
                    edges.push(l);
                }
            }
            (edges, m.len)
        };
        let mut records = Vec::new();
        for l in mapped_edges {
            let old = self.read_block(chunk, l).await?;
            let bstart = u64::from(l) * BLOCK as u64;
            let zs = (offset.max(bstart) - bstart) as usize;
            let ze = (end.min(bstart + BLOCK as u64) - bstart) as usize;
            let (refs, _) = self
                .write_new_blocks(chunk, l, 1, |_, b| {
                    b.copy_from_slice(&old);
                    b[zs..ze].fill(0);
                })
                .await?;
            records.push(Record::Write {
                chunk,
                first: l,
                len_after: chunk_len,
                blocks: refs,
            });
        }
        // Whole blocks: from the first block starting at or after `offset` to the last block
        // ending at or before `end`.
        let whole_first = offset.div_ceil(BLOCK as u64);
        let whole_end = end / BLOCK as u64;
        if whole_end > whole_first {
            records.push(Record::Punch {
                chunk,
                first: whole_first as u32,
                count: (whole_end - whole_first) as u32,
            });
        }
        if records.is_empty() {
            return Ok(());
        }
        self.commit(records).await
    }

    /// Deletes a chunk and frees its blocks (durably, before returning).
    pub async fn delete(&self, chunk: ChunkId) -> Result<(), StoreError> {
        self.check_open()?;
        let _lock = self.lock_range(chunk, 0, u32::MAX).await;
        if !self.st.borrow().chunks.contains_key(&chunk) {
            return Err(StoreError::NotFound { chunk });
        }
        self.commit(vec![Record::Delete { chunk }]).await
    }

    /// Sets a chunk's length; blocks past it are freed and the tail of a partial last block
    /// reads as zeros afterwards. Creates the chunk if it does not exist.
    pub async fn truncate(&self, chunk: ChunkId, len: u64) -> Result<(), StoreError> {
        self.check_open()?;
        self.check_range(len, 0)?;
        let _lock = self.lock_range(chunk, 0, u32::MAX).await;
        let mut records = vec![Record::Truncate { chunk, len }];
        let tail_block = (len / BLOCK as u64) as u32;
        let mapped = self
            .st
            .borrow()
            .chunks
            .get(&chunk)
            .is_some_and(|m| m.blocks.contains_key(&tail_block));
        if !len.is_multiple_of(BLOCK as u64) && mapped {
            let old = self.read_block(chunk, tail_block).await?;
            let keep = (len % BLOCK as u64) as usize;
            let (refs, _) = self
                .write_new_blocks(chunk, tail_block, 1, |_, b| {
                    b[..keep].copy_from_slice(&old[..keep])
                })
                .await?;
            records.push(Record::Write {
                chunk,
                first: tail_block,
                len_after: len,
                blocks: refs,
            });
        }
        self.commit(records).await
    }

    /// Facts about a chunk.
    /// Byte ranges of `chunk` that hold data (allocated blocks, merged; whole blocks, as a
    /// local file system reports them); everything else reads as zeros. Empty if the chunk
    /// does not exist.
    pub fn data_ranges(&self, chunk: ChunkId) -> Vec<(u64, u64)> {
        let st = self.st.borrow();
        let Some(m) = st.chunks.get(&chunk) else {
            return Vec::new();
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &l in m.blocks.keys() {
            let s = u64::from(l) * BLOCK as u64;
            let e = s + BLOCK as u64;
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }

    pub fn stat(&self, chunk: ChunkId) -> Option<ChunkInfo> {
        self.st.borrow().chunks.get(&chunk).map(|m| ChunkInfo {
            len: m.len,
            blocks: m.blocks.len() as u64,
        })
    }

    /// The chunks recovery found changed last (see `State::recent`), possibly by writes their
    /// cluster never acknowledged.
    pub fn boot_suspects(&self) -> Vec<ChunkId> {
        self.st.borrow().boot_suspects.clone()
    }

    /// A digest of `chunk`'s length and block checksums, all-zero blocks counted as holes:
    /// equal for copies with equal contents written the same way (copies that differ only in
    /// where zeros are stored compare by data instead). `None` if the chunk does not exist.
    pub fn map_digest(&self, chunk: ChunkId) -> Option<(u64, [u8; 32])> {
        let zero_crc = crc(&[0u8; BLOCK]);
        let st = self.st.borrow();
        let m = st.chunks.get(&chunk)?;
        let mut h = blake3::Hasher::new();
        h.update(&m.len.to_le_bytes());
        for (l, r) in &m.blocks {
            if r.crc != zero_crc {
                h.update(&l.to_le_bytes());
                h.update(&r.crc.to_le_bytes());
            }
        }
        Some((m.len, *h.finalize().as_bytes()))
    }

    /// Device block holding byte `offset` of `chunk`, if it is allocated (for tools and tests).
    pub fn locate(&self, chunk: ChunkId, offset: u64) -> Option<u64> {
        let logical = u32::try_from(offset / BLOCK as u64).ok()?;
        let st = self.st.borrow();
        let r = st.chunks.get(&chunk)?.blocks.get(&logical)?;
        Some(self.layout.data_start + u64::from(r.phys))
    }

    /// Device name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Every chunk id in the shard.
    pub fn list(&self) -> Vec<ChunkId> {
        self.st.borrow().chunks.keys().copied().collect()
    }

    /// Counters.
    pub fn stats(&self) -> ShardStats {
        let st = self.st.borrow();
        let mut s = st.stats;
        s.chunks = st.chunks.len() as u64;
        s.free_blocks = u64::from(st.alloc.free_blocks());
        s.live_blocks = st.chunks.values().map(|m| m.blocks.len() as u64).sum();
        s
    }

    /// Queues records for the next journal batch and waits until they are durable and applied.
    /// The first waiter to find no commit running runs the commit loop (group commit).
    async fn commit(&self, records: Vec<Record>) -> Result<(), StoreError> {
        let done = LocalOneshot::new();
        let bytes = records.iter().map(Record::encoded_len).sum();
        assert!(
            bytes <= MAX_BATCH_BLOCKS as usize * JOURNAL_PAYLOAD,
            "record larger than a batch"
        );
        let lead = {
            let mut st = self.st.borrow_mut();
            st.pending.push_back(Pending {
                records,
                bytes,
                done: Rc::clone(&done),
            });
            !std::mem::replace(&mut st.committing, true)
        };
        if lead {
            self.commit_loop().await;
        }
        done.wait().await
    }

    async fn commit_loop(&self) {
        loop {
            let batch: Vec<Pending> = {
                let mut st = self.st.borrow_mut();
                let mut total = 0;
                let mut batch = Vec::new();
                while let Some(p) = st.pending.front() {
                    if !batch.is_empty()
                        && total + p.bytes > MAX_BATCH_BLOCKS as usize * JOURNAL_PAYLOAD
                    {
                        break;
                    }
                    total += p.bytes;
                    batch.extend(st.pending.pop_front());
                }
                if batch.is_empty() {
                    st.committing = false;
                    return;
                }
                batch
            };
            let result = self.write_batch(&batch).await;
            if let Err(e) = &result {
                let mut st = self.st.borrow_mut();
                st.failed.get_or_insert_with(|| e.to_string());
                tracing::error!(
                    shard = self.index,
                    "journal commit failed, shard stops accepting writes: {e}"
                );
            }
            for p in batch {
                p.done.set(result.clone());
            }
        }
    }

    /// Writes one batch to the journal, flushes, and applies it.
    async fn write_batch(&self, batch: &[Pending]) -> Result<(), StoreError> {
        if let Some(why) = self.st.borrow().failed.clone() {
            return Err(StoreError::ShardFailed {
                shard: self.index,
                reason: why,
            });
        }
        let mut payload = Vec::new();
        for p in batch {
            for r in &p.records {
                r.encode(&mut payload);
            }
        }
        let nblocks = payload.len().div_ceil(JOURNAL_PAYLOAD).max(1) as u32;
        assert!(nblocks <= MAX_BATCH_BLOCKS);
        let needs_ckpt = {
            let st = self.st.borrow();
            st.journal_pos + nblocks > self.layout.journal_blocks
                || st.journal_pos > self.layout.journal_blocks / 4 * 3
        };
        if needs_ckpt {
            self.write_checkpoint().await?;
        }
        let (seq, pos) = {
            let st = self.st.borrow();
            (st.next_seq, st.journal_pos)
        };
        let mut blocks = vec![0u8; nblocks as usize * BLOCK];
        for i in 0..nblocks as usize {
            let part = &payload[(i * JOURNAL_PAYLOAD).min(payload.len())
                ..((i + 1) * JOURNAL_PAYLOAD).min(payload.len())];
            let h = JournalHeader {
                store_tag: self.store_tag,
                seq: seq + i as u64,
                batch_seq: seq,
                batch_blocks: nblocks as u16,
                index: i as u16,
                used: part.len() as u32,
            };
            encode_journal_block(&h, part, &mut blocks[i * BLOCK..(i + 1) * BLOCK]);
        }
        self.write_meta(self.layout.journal_start + u64::from(pos), &blocks)
            .await?;
        self.flush().await?;
        let mut st = self.st.borrow_mut();
        st.next_seq = seq + u64::from(nblocks);
        st.journal_pos = pos + nblocks;
        st.stats.batches += 1;
        let mut freed = Vec::new();
        for p in batch {
            for r in &p.records {
                apply(&mut st.chunks, r, &mut freed);
                note_recent(&mut st.recent, r.chunk());
            }
        }
        if !freed.is_empty() {
            let epoch = st.read_epoch;
            st.read_epoch += 1;
            st.limbo.push_back((epoch, freed));
            release_limbo(&mut st);
        }
        Ok(())
    }

    /// Serialises the committed state into the inactive checkpoint slot, then points the
    /// journal at a fresh start. Only called with no journal write in progress.
    async fn write_checkpoint(&self) -> Result<(), StoreError> {
        let (header, body, slot) = {
            let st = self.st.borrow();
            let mut bitmap = Allocator::new(self.layout.data_blocks);
            let mut chunks: Vec<CkptChunk> = st
                .chunks
                .iter()
                .map(|(&id, m)| CkptChunk {
                    chunk: id,
                    len: m.len,
                    blocks: m.blocks.iter().map(|(&l, &r)| (l, r)).collect(),
                })
                .collect();
            chunks.sort_by_key(|c| c.chunk);
            let mut live = 0u64;
            for c in &chunks {
                for (_, r) in &c.blocks {
                    bitmap.mark_used(r.phys);
                    live += 1;
                }
            }
            let mut body = encode_ckpt_body(&bitmap.to_bytes(), &chunks);
            let body_len = body.len() as u64;
            body.resize(body.len().div_ceil(BLOCK) * BLOCK, 0);
            let header = CkptHeader {
                generation: st.ckpt_generation + 1,
                journal_start_seq: st.next_seq,
                body_len,
                body_crc: crc(&body[..body_len as usize]),
                chunk_count: chunks.len() as u32,
                live_blocks: live,
                store_tag: self.store_tag,
                recent: st.recent.iter().copied().collect(),
            };
            (header, body, 1 - st.ckpt_slot)
        };
        assert!(
            body.len() / BLOCK < self.layout.ckpt_blocks as usize,
            "checkpoint body exceeds its slot: the format sizes slots for the worst case"
        );
        let at = self.layout.ckpt_slot(slot);
        self.write_meta(at + 1, &body).await?;
        self.flush().await?;
        self.write_meta(at, &header.encode()).await?;
        self.flush().await?;
        let mut st = self.st.borrow_mut();
        st.ckpt_generation = header.generation;
        st.ckpt_slot = slot;
        st.journal_pos = 0;
        st.stats.checkpoints += 1;
        Ok(())
    }

    /// Writes a checkpoint and refuses further requests (clean shutdown: next open replays
    /// nothing).
    pub async fn close(&self) -> Result<(), StoreError> {
        self.check_open()?;
        // Wait for any running commit to drain.
        while self.st.borrow().committing {
            crate::exec::yield_now().await;
        }
        self.st.borrow_mut().committing = true;
        let r = self.write_checkpoint().await;
        self.st.borrow_mut().committing = false;
        self.closed.set(true);
        r
    }

    /// Formats this shard: an empty checkpoint in slot 0 and an invalidated slot 1.
    pub async fn format(spec: ShardSpec, dev: DevIo) -> Result<(), StoreError> {
        let shard = Shard::new(spec, dev);
        // Slot 1 gets a zeroed header so a previous format's checkpoint cannot be picked up.
        shard
            .write_meta(shard.layout.ckpt_slot(1), &[0u8; BLOCK])
            .await?;
        {
            let mut st = shard.st.borrow_mut();
            st.ckpt_slot = 1;
            st.ckpt_generation = 0;
            st.next_seq = 1;
        }
        // Zero the first journal block too (belt and braces: the store tag already rejects
        // blocks of a previous format).
        shard
            .write_meta(shard.layout.journal_start, &[0u8; BLOCK])
            .await?;
        shard.write_checkpoint().await?;
        Ok(())
    }

    /// Opens a shard: newest valid checkpoint, then journal replay.
    pub async fn open(spec: ShardSpec, dev: DevIo) -> Result<Shard, StoreError> {
        let shard = Shard::new(spec, dev);
        shard.recover().await?;
        Ok(shard)
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            device: self.device.to_string(),
            shard: self.index,
            what: what.into(),
        }
    }

    async fn recover(&self) -> Result<(), StoreError> {
        // 1. Checkpoint: the valid slot with the highest generation.
        let mut best: Option<(usize, CkptHeader)> = None;
        for slot in 0..2 {
            let raw = self.read_meta(self.layout.ckpt_slot(slot), 1).await?;
            if let Some(h) = CkptHeader::decode(&raw) {
                if h.store_tag == self.store_tag
                    && best
                        .as_ref()
                        .is_none_or(|(_, b)| h.generation > b.generation)
                {
                    best = Some((slot, h));
                }
            }
        }
        let Some((slot, hdr)) = best else {
            return Err(self.corrupt("no valid checkpoint in either slot"));
        };
        let body_blocks = hdr.body_len.div_ceil(BLOCK as u64);
        if body_blocks >= u64::from(self.layout.ckpt_blocks) {
            return Err(self.corrupt("checkpoint body larger than its slot"));
        }
        let body = self
            .read_meta(self.layout.ckpt_slot(slot) + 1, body_blocks)
            .await?;
        let body = &body[..hdr.body_len as usize];
        if crc(body) != hdr.body_crc {
            return Err(self.corrupt(format!(
                "checkpoint generation {} body checksum mismatch",
                hdr.generation
            )));
        }
        let (bitmap, chunks) = decode_ckpt_body(body, hdr.chunk_count)
            .ok_or_else(|| self.corrupt("checkpoint body does not decode"))?;
        let mut map: HashMap<ChunkId, ChunkMap> = HashMap::with_capacity(chunks.len());
        for c in chunks {
            map.insert(
                c.chunk,
                ChunkMap {
                    len: c.len,
                    blocks: c.blocks.into_iter().collect(),
                },
            );
        }
        // The checkpoint's bitmap must agree with its own map (a cross-check of both).
        let ckpt_bitmap = Allocator::from_bytes(self.layout.data_blocks, &bitmap)
            .ok_or_else(|| self.corrupt("checkpoint bitmap has the wrong size"))?;
        let derived = self.allocator_from(&map)?;
        if derived.free_blocks() != ckpt_bitmap.free_blocks()
            || (0..self.layout.data_blocks).any(|b| derived.is_used(b) != ckpt_bitmap.is_used(b))
        {
            return Err(self.corrupt("checkpoint bitmap disagrees with its block map"));
        }
        // 2. Journal: complete batches in sequence from the checkpoint's start.
        let (mut batches, stop_pos, max_seen) = self.scan_journal(hdr.journal_start_seq).await?;
        let mut dropped_tail = false;
        if let Some(last) = batches.last() {
            if !self.batch_data_intact(last).await? {
                tracing::warn!(
                    shard = self.index,
                    "dropping a torn, unacknowledged final journal batch"
                );
                batches.pop();
                dropped_tail = true;
            }
        }
        let replayed = batches.len();
        let mut freed = Vec::new();
        let mut recent: VecDeque<ChunkId> = hdr.recent.iter().copied().collect();
        for b in &batches {
            for r in b {
                apply(&mut map, r, &mut freed);
                note_recent(&mut recent, r.chunk());
            }
        }
        // 3. The allocator is rebuilt from the map: it cannot hand out a live block.
        let alloc = self.allocator_from(&map)?;
        {
            let mut st = self.st.borrow_mut();
            st.chunks = map;
            st.alloc = alloc;
            st.ckpt_generation = hdr.generation;
            st.ckpt_slot = slot;
            st.journal_pos = stop_pos;
            st.next_seq = hdr.journal_start_seq + u64::from(stop_pos);
            st.boot_suspects = recent.iter().copied().collect();
            st.recent = recent;
        }
        if replayed > 0 || dropped_tail {
            // Start the journal afresh past every sequence number seen, so no stale block can
            // ever look like a continuation.
            {
                let mut st = self.st.borrow_mut();
                st.next_seq = st.next_seq.max(max_seen + 1);
                st.committing = true;
            }
            let r = self.write_checkpoint().await;
            self.st.borrow_mut().committing = false;
            r?;
        }
        tracing::debug!(
            shard = self.index,
            replayed,
            dropped_tail,
            "shard recovered"
        );
        Ok(())
    }

    /// Reads the journal from position 0: returns the complete batches in order, the position
    /// after the last one, and the highest sequence number seen in any valid block.
    async fn scan_journal(
        &self,
        start_seq: u64,
    ) -> Result<(Vec<Vec<Record>>, u32, u64), StoreError> {
        let jb = self.layout.journal_blocks;
        let window = self.buf_blocks().max(1);
        let mut cache: (u32, Vec<u8>) = (u32::MAX, Vec::new());
        let mut max_seen = start_seq.saturating_sub(1);
        let mut batches = Vec::new();
        let mut pos = 0u32;
        let mut expected = start_seq;
        // Blocks are read in windows; a closure can't await, so fetch explicitly.
        macro_rules! block_at {
            ($p:expr) => {{
                let p: u32 = $p;
                if !(cache.0 <= p && p < cache.0.saturating_add(window)) || cache.1.is_empty() {
                    let n = window.min(jb - p);
                    let data = self
                        .read_meta(self.layout.journal_start + u64::from(p), u64::from(n))
                        .await?;
                    cache = (p, data);
                }
                let off = (p - cache.0) as usize * BLOCK;
                cache.1[off..off + BLOCK].to_vec()
            }};
        }
        'outer: while pos < jb {
            let first = block_at!(pos);
            let Some((h, _)) = decode_journal_block(&first) else {
                break;
            };
            if h.store_tag != self.store_tag || h.seq != expected || h.index != 0 {
                if h.store_tag == self.store_tag && pos == 0 && h.seq > start_seq {
                    return Err(self.corrupt(format!(
                        "journal starts at sequence {} but the newest readable checkpoint expects {}: a newer checkpoint is damaged",
                        h.seq, start_seq
                    )));
                }
                break;
            }
            let n = u32::from(h.batch_blocks);
            if pos + n > jb {
                break;
            }
            let mut payload = Vec::with_capacity(n as usize * JOURNAL_PAYLOAD);
            for i in 0..n {
                let raw = block_at!(pos + i);
                match decode_journal_block(&raw) {
                    Some((bh, p))
                        if bh.store_tag == self.store_tag
                            && bh.seq == expected + u64::from(i)
                            && bh.batch_seq == expected
                            && bh.batch_blocks == h.batch_blocks =>
                    {
                        max_seen = max_seen.max(bh.seq);
                        payload.extend_from_slice(p);
                    }
                    _ => break 'outer, // torn final batch
                }
            }
            let records = Record::decode_all(&payload).ok_or_else(|| {
                self.corrupt(format!(
                    "journal batch at sequence {expected} has checksums but does not decode"
                ))
            })?;
            batches.push(records);
            pos += n;
            expected += u64::from(n);
        }
        // A valid block of a later batch past the stopping point means a damaged block in the
        // middle of acknowledged history, not a torn tail: refuse rather than lose it silently.
        let scan_end = (pos + 2 * MAX_BATCH_BLOCKS).min(jb);
        for p in pos..scan_end {
            let raw = block_at!(p);
            if let Some((h, _)) = decode_journal_block(&raw) {
                if h.store_tag == self.store_tag && h.seq >= start_seq {
                    max_seen = max_seen.max(h.seq);
                    if h.batch_seq > expected {
                        return Err(self.corrupt(format!(
                            "journal block at position {pos} (sequence {expected}) is damaged but later batches exist"
                        )));
                    }
                }
            }
        }
        Ok((batches, pos, max_seen))
    }

    /// Marks every block the map references; a block referenced twice is corruption.
    fn allocator_from(&self, map: &HashMap<ChunkId, ChunkMap>) -> Result<Allocator, StoreError> {
        let mut alloc = Allocator::new(self.layout.data_blocks);
        for m in map.values() {
            for r in m.blocks.values() {
                if r.phys >= self.layout.data_blocks || alloc.is_used(r.phys) {
                    return Err(self.corrupt(format!(
                        "data block {} referenced twice or out of range",
                        r.phys
                    )));
                }
                alloc.mark_used(r.phys);
            }
        }
        Ok(alloc)
    }

    /// Whether every data block a batch's write records point at holds the recorded CRC.
    async fn batch_data_intact(&self, batch: &[Record]) -> Result<bool, StoreError> {
        for r in batch {
            if let Record::Write { blocks, .. } = r {
                for b in blocks {
                    if b.phys >= self.layout.data_blocks {
                        return Ok(false);
                    }
                    let raw = self
                        .read_meta(self.layout.data_start + u64::from(b.phys), 1)
                        .await?;
                    if crc(&raw) != b.crc {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }
}

/// Applies one committed record to the map; blocks it releases go to `freed`.
fn apply(map: &mut HashMap<ChunkId, ChunkMap>, r: &Record, freed: &mut Vec<u32>) {
    match r {
        Record::Write {
            chunk,
            first,
            len_after,
            blocks,
        } => {
            let m = map.entry(*chunk).or_default();
            for (i, b) in blocks.iter().enumerate() {
                if let Some(old) = m.blocks.insert(first + i as u32, *b) {
                    freed.push(old.phys);
                }
            }
            m.len = m.len.max(*len_after);
        }
        Record::Delete { chunk } => {
            if let Some(m) = map.remove(chunk) {
                freed.extend(m.blocks.values().map(|b| b.phys));
            }
        }
        Record::Truncate { chunk, len } => {
            let m = map.entry(*chunk).or_default();
            let keep = len.div_ceil(BLOCK as u64);
            let cut: Vec<u32> = m
                .blocks
                .range(keep.min(u64::from(u32::MAX)) as u32..)
                .map(|(&l, _)| l)
                .collect();
            for l in cut {
                if let Some(b) = m.blocks.remove(&l) {
                    freed.push(b.phys);
                }
            }
            m.len = *len;
        }
        Record::Punch {
            chunk,
            first,
            count,
        } => {
            if let Some(m) = map.get_mut(chunk) {
                let end = u64::from(*first) + u64::from(*count);
                let gone: Vec<u32> = m
                    .blocks
                    .range(*first..)
                    .take_while(|(&l, _)| u64::from(l) < end)
                    .map(|(&l, _)| l)
                    .collect();
                for l in gone {
                    if let Some(b) = m.blocks.remove(&l) {
                        freed.push(b.phys);
                    }
                }
            }
        }
    }
}

/// Copies the part of logical block `logical` that overlaps the read `[offset, offset+out.len())`.
fn copy_block_part(block: &[u8], logical: u64, offset: u64, out: &mut [u8]) {
    let bstart = logical * BLOCK as u64;
    let s = offset.max(bstart);
    let e = (offset + out.len() as u64).min(bstart + BLOCK as u64);
    if s < e {
        out[(s - offset) as usize..(e - offset) as usize]
            .copy_from_slice(&block[(s - bstart) as usize..(e - bstart) as usize]);
    }
}

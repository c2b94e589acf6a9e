//! The chunk store: checksummed, crash-safe storage of chunks addressed by (chunk id, offset)
//! on one or more devices, split into shards that each belong to one reactor.

pub mod alloc;
pub mod format;
pub mod shard;

use crate::io::{Buffers, IoDriver, IoFuture};
use cfs_hugepages::DmaBuf;
use cfs_nvme::{Command, IoError};
use format::{ChunkId, ShardLayout, Superblock, BLOCK, FORMAT_VERSION, MAX_BATCH_BLOCKS};
use shard::ShardSpec;
use std::rc::Rc;
use std::sync::Arc;

/// Errors of chunk store operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// A device command failed (the message names the device, LBA and status).
    #[error("{source}")]
    Io {
        /// The failed command.
        #[from]
        source: IoError,
    },
    /// Stored data does not match its checksum: the block is damaged; nothing is returned.
    #[error("checksum mismatch on {device}: chunk {chunk:#x} offset {offset} (lba {lba}): stored crc32c {expected:#010x}, data has {actual:#010x}")]
    Checksum {
        /// Device holding the block.
        device: String,
        /// Chunk read.
        chunk: ChunkId,
        /// Byte offset of the damaged block within the chunk.
        offset: u64,
        /// Device LBA of the damaged block.
        lba: u64,
        /// Stored checksum.
        expected: u32,
        /// Checksum of what was read.
        actual: u32,
    },
    /// No such chunk.
    #[error("chunk {chunk:#x} does not exist")]
    NotFound {
        /// Chunk asked for.
        chunk: ChunkId,
    },
    /// Offset and length go past the largest chunk.
    #[error("range {offset}+{len} exceeds the maximum chunk size of {max} bytes")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Largest chunk in bytes.
        max: u64,
    },
    /// The shard has no room.
    #[error("no space in shard {shard}: need {need} blocks, {free} free")]
    NoSpace {
        /// Shard index.
        shard: u32,
        /// Blocks needed.
        need: u32,
        /// Blocks free.
        free: u32,
    },
    /// A journal write failed earlier; the shard accepts no more writes until restarted.
    #[error("shard {shard} stopped accepting writes after an error: {reason}")]
    ShardFailed {
        /// Shard index.
        shard: u32,
        /// The first error.
        reason: String,
    },
    /// On-disk metadata is damaged or inconsistent.
    #[error("store metadata on {device} (shard {shard}) is damaged: {what}")]
    Corrupt {
        /// Device.
        device: String,
        /// Shard index.
        shard: u32,
        /// What is wrong.
        what: String,
    },
    /// The devices do not form a valid store.
    #[error("{0}")]
    Layout(String),
    /// The store was closed.
    #[error("chunk store is closed")]
    Closed,
}

/// One device as a reactor sees it: its queue pair driver and geometry.
#[derive(Clone)]
pub struct DevIo {
    /// Device name.
    pub name: Arc<str>,
    /// This reactor's queue pair on the device.
    pub io: Rc<IoDriver>,
    /// The reactor's buffers.
    pub bufs: Rc<Buffers>,
    /// Device LBAs per store block.
    pub lbas_per_block: u64,
    /// Device size in store blocks.
    pub blocks: u64,
}

impl DevIo {
    /// Wraps a driver; the device's LBA size must divide the store block.
    pub fn new(
        name: Arc<str>,
        io: Rc<IoDriver>,
        bufs: Rc<Buffers>,
        ns: cfs_nvme::Namespace,
    ) -> Result<DevIo, StoreError> {
        if ns.lba_size as usize > BLOCK || !BLOCK.is_multiple_of(ns.lba_size as usize) {
            return Err(StoreError::Layout(format!(
                "device {name}: LBA size {} does not divide the {BLOCK}-byte store block",
                ns.lba_size
            )));
        }
        let lbas_per_block = (BLOCK / ns.lba_size as usize) as u64;
        Ok(DevIo {
            name,
            io,
            bufs,
            lbas_per_block,
            blocks: ns.lba_count / lbas_per_block,
        })
    }

    fn buf_blocks(&self) -> u32 {
        (self.bufs.buf_bytes() / BLOCK) as u32
    }

    /// Submits a read or write of `nblocks` store blocks at `dev_block` from/into `buf`.
    pub fn submit_rw(&self, write: bool, dev_block: u64, nblocks: u32, buf: DmaBuf) -> IoFuture {
        assert!(
            nblocks as usize * BLOCK <= buf.len(),
            "transfer larger than its buffer"
        );
        assert!(
            dev_block + u64::from(nblocks) <= self.blocks,
            "transfer past the device end"
        );
        let lba = dev_block * self.lbas_per_block;
        let nlb = (u64::from(nblocks) * self.lbas_per_block) as u32;
        let cmd = if write {
            Command::write(lba, nlb, buf, 0)
        } else {
            Command::read(lba, nlb, buf, 0)
        };
        self.io.submit(cmd)
    }

    /// Awaits an I/O; on error the buffer is returned to the pool.
    pub async fn finish(&self, f: IoFuture) -> Result<DmaBuf, StoreError> {
        let (res, buf) = f.await;
        match (res, buf) {
            (Ok(()), Some(b)) => Ok(b),
            (Ok(()), None) => panic!("read/write completion without its buffer"),
            (Err(e), b) => {
                if let Some(b) = b {
                    self.bufs.put(b);
                }
                Err(e.into())
            }
        }
    }

    /// Flushes the device's volatile cache.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (res, _) = self.io.submit(Command::flush(0)).await;
        Ok(res?)
    }

    /// Runs one I/O per job through the buffer pool, at most `window` in flight, calling
    /// `start` to fill a buffer and submit it and `done` with each result in job order.
    ///
    /// It never waits for a free buffer while holding one of its own: when the pool is empty it
    /// first completes its oldest I/O. So tasks can't deadlock on the pool, however many run.
    pub async fn pipeline<J: Copy>(
        &self,
        jobs: &[J],
        window: usize,
        mut start: impl FnMut(J, DmaBuf) -> IoFuture,
        mut done: impl FnMut(J, Result<&DmaBuf, &StoreError>),
    ) -> Result<(), StoreError> {
        let mut pending: std::collections::VecDeque<(J, IoFuture)> =
            std::collections::VecDeque::new();
        let mut next = 0;
        let mut first_err = None;
        while next < jobs.len() || !pending.is_empty() {
            if next < jobs.len() && pending.len() < window.max(1) {
                let buf = match self.bufs.try_get() {
                    Some(b) => Some(b),
                    None if pending.is_empty() => Some(self.bufs.get().await),
                    None => None,
                };
                if let Some(buf) = buf {
                    pending.push_back((jobs[next], start(jobs[next], buf)));
                    next += 1;
                    continue;
                }
            }
            let Some((job, f)) = pending.pop_front() else {
                break;
            };
            match self.finish(f).await {
                Ok(buf) => {
                    done(job, Ok(&buf));
                    self.bufs.put(buf);
                }
                Err(e) => {
                    done(job, Err(&e));
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Reads `n` consecutive blocks into a vector (metadata paths).
    pub async fn read_meta(&self, dev_block: u64, n: u64) -> Result<Vec<u8>, StoreError> {
        let per = u64::from(self.buf_blocks());
        let jobs: Vec<(u64, u32)> = (0..n)
            .step_by(per as usize)
            .map(|off| (off, (n - off).min(per) as u32))
            .collect();
        let mut out = vec![0u8; n as usize * BLOCK];
        self.pipeline(
            &jobs,
            8,
            |(off, k), buf| self.submit_rw(false, dev_block + off, k, buf),
            |(off, k), r| {
                if let Ok(buf) = r {
                    let at = off as usize * BLOCK;
                    out[at..at + k as usize * BLOCK]
                        .copy_from_slice(&buf.as_slice()[..k as usize * BLOCK]);
                }
            },
        )
        .await?;
        Ok(out)
    }

    /// Writes `data` (whole blocks) at `dev_block`, several pieces in flight at once.
    pub async fn write_meta(&self, dev_block: u64, data: &[u8]) -> Result<(), StoreError> {
        assert_eq!(data.len() % BLOCK, 0);
        let per = self.buf_blocks() as usize;
        let jobs: Vec<usize> = (0..data.len() / BLOCK).step_by(per).collect();
        self.pipeline(
            &jobs,
            8,
            |first, mut buf| {
                let k = (data.len() / BLOCK - first).min(per);
                buf.as_mut_slice()[..k * BLOCK]
                    .copy_from_slice(&data[first * BLOCK..(first + k) * BLOCK]);
                self.submit_rw(true, dev_block + first as u64, k as u32, buf)
            },
            |_, _| {},
        )
        .await
    }
}

/// Format-time choices.
#[derive(Clone, Copy, Debug)]
pub struct FormatParams {
    /// Shards per device (each belongs to one reactor at run time).
    pub shards_per_device: u32,
    /// Journal blocks per shard; `None` picks from the shard size.
    pub journal_blocks: Option<u32>,
    /// Largest chunk in bytes (a multiple of 4 KiB).
    pub max_chunk_bytes: u64,
}

impl Default for FormatParams {
    fn default() -> Self {
        FormatParams {
            shards_per_device: 4,
            journal_blocks: None,
            max_chunk_bytes: 64 << 20,
        }
    }
}

/// Blocks a checkpoint slot needs for `data` blocks in the worst case (every block its own
/// chunk): 8-byte bitmap length, the bitmap, and 20 + 12 bytes per chunk and block.
fn ckpt_blocks_for(data: u64) -> u64 {
    let bytes = 8 + data.div_ceil(8) + data * 32;
    1 + bytes.div_ceil(BLOCK as u64) + 1
}

/// Plans a device's superblock (ids left for the caller).
pub fn plan_device(device_blocks: u64, p: &FormatParams) -> Result<Superblock, StoreError> {
    if p.shards_per_device == 0 {
        return Err(StoreError::Layout(
            "shards_per_device must be at least 1".into(),
        ));
    }
    if p.max_chunk_bytes == 0
        || !p.max_chunk_bytes.is_multiple_of(BLOCK as u64)
        || p.max_chunk_bytes > (1 << 40)
    {
        return Err(StoreError::Layout(format!(
            "max_chunk_bytes {} must be a non-zero multiple of {BLOCK} up to 1 TiB",
            p.max_chunk_bytes
        )));
    }
    let shard_blocks = device_blocks.saturating_sub(2) / u64::from(p.shards_per_device);
    let journal = u64::from(p.journal_blocks.unwrap_or_else(|| {
        (shard_blocks / 64).clamp(u64::from(2 * MAX_BATCH_BLOCKS), 16384) as u32
    }))
    .max(u64::from(2 * MAX_BATCH_BLOCKS));
    let mut data = shard_blocks.saturating_sub(journal);
    loop {
        let ckpt = ckpt_blocks_for(data);
        let fit = shard_blocks.saturating_sub(2 * ckpt + journal);
        if fit >= data {
            break;
        }
        data = fit;
    }
    let data = data.min(u64::from(u32::MAX - 1));
    if data < 16 {
        return Err(StoreError::Layout(format!(
            "device of {} bytes is too small for {} shards (each needs a {}-block journal, two checkpoint slots and data)",
            device_blocks * BLOCK as u64,
            p.shards_per_device,
            journal
        )));
    }
    Ok(Superblock {
        version: FORMAT_VERSION,
        uuid: [0; 16],
        device_index: 0,
        device_count: 1,
        shards: p.shards_per_device,
        first_shard: 0,
        total_shards: p.shards_per_device,
        device_blocks,
        shard_blocks,
        ckpt_blocks: ckpt_blocks_for(data) as u32,
        journal_blocks: journal as u32,
        data_blocks: data as u32,
        max_chunk_blocks: (p.max_chunk_bytes / BLOCK as u64) as u32,
        created_unix_secs: 0,
    })
}

/// The whole store as described by its devices' superblocks.
#[derive(Clone, Debug)]
pub struct StoreLayout {
    /// Superblock of each device, indexed by device index.
    pub devices: Vec<Superblock>,
}

impl StoreLayout {
    /// Shards in the store.
    pub fn total_shards(&self) -> u32 {
        self.devices[0].total_shards
    }

    /// Store UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.devices[0].uuid
    }

    /// The shard a chunk lives in (fixed at format time).
    pub fn shard_of(&self, chunk: ChunkId) -> u32 {
        shard_of(chunk, self.total_shards())
    }

    /// (device index, spec) of global shard `g`.
    pub fn shard_spec(&self, g: u32, dev: &DevIo) -> (usize, ShardSpec) {
        let (d, sb) = self
            .devices
            .iter()
            .enumerate()
            .find(|(_, sb)| sb.first_shard <= g && g < sb.first_shard + sb.shards)
            .expect("every shard index belongs to a device");
        let layout: ShardLayout = sb.shard_layout(g - sb.first_shard);
        (
            d,
            ShardSpec {
                index: g,
                device: Arc::clone(&dev.name),
                layout,
                lbas_per_block: dev.lbas_per_block,
                store_tag: sb.store_tag(g),
                max_chunk_blocks: sb.max_chunk_blocks,
            },
        )
    }
}

/// Spreads chunk ids evenly over shards (SplitMix64 finaliser, so sequential ids scatter).
pub fn shard_of(chunk: ChunkId, total_shards: u32) -> u32 {
    let mut z = chunk.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((u128::from(z) * u128::from(total_shards)) >> 64) as u32
}

/// Writes superblocks and empty shards on every device (given in device-index order).
pub async fn format_store(
    devs: &[DevIo],
    p: &FormatParams,
    uuid: [u8; 16],
    now_secs: u64,
) -> Result<StoreLayout, StoreError> {
    if devs.is_empty() || devs.len() > usize::from(u16::MAX) {
        return Err(StoreError::Layout(
            "a store needs between 1 and 65535 devices".into(),
        ));
    }
    let mut sbs = Vec::new();
    let mut first = 0u32;
    for (i, d) in devs.iter().enumerate() {
        let mut sb = plan_device(d.blocks, p)
            .map_err(|e| StoreError::Layout(format!("device {}: {e}", d.name)))?;
        sb.uuid = uuid;
        sb.device_index = i as u16;
        sb.device_count = devs.len() as u16;
        sb.first_shard = first;
        sb.created_unix_secs = now_secs;
        first += sb.shards;
        sbs.push(sb);
    }
    for sb in &mut sbs {
        sb.total_shards = first;
    }
    let layout = StoreLayout { devices: sbs };
    // Shards first, superblocks last: a half-formatted device has no valid superblock.
    for (d, dev) in devs.iter().enumerate() {
        let sb = &layout.devices[d];
        // Invalidate any old superblock first so an interrupted format is not mistaken for a store.
        dev.write_meta(0, &[0u8; 2 * BLOCK]).await?;
        dev.flush().await?;
        for i in 0..sb.shards {
            let (_, spec) = layout.shard_spec(sb.first_shard + i, dev);
            shard::Shard::format(spec, dev.clone()).await?;
        }
        let mut two = sb.encode().to_vec();
        two.extend_from_slice(&sb.encode());
        dev.write_meta(0, &two).await?;
        dev.flush().await?;
    }
    Ok(layout)
}

/// Reads and cross-checks the superblocks of the given devices (in any order).
pub async fn load_layout(devs: &[DevIo]) -> Result<(StoreLayout, Vec<usize>), StoreError> {
    let mut found: Vec<(usize, Superblock)> = Vec::new();
    for (i, d) in devs.iter().enumerate() {
        let raw = d.read_meta(0, 2).await?;
        let sb = match Superblock::decode(&raw[..BLOCK]) {
            Ok(sb) => sb,
            Err(first) => match Superblock::decode(&raw[BLOCK..]) {
                Ok(sb) => {
                    tracing::warn!(device = %d.name, "primary superblock unreadable ({first}); using the copy");
                    sb
                }
                Err(_) => {
                    return Err(StoreError::Layout(format!(
                    "device {} holds no ClaudeFS store ({first}); run `cfs-dataplane format` first",
                    d.name
                )))
                }
            },
        };
        if sb.device_blocks > d.blocks {
            return Err(StoreError::Layout(format!(
                "device {} is smaller ({} blocks) than when formatted ({} blocks)",
                d.name, d.blocks, sb.device_blocks
            )));
        }
        found.push((i, sb));
    }
    let uuid = found[0].1.uuid;
    let count = usize::from(found[0].1.device_count);
    if found.iter().any(|(_, sb)| sb.uuid != uuid) {
        return Err(StoreError::Layout(
            "devices belong to different stores (UUIDs differ)".into(),
        ));
    }
    if count != devs.len() {
        return Err(StoreError::Layout(format!(
            "the store has {count} devices but {} were configured",
            devs.len()
        )));
    }
    let mut order = vec![usize::MAX; count];
    for (i, sb) in &found {
        let slot = &mut order[usize::from(sb.device_index)];
        if *slot != usize::MAX {
            return Err(StoreError::Layout(format!(
                "two devices claim index {}",
                sb.device_index
            )));
        }
        *slot = *i;
    }
    let mut devices: Vec<Superblock> = vec![found[0].1.clone(); count];
    for (_, sb) in found {
        let idx = usize::from(sb.device_index);
        devices[idx] = sb;
    }
    // `order[device index]` = position in `devs`.
    Ok((StoreLayout { devices }, order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn plans_fit_their_device(blocks in 2_000u64..50_000_000, shards in 1u32..16, chunk in 1u64..20000) {
            let p = FormatParams { shards_per_device: shards, journal_blocks: None, max_chunk_bytes: chunk * 4096 };
            if let Ok(sb) = plan_device(blocks, &p) {
                let per = 2 * u64::from(sb.ckpt_blocks) + u64::from(sb.journal_blocks) + u64::from(sb.data_blocks);
                prop_assert!(per <= sb.shard_blocks);
                prop_assert!(2 + u64::from(sb.shards) * sb.shard_blocks <= blocks);
                prop_assert!(ckpt_blocks_for(u64::from(sb.data_blocks)) <= u64::from(sb.ckpt_blocks));
            }
        }

        #[test]
        fn shard_of_in_range(chunk in any::<u64>(), total in 1u32..1000) {
            prop_assert!(shard_of(chunk, total) < total);
        }
    }
}

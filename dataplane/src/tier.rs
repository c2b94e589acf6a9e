//! The object tier in the data plane: a loop on every node that, for the metadata shards the
//! node leads, flushes cold chunks to the object store in blobs, evicts flushed chunks from
//! flash above the watermark, rewrites blobs that are mostly dead and deletes empty ones; and
//! the hooks the read and write paths use to bring evicted chunks back.
//!
//! Ordering (why nothing acknowledged is ever lost):
//! - Flush: the chunk's tier version is read *before* its bytes; the blob is PUT; then
//!   `TierFlushed` commits. A write that landed meanwhile bumped the version (its `Wrote`
//!   commits after its data), so the extent is dead on arrival.
//! - Evict: under the chunk's tier lock (writers of the chunk hold it from before they look
//!   at the chunk until their `Wrote` committed), the flash bytes are read and compared with
//!   the extent's CRC32C; only then `TierEvicted` commits (refused if the version moved) and
//!   the holders' copies are cut to nothing.
//! - Restore (a write, compaction, format 1 reads): under the same lock, a fresh look at the
//!   index, a ranged GET checked against the CRC, the bytes written to every holder, then
//!   `TierRestored` commits.
//! - Read of an evicted chunk: under the chunk's shared lock (no eviction, restore or write
//!   meanwhile), the piece asked for is fetched as the 1 MiB blocks around it, each checked
//!   against the blob's block CRCs, which are checked against the extent's CRC32C in the
//!   index, and kept in a bounded block cache. The whole chunk is then brought back to flash
//!   in the background (a bounded queue served by its own thread) under the shared lock too,
//!   so reads go on: fetched by 8 MiB GETs into the same cache and written to every holder
//!   while the index still says evicted (no one reads that copy); then, under the exclusive
//!   lock, a fresh look (same version, still evicted, the flash copy still the extent's
//!   bytes) and `TierRestored`. Blobs of format 1 (no block CRCs) are restored whole first.
//! - Delete: `BlobDeleteStarted` commits (only for a blob nothing live points at), then the
//!   DELETE, then `BlobDeleted`. A crash between leaves a marked blob that the next round
//!   DELETEs again (a DELETE of a missing object succeeds).

use crate::block_cache::BlockCache;
use crate::config::TierSection;
use crate::fs_service::{errno, internal, FsService};
use crate::replication::ChunkOp;
use cfs_fabric::ServiceError;
use cfs_meta::command::{Op, Outcome};
use cfs_meta::tier::{Flushed, TierExtent};
use cfs_meta::{ChunkId, Creds, Errno, FileType, InodeId, Namespace, CHUNK_BYTES};
use cfs_objtier::blob::{BlobBuilder, BlobId, ExtentBlocks, FetchedBlocks, Placed, Table};
use cfs_objtier::mover::{Mover, MoverConfig};
use cfs_objtier::policy::{self, FlashExtent, PolicyConfig, Pressure};
use cfs_objtier::s3::{BlobStore, S3Config};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The extended attribute `cfs tier pin` sets: the file's chunks stay on flash.
pub const PIN_XATTR: &[u8] = b"user.cfs.pin";

/// RPC method of tier requests (payload JSON `{"op": "status"}` or `{"op": "flush"}`).
pub const TIER_METHOD: u32 = 0x0100_0020;

/// Stripes of the per-(file, chunk index) tier locks.
const LOCK_STRIPES: usize = 256;

/// Extent tables of blobs read lately (for their block CRCs); blobs never change, so an
/// entry is never stale, only unused. At this many the cache starts again.
const TABLE_CACHE: usize = 256;

/// Chunks waiting to be brought back to flash after a read from the store; one more is left
/// to a later read.
const RESTORE_QUEUE: usize = 64;

/// Threads bringing chunks back to flash after reads from the store.
const RESTORERS: usize = 2;

/// A background restore fetches a chunk by ranged GETs of this much (whole blocks), putting
/// each in the block cache as it comes: a reader of the chunk meanwhile finds them there.
const RESTORE_GET_BYTES: u64 = 8 << 20;

/// Chunks whose last read time a node remembers; past this the older half is forgotten.
const READS_REMEMBERED: usize = 1 << 20;

/// When this node last served a read of each chunk (ms since the epoch), for eviction's
/// "least recently read first". In memory and per node: a read another node served, or one
/// before a restart, is not seen (the chunk's write time counts then).
#[derive(Debug, Default)]
struct ReadTimes {
    at: std::collections::HashMap<u64, u64>,
}

impl ReadTimes {
    fn note(&mut self, chunk: u64, now_ms: u64) {
        if self.at.len() >= READS_REMEMBERED && !self.at.contains_key(&chunk) {
            let mut times: Vec<u64> = self.at.values().copied().collect();
            let mid = times.len() / 2;
            let median = *times.select_nth_unstable(mid).1;
            self.at.retain(|_, t| *t > median);
        }
        self.at.insert(chunk, now_ms);
        assert!(self.at.len() <= READS_REMEMBERED, "read times unbounded");
    }

    fn last(&self, chunk: u64) -> u64 {
        self.at.get(&chunk).copied().unwrap_or(0)
    }
}

/// What the last round saw, for `cfs tier status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TierStats {
    /// Bytes of file data on flash (chunks not evicted).
    pub flash_bytes: u64,
    /// Bytes of file data the index points at on the object store.
    pub store_bytes: u64,
    /// Of those, bytes whose flash copy was evicted.
    pub evicted_bytes: u64,
    /// Chunks not (or no longer) on the store.
    pub unflushed_chunks: u64,
    /// Their bytes (the flush queue).
    pub unflushed_bytes: u64,
    /// Age of the oldest unflushed write, ms.
    pub oldest_unflushed_ms: u64,
    /// Blobs in the index.
    pub blobs: u64,
    /// Blobs marked for deletion.
    pub blobs_deleting: u64,
    /// Blobs uploaded by this node since start.
    pub blobs_put: u64,
    /// Blobs deleted by this node since start.
    pub blobs_deleted: u64,
    /// Chunks evicted by this node since start.
    pub evictions: u64,
    /// Chunks read back by this node since start.
    pub restores: u64,
    /// Blobs rewritten by compaction since start.
    pub compactions: u64,
    /// Reads of evicted chunks answered from the store by blocks since start.
    pub store_reads: u64,
    /// Bytes those reads fetched from the store (whole blocks).
    pub store_read_bytes: u64,
    /// Reads of evicted chunks answered from the block cache since start.
    pub cache_reads: u64,
    /// Bytes the background restores fetched from the store since start.
    pub restore_bytes: u64,
    /// Rounds completed.
    pub rounds: u64,
}

/// The tier of one node (see the module documentation).
pub struct Tier {
    cfg: TierSection,
    policy: PolicyConfig,
    mover: Mover,
    locks: Vec<RwLock<()>>,
    /// Flush everything now, whatever its age (`cfs tier flush`): the round number asked.
    flush_asked: AtomicU64,
    stats: Mutex<TierStats>,
    /// Unflushed bytes as of the last round (back-pressure reads it on every write).
    unflushed: AtomicU64,
    /// Blob ids: node id, a start-time nonce and a counter.
    blob_seq: AtomicU64,
    nonce: u64,
    node: u64,
    wake: (Mutex<bool>, std::sync::Condvar),
    /// Last time writers were told the store is down (one log line a few seconds).
    last_full_log: Mutex<Option<Instant>>,
    started: AtomicBool,
    /// Set by [`Tier::stop`]: the loop ends and any request to the store it waits on is
    /// abandoned (an upload that never landed is simply done again after the restart).
    stop_tx: tokio::sync::watch::Sender<bool>,
    /// Threads (the loop, the restorer) still holding the service (and with it the engine).
    running: std::sync::atomic::AtomicUsize,
    tables: Mutex<std::collections::HashMap<u128, Arc<Table>>>,
    /// Last reads of chunks this node served.
    reads: Mutex<ReadTimes>,
    /// Checked blocks of evicted extents read lately; the condition is signalled when a
    /// fetch ends.
    blocks: (Mutex<BlockCache>, std::sync::Condvar),
    /// Chunks read from the store, to bring back to flash (the restorer takes them).
    restore_tx: std::sync::mpsc::SyncSender<(InodeId, u64)>,
    restore_rx: Mutex<Option<std::sync::mpsc::Receiver<(InodeId, u64)>>>,
    restore_queued: Mutex<std::collections::HashSet<(InodeId, u64)>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Tier {
    /// Opens the store client for `[tier]` (no request is made yet).
    pub fn new(cfg: &TierSection, node: u64) -> Result<Tier, String> {
        let s3 = S3Config {
            endpoint: (!cfg.endpoint.is_empty()).then(|| cfg.endpoint.clone()),
            region: cfg.region.clone(),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
            path_style: !cfg.virtual_host,
            access_key: cfg.access_key_id.clone(),
            secret_key: cfg.secret_access_key.clone(),
            request_timeout_ms: cfg.request_timeout_ms,
            sign_payload: cfg.sign_payload,
            retries: 1,
        };
        let store = BlobStore::new(&s3).map_err(|e| e.to_string())?;
        let mover = Mover::new(
            store,
            MoverConfig {
                deadline_ms: cfg.deadline_ms,
                ..MoverConfig::default()
            },
        );
        let (restore_tx, restore_rx) = std::sync::mpsc::sync_channel(RESTORE_QUEUE);
        Ok(Tier {
            running: std::sync::atomic::AtomicUsize::new(0),
            tables: Mutex::new(std::collections::HashMap::new()),
            reads: Mutex::new(ReadTimes::default()),
            blocks: (
                Mutex::new(BlockCache::new(cfg.read_cache_mib << 20)),
                std::sync::Condvar::new(),
            ),
            restore_tx,
            restore_rx: Mutex::new(Some(restore_rx)),
            restore_queued: Mutex::new(std::collections::HashSet::new()),
            policy: PolicyConfig {
                min_age_ms: cfg.min_age_ms,
                evict_above_pct: cfg.evict_above_pct,
                evict_to_pct: cfg.evict_to_pct,
                reserve_bytes: cfg.reserve_mib << 20,
                reserve_slack_bytes: (cfg.reserve_slack_mib << 20).max(1),
                compact_below_pct: cfg.compact_below_pct,
            },
            cfg: cfg.clone(),
            mover,
            locks: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            flush_asked: AtomicU64::new(0),
            stats: Mutex::new(TierStats::default()),
            unflushed: AtomicU64::new(0),
            blob_seq: AtomicU64::new(0),
            nonce: now_ms() ^ (u64::from(std::process::id()) << 40),
            node,
            wake: (Mutex::new(false), std::sync::Condvar::new()),
            last_full_log: Mutex::new(None),
            started: AtomicBool::new(false),
            stop_tx: tokio::sync::watch::channel(false).0,
        })
    }

    fn stripe(&self, ino: InodeId, idx: u64) -> usize {
        let h = ino.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ idx.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        (h >> 32) as usize % LOCK_STRIPES
    }

    /// Shared lock of a (file, chunk index) for a read: no eviction while it is held.
    pub fn read_lock(&self, ino: InodeId, idx: u64) -> std::sync::RwLockReadGuard<'_, ()> {
        self.locks[self.stripe(ino, idx)]
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Shared locks of the chunk indexes `first..=last` of a file, in stripe order.
    pub fn read_locks(
        &self,
        ino: InodeId,
        first: u64,
        last: u64,
    ) -> Vec<std::sync::RwLockReadGuard<'_, ()>> {
        let mut s: Vec<usize> = (first..=last).map(|i| self.stripe(ino, i)).collect();
        s.sort_unstable();
        s.dedup();
        s.into_iter()
            .map(|i| self.locks[i].read().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Exclusive locks of the chunk indexes `first..=last` of a file, in stripe order (no
    /// deadlock between two writers).
    pub fn write_locks(
        &self,
        ino: InodeId,
        first: u64,
        last: u64,
    ) -> Vec<std::sync::RwLockWriteGuard<'_, ()>> {
        let mut s: Vec<usize> = (first..=last).map(|i| self.stripe(ino, i)).collect();
        s.sort_unstable();
        s.dedup();
        s.into_iter()
            .map(|i| self.locks[i].write().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    fn bump(&self, f: impl FnOnce(&mut TierStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Back-pressure for a write of `bytes`: `Ok` to go on (after the delay it asks), or
    /// ENOSPC once the unflushed data is past the reserve while the store is down. Counts the
    /// bytes as unflushed until the next round recounts (a round stuck on a store that is
    /// down never does, so the count grows with every write meanwhile).
    pub fn admit_write(&self, bytes: u64) -> Result<(), ServiceError> {
        let healthy = self.mover.healthy();
        match policy::pressure(
            &self.policy,
            self.unflushed.load(Ordering::Relaxed),
            healthy,
        ) {
            Pressure::Normal => {
                self.unflushed.fetch_add(bytes, Ordering::Relaxed);
                Ok(())
            }
            Pressure::Throttle(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                self.unflushed.fetch_add(bytes, Ordering::Relaxed);
                Ok(())
            }
            Pressure::Full => {
                let mut last = self.last_full_log.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    *last = Some(Instant::now());
                    tracing::error!(
                        "object store unreachable ({}) and {} MiB unflushed, past the reserve of {} MiB: refusing new data with ENOSPC until the store is back (written data is safe on flash)",
                        self.mover.status().last_error.unwrap_or_default(),
                        self.unflushed.load(Ordering::Relaxed) >> 20,
                        self.cfg.reserve_mib
                    );
                }
                Err(errno(Errno::NoSpc))
            }
        }
    }

    fn new_blob_id(&self, shard: u16) -> u128 {
        let seq = self.blob_seq.fetch_add(1, Ordering::Relaxed);
        (u128::from(self.node) << 112)
            | (u128::from(self.nonce & 0xFFFF_FFFF_FFFF) << 64)
            | (u128::from(seq & 0xFFFF_FFFF_FFFF) << 16)
            | u128::from(shard)
    }

    /// Status for `cfs tier status`.
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let m = self.mover.status();
        serde_json::json!({
            "stats": s,
            "store": {
                "endpoint": self.cfg.endpoint,
                "bucket": self.cfg.bucket,
                "prefix": self.cfg.prefix,
                "puts": m.puts,
                "gets": m.gets,
                "retries": m.retries,
                "missing_blobs": m.missing,
                "breaker_open": m.breaker_open,
                "failing": m.failing,
                "last_error": m.last_error,
            },
            "flush_asked": self.flush_asked.load(Ordering::Relaxed),
        })
    }

    /// Stops the loop (at shutdown, before the engine is closed): waits up to `wait` for it.
    pub fn stop(&self, wait: Duration) {
        self.stop_tx.send_replace(true);
        self.wake();
        let until = Instant::now() + wait;
        while self.running.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }

    /// Runs a store request from the loop's thread, abandoned if the tier is stopped.
    fn run<T>(
        &self,
        rt: &tokio::runtime::Handle,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, ServiceError> {
        let mut stop = self.stop_tx.subscribe();
        rt.block_on(async move {
            tokio::select! {
                r = f => Ok(r),
                _ = stop.wait_for(|s| *s) => Err(ServiceError::new(
                    cfs_fabric::ErrorCode::Busy,
                    "the object tier is stopping",
                )),
            }
        })
    }

    /// A blob's extent table, from the cache or the store.
    fn table(&self, rt: &tokio::runtime::Handle, blob: u128) -> Result<Arc<Table>, ServiceError> {
        if let Some(t) = self
            .tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&blob)
        {
            return Ok(Arc::clone(t));
        }
        let t = Arc::new(
            rt.block_on(self.mover.read_table(BlobId(blob)))
                .map_err(|err| {
                    tracing::error!("reading the table of blob {blob:032x}: {err}");
                    errno(Errno::Io)
                })?,
        );
        let mut cache = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= TABLE_CACHE {
            cache.clear();
        }
        cache.insert(blob, Arc::clone(&t));
        Ok(t)
    }

    /// The checked blocks around `[offset, offset + len)` of extent `p`: from the block cache
    /// when it holds them all (`true`), else by one ranged GET (then kept in the cache).
    fn fetch_blocks(
        &self,
        rt: &tokio::runtime::Handle,
        p: &Placed,
        blocks: &ExtentBlocks,
        offset: u64,
        len: u64,
    ) -> Result<(FetchedBlocks, bool), ServiceError> {
        let (first, range) = blocks.cover(p, offset, len);
        let block = 1u64 << blocks.shift;
        let blob = p.blob.0;
        let (lock, fetched) = &self.blocks;
        let until = Instant::now() + Duration::from_millis(self.cfg.deadline_ms);
        let mut cache = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(bytes) = cache.get_range(blob, range.clone(), block) {
                let f = FetchedBlocks {
                    first,
                    range,
                    bytes,
                };
                return Ok((f, true));
            }
            // Being fetched by another (the restore, mostly): wait for it rather than fetch
            // the same blocks twice; if that fetch fails, fetch them here.
            let now = Instant::now();
            if !cache.being_fetched(blob, &range) || now >= until {
                break;
            }
            cache = fetched
                .wait_timeout(cache, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        cache.fetching(blob, range.clone());
        drop(cache);
        let got = self.run(rt, self.mover.get_blocks(p, blocks, offset, len));
        let mut cache = lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(Ok(f)) = &got {
            cache.insert_range(blob, f.range.start, &f.bytes, block);
        }
        cache.fetched(blob, &range);
        drop(cache);
        fetched.notify_all();
        let f = got?.map_err(|err| {
            tracing::error!(
                "reading evicted chunk {:#x} at {offset}+{len} from blob {}: {err}",
                p.chunk,
                p.blob
            );
            errno(Errno::Io)
        })?;
        Ok((f, false))
    }

    /// Notes a read of `chunk` (eviction takes the least recently read first).
    pub fn note_read(&self, chunk: ChunkId) {
        self.reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(chunk.0, now_ms());
    }

    /// Asks the restorer to bring chunk `idx` of `ino` back to flash (once; a full queue
    /// leaves it to a later read).
    fn queue_restore(&self, ino: InodeId, idx: u64) {
        let mut q = self
            .restore_queued
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if q.contains(&(ino, idx)) {
            return;
        }
        if self.restore_tx.try_send((ino, idx)).is_ok() {
            q.insert((ino, idx));
        }
    }

    fn wake(&self) {
        let (m, cv) = &self.wake;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    fn sleep(&self) {
        let (m, cv) = &self.wake;
        let g = m.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = cv
            .wait_timeout_while(g, Duration::from_millis(self.cfg.scan_interval_ms), |w| !*w)
            .unwrap_or_else(|p| p.into_inner());
        *g = false;
    }
}

/// One chunk as a round sees it.
#[derive(Clone, Debug)]
struct Cand {
    ino: InodeId,
    idx: u64,
    chunk: ChunkId,
    /// Logical bytes of the chunk (from the file size).
    len: u64,
    written_ms: u64,
    pinned: bool,
    version: u64,
    extent: Option<TierExtent>,
}

/// A blob packed and ready to go up.
struct Packed {
    id: u128,
    bytes: Vec<u8>,
    placed: Vec<Placed>,
    versions: Vec<(ChunkId, u64)>,
    packed_ms: u128,
}

/// What a round reads from one shard's namespace.
struct Scan {
    cands: Vec<Cand>,
    blobs: Vec<(u128, cfs_meta::tier::BlobInfo)>,
    /// Uploads started and never recorded (by a leader that died or lost its lead).
    pending: Vec<u128>,
}

impl Scan {
    /// The chunks with bytes on flash, as the policy sees them (`read_ms`: when one was last
    /// read, 0 if not known).
    fn on_flash(&self, read_ms: impl Fn(u64) -> u64) -> Vec<FlashExtent> {
        self.cands
            .iter()
            .filter(|c| !c.extent.is_some_and(|e| e.evicted))
            .map(|c| FlashExtent {
                chunk: c.chunk.0,
                bytes: c.len,
                written_ms: c.written_ms,
                flushed: c.extent.is_some(),
                pinned: c.pinned,
                read_ms: read_ms(c.chunk.0),
            })
            .collect()
    }
}

fn scan(ns: &Namespace) -> Scan {
    let mut cands = Vec::new();
    for (ino, idx, chunk) in ns.all_extents() {
        let Ok(a) = ns.getattr(ino) else { continue };
        if a.kind != FileType::Regular || a.size <= idx * CHUNK_BYTES {
            continue;
        }
        let len = (a.size - idx * CHUNK_BYTES).min(CHUNK_BYTES);
        let written_ms = (a.mtime.sec.max(0) as u64) * 1000 + u64::from(a.mtime.nsec) / 1_000_000;
        cands.push(Cand {
            ino,
            idx,
            chunk,
            len,
            written_ms,
            pinned: ns.getxattr(&Creds::root(), ino, PIN_XATTR).is_ok(),
            version: ns.tier().version(chunk),
            extent: ns.tier().extent(chunk).copied(),
        });
    }
    Scan {
        cands,
        blobs: ns.tier().blobs().map(|(k, v)| (k, *v)).collect(),
        pending: ns.tier().pending().collect(),
    }
}

fn placed(chunk: ChunkId, e: &TierExtent) -> Placed {
    Placed {
        chunk: chunk.0,
        chunk_offset: 0,
        generation: e.version,
        blob: BlobId(e.blob),
        blob_offset: e.blob_offset,
        len: e.len,
        crc32c: e.crc32c,
    }
}

impl FsService {
    /// Starts the tier loop (once).
    pub fn start_tier(&self, tier: Arc<Tier>, rt: tokio::runtime::Handle) {
        if tier.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let svc = self.clone();
        let (t, rt_restore) = (Arc::clone(&tier), rt.clone());
        tier.running.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("cfs-tier".into())
            .spawn(move || {
                let _rt = rt.enter();
                while !tier.stopping() {
                    let asked = tier.flush_asked.load(Ordering::Relaxed);
                    if let Err(e) = svc.tier_round(&tier, &rt, asked > 0) {
                        tracing::warn!("tier round: {e}");
                    }
                    tier.bump(|s| s.rounds += 1);
                    // A flush asked during the round is served by the next one.
                    let _ = tier.flush_asked.compare_exchange(
                        asked,
                        0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tier.sleep();
                }
                drop(svc);
                tier.running.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            t.running.fetch_sub(1, Ordering::SeqCst);
            tracing::error!("cannot start the tier thread: {e}");
        }
        let Some(rx) = t
            .restore_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        // Two restorers: one fetches a chunk while the other writes the last one to flash.
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..RESTORERS {
            let svc = self.clone();
            let (tier, rt, rx) = (Arc::clone(&t), rt_restore.clone(), Arc::clone(&rx));
            tier.running.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("cfs-tier-restore-{n}"))
                .spawn(move || {
                    let _rt = rt.enter();
                    while !tier.stopping() {
                        let next = rx
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .recv_timeout(Duration::from_millis(200));
                        let Ok((ino, idx)) = next else {
                            continue;
                        };
                        if let Err(e) = svc.restore_in_background(&tier, ino, idx) {
                            tracing::warn!("bringing chunk {idx} of {ino} back to flash: {e}");
                        }
                        tier.restore_queued
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&(ino, idx));
                    }
                    drop(svc);
                    tier.running.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                t.running.fetch_sub(1, Ordering::SeqCst);
                tracing::error!("cannot start the tier's restore thread: {e}");
            }
        }
    }

    /// The shards this node tiers (those it leads), each scanned.
    fn tier_scans(&self) -> Vec<(u16, Scan)> {
        if self.cluster().is_none() {
            return self
                .view(InodeId::ROOT, |ns| Ok(scan(ns)))
                .map(|s| vec![(0, s)])
                .unwrap_or_default();
        }
        let mut out = Vec::new();
        for c in self.groups() {
            if !c.replica().is_leader() {
                continue;
            }
            match c.read(scan) {
                Ok(s) => out.push((c.shard().index, s)),
                Err(e) => tracing::debug!("tier scan of shard {}: {e}", c.shard().index),
            }
        }
        out
    }

    /// One round: flush, evict, compact, delete (see the module documentation).
    fn tier_round(
        &self,
        tier: &Arc<Tier>,
        rt: &tokio::runtime::Handle,
        force: bool,
    ) -> Result<(), ServiceError> {
        let now = now_ms();
        let scans = self.tier_scans();
        let (used, capacity) = self.flash_usage();
        let mut totals = TierStats::default();
        for (shard, s) in &scans {
            let flash = s.on_flash(|_| 0);
            // Flush.
            let mut cfg = tier.policy;
            if force {
                cfg.min_age_ms = 0;
            }
            let pending: Vec<&Cand> = {
                let picked = policy::to_flush(&cfg, now, &flash, u64::MAX);
                let by_chunk: std::collections::HashMap<u64, &Cand> =
                    s.cands.iter().map(|c| (c.chunk.0, c)).collect();
                picked
                    .iter()
                    .filter_map(|c| by_chunk.get(c).copied())
                    .collect()
            };
            self.flush_all(tier, rt, *shard, &pending)?;
            // Evict.
            let flushed_now = self.tier_scans();
            if let Some((_, s2)) = flushed_now.iter().find(|(k, _)| k == shard) {
                let flash = {
                    let reads = tier.reads.lock().unwrap_or_else(|p| p.into_inner());
                    s2.on_flash(|c| reads.last(c))
                };
                for chunk in policy::to_evict(&tier.policy, used, capacity, &flash) {
                    if let Some(c) = s2.cands.iter().find(|c| c.chunk.0 == chunk) {
                        if let Err(e) = self.evict(tier, c) {
                            tracing::warn!("evicting {}: {e}", c.chunk);
                        }
                    }
                }
                // Compact, then delete what nothing points at.
                self.compact(tier, rt, *shard, s2)?;
            }
            self.delete_dead_blobs(tier, rt)?;
        }
        // Totals for status, from a fresh look.
        for (_, s) in self.tier_scans() {
            for c in &s.cands {
                match c.extent {
                    Some(e) => {
                        totals.store_bytes += u64::from(e.len);
                        if e.evicted {
                            totals.evicted_bytes += u64::from(e.len);
                        } else {
                            totals.flash_bytes += c.len;
                        }
                    }
                    None => {
                        totals.flash_bytes += c.len;
                        totals.unflushed_chunks += 1;
                        totals.unflushed_bytes += c.len;
                        totals.oldest_unflushed_ms = totals
                            .oldest_unflushed_ms
                            .max(now.saturating_sub(c.written_ms));
                    }
                }
            }
            totals.blobs += s.blobs.len() as u64;
            totals.blobs_deleting += s.blobs.iter().filter(|(_, b)| b.deleting).count() as u64;
        }
        tier.unflushed
            .store(totals.unflushed_bytes, Ordering::Relaxed);
        tier.bump(|st| {
            st.flash_bytes = totals.flash_bytes;
            st.store_bytes = totals.store_bytes;
            st.evicted_bytes = totals.evicted_bytes;
            st.unflushed_chunks = totals.unflushed_chunks;
            st.unflushed_bytes = totals.unflushed_bytes;
            st.oldest_unflushed_ms = totals.oldest_unflushed_ms;
            st.blobs = totals.blobs;
            st.blobs_deleting = totals.blobs_deleting;
        });
        Ok(())
    }

    /// Flash in use and its capacity, bytes (this node's store).
    fn flash_usage(&self) -> (u64, u64) {
        let block = crate::store::format::BLOCK as u64;
        match self.engine.stats() {
            Ok(v) => v.iter().fold((0, 0), |(u, c), (_, s)| {
                (
                    u + s.live_blocks * block,
                    c + (s.live_blocks + s.free_blocks) * block,
                )
            }),
            Err(_) => (0, 0),
        }
    }

    /// Packs chunks from the front of `pending` into one blob: how many were taken (read
    /// or skipped), and the blob unless none could be read.
    fn pack_blob(
        &self,
        tier: &Tier,
        shard: u16,
        pending: &[&Cand],
    ) -> Result<(usize, Option<Packed>), ServiceError> {
        let id = tier.new_blob_id(shard);
        let started = Instant::now();
        let mut b = match tier.cfg.block_kib {
            0 => BlobBuilder::v1(BlobId(id), tier.cfg.blob_kib << 10),
            k => BlobBuilder::with_block_shift(
                BlobId(id),
                tier.cfg.blob_kib << 10,
                (k << 10).trailing_zeros() as u8,
            ),
        };
        let mut versions = Vec::new();
        let mut taken = 0;
        for c in pending {
            // The version (in `c`) was read before the bytes: a write in between makes the
            // extent dead on arrival.
            let data = {
                let _shared = tier.read_lock(c.ino, c.idx);
                match self.read_whole(c.chunk, c.len) {
                    Ok(d) => d,
                    Err(e) => {
                        // Not this round (no copy reachable now): the others go ahead.
                        tracing::warn!("flush of {}: {e}; skipped this round", c.chunk);
                        taken += 1;
                        continue;
                    }
                }
            };
            match b.add(c.chunk.0, 0, c.version, &data) {
                Ok(true) => {
                    versions.push((c.chunk, c.version));
                    taken += 1;
                }
                Ok(false) => break,
                Err(e) => return Err(internal(format!("blob of {}: {e}", c.chunk))),
            }
        }
        if b.is_empty() {
            return Ok((taken, None));
        }
        let (bytes, placed) = b.finish(now_ms() / 1000);
        Ok((
            taken,
            Some(Packed {
                id,
                bytes,
                placed,
                versions,
                packed_ms: started.elapsed().as_millis(),
            }),
        ))
    }

    /// Flushes `pending` in blobs, reading and packing the next blob while the previous one
    /// goes up (measured: reading and PUT take about as long each); every blob is recorded
    /// (`TierFlushed`) only once its PUT succeeded.
    fn flush_all(
        &self,
        tier: &Arc<Tier>,
        rt: &tokio::runtime::Handle,
        shard: u16,
        pending: &[&Cand],
    ) -> Result<(), ServiceError> {
        type Upload = tokio::task::JoinHandle<Result<(), cfs_objtier::s3::S3Error>>;
        let mut rest = pending;
        let mut inflight: Option<(Packed, Upload, Instant)> = None;
        loop {
            let next = if rest.is_empty() {
                Ok(None)
            } else {
                self.pack_blob(tier, shard, rest).map(|(taken, p)| {
                    rest = &rest[taken.max(1).min(rest.len())..];
                    p
                })
            };
            if let Some((p, upload, sent)) = inflight.take() {
                let abort = upload.abort_handle();
                let waited = tier.run(rt, upload);
                if waited.is_err() {
                    abort.abort(); // stopping: the upload is left to the next leader's cleanup
                }
                waited?
                    .map_err(|e| internal(format!("upload task of blob {:032x}: {e}", p.id)))?
                    .map_err(|e| internal(format!("PUT of blob {:032x}: {e}", p.id)))?;
                tier.bump(|s| s.blobs_put += 1);
                self.record_blob(p, sent.elapsed().as_millis())?;
            }
            match next? {
                Some(mut p) => {
                    // Recorded first: if this upload is never recorded, the next leader finds
                    // it and DELETEs it (see the module documentation).
                    self.exec(&Creds::root(), Op::TierUploadStarted { blob: p.id })?;
                    let bytes = bytes::Bytes::from(std::mem::take(&mut p.bytes));
                    let (t, id) = (Arc::clone(tier), p.id);
                    let upload = rt.spawn(async move { t.mover.put_blob(BlobId(id), bytes).await });
                    inflight = Some((p, upload, Instant::now()));
                }
                None if rest.is_empty() => return Ok(()),
                None => {}
            }
        }
    }

    /// Commits an uploaded blob's extents to the index.
    fn record_blob(&self, p: Packed, put_ms: u128) -> Result<(), ServiceError> {
        let payload_offset = p.placed.first().map(|x| x.blob_offset).unwrap_or(0);
        let payload_bytes: u64 = p.placed.iter().map(|x| u64::from(x.len)).sum();
        assert_eq!(
            p.placed.len(),
            p.versions.len(),
            "one version per packed extent"
        );
        let extents: Vec<Flushed> = p
            .placed
            .iter()
            .zip(&p.versions)
            .map(|(x, (chunk, version))| Flushed {
                chunk: *chunk,
                version: *version,
                blob_offset: x.blob_offset,
                len: x.len,
                crc32c: x.crc32c,
            })
            .collect();
        let n = extents.len();
        self.exec(
            &Creds::root(),
            Op::TierFlushed {
                blob: p.id,
                payload_offset,
                payload_bytes,
                extents,
            },
        )?;
        tracing::info!(
            "flushed {n} chunk(s), {payload_bytes} bytes, to blob {:032x} (read and packed in {} ms, PUT in {put_ms} ms)",
            p.id,
            p.packed_ms,
        );
        Ok(())
    }

    /// A chunk's first `len` bytes, read in pieces (no request or reply is large).
    fn read_whole(&self, chunk: ChunkId, len: u64) -> Result<Vec<u8>, ServiceError> {
        let mut out = Vec::with_capacity(len as usize);
        for (off, n) in crate::replication::copy_pieces(len) {
            out.extend_from_slice(&self.chunk_read(chunk, off, n)?);
        }
        Ok(out)
    }

    /// Drops the flash copies of a flushed chunk whose bytes are still the blob's.
    fn evict(&self, tier: &Tier, c: &Cand) -> Result<bool, ServiceError> {
        let Some(e) = c.extent else { return Ok(false) };
        let _excl = tier.write_locks(c.ino, c.idx, c.idx);
        let data = self.read_whole(c.chunk, u64::from(e.len))?;
        if crc32c::crc32c(&data) != e.crc32c {
            return Ok(false); // changed since the flush (its Wrote is on the way)
        }
        match self.exec(
            &Creds::root(),
            Op::TierEvicted {
                chunk: c.chunk,
                version: e.version,
            },
        )? {
            Outcome::Committed(true) => {}
            _ => return Ok(false),
        }
        self.chunk_change(c.chunk, ChunkOp::Truncate { len: 0 })?;
        tier.bump(|s| s.evictions += 1);
        Ok(true)
    }

    /// Rewrites blobs mostly dead: their live extents go into new blobs (read from flash, or
    /// from the old blob when evicted: restored first), which moves them; the old blobs then
    /// hold nothing live and are deleted.
    fn compact(
        &self,
        tier: &Arc<Tier>,
        rt: &tokio::runtime::Handle,
        shard: u16,
        s: &Scan,
    ) -> Result<(), ServiceError> {
        let blobs: Vec<(u128, u64, u64)> = s
            .blobs
            .iter()
            .filter(|(_, b)| !b.deleting && b.live_bytes > 0)
            .map(|(k, b)| (*k, b.live_bytes, b.payload_bytes))
            .collect();
        for blob in policy::to_compact(&tier.policy, &blobs) {
            let live: Vec<&Cand> = s
                .cands
                .iter()
                .filter(|c| c.extent.is_some_and(|e| e.blob == blob))
                .collect();
            for c in &live {
                if c.extent.is_some_and(|e| e.evicted) {
                    self.restore(tier, c.ino, c.idx)?;
                }
            }
            self.flush_all(tier, rt, shard, &live)?;
            tier.bump(|st| st.compactions += 1);
            tracing::info!("compacted blob {blob:032x}");
        }
        Ok(())
    }

    /// Deletes blobs nothing live points at (and finishes deletions a crash interrupted), and
    /// the objects of uploads started and never recorded. Runs between flushes, when this
    /// loop has no upload of its own in flight.
    fn delete_dead_blobs(
        &self,
        tier: &Tier,
        rt: &tokio::runtime::Handle,
    ) -> Result<(), ServiceError> {
        for (_, s) in self.tier_scans() {
            for blob in s.pending {
                match tier.run(rt, tier.mover.delete_blob(BlobId(blob)))? {
                    Ok(()) => {
                        self.exec(&Creds::root(), Op::TierUploadAbandoned { blob })?;
                        tracing::warn!("deleted blob {blob:032x}: its upload was never recorded");
                    }
                    Err(e) => tracing::warn!("DELETE of unrecorded blob {blob:032x}: {e}"),
                }
            }
            for (blob, info) in s.blobs {
                if info.live_bytes > 0 {
                    continue;
                }
                if !info.deleting {
                    self.exec(&Creds::root(), Op::BlobDeleteStarted { blob })?;
                }
                match tier.run(rt, tier.mover.delete_blob(BlobId(blob)))? {
                    Ok(()) => {
                        self.exec(&Creds::root(), Op::BlobDeleted { blob })?;
                        tier.bump(|st| st.blobs_deleted += 1);
                        tracing::info!("deleted blob {blob:032x}");
                    }
                    Err(e) => tracing::warn!("DELETE of blob {blob:032x}: {e} (tried again later)"),
                }
            }
        }
        Ok(())
    }

    /// Brings chunk `idx` of `ino` back to flash if it is evicted, holding its tier lock
    /// exclusively throughout (writers, compaction, format 1 reads).
    pub(crate) fn restore(&self, tier: &Tier, ino: InodeId, idx: u64) -> Result<(), ServiceError> {
        let _excl = tier.write_locks(ino, idx, idx);
        self.restore_locked(tier, ino, idx)
    }

    /// The chunk at index `idx` of `ino` and its extent, if evicted (a fresh look: another
    /// may have restored it, a writer changed it since).
    fn evicted_chunk(
        &self,
        ino: InodeId,
        idx: u64,
    ) -> Result<Option<(ChunkId, TierExtent)>, ServiceError> {
        let found = self.view(ino, |ns| {
            let c = ns.extents(ino, idx * CHUNK_BYTES, 1)?;
            Ok(c.first()
                .and_then(|(_, c)| Some((*c, *ns.tier().extent(*c)?))))
        })?;
        Ok(found.filter(|(_, e)| e.evicted))
    }

    /// Writes a chunk's bytes back to every holder (what was there is cut first).
    fn write_back(&self, chunk: ChunkId, data: &[u8]) -> Result<(), ServiceError> {
        self.chunk_change(chunk, ChunkOp::Truncate { len: 0 })?;
        for (off, n) in crate::replication::copy_pieces(data.len() as u64) {
            let piece = data[off as usize..(off + n) as usize].to_vec();
            self.chunk_change(
                chunk,
                ChunkOp::Write {
                    offset: off,
                    data: piece,
                },
            )?;
        }
        Ok(())
    }

    /// [`FsService::restore`] with the chunk's tier lock held exclusively by the caller.
    pub(crate) fn restore_locked(
        &self,
        tier: &Tier,
        ino: InodeId,
        idx: u64,
    ) -> Result<(), ServiceError> {
        let Some((chunk, e)) = self.evicted_chunk(ino, idx)? else {
            return Ok(());
        };
        let rt = tokio::runtime::Handle::current();
        let data = rt
            .block_on(tier.mover.get_extent(&placed(chunk, &e)))
            .map_err(|err| {
                tracing::error!(
                    "reading evicted {chunk} back from blob {:032x}: {err}",
                    e.blob
                );
                errno(Errno::Io)
            })?;
        self.write_back(chunk, &data)?;
        self.exec(&Creds::root(), Op::TierRestored { chunk })?;
        tier.bump(|s| {
            s.restores += 1;
            s.restore_bytes += data.len() as u64;
        });
        Ok(())
    }

    /// Brings chunk `idx` of `ino` back to flash after a read from the store, without holding
    /// reads up: its blocks are fetched (the block cache has those reads left) and written
    /// to flash under the shared lock, reads going on meanwhile from the store or the cache
    /// (the index still says evicted, so nothing reads the flash copy half-written). Only
    /// `TierRestored` takes the exclusive lock, after a fresh look: still evicted at the same
    /// version, and the flash copy still the extent's bytes (a writer may have restored and
    /// changed it in between, or it may have been restored and evicted again). Blobs of
    /// format 1 are restored whole under the exclusive lock.
    pub(crate) fn restore_in_background(
        &self,
        tier: &Tier,
        ino: InodeId,
        idx: u64,
    ) -> Result<(), ServiceError> {
        let t0 = Instant::now();
        let (chunk, e, fetched_at) = {
            let _shared = tier.read_locks(ino, idx, idx);
            let Some((chunk, e)) = self.evicted_chunk(ino, idx)? else {
                return Ok(());
            };
            let Some((want, blocks)) = self.extent_blocks(tier, chunk, &e)? else {
                drop(_shared);
                return self.restore(tier, ino, idx);
            };
            let rt = tokio::runtime::Handle::current();
            let step = RESTORE_GET_BYTES.max(1u64 << blocks.shift);
            let mut data = Vec::with_capacity(want.len as usize);
            let fetch = |at: u64| -> Result<FetchedBlocks, ServiceError> {
                let (f, from_cache) = tier.fetch_blocks(&rt, &want, &blocks, at, step)?;
                if !from_cache {
                    tier.bump(|s| s.restore_bytes += f.bytes.len() as u64);
                }
                Ok(f)
            };
            // Two GETs at a time (one answer at a time is slower than the store).
            let mut at = 0u64;
            while at < u64::from(want.len) {
                if tier.stopping() {
                    return Ok(());
                }
                let next = at + step;
                let (f, g) = std::thread::scope(|sc| {
                    let g = (next < u64::from(want.len)).then(|| sc.spawn(|| fetch(next)));
                    let f = fetch(at);
                    let g = g.map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(internal("a restore fetch panicked".into())))
                    });
                    (f, g)
                });
                data.extend_from_slice(f?.piece(&want, at, step));
                if let Some(g) = g {
                    data.extend_from_slice(g?.piece(&want, next, step));
                }
                at = next + step;
            }
            // Every block was checked against its CRC and the block CRCs against the
            // extent's: the whole is the extent (asserted: what goes to flash is the blob's).
            assert_eq!(
                data.len() as u64,
                u64::from(want.len),
                "{chunk}: restored length"
            );
            assert_eq!(
                crc32c::crc32c(&data),
                want.crc32c,
                "{chunk}: restored bytes"
            );
            let fetched_at = t0.elapsed();
            self.write_back(chunk, &data)?;
            (chunk, e, fetched_at)
        };
        let written_at = t0.elapsed();
        let _excl = tier.write_locks(ino, idx, idx);
        let locked_at = t0.elapsed();
        match self.evicted_chunk(ino, idx)? {
            Some((c, now)) if c == chunk && now.version == e.version => {}
            _ => return Ok(()), // restored by another meanwhile (and maybe changed since)
        }
        let flash = self.read_whole(chunk, u64::from(e.len))?;
        if crc32c::crc32c(&flash) != e.crc32c {
            tracing::info!("{chunk}: its flash copy changed while it was brought back; later");
            return Ok(());
        }
        self.exec(&Creds::root(), Op::TierRestored { chunk })?;
        tier.bump(|s| s.restores += 1);
        tracing::info!(
            "{chunk} back on flash: fetched in {} ms, written by {} ms, locked by {} ms, checked and recorded by {} ms",
            fetched_at.as_millis(),
            written_at.as_millis(),
            locked_at.as_millis(),
            t0.elapsed().as_millis()
        );
        Ok(())
    }

    /// The extent the index records for evicted `chunk` (`e`) as its blob's table has it,
    /// with its block CRCs checked against the extent's CRC32C; `None` for a blob without
    /// block CRCs (format 1). A table that disagrees with the index is an I/O error, loudly.
    fn extent_blocks(
        &self,
        tier: &Tier,
        chunk: ChunkId,
        e: &TierExtent,
    ) -> Result<Option<(Placed, ExtentBlocks)>, ServiceError> {
        let rt = tokio::runtime::Handle::current();
        let table = tier.table(&rt, e.blob)?;
        let want = placed(chunk, e);
        let Some((p, blocks)) = table.at(&want) else {
            tracing::error!(
                "blob {:032x} has no extent at {} where the index puts {chunk}",
                e.blob,
                e.blob_offset
            );
            return Err(errno(Errno::Io));
        };
        if (p.chunk, p.len, p.crc32c) != (want.chunk, want.len, want.crc32c) {
            tracing::error!(
                "blob {:032x} at {}: chunk {:#x} ({} bytes, crc {:08x}), the index says {chunk} ({} bytes, crc {:08x})",
                e.blob, e.blob_offset, p.chunk, p.len, p.crc32c, want.len, want.crc32c
            );
            return Err(errno(Errno::Io));
        }
        let Some(blocks) = blocks else {
            return Ok(None);
        };
        if let Err(err) = blocks.check(&want) {
            tracing::error!("blob {:032x}: {err}", e.blob);
            return Err(errno(Errno::Io));
        }
        Ok(Some((want, blocks.clone())))
    }

    /// Reads `[offset, offset + len)` of evicted chunk `chunk` (chunk index `idx` of `ino`,
    /// extent `e`) by the blocks around it, checked (from the block cache, else the store),
    /// and asks for the chunk to be brought back to flash (and the next one too once the
    /// read is past the middle: reads of evicted files are mostly sequential); `None` when
    /// its blob has no block CRCs (format 1: restore it whole). The caller holds the chunk's
    /// tier lock shared. Bytes past the extent are not returned (they read as zeros).
    pub(crate) fn read_evicted_piece(
        &self,
        tier: &Tier,
        (ino, idx, chunk): (InodeId, u64, ChunkId),
        e: &TierExtent,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, ServiceError> {
        let Some((want, blocks)) = self.extent_blocks(tier, chunk, e)? else {
            return Ok(None);
        };
        let rt = tokio::runtime::Handle::current();
        let (f, from_cache) = tier.fetch_blocks(&rt, &want, &blocks, offset, len)?;
        tier.bump(|s| {
            if from_cache {
                s.cache_reads += 1;
            } else {
                s.store_reads += 1;
                s.store_read_bytes += f.bytes.len() as u64;
            }
        });
        tier.note_read(chunk);
        tier.queue_restore(ino, idx);
        if offset >= CHUNK_BYTES / 2 {
            tier.queue_restore(ino, idx + 1);
        }
        Ok(Some(f.piece(&want, offset, len).to_vec()))
    }

    /// Answers a tier request (`TIER_METHOD`) about the shards this node leads.
    pub(crate) fn tier_call(&self, payload: &[u8]) -> Result<bytes::Bytes, ServiceError> {
        let Some(tier) = self.tier() else {
            return Err(ServiceError::new(
                cfs_fabric::ErrorCode::BadRequest,
                "no object tier configured on this node ([tier] in its config)",
            ));
        };
        let q: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| ServiceError::new(cfs_fabric::ErrorCode::BadRequest, e.to_string()))?;
        match q.get("op").and_then(|v| v.as_str()) {
            Some("status") => {}
            Some("flush") => {
                tier.flush_asked.fetch_add(1, Ordering::Relaxed);
                tier.wake();
            }
            _ => {
                return Err(ServiceError::new(
                    cfs_fabric::ErrorCode::BadRequest,
                    "tier request: op must be \"status\" or \"flush\"",
                ))
            }
        }
        let mut v = tier.status_json();
        v["node"] = serde_json::json!(self.cluster().map(|c| c.node_id()).unwrap_or(0));
        Ok(bytes::Bytes::from(v.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(chunk: u64, written_ms: u64) -> Cand {
        Cand {
            ino: InodeId(100 + chunk),
            idx: 0,
            chunk: ChunkId(chunk),
            len: 1 << 20,
            written_ms,
            pinned: false,
            version: 1,
            extent: Some(TierExtent {
                blob: 7,
                blob_offset: 4096 * chunk,
                len: 1 << 20,
                crc32c: 0,
                version: 1,
                evicted: false,
            }),
        }
    }

    /// Of two flushed chunks, the one written earlier but read since stays on flash: the
    /// round hands the policy this node's read times.
    #[test]
    fn eviction_takes_the_least_recently_read() {
        let s = Scan {
            cands: vec![cand(1, 1_000), cand(2, 2_000)],
            blobs: Vec::new(),
            pending: Vec::new(),
        };
        let mut reads = ReadTimes::default();
        reads.note(1, 5_000);
        let cfg = PolicyConfig {
            evict_above_pct: 50,
            evict_to_pct: 50,
            ..PolicyConfig::default()
        };
        // 2 MiB used of 3 MiB: one chunk must go.
        let pick = |flash: &[FlashExtent]| policy::to_evict(&cfg, 2 << 20, 3 << 20, flash);
        assert_eq!(pick(&s.on_flash(|c| reads.last(c))), vec![2]);
        assert_eq!(pick(&s.on_flash(|_| 0)), vec![1], "by write time alone");
    }

    #[test]
    fn read_times_stay_bounded_keeping_the_newest() {
        let mut r = ReadTimes::default();
        for c in 0..READS_REMEMBERED as u64 {
            r.note(c, c);
        }
        assert_eq!(r.at.len(), READS_REMEMBERED);
        r.note(u64::MAX, u64::MAX);
        assert!(r.at.len() <= READS_REMEMBERED / 2 + 1);
        assert_eq!(r.last(u64::MAX), u64::MAX);
        assert_eq!(
            r.last(READS_REMEMBERED as u64 - 1),
            READS_REMEMBERED as u64 - 1
        );
        assert_eq!(r.last(0), 0, "the oldest are forgotten");
    }
}

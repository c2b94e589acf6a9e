//! The file-system service: RPC requests from clients, applied to the namespace (persisted in
//! the metadata store before each reply) and to file data in the chunk store.
//!
//! File data: byte `o` of a file lives at offset `o % 64 MiB` of the chunk its extent map gives
//! for index `o / 64 MiB` (a hole where there is none). Order of effects, so a crash exposes
//! nothing and loses nothing acknowledged:
//! - write: map the chunk (in memory), write the data durably, then commit size + extent;
//! - truncate down: cut the partial last chunk, commit the size (dropping whole chunks past
//!   it), then delete those chunks;
//! - unlink of the last name with no handle open: commit, then delete the file's chunks.
//!
//! A crash between the steps leaves chunks no committed extent points at; the server deletes
//! them at its next start (the database is bound to the store's UUID so this can never run
//! against another store's chunks).

use crate::cluster::{Cluster, ClusterError};
use crate::meta_store::MetaStore;
use crate::reactor::Engine;
use crate::replication::{self, ChunkOp, Fence};
use crate::store::StoreError;
use cfs_fabric::{ErrorCode, Service, ServiceError, ServiceFuture};
use cfs_meta::command::{Command, Op, Outcome};
use cfs_meta::namespace::{Namespace, MAX_FILE_SIZE};
use cfs_meta::placement::Move;
use cfs_meta::{ChunkId, Creds, Errno, FileType, InodeId, SetAttr, Timespec, CHUNK_BYTES};
use cfs_meta_replica::MemberChange;
use cfs_proto::{
    Reply, Request, ERRNO_BASE, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE, SEEK_DATA,
    SEEK_HOLE,
};
use std::sync::{Arc, Mutex, MutexGuard};

/// Largest read or write in one request.
pub const MAX_IO: u32 = 16 << 20;

/// Pieces of `[offset, offset+len)` within single chunks: (chunk index, offset in chunk,
/// bytes, offset from `offset`).
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let (idx, off) = (pos / CHUNK_BYTES, pos % CHUNK_BYTES);
        let n = (end - pos).min(CHUNK_BYTES - off);
        let item = (idx, off, n, pos - offset);
        pos += n;
        Some(item)
    })
}

struct Meta {
    store: MetaStore,
    ns: Namespace,
}

/// The service; cheap to clone.
#[derive(Clone)]
pub struct FsService {
    backend: Backend,
    pub(crate) engine: Arc<Engine>,
    /// Cluster mode: one change at a time per chunk (by hash), so every member applies a
    /// chunk's changes in the same order; reads share it, so they never see a change that is
    /// still being applied.
    chunk_locks: Arc<Vec<std::sync::RwLock<()>>>,
    /// Cluster mode: the newest fence seen per chunk (see [`replication::Fences`]).
    fences: Arc<replication::Fences>,
    /// Sequence of this node's cross-shard transactions (their `TxnBegin` sessions).
    pub(crate) txn_seq: Arc<std::sync::atomic::AtomicU64>,
    /// Begin sessions (seq) of the transactions this node is coordinating right now.
    pub(crate) running_txns: Arc<Mutex<std::collections::HashSet<u64>>>,
    /// Client requests this node served by forwarding them to their shard's leader (shown by
    /// status: a client that routes by shard keeps it near zero).
    forwarded: Arc<std::sync::atomic::AtomicU64>,
    /// Cluster mode: this node's chunk changes in flight as a leader, by epoch (see
    /// [`replication::Epochs`]).
    epochs: Arc<replication::Epochs>,
    /// Orphan chunk copies this node deleted (see `collect_orphans`).
    orphans_deleted: Arc<std::sync::atomic::AtomicU64>,
    /// The one-sided read path, or why there is none (set once at start; see [`crate::rma`]).
    rma: Arc<std::sync::OnceLock<Result<Arc<crate::rma::RmaServer>, String>>>,
    /// The object tier, when configured (set once at start; see [`crate::tier`]).
    tier: Arc<std::sync::OnceLock<Arc<crate::tier::Tier>>>,
}

/// Orphan candidates: chunk -> (first seen orphaned, its newest fence then).
#[derive(Default)]
struct Orphans {
    seen: std::collections::HashMap<ChunkId, (std::time::Instant, Option<Fence>)>,
    last: Option<std::time::Instant>,
    /// Chunks whose leader could not be asked this round (kept, not deleted).
    unknown: std::collections::HashSet<ChunkId>,
}

fn chunk_locks() -> Arc<Vec<std::sync::RwLock<()>>> {
    Arc::new((0..64).map(|_| std::sync::RwLock::new(())).collect())
}

/// Where the namespace lives.
#[derive(Clone)]
enum Backend {
    /// This node alone: the namespace in memory, persisted to redb before each reply.
    Local {
        meta: Arc<Mutex<Meta>>,
        db_path: std::path::PathBuf,
    },
    /// Raft groups, one per metadata shard (index = shard): mutations are proposed and
    /// applied on every member; each shard's leader serves its requests.
    Raft(Arc<Vec<Cluster>>),
}

/// Why the service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The metadata database cannot be opened or is damaged.
    #[error(transparent)]
    Meta(#[from] crate::meta_store::MetaStoreError),
    /// The database belongs to another chunk store.
    #[error("metadata database {db} belongs to another chunk store (was the store reformatted? move the database away to start empty)")]
    WrongStore {
        /// Database file.
        db: String,
    },
    /// Listing the store's chunks failed.
    #[error("cannot list the chunk store: {0}")]
    Store(StoreError),
}

pub(crate) fn internal(what: String) -> ServiceError {
    tracing::error!("{what}");
    ServiceError::new(ErrorCode::Internal, what)
}

/// A Raft-side failure of a mutation as the client sees it: "not the leader" (for the
/// forwarding layer), Busy (not run: the client may try another member), or EIO (it timed out
/// and may or may not have been applied).
pub(crate) fn cluster_error(e: ClusterError) -> ServiceError {
    match e {
        ClusterError::NotLeader(leader) => ServiceError::new(
            ErrorCode::Service(NOT_LEADER),
            format!("not the leader; leader is {leader:?}"),
        ),
        ClusterError::Busy | ClusterError::Stopped => {
            ServiceError::new(ErrorCode::Busy, e.to_string())
        }
        ClusterError::Timeout => {
            ServiceError::new(ErrorCode::Service(OUTCOME_UNKNOWN), e.to_string())
        }
    }
}

/// What the client hears when a mutation's outcome is unknown: with a session it resends
/// safely (Busy: try again, on another member if need be), without one it gets EIO.
fn unknown_outcome(e: ServiceError, has_session: bool) -> ServiceError {
    if has_session {
        ServiceError::new(ErrorCode::Busy, format!("{}; resend", e.message))
    } else {
        ServiceError::new(
            ErrorCode::Service(ERRNO_BASE + Errno::Io.errno() as u32),
            e.message,
        )
    }
}

/// A failed read barrier: nothing was changed, so the client may always try elsewhere.
pub(crate) fn read_error(e: ClusterError) -> ServiceError {
    match e {
        ClusterError::NotLeader(_) => cluster_error(e),
        other => ServiceError::new(ErrorCode::Busy, other.to_string()),
    }
}

/// Service error code: this node does not lead the metadata group (the request was not run).
/// (Service codes travel as themselves only from 1000 up, and must stay clear of the errno
/// codes: a code under 1000 once turned into "errno 0", i.e. EIO, on the wire, so a forwarder
/// never saw NOT_LEADER and the client got EIO while a shard elected its leader.)
pub const NOT_LEADER: u32 = 9_000;

/// Service error code between nodes: the request may or may not have been applied (a proposal
/// timed out, a forwarded request was lost). The node the client asked turns it into Busy
/// when the request carries a session (resending it is safe: it applies once) and into EIO
/// otherwise.
pub const OUTCOME_UNKNOWN: u32 = 9_001;

const _: () = assert!(NOT_LEADER >= cfs_proto::ERRNO_BASE + cfs_proto::ERRNO_LIMIT);
const _: () = assert!(OUTCOME_UNKNOWN >= cfs_proto::ERRNO_BASE + cfs_proto::ERRNO_LIMIT);

thread_local! {
    /// The session of the client request this thread runs, and how many commands of each op
    /// code it proposed so far. Each command gets its own sequence number, `request seq << 8 |
    /// occurrence << 5 | op code`: the same for the same command on a resend even when the
    /// resend skips a step the first attempt took (a write whose chunks the first attempt
    /// already mapped proposes only `Wrote`), so each command finds its own first result.
    static SESSION_SCOPE: std::cell::RefCell<Option<(cfs_meta::session::Session, [u8; 32])>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` (one client request, on this thread) under `session`.
fn with_session<T>(session: Option<cfs_meta::session::Session>, f: impl FnOnce() -> T) -> T {
    SESSION_SCOPE.with(|c| *c.borrow_mut() = session.map(|s| (s, [0u8; 32])));
    let out = f();
    SESSION_SCOPE.with(|c| *c.borrow_mut() = None);
    out
}

/// The session the current request's next command with op code `code` will get, without
/// taking it.
fn peek_session_step(code: u8) -> Option<cfs_meta::session::Session> {
    SESSION_SCOPE.with(|c| {
        let scope = c.borrow();
        let (s, counts) = scope.as_ref()?;
        let code = code & 31;
        let n = counts[code as usize];
        (n < 8).then(|| cfs_meta::session::Session {
            client: s.client,
            seq: s.seq.wrapping_shl(8) | u64::from(n) << 5 | u64::from(code),
        })
    })
}

/// The session for the current request's next command with op code `code` (None outside a
/// session, or past 8 commands of one kind, which no request proposes).
fn next_session_step(code: u8) -> Option<cfs_meta::session::Session> {
    let s = peek_session_step(code)?;
    SESSION_SCOPE.with(|c| {
        if let Some((_, counts)) = c.borrow_mut().as_mut() {
            counts[(code & 31) as usize] += 1;
        }
    });
    Some(s)
}

/// Most chunk ids one `Unsettled` answer carries (the leader asks again next round).
const UNSETTLED_BATCH: u64 = 4096;

/// Answers a leader's `Unsettled` question for `shard`: first raises the shard's term floor
/// (no change of an older leader lands after this), then lists the chunks, u64 LE each.
fn unsettled_answer(
    fences: &replication::Fences,
    shards: u16,
    (shard, below_term, max): (u16, u64, u64),
    epochs: (u64, u64),
) -> Vec<u8> {
    fences.raise_floor(shard, below_term);
    fences
        .unsettled(
            shard,
            below_term,
            epochs,
            max.min(UNSETTLED_BATCH) as usize,
            |c| cfs_meta::shard::shard_of_id(shards, c.0) == shard,
        )
        .iter()
        .flat_map(|c| c.0.to_le_bytes())
        .collect()
}

/// Answers the reconciliation questions every member answers alike (`Unsettled`, `Settle`);
/// any other operation is handed back.
fn bookkeeping(fences: &replication::Fences, shards: u16, op: ChunkOp) -> Result<Vec<u8>, ChunkOp> {
    match op {
        ChunkOp::Unsettled {
            shard,
            below_term,
            max,
            mark,
            settle_below,
        } => Ok(unsettled_answer(
            fences,
            shards,
            (shard, below_term, max),
            (mark, settle_below),
        )),
        ChunkOp::Settle {
            below_term, chunks, ..
        } => {
            fences.settle(below_term, &chunks);
            Ok(Vec::new())
        }
        other => Err(other),
    }
}

/// Test fault (`CFS_TEST_ABORT_PARTIAL_WRITE=PATH`, armed while PATH exists): a leader's
/// next write to a chunk reaches this node's copy and one other holder's, then the process
/// aborts, leaving the copies different with nothing recorded stale.
fn partial_write_fault_armed() -> bool {
    static PATH: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| std::env::var_os("CFS_TEST_ABORT_PARTIAL_WRITE").map(Into::into))
        .as_ref()
        .is_some_and(|p| p.exists())
}

pub(crate) fn errno(e: Errno) -> ServiceError {
    ServiceError::new(
        ErrorCode::Service(ERRNO_BASE + e.errno() as u32),
        e.to_string(),
    )
}

fn io_error(e: StoreError) -> ServiceError {
    tracing::error!("data I/O failed: {e}");
    ServiceError::new(
        ErrorCode::Service(ERRNO_BASE + Errno::Io.errno() as u32),
        e.to_string(),
    )
}

pub(crate) fn now() -> Timespec {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timespec::new(d.as_secs() as i64, d.subsec_nanos())
}

impl FsService {
    /// Opens the metadata database at `db_path` and serves over `engine`. Chunks no extent
    /// points at (left by a crash, or by files unlinked while open when the server stopped)
    /// are deleted first.
    pub fn open(db_path: &std::path::Path, engine: Arc<Engine>) -> Result<FsService, OpenError> {
        let (store, mut ns) = MetaStore::open(db_path, now())?;
        let uuid = engine.layout().uuid();
        match store.store_uuid()? {
            Some(u) if u != uuid => {
                return Err(OpenError::WrongStore {
                    db: db_path.display().to_string(),
                })
            }
            Some(_) => {}
            None => store.set_store_uuid(uuid)?,
        }
        let freed = ns.take_freed();
        let referenced = ns.referenced_chunks();
        let svc = FsService {
            backend: Backend::Local {
                meta: Arc::new(Mutex::new(Meta { store, ns })),
                db_path: db_path.to_path_buf(),
            },
            engine,
            chunk_locks: chunk_locks(),
            fences: Arc::default(),
            txn_seq: Arc::default(),
            running_txns: Arc::default(),
            forwarded: Arc::default(),
            epochs: Arc::default(),
            orphans_deleted: Arc::default(),
            rma: Arc::default(),
            tier: Arc::default(),
        };
        svc.delete_chunks(freed);
        let stored = svc.engine.list_chunks().map_err(OpenError::Store)?;
        let orphans: Vec<ChunkId> = stored
            .into_iter()
            .map(ChunkId)
            .filter(|c| !referenced.contains(c))
            .collect();
        if !orphans.is_empty() {
            tracing::info!(
                "deleting {} chunk(s) no file points at (left by a crash)",
                orphans.len()
            );
            svc.delete_chunks(orphans);
        }
        Ok(svc)
    }

    /// Serves a node of a cluster: one Raft group per metadata shard (`groups[k]` serves
    /// shard k; see [`Cluster`]). A background thread does each led group's upkeep (repair,
    /// membership, unfinished transactions).
    pub fn open_cluster(
        groups: Vec<Cluster>,
        engine: Arc<Engine>,
        fences: Arc<replication::Fences>,
        rt: tokio::runtime::Handle,
    ) -> FsService {
        assert!(
            !groups.is_empty()
                && groups
                    .iter()
                    .enumerate()
                    .all(|(k, g)| g.shard().index as usize == k
                        && g.shard().count as usize == groups.len()),
            "one group per shard, in shard order"
        );
        // Begin sessions must never repeat, even across restarts: start from the clock (µs).
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        match engine.boot_suspects() {
            Ok(chunks) => {
                let chunks: Vec<ChunkId> = chunks.into_iter().map(ChunkId).collect();
                if !chunks.is_empty() {
                    tracing::info!(
                        "{} chunks changed last before this start: their copies are compared \
                         by their shard leaders before this node serves them",
                        chunks.len()
                    );
                }
                fences.note_restart(&chunks);
            }
            Err(e) => tracing::error!("cannot list the chunks changed before this start: {e}"),
        }
        let svc = FsService {
            backend: Backend::Raft(Arc::new(groups)),
            engine,
            fences,
            chunk_locks: chunk_locks(),
            txn_seq: Arc::new(std::sync::atomic::AtomicU64::new(start)),
            running_txns: Arc::default(),
            forwarded: Arc::default(),
            epochs: Arc::default(),
            orphans_deleted: Arc::default(),
            rma: Arc::default(),
            tier: Arc::default(),
        };
        let bg = svc.clone();
        let spawned = std::thread::Builder::new()
            .name("cfs-repair".into())
            .spawn(move || {
                let _rt = rt.enter();
                bg.repair_loop();
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the repair thread: {e}");
        }
        svc
    }

    /// The leader's background work, twice a second: remove members silent for longer than
    /// `dead_after_ms` and hand their votes to learners, move chunk copies towards their
    /// target placement (re-replication after a removal, rebalancing after a join), and copy
    /// current data over stale copies, finish or undo transactions whose coordinator died, and
    /// (with several shards) hand each group's leadership to its preferred node. Each step is
    /// a committed command or a Raft transfer, so a new leader picks up where the old one
    /// stopped.
    fn repair_loop(self) {
        let Backend::Raft(groups) = &self.backend else {
            return;
        };
        let mut cursors = vec![ChunkId(0); groups.len()];
        let mut balanced = vec![None; groups.len()];
        let mut orphans = Orphans::default();
        while !groups[0].is_stopped() {
            std::thread::sleep(std::time::Duration::from_millis(500));
            self.collect_orphans(groups, &mut orphans);
            for ((c, cursor), last) in groups.iter().zip(cursors.iter_mut()).zip(&mut balanced) {
                if c.replica().is_leader() {
                    if c.shard().index == 0 {
                        self.check_members(c);
                    } else {
                        self.mirror_members(&groups[0], c);
                    }
                    self.txn_chores(c);
                    self.upkeep(c, cursor);
                    self.balance_leader(c, last);
                }
            }
        }
    }

    /// Orphan copies (every node, not only leaders): chunks this node stores that the
    /// namespace no longer gives it, because they were deleted or moved off while the node was
    /// away and it caught up from a snapshot (the compacted log's deletes never ran here). A
    /// copy is deleted once its shard's leader called it orphaned in two checks at least
    /// `orphan_grace_ms` apart and no change was admitted to it in between (a move onto this
    /// node starts with a change).
    fn collect_orphans(&self, groups: &[Cluster], o: &mut Orphans) {
        let grace = groups[0].orphan_grace();
        let every = (grace / 4).clamp(
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(60),
        );
        if o.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        o.last = Some(std::time::Instant::now());
        let stored = match self.engine.list_chunks() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot list the stored chunks for orphan collection: {e}");
                return;
            }
        };
        let me = groups[0].node_id();
        let mut by_group: Vec<Vec<ChunkId>> = vec![Vec::new(); groups.len()];
        for c in stored {
            let g = cfs_meta::shard::shard_of_id(self.shard_count(), c) as usize;
            by_group[g].push(ChunkId(c));
        }
        let mut now_orphaned = std::collections::HashSet::new();
        for (c, chunks) in groups.iter().zip(by_group) {
            // The shard leader's view decides (with a read barrier): this node's own replica
            // may not have its snapshot yet, or lag.
            let shard = c.shard().index;
            for batch in chunks.chunks(8192) {
                let ask = ChunkOp::Orphans {
                    shard,
                    node: me,
                    chunks: batch.to_vec(),
                };
                let leader = c.replica().leader();
                let answer = match leader {
                    Some(l) if l == me => self
                        .orphans_of(shard, me, batch.to_vec())
                        .map_err(|e| e.to_string()),
                    Some(l) => self.ask_member(c, l, ask),
                    None => Err("no leader".to_string()),
                };
                match answer.map(|b| replication::chunk_ids(&b)) {
                    Ok(Some(ids)) => now_orphaned.extend(ids),
                    Ok(None) => tracing::warn!("malformed orphan answer from shard {shard}"),
                    Err(e) => {
                        tracing::debug!("orphan check of shard {shard} not done this round: {e}");
                        // Candidates of this shard keep their first sighting.
                        now_orphaned.extend(batch.iter().filter(|ch| o.seen.contains_key(ch)));
                        o.unknown.extend(batch.iter().copied());
                    }
                }
            }
        }
        o.seen.retain(|ch, _| now_orphaned.contains(ch));
        let mut deleted = 0u64;
        let unknown = std::mem::take(&mut o.unknown);
        for ch in now_orphaned.into_iter().filter(|ch| !unknown.contains(ch)) {
            let fence = self.fences.newest(ch);
            match o.seen.get(&ch) {
                Some((since, f)) if since.elapsed() >= grace && *f == fence => {
                    match self.fences.delete_if_unchanged(&self.engine, ch, fence) {
                        Ok(true) => deleted += 1,
                        Ok(false) => {
                            o.seen.remove(&ch);
                        }
                        Err(e) => tracing::warn!("cannot delete orphan copy of {ch}: {e}"),
                    }
                }
                Some((_, f)) if *f == fence => {}
                _ => {
                    o.seen.insert(ch, (std::time::Instant::now(), fence));
                }
            }
        }
        if deleted > 0 {
            o.seen.retain(|_, (since, _)| since.elapsed() < grace);
            self.orphans_deleted
                .fetch_add(deleted, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                "deleted {deleted} orphan chunk copies (no longer this node's: deleted or moved while it was away)"
            );
        }
    }

    /// Which of `chunks` (of metadata shard `shard`) are no longer `node`'s: no holder record
    /// names it, or there is no record and no file maps the chunk. Only the shard's leader
    /// answers (after a read barrier), as u64 LE ids.
    fn orphans_of(
        &self,
        shard: u16,
        node: u64,
        chunks: Vec<ChunkId>,
    ) -> Result<Vec<u8>, ClusterError> {
        let c = self
            .groups()
            .get(shard as usize)
            .ok_or(ClusterError::NotLeader(None))?;
        let orphans = c.read(|ns| {
            let mut referenced = None;
            chunks
                .into_iter()
                .filter(|ch| match ns.placement().holders(*ch) {
                    Some(h) => !h.contains(&node),
                    // No holders recorded: every member holds a chunk a file maps.
                    None => !referenced
                        .get_or_insert_with(|| ns.referenced_chunks())
                        .contains(ch),
                })
                .collect::<Vec<_>>()
        })?;
        Ok(orphans.iter().flat_map(|c| c.0.to_le_bytes()).collect())
    }

    /// Placement moves and repairs of the chunks of `c`'s shard.
    fn upkeep(&self, c: &Cluster, cursor: &mut ChunkId) {
        self.reconcile(c);
        {
            let moves = c.read_local(|ns| ns.placement().plan(*cursor, 16));
            for mv in moves {
                let (chunk, op) = match mv {
                    Move::Add { chunk, nodes } => (chunk, Op::AddHolders { chunk, nodes }),
                    Move::Drop { chunk, nodes } => (chunk, Op::DropHolders { chunk, nodes }),
                };
                *cursor = chunk;
                // Under the chunk's lock: no change to it is in flight while holders change.
                let _order = self
                    .chunk_lock(chunk)
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                if let Err(e) = self.exec(&Creds::root(), op.clone()) {
                    tracing::debug!("placement move {op:?} failed: {e}");
                } else {
                    tracing::info!("placement move: {op:?}");
                }
            }
            let todo: Vec<(ChunkId, Vec<u64>)> = c
                .read(|ns| {
                    ns.all_stale()
                        .take(16)
                        .map(|(ch, nodes)| (ch, nodes.iter().copied().collect()))
                        .collect()
                })
                .unwrap_or_default();
            for (chunk, nodes) in todo {
                for node in nodes {
                    if c.is_stopped() {
                        return;
                    }
                    match self.repair(c, chunk, node) {
                        Ok(bytes) => {
                            tracing::info!("repaired {chunk} on member {node} ({bytes} bytes)")
                        }
                        Err(e) => {
                            tracing::debug!("cannot repair {chunk} on member {node} yet: {e}")
                        }
                    }
                    // Repair yields to client traffic: a few chunks a second at most.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }

    /// Removes one member the leader has not heard from for `dead_after_ms`, or, when the
    /// metadata group has fewer voters than configured, promotes a live learner.
    fn check_members(&self, c: &Cluster) {
        let me = c.node_id();
        let dead_after = c.dead_after();
        for m in c.members().into_iter().filter(|m| *m != me) {
            if c.silent_for(m).is_some_and(|d| d >= dead_after) {
                tracing::warn!(
                    "member {m} silent for over {} ms: removing it for good",
                    dead_after.as_millis()
                );
                let cmd = Command {
                    creds: Creds::root(),
                    now: now(),
                    op: Op::RemoveMember { id: m },
                    session: None,
                };
                match c.propose_member(cmd, MemberChange::Remove) {
                    Ok(Ok(_)) => tracing::warn!("member {m} removed; its chunks re-replicate"),
                    Ok(Err(e)) => tracing::warn!("removing member {m} refused: {e:?}"),
                    Err(e) => tracing::info!("removing member {m} not done yet: {e}"),
                }
                return;
            }
        }
        let cs = c.conf_state();
        if cs.voters.len() >= c.meta_replicas() {
            return;
        }
        let alive = c.election_timeout() * 2;
        let candidate = cs
            .learners
            .iter()
            .copied()
            .find(|l| c.silent_for(*l).is_some_and(|d| d < alive));
        let Some(l) = candidate else {
            return;
        };
        let Some(member) = c.read_local(|ns| ns.placement().members().get(&l).cloned()) else {
            return;
        };
        let cmd = Command {
            creds: Creds::root(),
            now: now(),
            op: Op::AddMember {
                id: l,
                addr: member.addr,
                domain: member.domain,
            },
            session: None,
        };
        match c.propose_member(cmd, MemberChange::AddVoter) {
            Ok(Ok(_)) => tracing::warn!("learner {l} promoted to metadata voter"),
            Ok(Err(e)) => tracing::warn!("promoting learner {l} refused: {e:?}"),
            Err(e) => tracing::info!("promoting learner {l} not done yet: {e}"),
        }
    }

    /// The lock ordering changes to `chunk` (exclusive) and reads of it (shared): a read never
    /// sees a change that is still being applied to the holders.
    fn chunk_lock(&self, chunk: ChunkId) -> &std::sync::RwLock<()> {
        &self.chunk_locks[(chunk.0 % self.chunk_locks.len() as u64) as usize]
    }

    /// The fence changes to `chunk` carry now: this leader's term and the chunk's generation.
    fn fence_of(&self, c: &Cluster, chunk: ChunkId) -> Fence {
        let r = c.replica();
        Fence {
            term: r.term(),
            gen: r.namespace().placement().generation(chunk),
        }
    }

    /// The nodes holding a current copy of `chunk` (every member for a chunk without
    /// recorded holders), and its stale nodes.
    fn current_holders(&self, c: &Cluster, chunk: ChunkId) -> (Vec<u64>, Vec<u64>) {
        let (holders, stale) = c.read_local(|ns| {
            (
                ns.placement().holders(chunk).map(<[u64]>::to_vec),
                ns.stale_nodes(chunk),
            )
        });
        let holders = holders.unwrap_or_else(|| c.members());
        let current = holders
            .iter()
            .copied()
            .filter(|h| !stale.contains(h))
            .collect();
        (current, holders)
    }

    /// Runs a chunk operation on member `node` (this node directly). `Err(true)`: the copy
    /// answered with an error (bad data); `Err(false)`: the member could not be asked.
    fn chunk_op_on(
        &self,
        c: &Cluster,
        node: u64,
        chunk: ChunkId,
        op: ChunkOp,
        fence: Fence,
    ) -> Result<Vec<u8>, (bool, String)> {
        if node == c.node_id() {
            return self
                .fences
                .apply(&self.engine, chunk, c.shard().index, op, fence)
                .map_err(|e| (true, e.to_string()));
        }
        let client = c
            .client(node)
            .ok_or((false, "unknown member".to_string()))?;
        let rt = tokio::runtime::Handle::current();
        let payload = replication::encode(chunk, &op, fence);
        match rt.block_on(client.call(replication::CHUNK_METHOD, &payload)) {
            Ok(b) => Ok(b.to_vec()),
            Err(e @ cfs_fabric::RpcError::Remote { .. }) => Err((true, e.to_string())),
            Err(e) => Err((false, e.to_string())),
        }
    }

    /// Reads every current copy of every chunk in full (checksums are verified as blocks are
    /// read) and records unreadable copies stale, so repair rewrites them from a good one.
    /// Answers a JSON summary.
    fn scrub(&self) -> Result<Vec<u8>, ServiceError> {
        let Backend::Raft(groups) = &self.backend else {
            return Err(ServiceError::new(
                ErrorCode::BadRequest,
                "not a cluster node",
            ));
        };
        // Each shard's chunks, from this node's replica of the shard's group.
        let chunks: Vec<(&Cluster, ChunkId)> = groups
            .iter()
            .flat_map(|c| {
                c.read_local(|ns| {
                    ns.placement()
                        .all_holders()
                        .map(|(ch, _)| ch)
                        .collect::<Vec<_>>()
                })
                .into_iter()
                .map(move |ch| (c, ch))
            })
            .collect();
        let (mut copies, mut bad_copies, mut unreachable) = (0u64, 0u64, 0u64);
        let mut unreadable_chunks = Vec::new();
        for (c, chunk) in &chunks {
            let c = *c;
            let _order = self
                .chunk_lock(*chunk)
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let (current, _) = self.current_holders(c, *chunk);
            let mut bad = Vec::new();
            for h in &current {
                copies += 1;
                match self.copy_readable(c, *chunk, *h) {
                    Ok(()) => {}
                    Err((true, e)) => {
                        tracing::error!("scrub: copy of {chunk} on member {h} unreadable: {e}");
                        bad.push(*h);
                    }
                    Err((false, e)) => {
                        tracing::warn!("scrub: cannot read {chunk} on member {h}: {e}");
                        unreachable += 1;
                    }
                }
            }
            if !bad.is_empty() && bad.len() == current.len() {
                // Every copy is damaged: keep them all rather than lose the chunk.
                tracing::error!("scrub: no readable copy of {chunk} left");
                unreadable_chunks.push(chunk.0);
            } else if !bad.is_empty() {
                bad_copies += bad.len() as u64;
                self.record_bad_copies(*chunk, bad);
            }
        }
        let v = serde_json::json!({"chunks": chunks.len(), "copies": copies,
            "bad_copies": bad_copies, "unreachable_copies": unreachable,
            "unreadable_chunks": unreadable_chunks});
        Ok(v.to_string().into_bytes())
    }

    /// Reads a chunk's copy on `node` in full, in 4 MiB pieces.
    fn copy_readable(&self, c: &Cluster, chunk: ChunkId, node: u64) -> Result<(), (bool, String)> {
        let len_bytes = self.chunk_op_on(c, node, chunk, ChunkOp::Len, Fence::default())?;
        let len = u64::from_le_bytes(
            len_bytes
                .try_into()
                .map_err(|_| (false, "bad length reply".to_string()))?,
        );
        for (offset, len) in replication::copy_pieces(len) {
            self.chunk_op_on(
                c,
                node,
                chunk,
                ChunkOp::Read { offset, len },
                Fence::default(),
            )?;
        }
        Ok(())
    }

    /// Copies `chunk` to `node` from a current copy and records it current again.
    fn repair(&self, c: &Cluster, chunk: ChunkId, node: u64) -> Result<u64, String> {
        let _order = self
            .chunk_lock(chunk)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let stale = c
            .read(|ns| ns.stale_nodes(chunk))
            .map_err(|e| e.to_string())?;
        if !stale.contains(&node) {
            return Ok(0);
        }
        // The repair's writes carry the chunk's current fence: newer than any change sent to
        // the node before it was marked stale, which the node then refuses.
        let fence = self.fence_of(c, chunk);
        let on = |m: u64, op: ChunkOp| -> Result<Vec<u8>, String> {
            self.chunk_op_on(c, m, chunk, op, fence).map_err(|(_, e)| e)
        };
        // Only a current holder is a source: any other node reads as an empty chunk.
        let (current, _) = self.current_holders(c, chunk);
        let source = current
            .into_iter()
            .find(|m| on(*m, ChunkOp::Len).is_ok())
            .ok_or("no current copy reachable")?;
        let len_bytes = on(source, ChunkOp::Len)?;
        let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| "bad length reply")?);
        on(node, ChunkOp::Truncate { len: 0 })?;
        for (offset, n) in replication::copy_pieces(len) {
            let data = on(source, ChunkOp::Read { offset, len: n })?;
            on(node, ChunkOp::Write { offset, data })?;
        }
        on(node, ChunkOp::Truncate { len })?;
        self.exec(&Creds::root(), Op::Repaired { chunk, node })
            .map_err(|e| e.to_string())?;
        Ok(len)
    }

    /// Asks a member (this node directly) a bookkeeping question about `c`'s shard.
    fn ask_member(&self, c: &Cluster, node: u64, op: ChunkOp) -> Result<Vec<u8>, String> {
        if node == c.node_id() {
            return bookkeeping(&self.fences, self.shard_count(), op)
                .map_err(|other| format!("not a bookkeeping question: {other:?}"));
        }
        let client = c.client(node).ok_or("unknown member")?;
        let payload = replication::encode(ChunkId(0), &op, Fence::default());
        tokio::runtime::Handle::current()
            .block_on(client.call_timeout(replication::CHUNK_METHOD, &payload, c.replica_timeout()))
            .map(|b| b.to_vec())
            .map_err(|e| e.to_string())
    }

    /// Reconciliation (see [`crate::replication`]): asks every member which chunks of this
    /// shard it changed under an older term (or found changed last at its restart), compares
    /// the copies of each, records the ones that differ from the chosen copy stale (repair
    /// rewrites them), and tells the members those chunks are settled. Returns how many
    /// chunks were settled.
    fn reconcile(&self, c: &Cluster) -> usize {
        let term = c.replica().term();
        let shard = c.shard().index;
        let mut asked: Vec<(u64, Vec<ChunkId>)> = Vec::new();
        let (mark, settle_below) = self.epochs.round(shard, term);
        let members = c.members();
        let alive = c.election_timeout() * 4;
        let mut silent = std::collections::HashSet::new();
        for &m in &members {
            // A member not heard from lately is asked once it is heard again (its lists
            // wait), rather than holding every round up for a timeout.
            if m != c.node_id() && c.silent_for(m).is_none_or(|d| d > alive) {
                silent.insert(m);
                continue;
            }
            let q = ChunkOp::Unsettled {
                shard,
                below_term: term,
                max: UNSETTLED_BATCH,
                mark,
                settle_below,
            };
            match self.ask_member(c, m, q) {
                Ok(b) => asked.push((
                    m,
                    b.chunks_exact(8)
                        .filter_map(|x| x.try_into().ok())
                        .map(|x| ChunkId(u64::from_le_bytes(x)))
                        .collect(),
                )),
                Err(e) => tracing::debug!("member {m}: unsettled chunks not known yet: {e}"),
            }
        }
        if asked.len() == members.len() {
            self.epochs.marked(shard, term, mark);
        }
        let suspects: std::collections::BTreeSet<ChunkId> =
            asked.iter().flat_map(|(_, l)| l.iter().copied()).collect();
        // Members silent lately, and any whose call fails in transport this round, are not
        // asked per chunk: each try would wait out a timeout, and with hundreds of suspect
        // chunks and one dead member a round took minutes. Their copies count as not
        // comparable, as they would after the timeout.
        let mut unreachable = silent;
        let mut settled = std::collections::BTreeSet::new();
        for chunk in suspects {
            if c.is_stopped() || c.replica().term() != term {
                break;
            }
            match self.reconcile_chunk(c, chunk, &mut unreachable) {
                Ok(()) => {
                    settled.insert(chunk);
                }
                Err(e) => tracing::info!("copies of {chunk} not compared yet: {e}"),
            }
        }
        for (m, listed) in asked {
            let chunks: Vec<ChunkId> = listed
                .into_iter()
                .filter(|ch| settled.contains(ch))
                .collect();
            if chunks.is_empty() {
                continue;
            }
            let op = ChunkOp::Settle {
                shard,
                below_term: term,
                chunks,
            };
            if let Err(e) = self.ask_member(c, m, op) {
                tracing::debug!("member {m}: settling failed ({e}); asked again next round");
            }
        }
        settled.len()
    }

    /// Compares the current copies of `chunk` (digests of their block checksums, then of
    /// their data if those differ) and records stale every copy that differs from the most
    /// common one (ties: this node's, else the lowest node's) and every copy that could not
    /// be compared.
    /// Members in `unreachable` are not asked (their copies count as not comparable); a
    /// member whose call fails in transport joins it.
    fn reconcile_chunk(
        &self,
        c: &Cluster,
        chunk: ChunkId,
        unreachable: &mut std::collections::HashSet<u64>,
    ) -> Result<(), String> {
        use replication::Digest;
        let _order = self
            .chunk_lock(chunk)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if c.read_local(|ns| ns.placement().holders(chunk).is_none()) {
            tracing::debug!("{chunk}: no holders recorded (deleted): nothing to compare");
            return Ok(());
        }
        let (current, _) = self.current_holders(c, chunk);
        let me = c.node_id();
        let mut digests = |op: ChunkOp, nodes: &[u64]| -> (Vec<(u64, Digest)>, Vec<u64>) {
            let (mut got, mut missing) = (Vec::new(), Vec::new());
            for &n in nodes {
                if unreachable.contains(&n) {
                    tracing::debug!("copy of {chunk} on member {n} not comparable: unreachable");
                    missing.push(n);
                    continue;
                }
                match self.chunk_op_on(c, n, chunk, op.clone(), Fence::default()) {
                    Ok(b) => match Digest::decode(&b) {
                        Some(d) => got.push((n, d)),
                        None => missing.push(n),
                    },
                    Err((remote, e)) => {
                        tracing::warn!("copy of {chunk} on member {n} not comparable: {e}");
                        if !remote && n != me {
                            unreachable.insert(n);
                        }
                        missing.push(n);
                    }
                }
            }
            (got, missing)
        };
        let (mut got, mut missing) = digests(ChunkOp::MapDigest, &current);
        let distinct: std::collections::HashSet<Digest> = got.iter().map(|(_, d)| *d).collect();
        if distinct.len() > 1 {
            let reachable: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
            let (g, m) = digests(ChunkOp::DataDigest, &reachable);
            got = g;
            missing.extend(m);
        }
        let mut groups: std::collections::HashMap<Digest, Vec<u64>> = Default::default();
        for (n, d) in &got {
            groups.entry(*d).or_default().push(*n);
        }
        let chosen = groups
            .values()
            .max_by_key(|nodes| {
                (
                    nodes.len(),
                    nodes.contains(&me),
                    std::cmp::Reverse(nodes.iter().min().copied()),
                )
            })
            .cloned()
            .ok_or("no copy reachable")?;
        let stale: Vec<u64> = current
            .iter()
            .copied()
            .filter(|n| !chosen.contains(n))
            .collect();
        if stale.is_empty() {
            tracing::debug!("{chunk}: copies on {current:?} are equal");
            return Ok(());
        }
        tracing::warn!(
            "{chunk}: copies on {stale:?} differ from those on {chosen:?} or could not be compared \
             (a change whose leader stopped half-way): recorded stale, repair rewrites them"
        );
        self.exec(
            &Creds::root(),
            Op::MarkStale {
                chunks: vec![chunk],
                nodes: stale,
            },
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// The Raft group of shard 0, if this is a cluster node: it holds the membership.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.groups().first()
    }

    /// Every shard's Raft group, by shard (empty on a single node).
    pub fn groups(&self) -> &[Cluster] {
        match &self.backend {
            Backend::Raft(g) => g,
            Backend::Local { .. } => &[],
        }
    }

    fn local(&self) -> Option<MutexGuard<'_, Meta>> {
        match &self.backend {
            Backend::Local { meta, .. } => Some(meta.lock().unwrap_or_else(|p| p.into_inner())),
            Backend::Raft(_) => None,
        }
    }

    /// Runs a read on the current namespace holding `ino` (the leader's of its shard, in a
    /// cluster).
    pub(crate) fn view<T>(
        &self,
        ino: InodeId,
        f: impl FnOnce(&Namespace) -> Result<T, Errno>,
    ) -> Result<T, ServiceError> {
        match &self.backend {
            Backend::Local { meta, .. } => {
                let m = meta.lock().unwrap_or_else(|p| p.into_inner());
                f(&m.ns).map_err(errno)
            }
            Backend::Raft(_) => match self.group_for(ino).read(f) {
                Ok(r) => r.map_err(errno),
                Err(e) => Err(read_error(e)),
            },
        }
    }

    /// Applies a mutation: committed locally, or through the Raft group.
    pub(crate) fn exec(&self, creds: &Creds, op: Op) -> Result<Outcome, ServiceError> {
        // The cluster's own bookkeeping (stale marks, repairs, moves) never takes a session
        // step: whether it happens differs between a request and its resend, and the steps of
        // the client's commands must match.
        let system = matches!(
            op,
            Op::MarkStale { .. }
                | Op::Repaired { .. }
                | Op::AddHolders { .. }
                | Op::DropHolders { .. }
                | Op::AddMember { .. }
                | Op::RemoveMember { .. }
                | Op::TierFlushed { .. }
                | Op::TierEvicted { .. }
                | Op::TierRestored { .. }
                | Op::BlobDeleteStarted { .. }
                | Op::BlobDeleted { .. }
                | Op::TierUploadStarted { .. }
                | Op::TierUploadAbandoned { .. }
        );
        let op_code = op.code();
        let cmd = Command {
            creds: creds.clone(),
            now: now(),
            op,
            session: if system {
                None
            } else {
                next_session_step(op_code)
            },
        };
        match &self.backend {
            Backend::Local { .. } => self.mutate(|ns| ns.apply(&cmd)),
            Backend::Raft(_) => self.exec_sharded(cmd),
        }
    }

    fn exec_attr(&self, creds: &Creds, op: Op) -> Result<Reply, ServiceError> {
        match self.exec(creds, op)? {
            Outcome::Attr(a) => Ok(Reply::Attr(a)),
            other => Err(internal(format!("expected attributes, got {other:?}"))),
        }
    }

    fn exec_unit(&self, creds: &Creds, op: Op) -> Result<Reply, ServiceError> {
        self.exec(creds, op).map(|_| Reply::Unit)
    }

    /// Applies a namespace change and makes it durable (local mode); on a persistence failure
    /// the in-memory namespace is rolled back to what is on disk and the caller gets EIO.
    fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Namespace) -> Result<T, Errno>,
    ) -> Result<T, ServiceError> {
        let Some(mut m) = self.local() else {
            return Err(internal("local commit on a cluster node".into()));
        };
        let out = f(&mut m.ns);
        let persisted = {
            let Meta { store, ns } = &mut *m;
            // Failed operations and handle bookkeeping change nothing durable: no commit.
            if ns.is_dirty() {
                store.persist(ns)
            } else {
                Ok(())
            }
        };
        if let Err(e) = persisted {
            tracing::error!("metadata commit failed, rolling back to the durable state: {e}");
            drop(m);
            self.reload();
            return Err(errno(Errno::Io));
        }
        let freed = m.ns.take_freed();
        drop(m);
        self.delete_chunks(freed);
        out.map_err(errno)
    }

    fn reload(&self) {
        let Backend::Local { meta, db_path } = &self.backend else {
            return;
        };
        let mut m = meta.lock().unwrap_or_else(|p| p.into_inner());
        match MetaStore::open(db_path, now()) {
            Ok((store, ns)) => {
                m.store = store;
                m.ns = ns;
            }
            Err(e) => tracing::error!("cannot reload metadata after a failed commit: {e}"),
        }
    }

    /// Deletes chunks nothing points at any more (after the commit that unreferenced them).
    /// A failure only leaks space until the next start, which deletes unreferenced chunks.
    fn delete_chunks(&self, chunks: Vec<ChunkId>) {
        for c in chunks {
            match self.engine.delete(c.0) {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => tracing::warn!("cannot delete {c}: {e}"),
            }
        }
    }

    /// Sets the object tier and starts its loop, once, before serving.
    pub fn set_tier(&self, tier: Arc<crate::tier::Tier>, rt: tokio::runtime::Handle) {
        if self.tier.set(Arc::clone(&tier)).is_err() {
            tracing::error!("the object tier was set twice; the first one stays");
            return;
        }
        self.start_tier(tier, rt);
    }

    /// The object tier, when configured.
    pub(crate) fn tier(&self) -> Option<&Arc<crate::tier::Tier>> {
        self.tier.get()
    }

    /// Chunk indexes of `ino` in `[offset, offset+len)` whose chunk is evicted to the store,
    /// with their extents.
    fn evicted_extents(
        ns: &Namespace,
        ino: InodeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, cfs_meta::tier::TierExtent)>, Errno> {
        if ns.tier().is_empty() || len == 0 {
            return Ok(Vec::new());
        }
        Ok(ns
            .extents(ino, offset, len)?
            .into_iter()
            .filter_map(|(idx, c)| Some((idx, *ns.tier().extent(c).filter(|e| e.evicted)?)))
            .collect())
    }

    /// Chunk indexes of `ino` in `[offset, offset+len)` whose chunk is evicted to the store.
    fn evicted_in(ns: &Namespace, ino: InodeId, offset: u64, len: u64) -> Result<Vec<u64>, Errno> {
        Ok(Self::evicted_extents(ns, ino, offset, len)?
            .into_iter()
            .map(|(idx, _)| idx)
            .collect())
    }

    /// Brings back the evicted chunk indexes `idxs` of `ino` (the caller holds their tier
    /// locks exclusively when `locked`).
    fn restore_all(&self, ino: InodeId, idxs: &[u64], locked: bool) -> Result<(), ServiceError> {
        if idxs.is_empty() {
            return Ok(());
        }
        let Some(t) = self.tier() else {
            tracing::error!("{ino} has data on the object store but no [tier] is configured here");
            return Err(errno(Errno::Io));
        };
        for idx in idxs {
            if locked {
                self.restore_locked(t, ino, *idx)?;
            } else {
                self.restore(t, ino, *idx)?;
            }
        }
        Ok(())
    }

    /// Sets the one-sided read path (or why there is none), once, before serving.
    pub fn set_rma(&self, rma: Result<Arc<crate::rma::RmaServer>, String>) {
        if self.rma.set(rma).is_err() {
            tracing::error!("the RMA path was set twice; the first one stays");
        }
    }

    fn rma_server(&self) -> Option<&Arc<crate::rma::RmaServer>> {
        self.rma.get().and_then(|r| r.as_ref().ok())
    }

    /// What `cfs status` shows of the transports: the RMA path's counters, or why only TCP.
    fn transport_status(&self) -> serde_json::Value {
        match self.rma.get() {
            Some(Ok(r)) => serde_json::json!({"rma": r.status()}),
            Some(Err(why)) => serde_json::json!({"rma": null, "tcp_only": why}),
            None => serde_json::json!({"rma": null, "tcp_only": "not configured"}),
        }
    }

    /// A client's hello on the RMA path.
    fn rma_hello(&self, payload: &[u8]) -> Result<bytes::Bytes, ServiceError> {
        let h = cfs_proto::rma::Hello::decode(payload)
            .ok_or_else(|| ServiceError::new(ErrorCode::BadRequest, "malformed RMA hello"))?;
        let reply = match self.rma.get() {
            Some(Ok(r)) => r.hello(&h),
            Some(Err(why)) => cfs_proto::rma::HelloReply::Tcp(format!("no RMA here: {why}")),
            None => cfs_proto::rma::HelloReply::Tcp("no RMA here: not configured".into()),
        };
        match &reply {
            cfs_proto::rma::HelloReply::Rma { provider, .. } => {
                tracing::info!("a client reads over RMA ({provider})")
            }
            cfs_proto::rma::HelloReply::Tcp(why) => {
                tracing::info!(
                    "a client asking for RMA ({}) reads over TCP: {why}",
                    h.provider
                )
            }
        }
        Ok(bytes::Bytes::from(reply.encode()))
    }

    /// A read on the RMA path over TCP (see [`FsService::rma_read_request`]).
    async fn rma_read(&self, payload: &[u8]) -> Result<bytes::Bytes, ServiceError> {
        let q = cfs_proto::rma::ReadRequest::decode(payload)
            .ok_or_else(|| ServiceError::new(ErrorCode::BadRequest, "malformed RMA read"))?;
        Ok(bytes::Bytes::from(self.rma_read_request(q).await?.encode()))
    }

    /// A read on the RMA path (a TCP call or a fabric message): runs the read as usual
    /// (forwarded to the shard's leader if need be), then stages its data for a one-sided
    /// read when it is worth it.
    pub async fn rma_read_request(
        &self,
        q: cfs_proto::rma::ReadRequest,
    ) -> Result<cfs_proto::rma::ReadReply, ServiceError> {
        use cfs_proto::rma::ReadReply;
        if let Some(r) = self.rma_server() {
            r.release(&q.released);
        }
        // Only reads: anything else goes through the ordinary path (sessions and all).
        match Request::decode(q.method, &q.payload) {
            Some((_, Request::Read { .. })) => {}
            _ => {
                return Err(ServiceError::new(
                    ErrorCode::BadRequest,
                    "only reads go over the RMA path",
                ))
            }
        }
        let reply = self.call(q.method, bytes::Bytes::from(q.payload)).await?;
        let staged = match (self.rma_server(), Reply::data_of(&reply)) {
            (Some(r), Some(data)) => r.stage(data),
            _ => None,
        };
        Ok(match staged {
            Some(layout) => ReadReply::Layout(layout),
            None => ReadReply::Inline(reply.to_vec()),
        })
    }

    /// This node's view, as JSON: role, term, applied index, members, stale chunk copies
    /// (repair backlog) and the local chunk store's usage.
    pub fn status(&self) -> String {
        let (chunks, used, free) = match self.engine.stats() {
            Ok(st) => st.iter().fold((0, 0, 0), |(c, u, f), (_, s)| {
                (
                    c + s.chunks,
                    u + s.live_blocks * 4096,
                    f + s.free_blocks * 4096,
                )
            }),
            Err(_) => (0, 0, 0),
        };
        let store = serde_json::json!({"chunks": chunks, "used_bytes": used, "free_bytes": free});
        match &self.backend {
            Backend::Local { .. } => serde_json::json!({"mode": "single", "store": store,
                "transport": self.transport_status()}),
            Backend::Raft(groups) => {
                let c = &groups[0];
                let cs = c.conf_state();
                let members: Vec<serde_json::Value> = {
                    let r = c.replica();
                    r.namespace()
                        .placement()
                        .members()
                        .iter()
                        .map(|(id, m)| {
                            let role = if cs.voters.contains(id) {
                                "voter"
                            } else if cs.learners.contains(id) {
                                "learner"
                            } else {
                                "none"
                            };
                            let silent_ms = (*id != c.node_id())
                                .then(|| c.silent_for(*id).map(|d| d.as_millis() as u64))
                                .flatten();
                            serde_json::json!({"id": id, "addr": m.addr, "domain": m.domain,
                                "raft": role, "silent_ms": silent_ms})
                        })
                        .collect()
                };
                let (removed, replicas, effective) = c.read_local(|ns| {
                    let p = ns.placement();
                    (p.removed().clone(), p.replicas(), p.effective_replicas())
                });
                // Chunks are recorded in the shard of the file they belong to: add them up.
                let (mut stale, mut holders, mut shards) = (Vec::new(), Vec::new(), Vec::new());
                let mut h = cfs_meta::placement::Health::default();
                for g in groups.iter() {
                    // Before the replica lock (conf_state takes it too).
                    let gcs = g.conf_state();
                    let r = g.replica();
                    let ns = r.namespace();
                    let p = ns.placement();
                    stale.extend(
                        ns.all_stale()
                            .map(
                                |(ch, nodes)| serde_json::json!({"chunk": ch.0, "stale_on": nodes}),
                            )
                            .take(1000),
                    );
                    holders.extend(
                        p.all_holders()
                            .take(10_000)
                            .map(|(ch, hs)| serde_json::json!([ch.0, hs])),
                    );
                    let gh = p.health();
                    h.chunks += gh.chunks;
                    h.under_replicated += gh.under_replicated;
                    h.lost += gh.lost;
                    h.misplaced += gh.misplaced;
                    h.stale_copies += gh.stale_copies;
                    shards.push(serde_json::json!({
                        "shard": g.shard().index,
                        "role": if r.is_leader() { "leader" } else { "follower" },
                        "leader": r.leader(),
                        "term": r.term(),
                        "applied": r.applied(),
                        "transactions_idle": ns.txn_idle(),
                        "voters": gcs.voters,
                        "learners": gcs.learners,
                    }));
                }
                let r = c.replica();
                serde_json::json!({
                    "mode": "cluster",
                    "node": c.node_id(),
                    "role": if r.is_leader() { "leader" } else { "follower" },
                    "leader": r.leader(),
                    "term": r.term(),
                    "applied": r.applied(),
                    "forwarded_requests": self.forwarded.load(std::sync::atomic::Ordering::Relaxed),
                    "shards": shards,
                    "members": members,
                    "removed": removed,
                    "replicas": replicas,
                    "effective_replicas": effective,
                    "chunks": {"total": h.chunks, "under_replicated": h.under_replicated,
                        "lost": h.lost, "misplaced": h.misplaced, "stale_copies": h.stale_copies},
                    "stale_chunk_copies": stale.len(),
                    "orphan_copies_deleted": self
                        .orphans_deleted
                        .load(std::sync::atomic::Ordering::Relaxed),
                    "stale": stale,
                    "holders": holders,
                    "store": store,
                    "transport": self.transport_status(),
                })
            }
        }
        .to_string()
    }

    /// Applies a change to a chunk's data: here (one node), or on every member of the
    /// cluster (see [`crate::replication`]): a majority must apply it, and members that did
    /// not are marked stale for the chunk before this returns.
    pub(crate) fn chunk_change(&self, chunk: ChunkId, op: ChunkOp) -> Result<(), ServiceError> {
        let c = match &self.backend {
            Backend::Local { .. } => {
                return replication::apply(&self.engine, chunk, op)
                    .map(|_| ())
                    .map_err(io_error)
            }
            Backend::Raft(_) => self.group_for_chunk(chunk),
        };
        let _order = self
            .chunk_lock(chunk)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let me = c.node_id();
        let (targets, members) = self.current_holders(c, chunk);
        let stale: std::collections::BTreeSet<u64> = members
            .iter()
            .copied()
            .filter(|m| !targets.contains(m))
            .collect();
        let fence = self.fence_of(c, chunk);
        // Counted in flight until the copies agree or the ones that missed it are stale.
        let _in_flight = self.epochs.start(c.shard().index, fence.term);
        let payload = bytes::Bytes::from(replication::encode(chunk, &op, fence));
        let rt = tokio::runtime::Handle::current();
        let timeout = c.replica_timeout();
        if matches!(op, ChunkOp::Write { .. }) && partial_write_fault_armed() {
            let other = members.iter().find(|m| **m != me && !stale.contains(m));
            if let Some(client) = other.and_then(|m| c.client(*m)) {
                let r =
                    rt.block_on(client.call_timeout(replication::CHUNK_METHOD, &payload, timeout));
                tracing::error!("test fault: change to {chunk} sent to member {other:?}: {r:?}");
            }
            if targets.contains(&me) {
                let r = self
                    .fences
                    .apply(&self.engine, chunk, c.shard().index, op, fence);
                tracing::error!("test fault: change to {chunk} applied here: {r:?}");
            }
            tracing::error!("test fault: aborting in the middle of a change to {chunk}");
            std::process::abort();
        }
        let mut calls = tokio::task::JoinSet::new();
        for m in members
            .iter()
            .copied()
            .filter(|m| *m != me && !stale.contains(m))
        {
            if let Some(client) = c.client(m) {
                let p = payload.clone();
                calls.spawn_on(
                    async move {
                        // A member that does not answer within this is recorded stale rather
                        // than holding the write (and the client) up.
                        let r = client
                            .call_timeout(replication::CHUNK_METHOD, &p, timeout)
                            .await;
                        (m, r)
                    },
                    &rt,
                );
            }
        }
        let mut ok = Vec::new();
        // Only a current holder applies the change here (the leader need not hold the chunk).
        if targets.contains(&me) {
            match self
                .fences
                .apply(&self.engine, chunk, c.shard().index, op.clone(), fence)
            {
                Ok(_) => ok.push(me),
                Err(e) => tracing::error!("local change to {chunk} failed: {e}"),
            }
        }
        rt.block_on(async {
            while let Some(r) = calls.join_next().await {
                match r {
                    Ok((m, Ok(_))) => ok.push(m),
                    Ok((m, Err(e))) => tracing::warn!("member {m} missed a change to {chunk}: {e}"),
                    Err(e) => tracing::warn!("replication task failed: {e}"),
                }
            }
        });
        if ok.len() < members.len() / 2 + 1 {
            return Err(ServiceError::new(
                ErrorCode::Service(ERRNO_BASE + Errno::Io.errno() as u32),
                format!(
                    "{chunk}: only {} of {} holders applied the change",
                    ok.len(),
                    members.len()
                ),
            ));
        }
        let missed: Vec<u64> = members
            .iter()
            .copied()
            .filter(|m| !ok.contains(m) && !stale.contains(m))
            .collect();
        if !missed.is_empty() {
            self.exec(
                &Creds::root(),
                Op::MarkStale {
                    chunks: vec![chunk],
                    nodes: missed,
                },
            )?;
        }
        Ok(())
    }

    /// Reads a range of a chunk: this node's copy when it is a current holder, else a current
    /// holder's. A local copy that fails its checksums is recorded stale (repair rewrites it)
    /// and the read goes to another holder.
    pub(crate) fn chunk_read(
        &self,
        chunk: ChunkId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, ServiceError> {
        let c = match &self.backend {
            Backend::Raft(_) => self.group_for_chunk(chunk),
            Backend::Local { .. } => {
                return replication::apply(&self.engine, chunk, ChunkOp::Read { offset, len })
                    .map_err(io_error)
            }
        };
        let mut unsettled = false;
        match self.chunk_read_once(c, chunk, offset, len, &mut unsettled) {
            Err(_) if unsettled => {
                // Copies changed under an older leader and not compared yet: compare them
                // now (not under the chunk's read lock) and read once more.
                self.reconcile(c);
                let mut again = false;
                self.chunk_read_once(c, chunk, offset, len, &mut again)
                    .map_err(|e| match again {
                        true => ServiceError::new(ErrorCode::Busy, e.message),
                        false => e,
                    })
            }
            r => r,
        }
    }

    /// One try of [`FsService::chunk_read`]; sets `unsettled` when a copy was refused because
    /// it is not reconciled yet.
    fn chunk_read_once(
        &self,
        c: &Cluster,
        chunk: ChunkId,
        offset: u64,
        len: u64,
        unsettled: &mut bool,
    ) -> Result<Vec<u8>, ServiceError> {
        let op = ChunkOp::Read { offset, len };
        let _order = self
            .chunk_lock(chunk)
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let me = c.node_id();
        let (current, _) = self.current_holders(c, chunk);
        // Reads carry this leader's term: a copy changed under an older one and not compared
        // since refuses them (see [`crate::replication`]).
        let fence = self.fence_of(c, chunk);
        if current.contains(&me) {
            match self
                .fences
                .apply(&self.engine, chunk, c.shard().index, op.clone(), fence)
            {
                Ok(d) => return Ok(d),
                Err(replication::ApplyError::Unsettled { .. }) => *unsettled = true,
                Err(e) => {
                    tracing::error!("local copy of {chunk} unreadable ({e}): reading another");
                    self.record_bad_copies(chunk, vec![me]);
                }
            }
        }
        let payload = replication::encode(chunk, &op, fence);
        let rt = tokio::runtime::Handle::current();
        // Holders whose store answered with an error (a failed checksum): their copies are
        // bad, unlike those of holders that could not be reached.
        let mut bad = Vec::new();
        for m in current.into_iter().filter(|m| *m != me) {
            if let Some(client) = c.client(m) {
                // A holder that does not answer within replica_timeout_ms is skipped for the
                // next one, as a holder that fails.
                let r = rt.block_on(client.call_timeout(
                    replication::CHUNK_METHOD,
                    &payload,
                    c.replica_timeout(),
                ));
                match r {
                    Ok(b) if b.len() as u64 == len => {
                        if !bad.is_empty() {
                            self.record_bad_copies(chunk, bad);
                        }
                        return Ok(b.to_vec());
                    }
                    Ok(b) => tracing::warn!("member {m} returned {} of {len} bytes", b.len()),
                    Err(cfs_fabric::RpcError::Remote {
                        code: ErrorCode::Busy,
                        ..
                    }) => *unsettled = true,
                    Err(e @ cfs_fabric::RpcError::Remote { .. }) => {
                        tracing::error!("copy of {chunk} on member {m} unreadable: {e}");
                        bad.push(m);
                    }
                    Err(e) => tracing::warn!("reading {chunk} from member {m}: {e}"),
                }
            }
        }
        Err(ServiceError::new(
            ErrorCode::Service(ERRNO_BASE + Errno::Io.errno() as u32),
            format!("no current copy of {chunk} reachable"),
        ))
    }

    /// Records copies that failed their checksums as stale, so repair rewrites them.
    fn record_bad_copies(&self, chunk: ChunkId, nodes: Vec<u64>) {
        if let Err(e) = self.exec(
            &Creds::root(),
            Op::MarkStale {
                chunks: vec![chunk],
                nodes: nodes.clone(),
            },
        ) {
            tracing::warn!("cannot record the copies of {chunk} on {nodes:?} stale: {e}");
        }
    }

    /// Before a size change from `old` to `new`: cuts the chunk holding the new (when
    /// shrinking) or old (when growing) end, so bytes past the end read as zeros later.
    fn cut_tail(&self, ino: InodeId, old: u64, new: u64) -> Result<(), ServiceError> {
        let at = old.min(new);
        if at.is_multiple_of(CHUNK_BYTES) || old == new {
            return Ok(());
        }
        let _tier_locks = self
            .tier()
            .map(|t| t.write_locks(ino, at / CHUNK_BYTES, at / CHUNK_BYTES));
        let (mapped, evicted) = self.view(ino, |ns| {
            Ok((ns.extents(ino, at, 1)?, Self::evicted_in(ns, ino, at, 1)?))
        })?;
        self.restore_all(ino, &evicted, true)?;
        if let Some((_, c)) = mapped.first() {
            self.chunk_change(
                *c,
                ChunkOp::Truncate {
                    len: at % CHUNK_BYTES,
                },
            )?;
        }
        Ok(())
    }

    fn write(
        &self,
        creds: &Creds,
        ino: InodeId,
        offset: u64,
        data: &[u8],
    ) -> Result<Reply, ServiceError> {
        if data.len() > MAX_IO as usize {
            return Err(errno(Errno::Inval));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| errno(Errno::FBig))?;
        if end > MAX_FILE_SIZE {
            return Err(errno(Errno::FBig));
        }
        if data.is_empty() {
            return self.view(ino, |ns| ns.getattr(ino)).map(Reply::Attr);
        }
        // A resend of a write whose `Wrote` already committed: its data must not be written
        // again (another client may have overwritten it since); answer the first result.
        if let Some(s) = peek_session_step(cfs_meta::command::Op::WROTE_CODE) {
            if let Some(first) = self.view(ino, |ns| Ok(ns.session_result(s)))? {
                return match first.map_err(errno)? {
                    Outcome::Attr(a) => Ok(Reply::Attr(a)),
                    other => Err(internal(format!("a write's first result was {other:?}"))),
                };
            }
        }
        let len = data.len() as u64;
        // Object tier: back-pressure while the store is down, and no eviction of these chunks
        // from before we look at them until the write is committed.
        if let Some(t) = self.tier() {
            t.admit_write(len)?;
        }
        let _tier_locks = self
            .tier()
            .map(|t| t.write_locks(ino, offset / CHUNK_BYTES, (offset + len - 1) / CHUNK_BYTES));
        let (chunks, new_chunks, evicted, tiered) = match self.local() {
            Some(mut m) => {
                // Mapped in memory now, committed with the write (see the module docs).
                let before = m.ns.extents(ino, offset, len).map_err(errno)?;
                let evicted = Self::evicted_in(&m.ns, ino, offset, len).map_err(errno)?;
                let tiered = before.iter().any(|(_, c)| m.ns.tier().extent(*c).is_some());
                let chunks = m.ns.map_chunks(ino, offset, len).map_err(errno)?;
                let new = chunks.len() != before.len();
                (chunks, new, evicted, tiered)
            }
            None => {
                let (existing, evicted) = self.view(ino, |ns| {
                    Ok((
                        ns.extents(ino, offset, len)?,
                        Self::evicted_in(ns, ino, offset, len)?,
                    ))
                })?;
                if existing.len() as u64
                    == (offset + len - 1) / CHUNK_BYTES - offset / CHUNK_BYTES + 1
                {
                    (existing, false, evicted, false)
                } else {
                    match self.exec(creds, Op::MapChunks { ino, offset, len })? {
                        Outcome::Chunks(c) => (c, true, evicted, false),
                        other => return Err(internal(format!("expected chunks, got {other:?}"))),
                    }
                }
            }
        };
        // A partial write to an evicted chunk needs the rest of its bytes back first.
        self.restore_all(ino, &evicted, true)?;
        for ((_, off, n, at), (_, c)) in pieces(offset, data.len() as u64).zip(&chunks) {
            let piece = &data[at as usize..(at + n) as usize];
            self.chunk_change(
                *c,
                ChunkOp::Write {
                    offset: off,
                    data: piece.to_vec(),
                },
            )?;
        }
        let Some(mut m) = self.local() else {
            return self.exec_attr(
                creds,
                Op::Wrote {
                    ino,
                    offset,
                    len,
                    chunks,
                },
            );
        };
        let t = now();
        let res = {
            let before = m.ns.getattr(ino).map_err(errno)?;
            let res = m.ns.wrote(creds, ino, offset, len, &chunks, t);
            if let Ok(a) = &res {
                // (Not when a stored copy just died: the index change must be durable.)
                if !new_chunks && !tiered && a.size == before.size && a.perm == before.perm {
                    // Only the times changed (an overwrite inside the file, no new chunk, no
                    // setuid to drop): the data is durable; the times ride along with the next
                    // commit, fsync or close instead of costing a commit per write.
                    return Ok(Reply::Attr(a.clone()));
                }
            }
            res
        };
        drop(m);
        self.mutate(|_| res).map(Reply::Attr)
    }

    fn read(&self, ino: InodeId, offset: u64, len: u32) -> Result<Reply, ServiceError> {
        let want = u64::from(len.min(MAX_IO));
        if want == 0 {
            return Ok(Reply::Data(Vec::new()));
        }
        let (first, last) = (
            offset / CHUNK_BYTES,
            offset.saturating_add(want - 1) / CHUNK_BYTES,
        );
        let mut tries = 0;
        loop {
            // Shared tier locks: no eviction, restore or write of these chunks while they
            // are read (from flash, or from the store when evicted).
            let _shared = self.tier().map(|t| t.read_locks(ino, first, last));
            let (attr, mapped, evicted) = self.view(ino, |ns| {
                Ok((
                    ns.getattr(ino)?,
                    ns.extents(ino, offset, want)?,
                    Self::evicted_extents(ns, ino, offset, want)?,
                ))
            })?;
            let end = attr.size.min(offset.saturating_add(want));
            if offset >= end {
                return Ok(Reply::Data(Vec::new()));
            }
            let mut out = vec![0u8; (end - offset) as usize];
            // Evicted chunks whose blob has no block CRCs: brought back whole, then again.
            let mut whole = Vec::new();
            for (idx, off, n, at) in pieces(offset, end - offset) {
                let Some((_, c)) = mapped.iter().find(|(i, _)| *i == idx) else {
                    continue; // a hole: zeros
                };
                let d = match evicted.iter().find(|(i, _)| *i == idx) {
                    None => {
                        if let Some(t) = self.tier() {
                            t.note_read(*c);
                        }
                        self.chunk_read(*c, off, n)?
                    }
                    Some((_, e)) => {
                        let Some(t) = self.tier() else {
                            tracing::error!(
                                "{ino} has data on the object store but no [tier] is configured here"
                            );
                            return Err(errno(Errno::Io));
                        };
                        match self.read_evicted_piece(t, (ino, idx, *c), e, off, n)? {
                            Some(d) => d,
                            None => {
                                whole.push(idx);
                                continue;
                            }
                        }
                    }
                };
                out[at as usize..at as usize + d.len()].copy_from_slice(&d);
            }
            if whole.is_empty() {
                return Ok(Reply::Data(out));
            }
            drop(_shared);
            tries += 1;
            if tries > 3 {
                return Err(ServiceError::new(
                    ErrorCode::Busy,
                    format!("{ino}: evicted again while being read back"),
                ));
            }
            self.restore_all(ino, &whole, false)?;
        }
    }

    /// Makes `[offset, offset+len)` read as zeros in the store, except whole chunks, which
    /// the namespace unmaps (`Namespace::punched`).
    fn zero_partial_chunks(&self, ino: InodeId, offset: u64, len: u64) -> Result<(), ServiceError> {
        let (first, last) = (
            offset / CHUNK_BYTES,
            (offset + len.max(1) - 1) / CHUNK_BYTES,
        );
        let _tier_locks = self.tier().map(|t| t.write_locks(ino, first, last));
        let (mapped, evicted) = self.view(ino, |ns| {
            Ok((
                ns.extents(ino, offset, len)?,
                Self::evicted_in(ns, ino, offset, len)?,
            ))
        })?;
        // Only chunks cut in part need their bytes back (whole ones are dropped).
        let partial: Vec<u64> = evicted
            .into_iter()
            .filter(|idx| idx * CHUNK_BYTES < offset || (idx + 1) * CHUNK_BYTES > offset + len)
            .collect();
        self.restore_all(ino, &partial, true)?;
        for (idx, off, n, _) in pieces(offset, len) {
            if n == CHUNK_BYTES {
                continue;
            }
            if let Some((_, c)) = mapped.iter().find(|(i, _)| *i == idx) {
                self.chunk_change(
                    *c,
                    ChunkOp::Punch {
                        offset: off,
                        len: n,
                    },
                )?;
            }
        }
        Ok(())
    }

    fn fallocate(
        &self,
        creds: &Creds,
        ino: InodeId,
        offset: u64,
        len: u64,
        mode: u32,
    ) -> Result<Reply, ServiceError> {
        let end = offset.checked_add(len).ok_or_else(|| errno(Errno::FBig))?;
        if len == 0 {
            return Err(errno(Errno::Inval));
        }
        if end > MAX_FILE_SIZE {
            return Err(errno(Errno::FBig));
        }
        let keep = mode & FALLOC_KEEP_SIZE != 0;
        match mode & !FALLOC_KEEP_SIZE {
            0 => {
                // The store is copy-on-write, so space cannot be set aside; refuse what
                // clearly does not fit, as a full disk would.
                let free: u64 = self
                    .engine
                    .stats()
                    .map_err(io_error)?
                    .iter()
                    .map(|(_, s)| s.free_blocks * crate::store::format::BLOCK as u64)
                    .sum();
                let size = self.view(ino, |ns| ns.getattr(ino))?.size;
                if end.saturating_sub(size.max(offset)) > free {
                    return Err(errno(Errno::NoSpc));
                }
                self.exec_attr(
                    creds,
                    Op::Fallocate {
                        ino,
                        offset,
                        len,
                        keep_size: keep,
                    },
                )
            }
            FALLOC_PUNCH_HOLE if keep => {
                self.zero_partial_chunks(ino, offset, len)?;
                self.exec_attr(
                    creds,
                    Op::Punched {
                        ino,
                        offset,
                        len,
                        extend: false,
                    },
                )
            }
            FALLOC_ZERO_RANGE => {
                self.zero_partial_chunks(ino, offset, len)?;
                self.exec_attr(
                    creds,
                    Op::Punched {
                        ino,
                        offset,
                        len,
                        extend: !keep,
                    },
                )
            }
            FALLOC_PUNCH_HOLE => Err(errno(Errno::Inval)),
            _ => Err(errno(Errno::NotSup)),
        }
    }

    /// SEEK_DATA / SEEK_HOLE at 4 KiB precision: holes are unmapped chunks, blocks never
    /// written or punched, and anything past a chunk's length.
    fn lseek(&self, ino: InodeId, offset: u64, whence: u32) -> Result<Reply, ServiceError> {
        let (size, mapped) = self.view(ino, |ns| {
            let size = ns.getattr(ino)?.size;
            Ok((size, ns.extents(ino, offset, size.saturating_sub(offset))?))
        })?;
        if offset >= size {
            return Err(errno(Errno::NxIo));
        }
        let data_in = |idx: u64| -> Result<Vec<(u64, u64)>, ServiceError> {
            let Some((_, c)) = mapped.iter().find(|(i, _)| *i == idx) else {
                return Ok(Vec::new());
            };
            let base = idx * CHUNK_BYTES;
            Ok(self
                .engine
                .data_ranges(c.0)
                .map_err(io_error)?
                .into_iter()
                .map(|(s, e)| (base + s, base + e))
                .collect())
        };
        let last = (size - 1) / CHUNK_BYTES;
        match whence {
            SEEK_DATA => {
                for (idx, _) in mapped.iter().filter(|(i, _)| *i <= last) {
                    for (s, e) in data_in(*idx)? {
                        if e > offset && s < size {
                            return Ok(Reply::Offset(s.max(offset)));
                        }
                    }
                }
                Err(errno(Errno::NxIo))
            }
            SEEK_HOLE => {
                let mut pos = offset;
                for idx in offset / CHUNK_BYTES..=last {
                    let chunk_end = (idx + 1) * CHUNK_BYTES;
                    for (s, e) in data_in(idx)? {
                        if s > pos {
                            break;
                        }
                        pos = pos.max(e);
                    }
                    if pos < chunk_end {
                        return Ok(Reply::Offset(pos.min(size)));
                    }
                }
                Ok(Reply::Offset(size))
            }
            _ => Err(errno(Errno::Inval)),
        }
    }

    /// Handles one decoded request (blocking: call from a blocking-capable thread).
    pub fn handle(&self, creds: &Creds, req: Request) -> Result<Reply, ServiceError> {
        let t = now();
        match req {
            Request::Lookup { parent, name } => {
                match self.view(parent, |ns| ns.lookup_entry(creds, parent, &name))? {
                    (_, Some(a)) => Ok(Reply::Attr(a)),
                    // The entry names an inode of another shard.
                    (ino, None) => self.sub_request(creds, Request::GetAttr { ino }),
                }
            }
            Request::GetAttr { ino } => self.view(ino, |ns| ns.getattr(ino)).map(Reply::Attr),
            Request::SetAttr { ino, set } => {
                if let Some(size) = set.size {
                    // Check every rule before cutting any data.
                    let old = self.view(ino, |ns| {
                        ns.setattr_preview(creds, ino, &set, t)?;
                        ns.getattr(ino)
                    })?;
                    if old.kind == FileType::Regular {
                        self.cut_tail(ino, old.size, size)?;
                    }
                }
                self.exec_attr(creds, Op::SetAttr { ino, set })
            }
            Request::Mknod {
                parent,
                name,
                kind,
                perm,
                rdev,
            } => self.exec_attr(
                creds,
                Op::Mknod {
                    parent,
                    name,
                    kind,
                    perm,
                    rdev,
                },
            ),
            Request::Mkdir { parent, name, perm } => {
                self.exec_attr(creds, Op::Mkdir { parent, name, perm })
            }
            Request::Symlink {
                parent,
                name,
                target,
            } => self.exec_attr(
                creds,
                Op::Symlink {
                    parent,
                    name,
                    target,
                },
            ),
            Request::Link {
                ino,
                newparent,
                newname,
            } => self.exec_attr(
                creds,
                Op::Link {
                    ino,
                    newparent,
                    newname,
                },
            ),
            Request::Unlink { parent, name } => self.exec_unit(creds, Op::Unlink { parent, name }),
            Request::Rmdir { parent, name } => self.exec_unit(creds, Op::Rmdir { parent, name }),
            Request::Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => self.exec_unit(
                creds,
                Op::Rename {
                    parent,
                    name,
                    newparent,
                    newname,
                    flags,
                },
            ),
            Request::Readlink { ino } => self.view(ino, |ns| ns.readlink(ino)).map(Reply::Data),
            Request::Open {
                ino,
                read,
                write,
                truncate,
            } => {
                let attr = match self.exec(creds, Op::Open { ino, read, write })? {
                    Outcome::Attr(a) => a,
                    other => return Err(internal(format!("open gave {other:?}"))),
                };
                if truncate && write && attr.kind == FileType::Regular && attr.size > 0 {
                    let set = SetAttr {
                        size: Some(0),
                        via_write_handle: true,
                        ..SetAttr::default()
                    };
                    self.cut_tail(ino, attr.size, 0)?;
                    return self.exec_attr(creds, Op::SetAttr { ino, set });
                }
                Ok(Reply::Attr(attr))
            }
            Request::Release { ino } => self.exec_unit(creds, Op::Release { ino }),
            Request::Create { parent, name, perm } => {
                self.exec_attr(creds, Op::Create { parent, name, perm })
            }
            // Commits whatever is pending (times deferred by overwrites, local mode); in a
            // group every change is already committed.
            Request::Fsync { ino } => match self.backend {
                Backend::Local { .. } => self.mutate(|ns| ns.getattr(ino)).map(|_| Reply::Unit),
                Backend::Raft(_) => self.view(ino, |ns| ns.getattr(ino)).map(|_| Reply::Unit),
            },
            Request::ReadDir { ino, cookie, limit } => self
                .view(ino, |ns| {
                    ns.readdir(creds, ino, cookie, limit.min(4096) as usize)
                })
                .map(Reply::Entries),
            Request::SetXattr {
                ino,
                name,
                value,
                mode,
            } => self.exec_unit(
                creds,
                Op::SetXattr {
                    ino,
                    name,
                    value,
                    mode,
                },
            ),
            Request::GetXattr { ino, name } => self
                .view(ino, |ns| ns.getxattr(creds, ino, &name))
                .map(Reply::Data),
            Request::ListXattr { ino } => self
                .view(ino, |ns| ns.listxattr(creds, ino))
                .map(Reply::Names),
            Request::RemoveXattr { ino, name } => {
                self.exec_unit(creds, Op::RemoveXattr { ino, name })
            }
            Request::Access { ino, mask } => self
                .view(ino, |ns| ns.access(creds, ino, mask))
                .map(|()| Reply::Unit),
            Request::Statfs => self.statfs().map(Reply::Stats),
            Request::Status => Ok(Reply::Data(self.status().into_bytes())),
            Request::Routes => Ok(Reply::Routes(self.routes())),
            Request::Write { ino, offset, data } => self.write(creds, ino, offset, &data),
            Request::Read { ino, offset, len } => self.read(ino, offset, len),
            Request::Fallocate {
                ino,
                offset,
                len,
                mode,
            } => self.fallocate(creds, ino, offset, len, mode),
            Request::Lseek {
                ino,
                offset,
                whence,
            } => self.lseek(ino, offset, whence),
            Request::ReadDirPlus { ino, cookie, limit } => {
                let part = self.view(ino, |ns| {
                    let entries = ns.readdir(creds, ino, cookie, limit.min(4096) as usize)?;
                    Ok(entries
                        .into_iter()
                        .map(|e| {
                            let a = ns.getattr(e.ino).ok();
                            (e, a)
                        })
                        .collect::<Vec<_>>())
                })?;
                let mut out = Vec::with_capacity(part.len());
                for (e, a) in part {
                    let a = match a {
                        Some(a) => a,
                        // An inode of another shard.
                        None => match self.sub_request(creds, Request::GetAttr { ino: e.ino })? {
                            Reply::Attr(a) => a,
                            other => return Err(internal(format!("getattr gave {other:?}"))),
                        },
                    };
                    out.push((e, a));
                }
                Ok(Reply::EntriesPlus(out))
            }
        }
    }
}

/// Set on the method id of a request one node forwards to the leader: the receiver runs it or
/// answers NOT_LEADER, never forwards it again (no forwarding loops).
pub const FORWARDED: u32 = 0x8000_0000;

impl FsService {
    /// Runs a decoded request here (blocking work off the async workers).
    async fn run_here(
        &self,
        creds: Creds,
        req: Request,
        session: Option<cfs_meta::session::Session>,
    ) -> Result<Reply, ServiceError> {
        // Requests answered from the in-memory namespace alone (not data reads).
        let read_only = req.is_read_only()
            && !matches!(
                req,
                Request::Read { .. } | Request::Lseek { .. } | Request::Status
            );
        // In-memory lookups answer at once on a single node: a hand-off to another thread
        // would cost more than the work (measured: thread wake-ups dominated stat latency).
        // In a cluster a read waits for a ReadIndex round, which must not hold an async worker
        // (the Raft messages that complete it run on those workers).
        if read_only && self.cluster().is_none() {
            self.handle(&creds, req)
        } else {
            // Commits and data I/O block: keep them off the async workers.
            let this = self.clone();
            tokio::task::spawn_blocking(move || with_session(session, || this.handle(&creds, req)))
                .await
                .map_err(|e| ServiceError::new(ErrorCode::Internal, e.to_string()))?
        }
    }

    /// Sends a request this node cannot serve to the group's leader, waiting up to an
    /// election for one to be known.
    /// `resendable`: the request may run twice (a read, or a mutation with a session), so a
    /// forward lost on the way (e.g. on a connection to a leader that just restarted) is sent
    /// again rather than reported as an unknown outcome.
    pub(crate) async fn forward(
        &self,
        c: &Cluster,
        method: u32,
        payload: &[u8],
        resendable: bool,
    ) -> Result<bytes::Bytes, ServiceError> {
        let give_up = std::time::Instant::now() + c.election_timeout() * 3;
        loop {
            let leader = c.replica().leader();
            if let Some(l) = leader.filter(|l| *l != c.node_id()) {
                if let Some(client) = c.client(l) {
                    match client.call(method | FORWARDED, payload).await {
                        Ok(b) => return Ok(b),
                        Err(cfs_fabric::RpcError::Remote {
                            code: ErrorCode::Service(NOT_LEADER),
                            ..
                        }) => {}
                        Err(cfs_fabric::RpcError::Remote { code, message }) => {
                            return Err(ServiceError::new(code, message))
                        }
                        // Never sent: try again (the leader may change meanwhile).
                        Err(e @ cfs_fabric::RpcError::Connect { .. }) => {
                            tracing::debug!("forwarding to leader {l} failed: {e}")
                        }
                        Err(
                            e @ (cfs_fabric::RpcError::ConnectionLost { .. }
                            | cfs_fabric::RpcError::Timeout { .. }),
                        ) if resendable => {
                            tracing::debug!("forward to leader {l} lost ({e}); sending it again")
                        }
                        // Sent and lost: it may have run, so it is not sent again here (the
                        // client resends it if it has a session).
                        Err(e) => {
                            return Err(ServiceError::new(
                                ErrorCode::Service(OUTCOME_UNKNOWN),
                                format!("forwarded request lost: {e}"),
                            ))
                        }
                    }
                }
            } else if leader == Some(c.node_id()) {
                return Err(ServiceError::new(
                    ErrorCode::Service(NOT_LEADER),
                    "became leader",
                ));
            }
            if std::time::Instant::now() >= give_up {
                // Nothing ran: the client may try another member.
                return Err(ServiceError::new(
                    ErrorCode::Busy,
                    "no metadata leader reachable",
                ));
            }
            tokio::time::sleep(c.tick()).await;
        }
    }
}

/// RPC method of a scrub request (empty payload; the leader answers a JSON summary).
pub const SCRUB_METHOD: u32 = 0x0100_0004;

impl FsService {
    /// For an administrative request that only the leader runs: `None` if this node leads
    /// (run it here), else the leader's answer to it forwarded (or NOT_LEADER when it was
    /// already forwarded here).
    async fn leader_elsewhere(
        &self,
        c: &Cluster,
        method: u32,
        payload: &[u8],
        resendable: bool,
    ) -> Option<Result<bytes::Bytes, ServiceError>> {
        if c.replica().is_leader() {
            return None;
        }
        if method & FORWARDED != 0 {
            return Some(Err(ServiceError::new(
                ErrorCode::Service(NOT_LEADER),
                "not the leader",
            )));
        }
        match self
            .forward(c, method & !FORWARDED, payload, resendable)
            .await
        {
            // Became leader meanwhile: run it here.
            Err(e) if e.code == ErrorCode::Service(NOT_LEADER) => None,
            other => Some(other),
        }
    }

    /// A scrub request: run on the leader (forwarded there if need be).
    async fn scrub_call(&self, method: u32) -> Result<bytes::Bytes, ServiceError> {
        let Some(c) = self.cluster() else {
            return Err(ServiceError::new(
                ErrorCode::BadRequest,
                "not a cluster node",
            ));
        };
        if let Some(done) = self.leader_elsewhere(c, method, &[], true).await {
            return done;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.scrub())
            .await
            .map_err(|e| ServiceError::new(ErrorCode::Internal, e.to_string()))?
            .map(bytes::Bytes::from)
    }

    /// A join request: run on the leader (forwarded there if need be).
    async fn join_call(&self, method: u32, payload: &[u8]) -> Result<bytes::Bytes, ServiceError> {
        let Some(c) = self.cluster() else {
            return Err(ServiceError::new(
                ErrorCode::BadRequest,
                "this server is not a cluster node (no cluster to join)",
            ));
        };
        let Some((addr, domain)) = crate::identity::decode_join(payload) else {
            return Err(ServiceError::new(
                ErrorCode::BadRequest,
                "malformed join request",
            ));
        };
        if let Some(done) = self.leader_elsewhere(c, method, payload, false).await {
            return done;
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.join(addr, domain))
            .await
            .map_err(|e| ServiceError::new(ErrorCode::Internal, e.to_string()))?
            .map(bytes::Bytes::from)
    }

    /// Adds a node at `addr` as a new member (a metadata learner; the placement starts moving
    /// chunk copies onto it) and answers the founding configuration it must start from.
    fn join(&self, addr: String, domain: String) -> Result<Vec<u8>, ServiceError> {
        let Some(c) = self.cluster() else {
            return Err(ServiceError::new(
                ErrorCode::BadRequest,
                "not a cluster node",
            ));
        };
        let refuse = |why: String| ServiceError::new(ErrorCode::BadRequest, why);
        let cs = c.conf_state();
        let (existing, mut used) = c.read_local(|ns| {
            let p = ns.placement();
            let existing = p
                .members()
                .iter()
                .find(|(_, m)| m.addr == addr)
                .map(|(id, _)| *id);
            let used: Vec<u64> = p
                .members()
                .keys()
                .chain(p.removed().iter())
                .copied()
                .collect();
            (existing, used)
        });
        if let Some(id) = existing {
            return Err(refuse(format!(
                "member {id} already has address {addr}; a wiped node rejoins under a new address, or after member {id} is removed (dead_after_ms)"
            )));
        }
        used.extend(cs.voters.iter().chain(cs.learners.iter()));
        let id = used.iter().copied().max().unwrap_or(0) + 1;
        let domain = if domain.is_empty() {
            id.to_string()
        } else {
            domain
        };
        let cmd = Command {
            creds: Creds::root(),
            now: now(),
            op: Op::AddMember {
                id,
                addr: addr.clone(),
                domain,
            },
            session: None,
        };
        match c.propose_member(cmd, MemberChange::AddLearner) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(refuse(format!("the cluster refused the member: {e:?}"))),
            Err(ClusterError::Busy) => {
                return Err(ServiceError::new(
                    ErrorCode::Busy,
                    "another membership change is in progress; try again",
                ))
            }
            Err(e) => return Err(cluster_error(e)),
        }
        tracing::warn!("node {id} at {addr} joined the cluster");
        let cfg = c.config();
        let strs = |m: &std::collections::BTreeMap<u64, String>| {
            m.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
        };
        let reply = crate::identity::JoinReply {
            node_id: id,
            replicas: cfg.replicas,
            meta_replicas: cfg.meta_replicas,
            meta_shards: cfg.meta_shards,
            peers: strs(&cfg.peers),
            domains: strs(&cfg.domains),
            members: c.read_local(|ns| {
                ns.placement()
                    .members()
                    .iter()
                    .map(|(k, m)| (k.to_string(), m.addr.clone()))
                    .collect()
            }),
        };
        serde_json::to_vec(&reply).map_err(|e| internal(e.to_string()))
    }
}

impl Service for FsService {
    fn call(&self, method: u32, payload: bytes::Bytes) -> ServiceFuture {
        let this = self.clone();
        Box::pin(async move {
            if method == crate::cluster::RAFT_METHOD {
                let Some((c, msg)) = crate::cluster::decode_message(&payload)
                    .and_then(|(shard, m)| Some((this.groups().get(shard as usize)?, m)))
                else {
                    return Err(ServiceError::new(
                        ErrorCode::BadRequest,
                        "not a raft message, or no such raft group here",
                    ));
                };
                c.deliver(msg);
                return Ok(bytes::Bytes::new());
            }
            if method == crate::sharding::SHARD_METHOD {
                return this.serve_shard_call(payload).await;
            }
            if method == replication::CHUNK_METHOD {
                let Some((chunk, op, fence)) = this.cluster().and(replication::decode(&payload))
                else {
                    return Err(ServiceError::new(
                        ErrorCode::BadRequest,
                        "not a chunk operation, or no cluster here",
                    ));
                };
                let shards = this.shard_count();
                let (engine, fences) = (Arc::clone(&this.engine), Arc::clone(&this.fences));
                let svc = this.clone();
                return tokio::task::spawn_blocking(move || {
                    match bookkeeping(&fences, shards, op) {
                        Ok(answer) => Ok(answer),
                        Err(ChunkOp::Orphans {
                            shard,
                            node,
                            chunks,
                        }) => Ok(svc
                            .orphans_of(shard, node, chunks)
                            .map_err(|e| StoreError::Layout(e.to_string()))?),
                        Err(op) => {
                            let shard = cfs_meta::shard::shard_of_id(shards, chunk.0);
                            fences.apply(&engine, chunk, shard, op, fence)
                        }
                    }
                })
                .await
                .map_err(|e| ServiceError::new(ErrorCode::Internal, e.to_string()))?
                .map(bytes::Bytes::from)
                .map_err(|e| match e {
                    replication::ApplyError::Store(s) => io_error(s),
                    // Not a bad copy: the reader tries another and the leader reconciles.
                    e @ replication::ApplyError::Unsettled { .. } => {
                        ServiceError::new(ErrorCode::Busy, e.to_string())
                    }
                    fenced => ServiceError::new(ErrorCode::BadRequest, fenced.to_string()),
                });
            }
            if method & !FORWARDED == crate::identity::JOIN_METHOD {
                return this.join_call(method, &payload).await;
            }
            if method & !FORWARDED == SCRUB_METHOD {
                return this.scrub_call(method).await;
            }
            if method == crate::tier::TIER_METHOD {
                let svc = this.clone();
                return tokio::task::spawn_blocking(move || svc.tier_call(&payload))
                    .await
                    .map_err(|e| ServiceError::new(ErrorCode::Internal, e.to_string()))?;
            }
            if method == cfs_proto::rma::RMA_HELLO_METHOD {
                return this.rma_hello(&payload);
            }
            if method == cfs_proto::rma::RMA_READ_METHOD {
                return this.rma_read(&payload).await;
            }
            let forwarded = method & FORWARDED != 0;
            // Forwarded as received (session included).
            let wire_method = method & !FORWARDED;
            let (method, session, body) = cfs_proto::split_session(wire_method, &payload)
                .ok_or_else(|| ServiceError::new(ErrorCode::BadRequest, "short session header"))?;
            let (creds, req) = Request::decode(method, body).ok_or_else(|| {
                ServiceError::new(
                    ErrorCode::BadRequest,
                    format!("malformed request for method {method}"),
                )
            })?;
            let shard = this.request_shard(&req) as usize;
            if let Some(c) = this
                .groups()
                .get(shard)
                .filter(|_| !matches!(req, Request::Status | Request::Routes))
            {
                let removed = this.groups()[0].removed_and_leading().0;
                let leads = c.replica().is_leader();
                if removed {
                    // Its data and vote went elsewhere: the client must use another node.
                    return Err(ServiceError::new(
                        ErrorCode::Busy,
                        "this node was removed from the cluster",
                    ));
                }
                if !leads {
                    if forwarded {
                        return Err(ServiceError::new(
                            ErrorCode::Service(NOT_LEADER),
                            "not the leader",
                        ));
                    }
                    let resendable = req.is_read_only() || session.is_some();
                    this.forwarded
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match this.forward(c, wire_method, &payload, resendable).await {
                        Err(e) if e.code == ErrorCode::Service(NOT_LEADER) => {}
                        Err(e) if e.code == ErrorCode::Service(OUTCOME_UNKNOWN) => {
                            return Err(unknown_outcome(e, session.is_some()))
                        }
                        other => return other,
                    }
                }
            }
            let reply = this.run_here(creds, req, session).await;
            match reply {
                Ok(r) => Ok(bytes::Bytes::from(r.encode())),
                // Lost leadership before running it: not run, the client may retry elsewhere
                // (a forwarder handles NOT_LEADER itself).
                Err(e) if !forwarded && e.code == ErrorCode::Service(NOT_LEADER) => {
                    Err(ServiceError::new(ErrorCode::Busy, e.message))
                }
                Err(e) if !forwarded && e.code == ErrorCode::Service(OUTCOME_UNKNOWN) => {
                    Err(unknown_outcome(e, session.is_some()))
                }
                Err(e) => Err(e),
            }
        })
    }
}

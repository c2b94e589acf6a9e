//! A node's place in the metadata Raft group: the driver thread that owns the replica's
//! progress (ticks, messages, proposals, persisting to the Raft log database, applying), and
//! the transport that carries Raft messages to peers over the fabric RPC.
//!
//! One thread drives the replica (raft-rs is single-threaded): inputs arrive on a bounded
//! channel (a full channel drops Raft messages, which Raft tolerates, and refuses proposals
//! with EAGAIN-like errors rather than queueing without limit). Persist jobs are made durable
//! in the driver thread, one redb transaction per ready (so concurrent proposals share a sync),
//! before the replica is told; messages that acknowledge the log go out only after that.

use crate::raft_store::RaftStore;
use cfs_fabric::{Client, ClientConfig};
use cfs_meta::command::{Command, Outcome};
use cfs_meta::placement::{Member, Placement};
use cfs_meta::shard::ShardSlot;
use cfs_meta::{ChunkId, Errno, Namespace};
use cfs_meta_replica::{
    ConfState, MemberChange, Message, MessageType, PersistJob, ProposeError, Replica, ReplicaConfig,
};
use protobuf::Message as _;
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// RPC method of a Raft message between nodes (outside the file-system method range):
/// `u16 shard | raft-rs message (protobuf)`.
pub const RAFT_METHOD: u32 = 0x0100_0001;

/// Initial membership and timing of the group.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's id.
    pub node_id: u64,
    /// The members the cluster starts with: id -> RPC address (later changes are replicated
    /// commands; this only seeds a new cluster and is the fallback address book).
    pub peers: BTreeMap<u64, String>,
    /// Every member's address this node knows, shared by all its groups (see [`AddressBook`]).
    pub addresses: AddressBook,
    /// Failure domain of members (missing: the member's id, one node per domain).
    pub domains: BTreeMap<u64, String>,
    /// Copies of each chunk (R, 1..=5; fewer while the cluster has fewer members).
    pub replicas: usize,
    /// Voters of the metadata Raft group (the lowest ids at creation; the other members are
    /// learners, promoted when a voter is removed).
    pub meta_replicas: usize,
    /// Metadata shards (Raft groups) of the cluster, fixed at creation.
    pub meta_shards: u16,
    /// A member the leader has not heard from for this long is removed for good: its chunk
    /// copies are re-replicated and its vote is handed to a learner.
    pub dead_after_ms: u64,
    /// A copy must look orphaned this long (in two checks) before it is deleted.
    pub orphan_grace_ms: u64,
    /// Cluster secret every connection between nodes proves (see `cfs_fabric::auth`).
    pub secret: Option<cfs_fabric::Secret>,
    /// Linearizable reads from the leader's lease instead of a ReadIndex round per batch.
    pub lease_reads: bool,
    /// Milliseconds per Raft tick.
    pub tick_ms: u64,
    /// Ticks without a leader before an election (randomised up to twice that).
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied commands between log compactions.
    pub snapshot_every: u64,
    /// How long a proposal may wait for its commit before the caller gets EIO.
    pub propose_timeout_ms: u64,
    /// How long the leader waits for a member to apply a chunk change.
    pub replica_timeout_ms: u64,
}

/// Member addresses shared by all the Raft groups of a node. A group's own replicated
/// membership is the authority, but a node that joined late knows nothing of a group until
/// that group's leader reaches it, and to answer the leader it needs the leader's address:
/// the founding peers may be long gone (a joined node's groups start from the founding state).
/// So every group adds the members it learns from its log here, the join reply seeds it with
/// the members at the time of joining, and a group that does not know an id yet looks here.
#[derive(Clone, Debug, Default)]
pub struct AddressBook(Arc<std::sync::RwLock<BTreeMap<u64, String>>>);

impl AddressBook {
    /// A book that starts with `known` (id -> address).
    pub fn new(known: BTreeMap<u64, String>) -> AddressBook {
        AddressBook(Arc::new(std::sync::RwLock::new(known)))
    }

    /// The address of `id`, if any group of this node has heard of it.
    pub fn get(&self, id: u64) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Records what a group's membership says: its members' addresses (a member that moved
    /// gets its new one) and no address for members it removed.
    pub fn learn(
        &self,
        members: &BTreeMap<u64, Member>,
        removed: &std::collections::BTreeSet<u64>,
    ) {
        let stale = {
            let book = self.0.read().unwrap_or_else(|p| p.into_inner());
            members.iter().any(|(id, m)| book.get(id) != Some(&m.addr))
                || removed.iter().any(|id| book.contains_key(id))
        };
        if !stale {
            return;
        }
        let mut book = self.0.write().unwrap_or_else(|p| p.into_inner());
        for (id, m) in members {
            book.insert(*id, m.addr.clone());
        }
        for id in removed {
            book.remove(id);
        }
    }

    /// Every known member's address.
    pub fn all(&self) -> BTreeMap<u64, String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why a proposal got no result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// Another node leads; send the request there.
    #[error("not the leader (leader is {0:?})")]
    NotLeader(Option<u64>),
    /// No commit within the timeout: the command may or may not have been applied.
    #[error("no commit within the timeout")]
    Timeout,
    /// The driver stopped (shutdown or a failed log write).
    #[error("the metadata replica stopped")]
    Stopped,
    /// Too many requests queued.
    #[error("too many requests queued")]
    Busy,
}

enum Input {
    Msg(Box<Message>),
    Propose {
        cmd: Box<Command>,
        reply: SyncSender<Result<Result<Outcome, Errno>, ClusterError>>,
    },
    SnapshotSent {
        to: u64,
        ok: bool,
    },
    /// The persist thread finished jobs (the number it reached is in `Shared::persisted`).
    Persisted,
    /// A read barrier: answered once this node is confirmed leader and has applied up to the
    /// commit index at the time of the request.
    ReadBarrier {
        reply: SyncSender<Result<(), ClusterError>>,
    },
    ProposeMember {
        cmd: Box<Command>,
        change: MemberChange,
        reply: SyncSender<Result<Result<Outcome, Errno>, ClusterError>>,
    },
    Stop,
}

/// Clients by member id, made on first use from the member's replicated address.
type ClientMap = Arc<Mutex<HashMap<u64, (String, Client)>>>;

/// Handle on the running group member (cheap to clone).
#[derive(Clone)]
pub struct Cluster {
    /// The metadata shard this group serves.
    shard: ShardSlot,
    inbox: SyncSender<Input>,
    replica: Arc<Mutex<Replica>>,
    cfg: Arc<ClusterConfig>,
    clients: ClientMap,
    raft_clients: ClientMap,
    client_cfgs: Arc<(ClientConfig, ClientConfig)>,
    /// When each peer was last heard from (any Raft message).
    last_seen: Arc<Mutex<HashMap<u64, Instant>>>,
    /// Since when this node leads (None: it does not).
    leader_since: Arc<Mutex<Option<Instant>>>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl Cluster {
    /// Opens the Raft log at `db` and starts the driver thread; `rt` runs the transport;
    /// `freed` receives chunks the applied commands unreferenced (to delete their data).
    pub fn start(
        cfg: ClusterConfig,
        shard: ShardSlot,
        db: &std::path::Path,
        rt: tokio::runtime::Handle,
        freed: Box<dyn Fn(Vec<ChunkId>) + Send>,
    ) -> Result<Cluster, anyhow::Error> {
        let ids: Vec<u64> = cfg.peers.keys().copied().collect();
        // A node that joined later is not among the founding peers: it starts from the same
        // founding state as everyone and learns its membership from the log.
        anyhow::ensure!(!ids.is_empty(), "no founding members");
        let n_voters = cfg.meta_replicas.clamp(1, ids.len());
        let (voters, learners) = (ids[..n_voters].to_vec(), ids[n_voters..].to_vec());
        let initial = Placement::new(
            cfg.peers
                .iter()
                .map(|(id, addr)| {
                    let domain = cfg.domains.get(id).cloned().unwrap_or(id.to_string());
                    (
                        *id,
                        Member {
                            addr: addr.clone(),
                            domain,
                        },
                    )
                })
                .collect(),
            cfg.replicas,
        );
        let (store, log) = RaftStore::open(db, &voters, &learners)?;
        anyhow::ensure!(
            shard.count == cfg.meta_shards,
            "shard {shard:?} of a cluster with {} shards",
            cfg.meta_shards
        );
        let rc = ReplicaConfig {
            id: cfg.node_id,
            voters,
            learners,
            initial,
            shard,
            election_ticks: cfg.election_ticks,
            heartbeat_ticks: cfg.heartbeat_ticks,
            snapshot_every: cfg.snapshot_every,
            seed: cfg.node_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_nanos(),
        };
        let replica = Arc::new(Mutex::new(Replica::open_with(rc, log, cfg.lease_reads)?));
        let (tx, rx) = sync_channel(4096);
        // Raft messages travel on their own connections with short timeouts, so heartbeats
        // never queue behind chunk data or forwarded requests (measured: sharing one connection
        // let 1 MiB chunk writes delay heartbeats past the election timeout under load).
        let raft_cfg = ClientConfig {
            request_timeout: Duration::from_millis(cfg.tick_ms * cfg.election_ticks as u64),
            connect_timeout: Duration::from_millis(cfg.tick_ms * 2),
            secret: cfg.secret,
            ..ClientConfig::default()
        };
        let data_cfg = ClientConfig {
            request_timeout: Duration::from_millis(cfg.propose_timeout_ms + 5_000),
            connect_timeout: Duration::from_secs(1),
            secret: cfg.secret,
            ..ClientConfig::default()
        };
        let cluster = Cluster {
            shard,
            inbox: tx.clone(),
            replica: Arc::clone(&replica),
            cfg: Arc::new(cfg),
            clients: ClientMap::default(),
            raft_clients: ClientMap::default(),
            client_cfgs: Arc::new((data_cfg, raft_cfg)),
            last_seen: Arc::default(),
            leader_since: Arc::default(),
            thread: Arc::new(Mutex::new(None)),
            stopped: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        // The persist thread: makes jobs durable in order, then wakes the driver. A disk sync
        // never delays ticks, heartbeats or votes.
        let (jobs, job_rx) = sync_channel::<PersistJob>(1024);
        let persisted_upto = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let persist_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (upto, failed, wake) = (
                Arc::clone(&persisted_upto),
                Arc::clone(&persist_failed),
                tx.clone(),
            );
            std::thread::Builder::new()
                .name(format!("cfs-raft-log-{}", shard.index))
                .spawn(move || {
                    while let Ok(job) = job_rx.recv() {
                        // Every job queued meanwhile goes in the same transaction (one sync).
                        let mut batch = vec![job];
                        while let Ok(j) = job_rx.try_recv() {
                            batch.push(j);
                        }
                        if let Err(e) = store.persist_all(&batch) {
                            tracing::error!("cannot persist the Raft log: {e}");
                            failed.store(true, std::sync::atomic::Ordering::SeqCst);
                            let _ = wake.try_send(Input::Persisted);
                            return;
                        }
                        if let Some(last) = batch.last() {
                            upto.store(last.number, std::sync::atomic::Ordering::SeqCst);
                        }
                        let _ = wake.try_send(Input::Persisted);
                    }
                })?;
        }
        let driver = Driver {
            cluster: cluster.clone(),
            rx,
            jobs,
            persisted_upto,
            persist_failed,
            reported: 0,
            rt,
            waiting: HashMap::new(),
            next_tag: 1,
            freed,
            last_leader: (None, 0),
            new_reads: Vec::new(),
            reads_in_flight: HashMap::new(),
            reads_confirmed: Vec::new(),
            shared_at: u64::MAX,
        };
        let handle = std::thread::Builder::new()
            .name(format!("cfs-raft-{}", shard.index))
            .spawn(move || driver.run())?;
        *cluster.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(cluster)
    }

    /// Delivers a Raft message from a peer (dropped if the driver is backed up).
    pub fn deliver(&self, msg: Message) {
        self.last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(msg.from, Instant::now());
        match self.inbox.try_send(Input::Msg(Box::new(msg))) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Proposes a command and waits for its result (blocking).
    pub fn propose(&self, cmd: Command) -> Result<Result<Outcome, Errno>, ClusterError> {
        self.submit(|reply| Input::Propose {
            cmd: Box::new(cmd),
            reply,
        })
    }

    /// Proposes a membership change (see [`Replica::propose_member`]) and waits for it.
    pub fn propose_member(
        &self,
        cmd: Command,
        change: MemberChange,
    ) -> Result<Result<Outcome, Errno>, ClusterError> {
        self.submit(|reply| Input::ProposeMember {
            cmd: Box::new(cmd),
            change,
            reply,
        })
    }

    /// Hands a proposal to the driver (never queueing past the inbox bound) and waits for its
    /// result up to the proposal timeout.
    fn submit(
        &self,
        input: impl FnOnce(Waiter) -> Input,
    ) -> Result<Result<Outcome, Errno>, ClusterError> {
        let (tx, rx) = sync_channel(1);
        self.inbox.try_send(input(tx)).map_err(|e| match e {
            TrySendError::Full(_) => ClusterError::Busy,
            TrySendError::Disconnected(_) => ClusterError::Stopped,
        })?;
        let wait = Duration::from_millis(self.cfg.propose_timeout_ms + self.cfg.tick_ms);
        match rx.recv_timeout(wait) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(ClusterError::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(ClusterError::Stopped),
        }
    }

    /// The Raft configuration (voters, learners).
    pub fn conf_state(&self) -> ConfState {
        self.replica().conf_state()
    }

    /// How long the leader has not heard from `id` (counted from when it started leading);
    /// `None` when this node does not lead.
    pub fn silent_for(&self, id: u64) -> Option<Duration> {
        let since = (*self.leader_since.lock().unwrap_or_else(|p| p.into_inner()))?;
        // A member never heard from counts as heard the first time anyone asks: one that
        // joined a moment ago (to a leader of long standing) gets its full `dead_after_ms`.
        let seen = *self
            .last_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_insert_with(Instant::now);
        Some(seen.max(since).elapsed())
    }

    /// The configuration this node started with (founding members, policy, timing).
    pub fn config(&self) -> &ClusterConfig {
        &self.cfg
    }

    /// How long a member may be silent before the leader removes it.
    pub fn dead_after(&self) -> Duration {
        Duration::from_millis(self.cfg.dead_after_ms)
    }

    /// How long a chunk copy must look orphaned before it is deleted.
    pub fn orphan_grace(&self) -> Duration {
        Duration::from_millis(self.cfg.orphan_grace_ms)
    }

    /// Voters the metadata group should have.
    pub fn meta_replicas(&self) -> usize {
        self.cfg.meta_replicas
    }

    /// The replica (for reads of the applied namespace and status).
    pub fn replica(&self) -> MutexGuard<'_, Replica> {
        self.replica.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the namespace if this node leads (`Err(NotLeader)` otherwise), linearizably:
    /// first a ReadIndex barrier (a quorum confirms the leadership; concurrent reads share one
    /// round), then the read on the namespace applied at least up to the commit index of that
    /// moment. No clock assumption.
    pub fn read<T>(&self, f: impl FnOnce(&Namespace) -> T) -> Result<T, ClusterError> {
        {
            let r = self.replica();
            if !r.is_leader() {
                return Err(ClusterError::NotLeader(r.leader()));
            }
        }
        let (tx, rx) = sync_channel(1);
        self.inbox
            .try_send(Input::ReadBarrier { reply: tx })
            .map_err(|e| match e {
                TrySendError::Full(_) => ClusterError::Busy,
                TrySendError::Disconnected(_) => ClusterError::Stopped,
            })?;
        match rx.recv_timeout(self.election_timeout() * 2) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(RecvTimeoutError::Timeout) => return Err(ClusterError::Timeout),
            Err(RecvTimeoutError::Disconnected) => return Err(ClusterError::Stopped),
        }
        Ok(f(self.replica().namespace()))
    }

    /// Reads without a barrier (status, repair scheduling): possibly stale.
    pub fn read_local<T>(&self, f: impl FnOnce(&Namespace) -> T) -> T {
        f(self.replica().namespace())
    }

    /// The RPC address of a member (replicated membership first, then the configuration).
    pub fn address(&self, id: u64) -> Option<String> {
        self.read_local(|ns| ns.placement().members().get(&id).map(|m| m.addr.clone()))
            .or_else(|| self.cfg.addresses.get(id))
            .or_else(|| self.cfg.peers.get(&id).cloned())
    }

    fn client_in(&self, map: &ClientMap, cfg: &ClientConfig, id: u64) -> Option<Client> {
        if id == self.cfg.node_id {
            return None;
        }
        if let Some((_, c)) = map.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Some(c.clone());
        }
        let addr = self.address(id)?;
        let c = Client::new(addr.clone(), cfg.clone());
        map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (addr, c.clone()));
        Some(c)
    }

    /// A client to a member (data, forwarded requests).
    pub fn client(&self, id: u64) -> Option<Client> {
        self.client_in(&self.clients, &self.client_cfgs.0, id)
    }

    /// A client for Raft messages to a member (own connections, short timeouts).
    fn raft_client(&self, id: u64) -> Option<Client> {
        self.client_in(&self.raft_clients, &self.client_cfgs.1, id)
    }

    /// Whether this node was removed from the cluster (it must not serve) and whether it leads,
    /// in one look at the replica (checked on every request).
    pub fn removed_and_leading(&self) -> (bool, bool) {
        let r = self.replica();
        let removed = r
            .namespace()
            .placement()
            .removed()
            .contains(&self.cfg.node_id);
        (removed, r.is_leader())
    }

    /// Whether [`Cluster::stop`] was called (background work ends).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every member's id (replicated membership; the configuration for a store from before
    /// membership was replicated).
    pub fn members(&self) -> Vec<u64> {
        let m: Vec<u64> = self.read_local(|ns| ns.placement().members().keys().copied().collect());
        if m.is_empty() {
            self.cfg.peers.keys().copied().collect()
        } else {
            m
        }
    }

    /// How long the leader waits for a member to apply a chunk change.
    pub fn replica_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.replica_timeout_ms)
    }

    /// One Raft tick.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.cfg.tick_ms)
    }

    /// The shortest election timeout.
    pub fn election_timeout(&self) -> Duration {
        self.tick() * self.cfg.election_ticks as u32
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.cfg.node_id
    }

    /// The metadata shard this group serves.
    pub fn shard(&self) -> ShardSlot {
        self.shard
    }

    /// Stops the driver thread and waits for it.
    pub fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.inbox.send(Input::Stop);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

type Waiter = SyncSender<Result<Result<Outcome, Errno>, ClusterError>>;
type ReadWaiter = SyncSender<Result<(), ClusterError>>;

struct Driver {
    cluster: Cluster,
    rx: Receiver<Input>,
    /// Jobs for the persist thread (in order).
    jobs: SyncSender<PersistJob>,
    /// Highest job number the persist thread made durable.
    persisted_upto: Arc<std::sync::atomic::AtomicU64>,
    /// Set by the persist thread when a write failed.
    persist_failed: Arc<std::sync::atomic::AtomicBool>,
    reported: u64,
    rt: tokio::runtime::Handle,
    /// Proposals waiting for their entry: tag -> (reply, deadline).
    waiting: HashMap<u64, (Waiter, Instant)>,
    next_tag: u64,
    freed: Box<dyn Fn(Vec<ChunkId>) + Send>,
    last_leader: (Option<u64>, u64),
    /// Read barriers not yet sent to raft-rs (one ReadIndex round serves them all).
    new_reads: Vec<ReadWaiter>,
    /// Barriers in flight: context tag -> waiters.
    reads_in_flight: HashMap<u64, (Vec<ReadWaiter>, Instant)>,
    /// Confirmed barriers waiting for the apply index to reach theirs.
    reads_confirmed: Vec<(u64, Vec<ReadWaiter>)>,
    /// Applied index when the membership was last copied to the address book.
    shared_at: u64,
}

impl Driver {
    /// Adds what this group's membership says to the node's [`AddressBook`] when something
    /// was applied since the last look (the other groups of a late joiner need it).
    fn share_addresses(&mut self) {
        let r = self.cluster.replica();
        if r.applied() == self.shared_at {
            return;
        }
        self.shared_at = r.applied();
        let p = r.namespace().placement();
        self.cluster.cfg.addresses.learn(p.members(), p.removed());
    }

    fn run(mut self) {
        let tick = Duration::from_millis(self.cluster.cfg.tick_ms.max(1));
        let mut next_tick = Instant::now() + tick;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(timeout) {
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(input) => self.input(input),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Take whatever else is queued before handling readiness (one sync for all).
            while let Ok(input) = self.rx.try_recv() {
                if matches!(input, Input::Stop) {
                    return;
                }
                self.input(input);
            }
            if Instant::now() >= next_tick {
                self.cluster.replica().tick();
                self.share_addresses();
                next_tick += tick;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + tick;
                }
                self.expire();
            }
            self.log_leadership();
            self.start_reads();
            self.report_persisted();
            let r = self.process_ready();
            self.finish_reads();
            if let Err(e) = r {
                // A log write failed: acknowledging anything more would be unsafe.
                tracing::error!("metadata replica stops: {e}");
                for (_, (w, _)) in self.waiting.drain() {
                    let _ = w.send(Err(ClusterError::Stopped));
                }
                return;
            }
        }
    }

    fn log_leadership(&mut self) {
        let (leader, term) = {
            let r = self.cluster.replica();
            (r.leader(), r.term())
        };
        if (leader, term) != self.last_leader {
            self.last_leader = (leader, term);
            *self
                .cluster
                .leader_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) =
                (leader == Some(self.cluster.cfg.node_id)).then(Instant::now);
            // Shard 0's group is "the metadata group" (it holds the membership; scripts
            // watch for its leader); the others name their shard.
            let shard = self.cluster.shard.index;
            match leader {
                Some(l) if l == self.cluster.cfg.node_id && shard == 0 => {
                    tracing::info!(term, "this node now leads the metadata group")
                }
                Some(l) if l == self.cluster.cfg.node_id => {
                    tracing::info!(term, shard, "this node now leads a metadata shard")
                }
                Some(l) => tracing::info!(term, shard, leader = l, "metadata shard leader"),
                None => tracing::info!(term, shard, "metadata shard has no leader"),
            }
        }
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Msg(m) => {
                if let Err(e) = self.cluster.replica().step(*m) {
                    tracing::debug!("raft message refused: {e}");
                }
            }
            Input::Propose { cmd, reply } => {
                let tag = self.next_tag;
                self.next_tag += 1;
                let r = self
                    .cluster
                    .replica()
                    .propose(tag.to_le_bytes().to_vec(), &cmd);
                // raft-rs refusing a command means a leadership transfer: try the leader.
                self.proposed(tag, reply, r, ClusterError::NotLeader(None));
            }
            Input::ProposeMember { cmd, change, reply } => {
                let tag = self.next_tag;
                self.next_tag += 1;
                let r =
                    self.cluster
                        .replica()
                        .propose_member(tag.to_le_bytes().to_vec(), &cmd, change);
                if let Err(ProposeError::Dropped(why)) = &r {
                    tracing::info!("membership change not proposed: {why}");
                }
                // Another membership change in progress: try again later.
                self.proposed(tag, reply, r, ClusterError::Busy);
            }
            Input::SnapshotSent { to, ok } => self.cluster.replica().report_snapshot(to, ok),
            Input::ReadBarrier { reply } => self.new_reads.push(reply),
            Input::Persisted => {}
            Input::Stop => {}
        }
    }

    /// Waits for a proposal's result, or answers at once why it was not proposed (`dropped`:
    /// what a refusal by raft-rs means to the caller).
    fn proposed(
        &mut self,
        tag: u64,
        reply: Waiter,
        r: Result<(), ProposeError>,
        dropped: ClusterError,
    ) {
        match r {
            Ok(()) => {
                let deadline =
                    Instant::now() + Duration::from_millis(self.cluster.cfg.propose_timeout_ms);
                self.waiting.insert(tag, (reply, deadline));
            }
            Err(ProposeError::NotLeader { leader }) => {
                let _ = reply.send(Err(ClusterError::NotLeader(leader)));
            }
            Err(ProposeError::Dropped(_)) => {
                let _ = reply.send(Err(dropped));
            }
        }
    }

    /// One ReadIndex round for every read barrier that arrived since the last one.
    fn start_reads(&mut self) {
        if self.new_reads.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.new_reads);
        let mut r = self.cluster.replica();
        if !r.is_leader() {
            let leader = r.leader();
            drop(r);
            for w in waiters {
                let _ = w.send(Err(ClusterError::NotLeader(leader)));
            }
            return;
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        r.read_index(tag.to_le_bytes().to_vec());
        drop(r);
        let deadline = Instant::now() + self.cluster.election_timeout() * 2;
        self.reads_in_flight.insert(tag, (waiters, deadline));
    }

    /// Answers confirmed barriers whose index is applied.
    fn finish_reads(&mut self) {
        if self.reads_confirmed.is_empty() {
            return;
        }
        let applied = self.cluster.replica().applied();
        self.reads_confirmed.retain_mut(|(index, waiters)| {
            if *index <= applied {
                for w in waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
                false
            } else {
                true
            }
        });
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.reads_in_flight.retain(|_, (waiters, deadline)| {
            if *deadline <= now {
                for w in waiters.drain(..) {
                    let _ = w.send(Err(ClusterError::Timeout));
                }
                false
            } else {
                true
            }
        });
        self.waiting.retain(|_, (w, deadline)| {
            if *deadline <= now {
                let _ = w.send(Err(ClusterError::Timeout));
                false
            } else {
                true
            }
        });
    }

    /// Tells the replica which jobs are durable and sends the messages that waited for them.
    fn report_persisted(&mut self) {
        let upto = self
            .persisted_upto
            .load(std::sync::atomic::Ordering::SeqCst);
        if upto > self.reported {
            self.reported = upto;
            let held = self.cluster.replica().persisted(upto);
            self.send(held);
        }
    }

    fn process_ready(&mut self) -> Result<(), String> {
        loop {
            if self
                .persist_failed
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err("a Raft log write failed".into());
            }
            let out = self.cluster.replica().ready();
            let Some(job) = out.persist else {
                return Ok(());
            };
            self.send(out.messages);
            if self.jobs.send(job).is_err() {
                return Err("the Raft log thread stopped".into());
            }
            for (ctx, index) in out.reads {
                let Ok(tag) = <[u8; 8]>::try_from(ctx.as_slice()) else {
                    continue;
                };
                if let Some((waiters, _)) = self.reads_in_flight.remove(&u64::from_le_bytes(tag)) {
                    self.reads_confirmed.push((index, waiters));
                }
            }
            let me = self.cluster.cfg.node_id;
            for a in out.applied {
                let mut freed = a.freed.clone();
                freed.extend(a.dropped.iter().filter(|(_, n)| *n == me).map(|(c, _)| *c));
                if !freed.is_empty() {
                    (self.freed)(freed);
                }
                let Ok(tag) = <[u8; 8]>::try_from(a.tag.as_slice()) else {
                    continue;
                };
                if let Some((w, _)) = self.waiting.remove(&u64::from_le_bytes(tag)) {
                    let _ = w.send(Ok(a.result));
                }
            }
        }
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            let Some(client) = self.cluster.raft_client(m.to) else {
                continue;
            };
            let bytes = match m.write_to_bytes() {
                Ok(b) => {
                    let mut framed = self.cluster.shard.index.to_le_bytes().to_vec();
                    framed.extend_from_slice(&b);
                    framed
                }
                Err(e) => {
                    tracing::error!("cannot encode a raft message: {e}");
                    continue;
                }
            };
            let snapshot = (m.get_msg_type() == MessageType::MsgSnapshot).then_some(m.to);
            let inbox = self.cluster.inbox.clone();
            // Each message on its own task: Raft tolerates reordering and loss, not stalls.
            self.rt.spawn(async move {
                let r = client.call(RAFT_METHOD, &bytes).await;
                if let Some(to) = snapshot {
                    let _ = inbox.try_send(Input::SnapshotSent { to, ok: r.is_ok() });
                }
            });
        }
    }
}

/// Decodes a Raft message received over RPC: (shard, message).
pub fn decode_message(b: &[u8]) -> Option<(u16, Message)> {
    let shard = u16::from_le_bytes(b.get(..2)?.try_into().ok()?);
    Some((shard, Message::parse_from_bytes(&b[2..]).ok()?))
}

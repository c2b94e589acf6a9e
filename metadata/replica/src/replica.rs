//! One replica of a metadata shard: a raft-rs `RawNode` over a [`LogStore`] and the namespace
//! it applies committed commands to. Like raft-rs itself it does no I/O and reads no clock:
//! ticks, messages and proposals come in; messages to send, work to persist and applied results
//! come out ([`Output`]). The driver (the server, or the simulator) moves messages, makes persist
//! jobs durable in order and reports them back ([`Replica::persisted`]).
//!
//! Persistence is asynchronous (raft-rs "async ready"): messages that depend on the local log
//! being durable (votes, append acknowledgements) are held until their job is persisted, so a
//! crash that loses an unflushed job never loses anything another node was told.

use crate::storage::LogStore;
use cfs_meta::command::{Command, Op, Outcome};
use cfs_meta::placement::Placement;
use cfs_meta::shard::ShardSlot;
use cfs_meta::{ChunkId, Errno, Namespace, Timespec};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot,
};
use raft::{RawNode, StateRole};

/// Static settings of a replica.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This replica's Raft id (non-zero).
    pub id: u64,
    /// The group's voters when it was created (a new store starts with them; later changes
    /// come through the log).
    pub voters: Vec<u64>,
    /// The group's learners (non-voting members) when it was created.
    pub learners: Vec<u64>,
    /// Membership and replication factor the namespace starts with (empty: a namespace
    /// without cluster placement). Identical on every replica of a group.
    pub initial: Placement,
    /// Which metadata shard the group serves ([`ShardSlot::SINGLE`]: the whole namespace).
    pub shard: ShardSlot,
    /// Ticks without a leader before an election (randomised in [n, 2n)).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between log compactions (snapshots).
    pub snapshot_every: u64,
    /// Seed of this replica's election-timeout randomness (determinism in the simulator).
    pub seed: u64,
}

/// Something for the driver to make durable, in order; report it back with
/// [`Replica::persisted`] once it is.
#[derive(Clone, Debug)]
pub struct PersistJob {
    /// raft-rs ready number.
    pub number: u64,
    /// Log entries to append (replacing any conflicting suffix).
    pub entries: Vec<Entry>,
    /// New hard state (term, vote, commit), if it changed.
    pub hard_state: Option<HardState>,
    /// A snapshot from the leader to install, if any (before the entries).
    pub snapshot: Option<Snapshot>,
    /// Log compaction (after the entries): everything up to the snapshot's index is replaced
    /// by it (it holds the namespace at that index).
    pub compact: Option<Snapshot>,
}

/// A committed command applied to this replica's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Log index.
    pub index: u64,
    /// Term of the entry.
    pub term: u64,
    /// The proposer's tag (matches a proposal to its result).
    pub tag: Vec<u8>,
    /// The result every replica computes for it.
    pub result: Result<Outcome, Errno>,
    /// Chunks the command unreferenced (their data may be deleted).
    pub freed: Vec<ChunkId>,
    /// Copies the command moved away from a node: (chunk, node that deletes its copy).
    pub dropped: Vec<(ChunkId, u64)>,
}

/// What one [`Replica::ready`] call produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to send now.
    pub messages: Vec<Message>,
    /// Work to make durable, if any.
    pub persist: Option<PersistJob>,
    /// Commands applied, in log order.
    pub applied: Vec<Applied>,
    /// Read barriers confirmed: (context given to `read_index`, log index that reads under
    /// it must wait for).
    pub reads: Vec<(Vec<u8>, u64)>,
}

/// Why a proposal was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Only the leader takes proposals.
    #[error("not the leader (leader is {leader:?})")]
    NotLeader {
        /// The leader this replica knows of.
        leader: Option<u64>,
    },
    /// raft-rs refused it (e.g. a leadership transfer is in progress).
    #[error("proposal dropped: {0}")]
    Dropped(String),
}

/// Why a message was refused.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// raft-rs refused it.
    #[error("raft: {0}")]
    Raft(raft::Error),
    /// A snapshot whose namespace does not decode.
    #[error("bad snapshot: {0}")]
    BadSnapshot(String),
}

/// Why a replica cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// raft-rs refused the configuration or the stored state.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// The snapshot's namespace does not decode or is inconsistent.
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// One replica (see the module documentation).
pub struct Replica {
    node: RawNode<LogStore>,
    ns: Namespace,
    applied: u64,
    cfg: ReplicaConfig,
    rng: u64,
    timeout: usize,
    role_term: (StateRole, u64),
    /// Messages waiting for the persist job with this number.
    held: Vec<(u64, Vec<Message>)>,
    /// Ticks since this replica opened (its logical clock).
    ticks: u64,
    /// Whether reads are confirmed by the leader's lease (configured).
    lease_reads: bool,
    /// Until this tick, reads take a quorum round even with `lease_reads` (see
    /// [`Replica::transfer_leader`]).
    lease_hold_until: u64,
}

/// The namespace every group starts from (identical on every replica): the root directory
/// and the initial membership.
pub fn initial_namespace(placement: &Placement, shard: ShardSlot) -> Namespace {
    let mut ns = Namespace::new_shard(shard, 0, 0, 0o755, Timespec::new(0, 0));
    ns.set_placement(placement.clone());
    ns.take_dirty();
    ns
}

/// A Raft membership change, carried with the namespace command that records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Add (or promote) a voter.
    AddVoter,
    /// Add a non-voting member (it replicates the log but does not vote).
    AddLearner,
    /// Remove a member.
    Remove,
}

impl Replica {
    /// Starts (or restarts after a crash) from what `store` holds: the namespace from its
    /// snapshot, then raft-rs re-delivers the committed entries after it.
    pub fn open(cfg: ReplicaConfig, store: LogStore) -> Result<Replica, ReplicaError> {
        Replica::open_with(cfg, store, false)
    }

    /// [`Replica::open`], choosing how read barriers are confirmed: `lease_reads` answers
    /// them from the leader's lease (no quorum round; correct while the nodes' clocks advance
    /// at similar rates, since the lease is shorter than the shortest election timeout and
    /// check_quorum makes a leader that lost its quorum step down) instead of a ReadIndex
    /// quorum round.
    pub fn open_with(
        cfg: ReplicaConfig,
        store: LogStore,
        lease_reads: bool,
    ) -> Result<Replica, ReplicaError> {
        let snap = store.latest_snapshot();
        let applied = snap.get_metadata().index;
        let ns = if snap.get_data().is_empty() {
            initial_namespace(&cfg.initial, cfg.shard)
        } else {
            Namespace::from_snapshot(snap.get_data()).map_err(ReplicaError::Snapshot)?
        };
        let rc = raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            read_only_option: if lease_reads {
                raft::ReadOnlyOption::LeaseBased
            } else {
                raft::ReadOnlyOption::Safe
            },
            ..raft::Config::default()
        };
        rc.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&rc, store, &logger)?;
        let mut r = Replica {
            role_term: (node.raft.state, node.raft.term),
            node,
            ns,
            applied,
            rng: cfg.seed | 1,
            timeout: cfg.election_ticks,
            cfg,
            held: Vec::new(),
            ticks: 0,
            lease_reads,
            lease_hold_until: 0,
        };
        r.new_timeout();
        Ok(r)
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*: deterministic per replica.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn new_timeout(&mut self) {
        let n = self.cfg.election_ticks as u64;
        self.timeout = (n + self.next_rand() % n) as usize;
        self.node.raft.set_randomized_election_timeout(self.timeout);
    }

    /// raft-rs draws election timeouts from a thread-local RNG whenever the role or term
    /// changes; replace them with this replica's seeded draws so a run is reproducible.
    fn fix_timeout(&mut self) {
        let now = (self.node.raft.state, self.node.raft.term);
        if now != self.role_term {
            self.role_term = now;
            self.new_timeout();
        } else {
            self.node.raft.set_randomized_election_timeout(self.timeout);
        }
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.node.tick();
        self.fix_timeout();
        self.restore_lease();
    }

    /// Hands leadership to the voter `to` when its log is complete and it answered lately
    /// (raft-rs sends it MsgTimeoutNow: it campaigns at once and its peers vote without
    /// waiting for the old leader's lease to run out). Returns whether a transfer started.
    ///
    /// That forced election is why lease reads pause here: from now until two election
    /// timeouts have passed (the transfer ends or is aborted within one, and check_quorum
    /// runs at the end of it), this leader confirms reads with a quorum round, which a
    /// deposed leader can no longer win, so it never answers from a stale lease.
    pub fn transfer_leader(&mut self, to: u64) -> bool {
        if !self.is_leader() || to == self.cfg.id || self.node.raft.lead_transferee.is_some() {
            return false;
        }
        if !self.conf_state().voters.contains(&to) {
            return false;
        }
        let last = self.node.raft.raft_log.last_index();
        let ready = self
            .node
            .raft
            .prs()
            .get(to)
            .is_some_and(|p| p.matched == last && p.recent_active);
        if !ready {
            return false;
        }
        self.lease_hold_until = self.ticks + 2 * self.cfg.election_ticks as u64;
        self.node.raft.read_only.option = raft::ReadOnlyOption::Safe;
        self.node.transfer_leader(to);
        true
    }

    /// Whether a leadership transfer from this replica is under way.
    pub fn transferring(&self) -> bool {
        self.node.raft.lead_transferee.is_some()
    }

    /// Lease reads again once the hold after a transfer is over and no read is waiting for
    /// a quorum round (switching with reads pending would strand them).
    fn restore_lease(&mut self) {
        if self.lease_reads
            && self.node.raft.read_only.option != raft::ReadOnlyOption::LeaseBased
            && self.ticks >= self.lease_hold_until
            && self.node.raft.lead_transferee.is_none()
            && self.node.raft.read_only.pending_read_count() == 0
        {
            self.node.raft.read_only.option = raft::ReadOnlyOption::LeaseBased;
        }
    }

    /// Whether reads are being confirmed by the lease (false: by a quorum round).
    pub fn lease_active(&self) -> bool {
        self.node.raft.read_only.option == raft::ReadOnlyOption::LeaseBased
    }

    /// Feeds a message from a peer. Messages from unknown peers or stale terms are ignored
    /// (raft-rs decides); a malformed one is an error for the transport to log.
    pub fn step(&mut self, msg: Message) -> Result<(), StepError> {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            // Check the namespace decodes before raft-rs accepts the snapshot.
            Namespace::from_snapshot(msg.get_snapshot().get_data())
                .map_err(StepError::BadSnapshot)?;
        }
        let r = self.node.step(msg);
        self.fix_timeout();
        r.map_err(StepError::Raft)
    }

    /// Proposes a command; `tag` comes back with its result in [`Applied`].
    pub fn propose(&mut self, tag: Vec<u8>, cmd: &Command) -> Result<(), ProposeError> {
        if self.node.raft.state != StateRole::Leader {
            let leader = self.node.raft.leader_id;
            return Err(ProposeError::NotLeader {
                leader: (leader != 0).then_some(leader),
            });
        }
        self.node
            .propose(tag, cmd.encode())
            .map_err(|e| ProposeError::Dropped(e.to_string()))
    }

    /// Proposes a membership change: `cmd` (AddMember or RemoveMember of `node`) is applied to
    /// the namespace at the same log index as the Raft configuration change. One change at a
    /// time: another pending one makes this fail with `Dropped`.
    pub fn propose_member(
        &mut self,
        tag: Vec<u8>,
        cmd: &Command,
        change: MemberChange,
    ) -> Result<(), ProposeError> {
        if self.node.raft.state != StateRole::Leader {
            let leader = self.node.raft.leader_id;
            return Err(ProposeError::NotLeader {
                leader: (leader != 0).then_some(leader),
            });
        }
        let node_id = match (&cmd.op, change) {
            (Op::AddMember { id, .. }, MemberChange::AddVoter | MemberChange::AddLearner)
            | (Op::RemoveMember { id }, MemberChange::Remove) => *id,
            _ => {
                return Err(ProposeError::Dropped(
                    "a membership change needs AddMember or RemoveMember".into(),
                ))
            }
        };
        if self.node.raft.has_pending_conf() {
            return Err(ProposeError::Dropped(
                "another membership change is in progress".into(),
            ));
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(match change {
            MemberChange::AddVoter => ConfChangeType::AddNode,
            MemberChange::AddLearner => ConfChangeType::AddLearnerNode,
            MemberChange::Remove => ConfChangeType::RemoveNode,
        });
        cc.node_id = node_id;
        cc.set_context(cmd.encode().into());
        self.node
            .propose_conf_change(tag, cc)
            .map_err(|e| ProposeError::Dropped(e.to_string()))
    }

    /// The Raft configuration: voters and learners.
    pub fn conf_state(&self) -> ConfState {
        self.node.raft.prs().conf().to_conf_state()
    }

    /// Collects what raft-rs has ready: messages to send, a persist job, applied results.
    pub fn ready(&mut self) -> Output {
        let mut out = Output::default();
        if !self.node.has_ready() {
            return out;
        }
        let mut rd = self.node.ready();
        out.messages = rd.take_messages();
        out.reads = rd
            .take_read_states()
            .into_iter()
            .map(|r| (r.request_ctx, r.index))
            .collect();
        let snapshot = (!rd.snapshot().is_empty()).then(|| rd.snapshot().clone());
        if let Some(s) = &snapshot {
            // The namespace restarts from the leader's snapshot; entries after it follow.
            match Namespace::from_snapshot(s.get_data()) {
                Ok(ns) => {
                    self.ns = ns;
                    self.applied = s.get_metadata().index;
                }
                // `step` checked it; only a bug gets here.
                Err(e) => panic!("accepted snapshot does not decode: {e}"),
            }
        }
        let committed = rd.take_committed_entries();
        out.applied = self.apply(committed);
        let held = rd.take_persisted_messages();
        let mut job = PersistJob {
            number: rd.number(),
            entries: rd.take_entries(),
            hard_state: rd.hs().cloned(),
            snapshot,
            compact: None,
        };
        if !held.is_empty() {
            self.held.push((job.number, held));
        }
        // raft-rs reads entries back from the storage as soon as the ready is advanced, so
        // the in-memory log takes them now; durability is tracked by `persisted`.
        let store = self.node.mut_store();
        store.apply_job(&job);
        let snap_index = store.latest_snapshot().get_metadata().index;
        let last = raft::Storage::last_index(&*store).unwrap_or(0);
        // The namespace is the state after `applied`: only that index can be its snapshot.
        // Compact every `snapshot_every` entries, or sooner when a peer needs a snapshot the
        // latest one cannot give (a member added since).
        let wanted = store.take_fresh_snapshot_wanted();
        if self.applied <= last
            && (self.applied >= snap_index + self.cfg.snapshot_every
                || (wanted && self.applied > snap_index))
        {
            let snap = store.compact(self.applied, self.ns.snapshot());
            job.compact = Some(snap);
        }
        self.node.advance_append_async(rd);
        self.report_applied();
        out.persist = Some(job);
        out
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Vec<Applied> {
        let mut out = Vec::new();
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            assert_eq!(e.index, self.applied + 1, "committed entries out of order");
            self.applied = e.index;
            let result = match e.get_entry_type() {
                EntryType::EntryConfChange => self.apply_member(&e.data),
                // Joint consensus is never proposed.
                EntryType::EntryConfChangeV2 => Err(Errno::Inval),
                // A new leader's empty entry.
                EntryType::EntryNormal if e.data.is_empty() => continue,
                EntryType::EntryNormal => match Command::decode(&e.data) {
                    Some(cmd) => self.ns.apply(&cmd),
                    // Every replica sees the same bytes and the same failure: no divergence.
                    None => Err(Errno::Inval),
                },
            };
            self.ns.take_dirty();
            out.push(Applied {
                index: e.index,
                term: e.term,
                tag: e.context.to_vec(),
                result,
                freed: self.ns.take_freed(),
                dropped: self.ns.take_dropped(),
            });
        }
        out
    }

    /// Applies a committed membership change: the Raft configuration and the namespace's
    /// member list change together, or (when either refuses it) neither does.
    fn apply_member(&mut self, data: &[u8]) -> Result<Outcome, Errno> {
        let cc = ConfChange::parse_from_bytes(data).map_err(|_| Errno::Inval)?;
        let cmd = Command::decode(cc.get_context()).ok_or(Errno::Inval)?;
        let ok = match (&cmd.op, cc.get_change_type()) {
            (
                Op::AddMember { id, addr, domain },
                ConfChangeType::AddNode | ConfChangeType::AddLearnerNode,
            ) => {
                let m = cfs_meta::placement::Member {
                    addr: addr.clone(),
                    domain: domain.clone(),
                };
                *id == cc.node_id && self.ns.placement().may_add(*id, &m)
            }
            (Op::RemoveMember { id }, ConfChangeType::RemoveNode) => {
                *id == cc.node_id && self.ns.placement().members().len() > 1
            }
            _ => false,
        };
        if !ok {
            return Err(Errno::Inval);
        }
        let cs = self.node.apply_conf_change(&cc).map_err(|_| Errno::Inval)?;
        self.node.mut_store().set_conf_state(cs);
        self.ns.apply(&cmd)
    }

    /// Tells raft-rs how far the namespace has applied; it accepts no more than what is
    /// persisted locally (a leader's snapshot restores the namespace before it is durable).
    fn report_applied(&mut self) {
        let log = &self.node.raft.raft_log;
        let to = self.applied.min(log.persisted).min(log.committed);
        if to > log.applied {
            self.node.advance_apply_to(to);
        }
    }

    /// The driver made the job with this number (and every earlier one) durable: release the
    /// messages that waited for it. Returns them, to send.
    pub fn persisted(&mut self, number: u64) -> Vec<Message> {
        self.node.on_persist_ready(number);
        self.report_applied();
        let mut msgs = Vec::new();
        self.held.retain_mut(|(n, m)| {
            if *n <= number {
                msgs.append(m);
                false
            } else {
                true
            }
        });
        msgs
    }

    /// Starts a read barrier (ReadIndex): once a quorum confirms this node still leads, the
    /// index every read under `ctx` must wait for comes back in [`Output::reads`].
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.node.read_index(ctx);
    }

    /// The transport tells the leader how sending a snapshot to `to` ended (it is streamed
    /// apart from other messages, and a lost one must be resent).
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.node.report_snapshot(to, status);
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<u64> {
        let l = self.node.raft.leader_id;
        (l != 0).then_some(l)
    }

    /// Index of the last applied entry.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The namespace as applied so far.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The persisted log (what survives a crash).
    pub fn store(&self) -> &LogStore {
        self.node.store()
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.cfg.id
    }
}

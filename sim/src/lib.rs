//! Deterministic simulation of a metadata shard's Raft group: N replicas ([`Replica`]) in one
//! process, a simulated network (delay, drop, duplicate, reorder, partitions that heal), and
//! simulated disks (persist jobs complete after a delay, in order; a crash loses every job not
//! yet complete). One seed drives everything, so a failing run replays exactly.
//!
//! The group starts as a cluster: every replica's namespace carries the same initial
//! [`Placement`] (the founding nodes as members, in two failure domains, replication factor
//! R), and clients map chunks of files, so chunks have holders. The leader runs a placement
//! repair driver every few ticks, as the server does: it proposes the moves of
//! [`Placement::plan`] (`AddHolders`, then `DropHolders` once the target is current) and
//! `Repaired` for stale copies on nodes it can reach (the data copy itself is simulated: a
//! proposed `Repaired` means the copy happened). Write failures are simulated by proposing
//! `MarkStale` for a current holder of a chunk.
//!
//! Membership mode ([`SimConfig::spare_nodes`], [`SimConfig::member_change_per_mille`]): spare
//! node slots start outside the group; now and then the leader adds one as a learner (it
//! starts from the same founding log as everyone and catches up from the log or a snapshot),
//! promotes a learner to voter, or removes a member (a learner, or a voter other than itself
//! while more than three voters remain). A removed node is stopped for good the moment its
//! removal first applies anywhere: it receives no more messages and is no longer simulated.
//! Joined nodes crash, restart and get partitioned like the founding ones. A restarted node
//! reloads its log the way the server does (`RaftStore::load`: snapshot, entries, hard state).
//!
//! Clients' commands carry a session and are now and then resent: a resend that applies again
//! (even after leader changes, snapshots and restarts) must give the first result (a mutant that
//! skips the session lookup fails this).
//!
//! Checked after every event: at most one leader per term; every replica applies the same
//! command with the same result at each index (a committed entry is never lost or changed);
//! the namespace invariants of every running replica (placement included); every running
//! replica's namespace members are exactly the voters and learners of its Raft configuration.
//! At the end (faults stop, partitions heal, crashed nodes restart): the group elects a leader
//! and commits a new command; the repair driver brings every chunk back to R copies (each
//! chunk held by exactly its target nodes, all current: nothing under-replicated, misplaced or
//! stale); every member of the final configuration has applied the same log to the same
//! namespace (byte-identical snapshots); and every command a client was told succeeded is in
//! that log with the result the client got. While members catch up, clients keep writing
//! unless [`SimConfig::quiet_end`] is set (on in membership mode; see there why).

use cfs_meta::command::{Command, Op, Outcome};
use cfs_meta::placement::{Member, Move, Placement};
use cfs_meta::{ChunkId, Creds, Errno, InodeId, RenameFlags, SetAttr, Timespec};
use cfs_meta_replica::{
    Applied, LogStore, MemberChange, Message, MessageType, PersistJob, Replica, ReplicaConfig,
};
use cfs_nvme::rng::SimRng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

pub mod lincheck;
pub mod shards;

/// Time units per Raft tick.
const TICK: u64 = 10;

/// Most placement moves, and most repairs, the leader proposes per repair round.
const REPAIR_BATCH: usize = 6;

/// Knobs of one run (probabilities in parts per thousand per tick unless noted).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Founding replicas (3 or 5).
    pub nodes: usize,
    /// The seed.
    pub seed: u64,
    /// Ticks with faults, then up to `settle_ticks` without.
    pub ticks: u64,
    /// Ticks allowed for recovery at the end (for each phase: commit, repair, catch up).
    pub settle_ticks: u64,
    /// Chance a message is dropped (per thousand messages).
    pub drop_per_mille: u64,
    /// Chance a message is delivered twice (per thousand messages).
    pub dup_per_mille: u64,
    /// Largest message delay in time units (a tick is 10); random delays reorder messages.
    pub max_delay: u64,
    /// Largest disk flush delay in time units.
    pub max_flush_delay: u64,
    /// Chance per tick that a running node crashes (losing unflushed jobs).
    pub crash_per_mille: u64,
    /// Chance per tick that the network splits into two sides (healed later).
    pub partition_per_mille: u64,
    /// Client proposals per tick (at most one per tick, with this chance per thousand).
    pub propose_per_mille: u64,
    /// Applied entries between snapshots (small, so lagging replicas catch up by snapshot).
    pub snapshot_every: u64,
    /// Replication factor R of chunk placement (the initial placement uses min(R, nodes)).
    pub replicas: usize,
    /// Extra node slots that start outside the group (membership mode).
    pub spare_nodes: usize,
    /// Chance per tick that the leader proposes a membership change (add a spare as a
    /// learner, promote a learner, remove a member).
    pub member_change_per_mille: u64,
    /// Chance per tick that the leader hands leadership to another voter (raft-rs leader
    /// transfer, as the runtime does to balance shard leaders over nodes).
    pub transfer_per_mille: u64,
    /// Chance per tick of a simulated write failure: the leader marks a current holder of a
    /// chunk stale (the repair driver must fix it).
    pub stale_per_mille: u64,
    /// Ticks between rounds of the leader's placement repair driver.
    pub repair_every: u64,
    /// No client writes while members catch up at the end. A learner that joined after the
    /// leader's latest log compaction must then get a snapshot made for it (the latest one's
    /// configuration does not list it and raft-rs would refuse it; fixed bug, seen with
    /// `membership` seeds such as 1702); with clients writing, the leader compacts again
    /// anyway, which would hide that. On in membership mode.
    pub quiet_end: bool,
}

impl SimConfig {
    /// Defaults for CI: 3 nodes, every fault on, placement repair on, fixed membership.
    pub fn standard(seed: u64) -> SimConfig {
        SimConfig {
            nodes: 3,
            seed,
            ticks: 600,
            settle_ticks: 400,
            drop_per_mille: 50,
            dup_per_mille: 20,
            max_delay: 25,
            max_flush_delay: 30,
            crash_per_mille: 4,
            partition_per_mille: 4,
            propose_per_mille: 600,
            snapshot_every: 40,
            replicas: 3,
            spare_nodes: 0,
            member_change_per_mille: 0,
            transfer_per_mille: 8,
            stale_per_mille: 15,
            repair_every: 4,
            quiet_end: false,
        }
    }

    /// [`SimConfig::standard`] with membership changes: 3 founding nodes and 2 spares.
    pub fn membership(seed: u64) -> SimConfig {
        SimConfig {
            spare_nodes: 2,
            member_change_per_mille: 15,
            quiet_end: true,
            ..SimConfig::standard(seed)
        }
    }
}

/// A broken invariant, with what is needed to replay it.
#[derive(Debug)]
pub struct Failure {
    /// The seed of the run.
    pub seed: u64,
    /// Simulated time (units; a tick is 10).
    pub time: u64,
    /// What broke.
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} at time {}: {} (replay: CFS_SIM_SEED={} cargo test -p cfs-sim)",
            self.seed, self.time, self.what, self.seed
        )
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Commands committed (distinct log indexes with a command).
    pub committed: u64,
    /// Commands acknowledged to clients.
    pub acked: u64,
    /// Terms that had a leader.
    pub terms_with_leader: u64,
    /// Node crashes.
    pub crashes: u64,
    /// Network partitions.
    pub partitions: u64,
    /// Messages dropped.
    pub dropped: u64,
    /// Snapshots installed by lagging replicas.
    pub snapshots_installed: u64,
    /// Final log index.
    pub last_index: u64,
    /// Learners added (membership changes applied).
    pub learners_added: u64,
    /// Learners promoted to voters.
    pub promotions: u64,
    /// Members removed.
    pub removals: u64,
    /// Placement moves applied (`AddHolders` and `DropHolders`).
    pub holder_moves: u64,
    /// `Repaired` commands applied.
    pub repairs: u64,
    /// Simulated write failures applied (`MarkStale`).
    pub stale_marks: u64,
    /// Copies a placement move dropped from a node ([`Applied::dropped`]).
    pub copies_dropped: u64,
    /// Chunks with holders at the end.
    pub chunks: u64,
    /// Members (voters and learners) at the end.
    pub final_members: u64,
    /// Client commands applied a second time under the same session (resends), each checked to
    /// give the first result.
    pub resends_deduplicated: u64,
    /// Leadership transfers started.
    pub transfers: u64,
}

#[derive(Debug)]
enum Event {
    Tick(usize),
    Deliver {
        to: usize,
        from: usize,
        msg: Message,
    },
    Flush {
        node: usize,
        epoch: u64,
        job: PersistJob,
    },
    Restart(usize),
    Heal,
    /// Faults, membership changes, repairs and client proposals, once per tick.
    World,
}

struct Node {
    replica: Option<Replica>,
    /// The disk: what survives a crash.
    disk: LogStore,
    epoch: u64,
    /// Time the last scheduled flush completes (flushes complete in order).
    flush_at: u64,
    /// A spare slot is not simulated until the leader first proposes to add it.
    started: bool,
    /// Removed from the group: never simulated again.
    removed: bool,
}

/// A membership change the simulation proposed (node index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemberOp {
    AddLearner(usize),
    Promote(usize),
    Remove(usize),
}

/// What a proposal was for (counted, and acted on, when it first applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Client,
    Member(MemberOp),
    AddHolders,
    DropHolders,
    Repaired,
    MarkStale,
}

/// One committed command as first applied by any replica.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CommittedEntry {
    term: u64,
    tag: Vec<u8>,
    result: Result<Outcome, Errno>,
}

struct Sim {
    cfg: SimConfig,
    rng: SimRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: HashMap<usize, Event>,
    next_event: usize,
    nodes: Vec<Node>,
    /// Side of each node while partitioned (messages cross only within a side).
    side: Option<Vec<bool>>,
    faults: bool,
    /// Clients propose random commands (off for the final catch-up).
    clients: bool,
    /// World ticks so far (the repair driver runs every `repair_every`).
    world_ticks: u64,
    /// Where the next repair round's plan starts.
    repair_after: ChunkId,
    leaders: BTreeMap<u64, u64>,
    committed: BTreeMap<u64, CommittedEntry>,
    /// Proposals in flight: tag -> node that took it.
    pending: HashMap<Vec<u8>, usize>,
    /// What every proposal was for.
    purposes: HashMap<Vec<u8>, Purpose>,
    /// Acknowledged: tag -> (index, result).
    acked: BTreeMap<Vec<u8>, (u64, Result<Outcome, Errno>)>,
    next_tag: u64,
    report: Report,
    /// `CFS_SIM_TRACE` set: print every proposal, persist job, apply and crash.
    trace: bool,
    /// The client's next session sequence number, and its last command (resent now and then,
    /// as a client does after a lost reply: it must not apply twice).
    client_seq: u64,
    last_client_command: Option<Command>,
    /// Session of each client proposal (by tag), and the first result committed under each
    /// session: a resend must get exactly that result, whenever and wherever it applies
    /// (across leader changes, snapshots and restarts).
    sessions_by_tag: HashMap<Vec<u8>, cfs_meta::session::Session>,
    session_results: HashMap<cfs_meta::session::Session, Result<Outcome, Errno>>,
}

fn ids(n: usize) -> Vec<u64> {
    (1..=n as u64).collect()
}

/// The member record of node `id` (two failure domains, so domains matter for placement).
fn member(id: u64) -> Member {
    Member {
        addr: format!("10.0.0.{id}:7411"),
        domain: format!("d{}", id % 2),
    }
}

/// The placement every replica starts with: the founding nodes, R copies.
fn initial_placement(cfg: &SimConfig) -> Placement {
    let members = ids(cfg.nodes).into_iter().map(|i| (i, member(i))).collect();
    Placement::new(members, cfg.replicas.min(cfg.nodes))
}

/// The log a restarting node reads back, as the server's `RaftStore::load` rebuilds it: a
/// new group's log, then the stored snapshot (with its configuration), the entries after it,
/// and the hard state. (Reusing the in-memory durable copy as is would not do: after
/// `LogStore::install_compaction` it still reports the founding configuration, while the
/// compacted snapshot and namespace include later membership changes.)
fn reload(founding: &[u64], disk: &LogStore) -> LogStore {
    let mut log = LogStore::new(founding, &[]);
    log.apply_snapshot(disk.latest_snapshot().clone());
    log.append(disk.entries_after_snapshot());
    log.set_hard_state(disk.hard_state().clone());
    log
}

impl Sim {
    fn fail(&self, what: impl Into<String>) -> Failure {
        Failure {
            seed: self.cfg.seed,
            time: self.now,
            what: what.into(),
        }
    }

    fn schedule(&mut self, at: u64, e: Event) {
        let k = self.next_event;
        self.next_event += 1;
        self.seq += 1;
        self.events.insert(k, e);
        self.queue.push(Reverse((at, self.seq, k)));
    }

    fn replica_config(&self, i: usize) -> ReplicaConfig {
        ReplicaConfig {
            id: i as u64 + 1,
            voters: ids(self.cfg.nodes),
            learners: Vec::new(),
            initial: initial_placement(&self.cfg),
            shard: cfs_meta::shard::ShardSlot::SINGLE,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: self.cfg.snapshot_every,
            seed: self.cfg.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        self.side.as_ref().is_none_or(|s| s[a] == s[b])
    }

    fn running(&self, i: usize) -> bool {
        self.nodes[i].replica.is_some()
    }

    /// The node that currently leads (the one with the highest term if a deposed leader has
    /// not heard of the new one yet).
    fn leader(&self) -> Option<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i]
                    .replica
                    .as_ref()
                    .is_some_and(Replica::is_leader)
            })
            .max_by_key(|&i| self.nodes[i].replica.as_ref().map_or(0, Replica::term))
    }

    /// Tells the sender of a snapshot whether it arrived (snapshots travel on their own
    /// stream, whose end the sender sees).
    fn snapshot_outcome(&mut self, from: usize, m: &Message, delivered: bool) {
        if m.get_msg_type() == MessageType::MsgSnapshot {
            if let Some(r) = self.nodes[from].replica.as_mut() {
                r.report_snapshot(m.to, delivered);
            }
        }
    }

    fn send(&mut self, from: usize, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to as usize - 1;
            if to >= self.nodes.len() || self.nodes[to].removed {
                // Nobody listens there any more.
                self.report.dropped += 1;
                self.snapshot_outcome(from, &m, false);
                continue;
            }
            if self.faults && self.rng.chance(self.cfg.drop_per_mille, 1000) {
                self.report.dropped += 1;
                self.snapshot_outcome(from, &m, false);
                continue;
            }
            let copies = if self.faults && self.rng.chance(self.cfg.dup_per_mille, 1000) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let at = self.now + 1 + self.rng.below(self.cfg.max_delay.max(1));
                self.schedule(
                    at,
                    Event::Deliver {
                        to,
                        from,
                        msg: m.clone(),
                    },
                );
            }
        }
    }

    /// Runs a node's ready loop: messages out, persist jobs to its disk, applied results in.
    fn drain(&mut self, i: usize) -> Result<(), Failure> {
        loop {
            let Some(r) = self.nodes[i].replica.as_mut() else {
                return Ok(());
            };
            let out = r.ready();
            let Some(job) = out.persist else {
                return Ok(());
            };
            if job.snapshot.is_some() {
                self.report.snapshots_installed += 1;
            }
            if self.trace {
                let es: Vec<(u64, u64, Vec<u8>)> = job
                    .entries
                    .iter()
                    .map(|e| (e.index, e.term, e.context.to_vec()))
                    .collect();
                eprintln!(
                    "t={} node {} job {} entries {:?} hs {:?} snap {:?} msgs {:?}",
                    self.now,
                    i + 1,
                    job.number,
                    es,
                    job.hard_state.as_ref().map(|h| (h.term, h.commit)),
                    job.snapshot.as_ref().map(|s| s.get_metadata().index),
                    out.messages
                        .iter()
                        .map(|m| (m.get_msg_type(), m.to, m.index, m.entries.len()))
                        .collect::<Vec<_>>()
                );
            }
            self.send(i, out.messages);
            let delay = 1 + self.rng.below(self.cfg.max_flush_delay.max(1));
            // Writes are pipelined but complete in order (a disk with a queue).
            let at = (self.now + delay).max(self.nodes[i].flush_at);
            self.nodes[i].flush_at = at;
            let epoch = self.nodes[i].epoch;
            self.schedule(
                at,
                Event::Flush {
                    node: i,
                    epoch,
                    job,
                },
            );
            self.record_applied(i, out.applied)?;
        }
    }

    fn record_applied(&mut self, i: usize, applied: Vec<Applied>) -> Result<(), Failure> {
        for a in applied {
            if self.trace {
                eprintln!(
                    "t={} node {} applied {} term {} tag {:?} {:?} dropped {:?}",
                    self.now,
                    i + 1,
                    a.index,
                    a.term,
                    a.tag,
                    a.result,
                    a.dropped
                );
            }
            let entry = CommittedEntry {
                term: a.term,
                tag: a.tag.clone(),
                result: a.result.clone(),
            };
            match self.committed.get(&a.index) {
                Some(first) if *first != entry => {
                    return Err(self.fail(format!(
                        "node {} applied index {} as {:?}, another replica as {:?}",
                        i + 1,
                        a.index,
                        entry,
                        first
                    )));
                }
                Some(_) => {}
                None => {
                    self.committed.insert(a.index, entry);
                    self.first_applied(&a);
                    if let Some(s) = self.sessions_by_tag.get(&a.tag).copied() {
                        match self.session_results.get(&s) {
                            Some(first) if *first != a.result => {
                                return Err(self.fail(format!(
                                    "a resend under {s:?} applied at index {} gave {:?}, the first gave {first:?}",
                                    a.index, a.result
                                )));
                            }
                            Some(_) => self.report.resends_deduplicated += 1,
                            None => {
                                self.session_results.insert(s, a.result.clone());
                            }
                        }
                    }
                }
            }
            if self.pending.get(&a.tag) == Some(&i) {
                self.pending.remove(&a.tag);
                self.acked.insert(a.tag, (a.index, a.result));
            }
        }
        self.check_node(i)
    }

    /// The namespace invariants of a running node, and its membership against its Raft
    /// configuration.
    fn check_node(&self, i: usize) -> Result<(), Failure> {
        let Some(r) = &self.nodes[i].replica else {
            return Ok(());
        };
        if let Err(e) = r.namespace().check_invariants() {
            return Err(self.fail(format!("node {} namespace: {e}", i + 1)));
        }
        let cs = r.conf_state();
        let conf: BTreeSet<u64> = cs.voters.iter().chain(&cs.learners).copied().collect();
        let members: BTreeSet<u64> = r
            .namespace()
            .placement()
            .members()
            .keys()
            .copied()
            .collect();
        if conf != members {
            return Err(self.fail(format!(
                "node {} (applied {}): namespace members {members:?} but Raft voters {:?} learners {:?}",
                i + 1,
                r.applied(),
                cs.voters,
                cs.learners
            )));
        }
        Ok(())
    }

    /// A command committed (first applied anywhere): count it, and stop a removed node.
    fn first_applied(&mut self, a: &Applied) {
        self.report.copies_dropped += a.dropped.len() as u64;
        let Some(&purpose) = self.purposes.get(&a.tag) else {
            return;
        };
        if a.result.is_err() {
            return;
        }
        match purpose {
            Purpose::Client => {}
            Purpose::Member(MemberOp::AddLearner(_)) => self.report.learners_added += 1,
            Purpose::Member(MemberOp::Promote(_)) => self.report.promotions += 1,
            Purpose::Member(MemberOp::Remove(n)) => {
                self.report.removals += 1;
                self.remove_node(n);
            }
            Purpose::AddHolders | Purpose::DropHolders => self.report.holder_moves += 1,
            Purpose::Repaired => self.report.repairs += 1,
            Purpose::MarkStale => self.report.stale_marks += 1,
        }
    }

    /// The node's removal committed: it is shut down for good.
    fn remove_node(&mut self, i: usize) {
        if self.trace {
            eprintln!("t={} node {} removed: stopped", self.now, i + 1);
        }
        let n = &mut self.nodes[i];
        n.removed = true;
        n.replica = None;
        n.epoch += 1;
        self.pending.retain(|_, p| *p != i);
    }

    fn check_leaders(&mut self) -> Result<(), Failure> {
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(r) = &n.replica else { continue };
            if r.is_leader() {
                let id = i as u64 + 1;
                match self.leaders.get(&r.term()) {
                    Some(&other) if other != id => {
                        return Err(self.fail(format!(
                            "two leaders in term {}: {} and {}",
                            r.term(),
                            other,
                            id
                        )));
                    }
                    Some(_) => {}
                    None => {
                        self.leaders.insert(r.term(), id);
                    }
                }
            }
        }
        Ok(())
    }

    fn random_command(&mut self) -> Command {
        let names: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];
        let rng = &mut self.rng;
        // Half the time one of the first inodes (the root and what was made first), so most
        // commands find their target and the tree and its files grow.
        let ino = |rng: &mut SimRng| {
            if rng.chance(1, 2) {
                InodeId(1 + rng.below(6))
            } else {
                InodeId(1 + rng.below(24))
            }
        };
        let name = |rng: &mut SimRng| names[rng.below(5) as usize].to_vec();
        let op = match rng.below(15) {
            0 => Op::Mkdir {
                parent: ino(rng),
                name: name(rng),
                perm: 0o777,
            },
            1 | 2 => Op::Create {
                parent: ino(rng),
                name: name(rng),
                perm: 0o666,
            },
            3 => Op::Unlink {
                parent: ino(rng),
                name: name(rng),
            },
            4 => Op::Rmdir {
                parent: ino(rng),
                name: name(rng),
            },
            5 => Op::Rename {
                parent: ino(rng),
                name: name(rng),
                newparent: ino(rng),
                newname: name(rng),
                flags: RenameFlags {
                    noreplace: rng.chance(1, 4),
                    exchange: rng.chance(1, 4),
                },
            },
            6 => Op::Link {
                ino: ino(rng),
                newparent: ino(rng),
                newname: name(rng),
            },
            7 => Op::Symlink {
                parent: ino(rng),
                name: name(rng),
                target: b"x".to_vec(),
            },
            8 => Op::SetAttr {
                ino: ino(rng),
                set: SetAttr {
                    perm: Some(rng.below(0o7777) as u32),
                    size: rng.chance(1, 2).then(|| rng.below(200 << 20)),
                    ..SetAttr::default()
                },
            },
            9 => Op::MapChunks {
                ino: ino(rng),
                offset: rng.below(300 << 20),
                len: 1 + rng.below(100 << 20),
            },
            // Chunks with holders for placement: files are among the first inodes made.
            12..=14 => Op::MapChunks {
                ino: InodeId(2 + rng.below(8)),
                offset: rng.below(1 << 30),
                len: 1 + rng.below(200 << 20),
            },
            10 => Op::Release { ino: ino(rng) },
            _ => Op::Wrote {
                ino: ino(rng),
                offset: rng.below(1 << 20),
                len: rng.below(1 << 20),
                chunks: vec![(0, ChunkId(1 + rng.below(8)))],
            },
        };
        let creds = if rng.chance(3, 4) {
            Creds::root()
        } else {
            Creds {
                uid: 1000,
                gid: 1000,
                groups: vec![],
            }
        };
        let seq = self.client_seq;
        self.client_seq += 1;
        Command {
            creds,
            now: Timespec::new((self.now / TICK) as i64, 0),
            op,
            session: Some(cfs_meta::session::Session { client: 7, seq }),
        }
    }

    /// A command from the cluster itself (repairs, membership), stamped with the clock.
    fn system_command(&self, op: Op) -> Command {
        Command {
            creds: Creds::root(),
            now: Timespec::new((self.now / TICK) as i64, 0),
            op,
            session: None,
        }
    }

    fn new_tag(&mut self) -> Vec<u8> {
        self.next_tag += 1;
        self.next_tag.to_le_bytes().to_vec()
    }

    /// A client sends a command to the node it finds leading; true if it was taken.
    fn propose(&mut self, cmd: Command) -> bool {
        self.propose_for(cmd, Purpose::Client)
    }

    fn propose_for(&mut self, cmd: Command, purpose: Purpose) -> bool {
        let Some(i) = self.leader() else { return false };
        let tag = self.new_tag();
        let Some(r) = self.nodes[i].replica.as_mut() else {
            return false;
        };
        if self.trace {
            eprintln!(
                "t={} propose tag {:?} to node {} term {}: {:?}",
                self.now,
                tag,
                i + 1,
                r.term(),
                cmd.op
            );
        }
        if r.propose(tag.clone(), &cmd).is_ok() {
            if let Some(s) = cmd.session {
                self.sessions_by_tag.insert(tag.clone(), s);
            }
            self.purposes.insert(tag.clone(), purpose);
            self.pending.insert(tag, i);
            true
        } else {
            false
        }
    }

    /// The leader proposes one membership change: add a spare as a learner, promote a
    /// learner, or remove a learner or (while more than three remain) a voter other than
    /// itself.
    fn change_membership(&mut self) -> Result<(), Failure> {
        let Some(l) = self.leader() else {
            return Ok(());
        };
        let Some(r) = self.nodes[l].replica.as_ref() else {
            return Ok(());
        };
        let cs = r.conf_state();
        let gone = r.namespace().placement().removed().clone();
        let leader_id = l as u64 + 1;
        let spares: Vec<usize> = (self.cfg.nodes..self.nodes.len())
            .filter(|&i| {
                let id = i as u64 + 1;
                !self.nodes[i].removed
                    && !gone.contains(&id)
                    && !cs.voters.contains(&id)
                    && !cs.learners.contains(&id)
            })
            .collect();
        let learners: Vec<u64> = cs.learners.clone();
        let mut removable = learners.clone();
        if cs.voters.len() > 3 {
            removable.extend(cs.voters.iter().filter(|&&v| v != leader_id));
        }
        // Joins and promotions twice as likely as removals (a removed id never comes back).
        let mut kinds = Vec::new();
        if !spares.is_empty() {
            kinds.extend([0, 0]);
        }
        if !learners.is_empty() {
            kinds.extend([1, 1]);
        }
        if !removable.is_empty() {
            kinds.push(2);
        }
        if kinds.is_empty() {
            return Ok(());
        }
        let kind = kinds[self.rng.below(kinds.len() as u64) as usize];
        let (op, change, mop) = match kind {
            0 => {
                let i = spares[self.rng.below(spares.len() as u64) as usize];
                let id = i as u64 + 1;
                // The new node starts (empty, from the founding log) and asks to join.
                if !self.nodes[i].started {
                    self.nodes[i].started = true;
                    self.restart(i)?;
                }
                let m = member(id);
                let op = Op::AddMember {
                    id,
                    addr: m.addr,
                    domain: m.domain,
                };
                (op, MemberChange::AddLearner, MemberOp::AddLearner(i))
            }
            1 => {
                let id = learners[self.rng.below(learners.len() as u64) as usize];
                let m = member(id);
                let op = Op::AddMember {
                    id,
                    addr: m.addr,
                    domain: m.domain,
                };
                let i = id as usize - 1;
                (op, MemberChange::AddVoter, MemberOp::Promote(i))
            }
            _ => {
                let id = removable[self.rng.below(removable.len() as u64) as usize];
                let i = id as usize - 1;
                (
                    Op::RemoveMember { id },
                    MemberChange::Remove,
                    MemberOp::Remove(i),
                )
            }
        };
        let cmd = self.system_command(op);
        let tag = self.new_tag();
        let Some(r) = self.nodes[l].replica.as_mut() else {
            return Ok(());
        };
        let res = r.propose_member(tag.clone(), &cmd, change);
        if self.trace {
            eprintln!(
                "t={} propose member change tag {:?} to node {}: {:?} {:?} -> {:?}",
                self.now,
                tag,
                l + 1,
                change,
                cmd.op,
                res
            );
        }
        if res.is_ok() {
            self.purposes.insert(tag.clone(), Purpose::Member(mop));
            self.pending.insert(tag, l);
        }
        Ok(())
    }

    /// The leader hands leadership to a random other voter (when that voter is caught up;
    /// the transfer may still fail under faults, and raft-rs aborts it after an election).
    fn transfer_leadership(&mut self) {
        let Some(l) = self.leader() else { return };
        let Some(r) = self.nodes[l].replica.as_ref() else {
            return;
        };
        let others: Vec<u64> = r
            .conf_state()
            .voters
            .into_iter()
            .filter(|&v| v != l as u64 + 1)
            .collect();
        if others.is_empty() {
            return;
        }
        let to = others[self.rng.below(others.len() as u64) as usize];
        let started = self.nodes[l]
            .replica
            .as_mut()
            .is_some_and(|r| r.transfer_leader(to));
        if self.trace {
            eprintln!(
                "t={} leader {} transfers to {to}: {started}",
                self.now,
                l + 1
            );
        }
        if started {
            self.report.transfers += 1;
        }
    }

    /// A simulated write failure: a current holder of some chunk missed a write (only
    /// while the chunk has another current copy, so data is never lost by it alone).
    fn write_failure(&mut self) {
        let Some(l) = self.leader() else { return };
        let Some(r) = self.nodes[l].replica.as_ref() else {
            return;
        };
        let p = r.namespace().placement();
        let candidates: Vec<(ChunkId, Vec<u64>)> = p
            .all_holders()
            .filter_map(|(c, h)| {
                let stale = p.stale_nodes(c);
                let current: Vec<u64> = h.iter().copied().filter(|n| !stale.contains(n)).collect();
                (current.len() >= 2).then_some((c, current))
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let (c, current) = &candidates[self.rng.below(candidates.len() as u64) as usize];
        let n = current[self.rng.below(current.len() as u64) as usize];
        let cmd = self.system_command(Op::MarkStale {
            chunks: vec![*c],
            nodes: vec![n],
        });
        self.propose_for(cmd, Purpose::MarkStale);
    }

    /// One round of the leader's placement repair driver: the next moves of the plan, and
    /// `Repaired` for stale copies on nodes it reaches (the copy is simulated).
    fn repair(&mut self) {
        let Some(l) = self.leader() else { return };
        let Some(r) = self.nodes[l].replica.as_ref() else {
            return;
        };
        let p = r.namespace().placement();
        let moves = p.plan(self.repair_after, REPAIR_BATCH);
        let stale: Vec<(ChunkId, u64)> = p
            .all_stale()
            .flat_map(|(c, nodes)| nodes.iter().map(move |&n| (c, n)))
            .collect();
        let mut cmds: Vec<(Op, Purpose)> = Vec::new();
        for m in moves {
            match m {
                Move::Add { chunk, nodes } => {
                    self.repair_after = chunk;
                    cmds.push((Op::AddHolders { chunk, nodes }, Purpose::AddHolders));
                }
                Move::Drop { chunk, nodes } => {
                    self.repair_after = chunk;
                    cmds.push((Op::DropHolders { chunk, nodes }, Purpose::DropHolders));
                }
            }
        }
        // A stale copy is repaired only on a node the leader reaches (it copies the data).
        let reachable = stale
            .into_iter()
            .filter(|&(_, node)| {
                let n = node as usize - 1;
                n < self.nodes.len() && self.running(n) && self.connected(l, n)
            })
            .take(REPAIR_BATCH);
        for (chunk, node) in reachable {
            cmds.push((Op::Repaired { chunk, node }, Purpose::Repaired));
        }
        for (op, purpose) in cmds {
            let cmd = self.system_command(op);
            if !self.propose_for(cmd, purpose) {
                return;
            }
        }
    }

    fn crash(&mut self, i: usize) {
        if self.nodes[i].replica.take().is_some() {
            // What the disk holds stays; jobs still in flight are lost.
            self.nodes[i].epoch += 1;
            self.nodes[i].flush_at = self.now;
            self.report.crashes += 1;
            if self.trace {
                eprintln!("t={} crash node {}", self.now, i + 1);
            }
            // Proposals it took are lost with it (the client never heard back).
            self.pending.retain(|_, n| *n != i);
            let at = self.now + TICK * (5 + self.rng.below(40));
            self.schedule(at, Event::Restart(i));
        }
    }

    fn restart(&mut self, i: usize) -> Result<(), Failure> {
        let n = &self.nodes[i];
        if n.replica.is_some() || !n.started || n.removed {
            return Ok(());
        }
        let cfg = self.replica_config(i);
        let store = reload(&ids(self.cfg.nodes), &n.disk);
        let r = Replica::open(cfg, store)
            .map_err(|e| self.fail(format!("node {} cannot restart: {e}", i + 1)))?;
        if self.trace {
            eprintln!(
                "t={} start node {} at applied {} conf {:?}",
                self.now,
                i + 1,
                r.applied(),
                r.conf_state()
            );
        }
        self.nodes[i].replica = Some(r);
        self.schedule(self.now + TICK, Event::Tick(i));
        self.check_node(i)
    }

    fn handle(&mut self, e: Event) -> Result<(), Failure> {
        match e {
            Event::Tick(i) => {
                let Some(r) = self.nodes[i].replica.as_mut() else {
                    return Ok(()); // crashed: the restart schedules ticks again
                };
                r.tick();
                self.schedule(self.now + TICK, Event::Tick(i));
                self.drain(i)?;
            }
            Event::World => {
                self.schedule(self.now + TICK, Event::World);
                self.world_tick()?;
            }
            Event::Deliver { to, from, msg } => {
                if !self.connected(from, to)
                    || self.nodes[to].replica.is_none()
                    || self.nodes[from].removed
                {
                    self.report.dropped += 1;
                    self.snapshot_outcome(from, &msg, false);
                    return Ok(());
                }
                let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
                if is_snapshot && self.trace {
                    let meta = msg.get_snapshot().get_metadata();
                    eprintln!(
                        "t={} snapshot at {} for node {} from {}: conf {:?}",
                        self.now,
                        meta.index,
                        to + 1,
                        from + 1,
                        meta.get_conf_state()
                    );
                }
                let copy = is_snapshot.then(|| msg.clone());
                let (t, kind) = (self.now, msg.get_msg_type());
                let stepped = match self.nodes[to].replica.as_mut() {
                    Some(r) => {
                        let res = r.step(msg);
                        if self.trace {
                            if let Err(e) = &res {
                                eprintln!(
                                    "t={t} node {} refused {kind:?} from {}: {e}",
                                    to + 1,
                                    from + 1
                                );
                            }
                        }
                        res.is_ok()
                    }
                    None => false,
                };
                if let Some(m) = copy {
                    self.snapshot_outcome(from, &m, stepped);
                }
                self.drain(to)?;
                self.drain(from)?;
            }
            Event::Flush { node, epoch, job } => {
                if self.nodes[node].epoch != epoch {
                    return Ok(()); // lost in a crash
                }
                self.nodes[node].disk.apply_job(&job);
                if let Some(r) = self.nodes[node].replica.as_mut() {
                    let msgs = r.persisted(job.number);
                    if self.trace && !msgs.is_empty() {
                        eprintln!(
                            "t={} node {} persisted {} msgs {:?}",
                            self.now,
                            node + 1,
                            job.number,
                            msgs.iter()
                                .map(|m| (m.get_msg_type(), m.to, m.index, m.reject))
                                .collect::<Vec<_>>()
                        );
                    }
                    self.send(node, msgs);
                    self.drain(node)?;
                }
            }
            Event::Restart(i) => self.restart(i)?,
            Event::Heal => self.side = None,
        }
        self.check_leaders()
    }

    fn world_tick(&mut self) -> Result<(), Failure> {
        self.world_ticks += 1;
        if self.faults {
            for i in 0..self.nodes.len() {
                if self.rng.chance(self.cfg.crash_per_mille, 1000) {
                    self.crash(i);
                }
            }
            if self.side.is_none() && self.rng.chance(self.cfg.partition_per_mille, 1000) {
                let side: Vec<bool> = (0..self.nodes.len())
                    .map(|_| self.rng.chance(1, 2))
                    .collect();
                self.side = Some(side);
                self.report.partitions += 1;
                let at = self.now + TICK * (10 + self.rng.below(60));
                self.schedule(at, Event::Heal);
            }
            if self.rng.chance(self.cfg.member_change_per_mille, 1000) {
                self.change_membership()?;
            }
            if self.rng.chance(self.cfg.stale_per_mille, 1000) {
                self.write_failure();
            }
            if self.rng.chance(self.cfg.transfer_per_mille, 1000) {
                self.transfer_leadership();
            }
        }
        if self.clients && self.rng.chance(self.cfg.propose_per_mille, 1000) {
            let resend = self.rng.chance(1, 20);
            let cmd = match self.last_client_command.clone() {
                Some(c) if resend => c,
                _ => {
                    let c = self.random_command();
                    self.last_client_command = Some(c.clone());
                    c
                }
            };
            self.propose(cmd);
        }
        if self
            .world_ticks
            .is_multiple_of(self.cfg.repair_every.max(1))
        {
            self.repair();
        }
        Ok(())
    }

    fn run_until(&mut self, end: u64, mut done: impl FnMut(&Sim) -> bool) -> Result<bool, Failure> {
        while let Some(Reverse((at, _, k))) = self.queue.pop() {
            if at > end {
                self.queue.push(Reverse((at, 0, k)));
                self.now = end;
                return Ok(false);
            }
            self.now = at;
            let Some(e) = self.events.remove(&k) else {
                continue;
            };
            self.handle(e)?;
            if done(self) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether the leader's placement is clean (every chunk on exactly its target nodes,
    /// all current) and nothing it holds is left to apply (no membership change pending).
    fn placement_settled(&self) -> bool {
        let Some(l) = self.leader() else { return false };
        let Some(r) = self.nodes[l].replica.as_ref() else {
            return false;
        };
        let h = r.namespace().placement().health();
        let last = raft::Storage::last_index(r.store()).unwrap_or(0);
        h.under_replicated == 0 && h.misplaced == 0 && h.stale_copies == 0 && r.applied() >= last
    }
}

/// Runs one simulation; `Err` describes the first broken invariant and how to replay it.
pub fn run(cfg: &SimConfig) -> Result<Report, Failure> {
    assert!(cfg.nodes >= 1, "a group needs a replica");
    let founding = ids(cfg.nodes);
    let mut sim = Sim {
        rng: SimRng::new(cfg.seed),
        cfg: cfg.clone(),
        now: 0,
        seq: 0,
        client_seq: 1,
        last_client_command: None,
        sessions_by_tag: HashMap::new(),
        session_results: HashMap::new(),
        queue: BinaryHeap::new(),
        events: HashMap::new(),
        next_event: 0,
        // Spares get the same founding log as everyone: they catch up once added.
        nodes: (0..cfg.nodes + cfg.spare_nodes)
            .map(|i| Node {
                replica: None,
                disk: LogStore::new(&founding, &[]),
                epoch: 0,
                flush_at: 0,
                started: i < cfg.nodes,
                removed: false,
            })
            .collect(),
        side: None,
        faults: true,
        clients: true,
        world_ticks: 0,
        repair_after: ChunkId(0),
        leaders: BTreeMap::new(),
        committed: BTreeMap::new(),
        pending: HashMap::new(),
        purposes: HashMap::new(),
        acked: BTreeMap::new(),
        next_tag: 0,
        report: Report::default(),
        trace: std::env::var_os("CFS_SIM_TRACE").is_some(),
    };
    for i in 0..cfg.nodes {
        sim.restart(i)?;
    }
    sim.schedule(TICK / 2, Event::World);
    sim.run_until(cfg.ticks * TICK, |_| false)?;

    // Recovery: no more faults (nor membership changes, nor write failures), heal, restart
    // everyone, then a new command must commit.
    sim.faults = false;
    sim.side = None;
    for i in 0..sim.nodes.len() {
        sim.restart(i)?;
    }
    // A client retries its probe (a new proposal every 30 ticks, as after a timeout) until
    // one is acknowledged: proposals are lost when leadership changes.
    let end = sim.now + cfg.settle_ticks * TICK;
    let mut probes: Vec<Vec<u8>> = Vec::new();
    let mut next_try = sim.now;
    loop {
        if probes.iter().any(|t| sim.acked.contains_key(t)) {
            break;
        }
        if sim.now >= end {
            return Err(sim.fail(format!(
                "the group did not commit a new command within {} ticks after the faults stopped ({} tries)",
                cfg.settle_ticks,
                probes.len()
            )));
        }
        if sim.now >= next_try {
            let cmd = Command {
                creds: Creds::root(),
                now: Timespec::new((sim.now / TICK) as i64, 0),
                op: Op::Mkdir {
                    parent: InodeId::ROOT,
                    name: format!("probe{}", probes.len()).into_bytes(),
                    perm: 0o755,
                },
                session: None,
            };
            let tag = (sim.next_tag + 1).to_le_bytes().to_vec();
            if sim.propose(cmd) {
                probes.push(tag);
                next_try = sim.now + 30 * TICK;
            } else {
                next_try = sim.now + TICK;
            }
        }
        sim.run_until(sim.now + TICK, |_| false)?;
    }
    // The repair driver brings every chunk back to its target placement, all copies current.
    // Clients stop, so the leader's log drains (a pending membership change applies too).
    sim.clients = false;
    let repair_end = sim.now + cfg.settle_ticks * TICK;
    if !sim.run_until(repair_end, Sim::placement_settled)? && !sim.placement_settled() {
        let health = sim
            .leader()
            .and_then(|l| sim.nodes[l].replica.as_ref())
            .map(|r| r.namespace().placement().health());
        return Err(sim.fail(format!(
            "placement not repaired within {} ticks after the faults stopped: leader's health {health:?}",
            cfg.settle_ticks
        )));
    }
    // Every member of the final configuration catches up to the last index.
    let Some(leader) = sim.leader() else {
        return Err(sim.fail("no leader after the placement was repaired"));
    };
    let cs = sim.nodes[leader]
        .replica
        .as_ref()
        .map(Replica::conf_state)
        .unwrap_or_default();
    let members: Vec<usize> = cs
        .voters
        .iter()
        .chain(&cs.learners)
        .map(|&id| id as usize - 1)
        .collect();
    if let Some(&i) = members
        .iter()
        .find(|&&i| i >= sim.nodes.len() || sim.nodes[i].removed || !sim.nodes[i].started)
    {
        return Err(sim.fail(format!(
            "node {} is in the final configuration {cs:?} but was never started or was removed",
            i + 1
        )));
    }
    let caught_up = |s: &Sim, last: u64| {
        members.iter().all(|&i| {
            s.nodes[i]
                .replica
                .as_ref()
                .is_some_and(|r| r.applied() >= last)
        })
    };
    // Unless the end is quiet, clients write meanwhile, as in a live cluster: the leader
    // keeps compacting, so a learner offered an older snapshot that predates its joining
    // (which raft-rs refuses) gets a newer one (see `SimConfig::quiet_end`).
    sim.clients = !cfg.quiet_end;
    let last = sim.committed.keys().next_back().copied().unwrap_or(0);
    sim.run_until(sim.now + cfg.settle_ticks * TICK, |s| caught_up(s, last))?;
    // Then nobody proposes: every member ends at the leader's last index.
    sim.clients = false;
    sim.run_until(sim.now + cfg.settle_ticks * TICK, |s| {
        let Some(r) = s.leader().and_then(|l| s.nodes[l].replica.as_ref()) else {
            return false;
        };
        let end = raft::Storage::last_index(r.store()).unwrap_or(0);
        r.applied() >= end && caught_up(s, end)
    })?;
    let last = sim.committed.keys().next_back().copied().unwrap_or(0);
    let mut snapshots = Vec::new();
    for &i in &members {
        let Some(r) = &sim.nodes[i].replica else {
            return Err(sim.fail(format!("node {} is down at the end", i + 1)));
        };
        if r.applied() < last {
            return Err(sim.fail(format!(
                "node {} applied only {} of {last} after recovery",
                i + 1,
                r.applied()
            )));
        }
        check_final_placement(r).map_err(|e| sim.fail(format!("node {}: {e}", i + 1)))?;
        snapshots.push((i, r.applied(), r.namespace().snapshot()));
    }
    let top = snapshots.iter().map(|s| s.1).max().unwrap_or(0);
    let reference = snapshots.iter().find(|s| s.1 == top).map(|s| s.2.clone());
    for (i, applied, snap) in &snapshots {
        if *applied != top {
            return Err(sim.fail(format!(
                "node {} applied {applied}, another member {top} (no proposals at the end)",
                i + 1
            )));
        }
        if Some(snap) != reference.as_ref() {
            return Err(sim.fail(format!(
                "node {} has a different namespace at index {top}",
                i + 1
            )));
        }
    }
    for (tag, (index, result)) in &sim.acked {
        match sim.committed.get(index) {
            Some(e) if e.tag == *tag && e.result == *result => {}
            other => {
                return Err(sim.fail(format!(
                    "acknowledged command at index {index} not in the final log as acknowledged: {other:?}"
                )))
            }
        }
    }
    if let Some(r) = sim.nodes[leader].replica.as_ref() {
        sim.report.chunks = r.namespace().placement().health().chunks;
    }
    sim.report.final_members = members.len() as u64;
    sim.report.committed = sim.committed.len() as u64;
    sim.report.acked = sim.acked.len() as u64;
    sim.report.terms_with_leader = sim.leaders.len() as u64;
    sim.report.last_index = top;
    Ok(sim.report)
}

/// The end state of placement on one replica: every chunk a file maps has recorded holders,
/// exactly its target nodes (`effective_replicas` of them), all current.
fn check_final_placement(r: &Replica) -> Result<(), String> {
    let ns = r.namespace();
    let p = ns.placement();
    let h = p.health();
    if h.under_replicated != 0 || h.misplaced != 0 || h.stale_copies != 0 || h.lost != 0 {
        return Err(format!("placement not repaired at the end: {h:?}"));
    }
    let want = p.effective_replicas();
    for (c, holders) in p.all_holders() {
        let mut target = p.target(c);
        let mut have = holders.to_vec();
        target.sort_unstable();
        have.sort_unstable();
        if have.len() != want || have != target || !p.stale_nodes(c).is_empty() {
            return Err(format!(
                "{c} held by {holders:?} (stale {:?}), target {target:?}, want {want} copies",
                p.stale_nodes(c)
            ));
        }
    }
    let recorded: BTreeSet<ChunkId> = p.all_holders().map(|(c, _)| c).collect();
    if let Some(c) = ns
        .referenced_chunks()
        .into_iter()
        .find(|c| !recorded.contains(c))
    {
        return Err(format!(
            "{c} is mapped by a file but has no recorded holders"
        ));
    }
    Ok(())
}

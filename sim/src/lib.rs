//! Deterministic simulation of a metadata shard's Raft group: N replicas ([`Replica`]) in one
//! process, a simulated network (delay, drop, duplicate, reorder, partitions that heal), and
//! simulated disks (persist jobs complete after a delay, in order; a crash loses every job not
//! yet complete). One seed drives everything, so a failing run replays exactly.
//!
//! Checked after every event: at most one leader per term; every replica applies the same
//! command with the same result at each index (a committed entry is never lost or changed);
//! the namespace invariants of every replica. At the end (faults stop, partitions heal, crashed
//! nodes restart): the group elects a leader and commits a new command, every replica has
//! applied the same log to the same namespace (byte-identical snapshots), and every command a
//! client was told succeeded is in that log with the result the client got.

use cfs_meta::command::{Command, Op, Outcome};
use cfs_meta::{ChunkId, Creds, Errno, InodeId, RenameFlags, SetAttr, Timespec};
use cfs_meta_replica::{
    Applied, LogStore, Message, MessageType, PersistJob, Replica, ReplicaConfig,
};
use cfs_nvme::rng::SimRng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

pub mod lincheck;

/// Time units per Raft tick.
const TICK: u64 = 10;

/// Knobs of one run (probabilities in parts per thousand per tick unless noted).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Replicas (3 or 5).
    pub nodes: usize,
    /// The seed.
    pub seed: u64,
    /// Ticks with faults, then up to `settle_ticks` without.
    pub ticks: u64,
    /// Ticks allowed for recovery at the end.
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
}

impl SimConfig {
    /// Defaults for CI: 3 nodes, every fault on.
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
    /// Faults and client proposals, once per tick.
    World,
}

struct Node {
    replica: Option<Replica>,
    /// The disk: what survives a crash.
    disk: LogStore,
    epoch: u64,
    /// Time the last scheduled flush completes (flushes complete in order).
    flush_at: u64,
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
    leaders: BTreeMap<u64, u64>,
    committed: BTreeMap<u64, CommittedEntry>,
    /// Proposals in flight: tag -> node that took it.
    pending: HashMap<Vec<u8>, usize>,
    /// Acknowledged: tag -> (index, result).
    acked: BTreeMap<Vec<u8>, (u64, Result<Outcome, Errno>)>,
    next_tag: u64,
    report: Report,
    /// `CFS_SIM_TRACE` set: print every proposal, persist job, apply and crash.
    trace: bool,
}

fn ids(n: usize) -> Vec<u64> {
    (1..=n as u64).collect()
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
            initial: cfs_meta::placement::Placement::default(),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: self.cfg.snapshot_every,
            seed: self.cfg.seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        self.side.as_ref().is_none_or(|s| s[a] == s[b])
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
                    "t={} node {} job {} entries {:?} hs {:?} msgs {:?}",
                    self.now,
                    i + 1,
                    job.number,
                    es,
                    job.hard_state.as_ref().map(|h| (h.term, h.commit)),
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
                    "t={} node {} applied {} term {} tag {:?} {:?}",
                    self.now,
                    i + 1,
                    a.index,
                    a.term,
                    a.tag,
                    a.result
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
                }
            }
            if self.pending.get(&a.tag) == Some(&i) {
                self.pending.remove(&a.tag);
                self.acked.insert(a.tag, (a.index, a.result));
            }
        }
        if let Some(r) = &self.nodes[i].replica {
            if let Err(e) = r.namespace().check_invariants() {
                return Err(self.fail(format!("node {} namespace: {e}", i + 1)));
            }
        }
        Ok(())
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
        let ino = |rng: &mut SimRng| InodeId(1 + rng.below(24));
        let name = |rng: &mut SimRng| names[rng.below(5) as usize].to_vec();
        let op = match rng.below(12) {
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
        Command {
            creds,
            now: Timespec::new((self.now / TICK) as i64, 0),
            op,
        }
    }

    /// A client sends a command to the node it finds leading; true if it was taken.
    fn propose(&mut self, cmd: Command) -> bool {
        let leader = (0..self.nodes.len()).find(|&i| {
            self.nodes[i]
                .replica
                .as_ref()
                .is_some_and(Replica::is_leader)
        });
        let Some(i) = leader else { return false };
        self.next_tag += 1;
        let tag = self.next_tag.to_le_bytes().to_vec();
        let Some(r) = self.nodes[i].replica.as_mut() else {
            return false;
        };
        if self.trace {
            eprintln!(
                "t={} propose tag {:?} to node {} term {}",
                self.now,
                tag,
                i + 1,
                r.term()
            );
        }
        if r.propose(tag.clone(), &cmd).is_ok() {
            self.pending.insert(tag, i);
            true
        } else {
            false
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
        if self.nodes[i].replica.is_some() {
            return Ok(());
        }
        let cfg = self.replica_config(i);
        let r = Replica::open(cfg, self.nodes[i].disk.clone())
            .map_err(|e| self.fail(format!("node {} cannot restart: {e}", i + 1)))?;
        self.nodes[i].replica = Some(r);
        self.schedule(self.now + TICK, Event::Tick(i));
        Ok(())
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
                if !self.connected(from, to) || self.nodes[to].replica.is_none() {
                    self.report.dropped += 1;
                    self.snapshot_outcome(from, &msg, false);
                    return Ok(());
                }
                let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
                let copy = is_snapshot.then(|| msg.clone());
                let stepped = match self.nodes[to].replica.as_mut() {
                    Some(r) => r.step(msg).is_ok(),
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
        }
        if self.rng.chance(self.cfg.propose_per_mille, 1000) {
            let cmd = self.random_command();
            self.propose(cmd);
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
}

/// Runs one simulation; `Err` describes the first broken invariant and how to replay it.
pub fn run(cfg: &SimConfig) -> Result<Report, Failure> {
    assert!(cfg.nodes >= 1, "a group needs a replica");
    let mut sim = Sim {
        rng: SimRng::new(cfg.seed),
        cfg: cfg.clone(),
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: HashMap::new(),
        next_event: 0,
        nodes: (0..cfg.nodes)
            .map(|_| Node {
                replica: None,
                disk: LogStore::new(&ids(cfg.nodes), &[]),
                epoch: 0,
                flush_at: 0,
            })
            .collect(),
        side: None,
        faults: true,
        leaders: BTreeMap::new(),
        committed: BTreeMap::new(),
        pending: HashMap::new(),
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

    // Recovery: no more faults, heal, restart everyone, then a new command must commit.
    sim.faults = false;
    sim.side = None;
    for i in 0..cfg.nodes {
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
    // Let every replica catch up to the last index.
    let last = sim.committed.keys().next_back().copied().unwrap_or(0);
    sim.run_until(end + cfg.settle_ticks * TICK, |s| {
        s.nodes
            .iter()
            .all(|n| n.replica.as_ref().is_some_and(|r| r.applied() >= last))
    })?;
    let mut snapshots = Vec::new();
    for (i, n) in sim.nodes.iter().enumerate() {
        let Some(r) = &n.replica else {
            return Err(sim.fail(format!("node {} is down at the end", i + 1)));
        };
        if r.applied() < last {
            return Err(sim.fail(format!(
                "node {} applied only {} of {last} after recovery",
                i + 1,
                r.applied()
            )));
        }
        snapshots.push((r.applied(), r.namespace().snapshot()));
    }
    let top = snapshots.iter().map(|s| s.0).max().unwrap_or(0);
    let reference = snapshots.iter().find(|s| s.0 == top).map(|s| s.1.clone());
    for (i, (applied, snap)) in snapshots.iter().enumerate() {
        if *applied == top && Some(snap) != reference.as_ref() {
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
    sim.report.committed = sim.committed.len() as u64;
    sim.report.acked = sim.acked.len() as u64;
    sim.report.terms_with_leader = sim.leaders.len() as u64;
    sim.report.last_index = top;
    Ok(sim.report)
}

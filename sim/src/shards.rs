//! Deterministic simulation of a namespace split over S metadata shards, for the cross-shard
//! transaction protocol ([`cfs_meta::txn`]). Each shard is one state machine (its Raft group is
//! simulated by [`crate::run`]; here a shard applies a command atomically, as a committed log
//! entry does). Between clients and shards runs a simulated network that drops, duplicates,
//! delays and reorders requests and replies (a request lost = a leader that crashed before
//! committing it; a reply lost = a leader that crashed after). Clients run operations with
//! [`TxnDriver`] and resend when no reply comes. Faults at every step:
//!
//! - a client's driver crashes mid-transaction (its locks stay behind; the shards' recovery
//!   finishes or undoes the transaction); the client later resends the same operation with the
//!   same session, or gives up;
//! - a shard restarts from its snapshot (the transaction state must survive the encoding);
//! - a shard's leader runs its recovery chores ([`Namespace::txn_chores`]) now and then.
//!
//! Checked after every step: each shard's own invariants. In sequential mode (one operation at
//! a time, then quiescence) the shards together must list exactly like a one-shard reference
//! namespace that applied the same operations: the operation's effect happened exactly once if
//! the client was told it succeeded, not at all if it was told it failed (with the same error
//! as the reference), and either way if the client gave up. In concurrent mode (several
//! clients at once) the shards together must form a valid namespace at the end (links, cycles,
//! reachability), with no transaction left holding a lock.

use cfs_meta::command::{Command, Op, Outcome};
use cfs_meta::session::Session;
use cfs_meta::shard::ShardSlot;
use cfs_meta::txn::{check_shards, merge_shards, Action, TxnDriver, TxnStatus};
use cfs_meta::{Creds, Errno, FileType, InodeId, Namespace, RenameFlags, SetAttr, Timespec};
use cfs_nvme::rng::SimRng;

/// Knobs of one run (probabilities in parts per thousand).
#[derive(Clone, Debug)]
pub struct ShardSimConfig {
    /// Drives everything.
    pub seed: u64,
    /// Shards.
    pub shards: u16,
    /// Clients running operations at once (sequential mode: 1).
    pub clients: usize,
    /// Operations in all.
    pub ops: usize,
    /// One operation at a time, checked against a one-shard reference.
    pub sequential: bool,
    /// A message (request or reply) is lost.
    pub drop_per_mille: u64,
    /// A request is delivered twice.
    pub dup_per_mille: u64,
    /// Per step: a client with a transaction in flight crashes.
    pub crash_per_mille: u64,
    /// Per step: a shard restarts from its snapshot.
    pub restart_per_mille: u64,
    /// Print every step.
    pub trace: bool,
}

impl ShardSimConfig {
    /// Defaults for `seed`.
    pub fn new(seed: u64, shards: u16, sequential: bool) -> ShardSimConfig {
        ShardSimConfig {
            seed,
            shards,
            clients: if sequential { 1 } else { 4 },
            ops: 60,
            sequential,
            drop_per_mille: 60,
            dup_per_mille: 40,
            crash_per_mille: 8,
            restart_per_mille: 5,
            trace: std::env::var_os("CFS_SIM_TRACE").is_some(),
        }
    }
}

/// What happened in a run (to check the faults were real).
#[derive(Clone, Debug, Default)]
pub struct ShardReport {
    /// Operations finished with a result.
    pub finished: u64,
    /// Of those, succeeded.
    pub succeeded: u64,
    /// Transactions begun (operations that spanned shards).
    pub txns: u64,
    /// Attempts that found a lock held and retried.
    pub retries: u64,
    /// Drivers that crashed mid-operation.
    pub crashes: u64,
    /// Operations given up after a crash (outcome unknown to the client).
    pub abandoned: u64,
    /// Transactions the shards' recovery committed, and aborted.
    pub recovered_commits: u64,
    /// Transactions the shards' recovery aborted.
    pub recovered_aborts: u64,
    /// Messages lost.
    pub dropped: u64,
    /// Requests duplicated.
    pub duplicated: u64,
    /// Shard restarts from snapshot.
    pub restarts: u64,
}

/// Steps before a client resends an unanswered request.
const RESEND_AFTER: u64 = 30;
/// Milliseconds (= steps) before a participant asks about a transaction.
const ASK_AFTER_MS: i64 = 40;
/// Milliseconds (= steps) before a home shard aborts an undecided transaction.
const ABORT_AFTER_MS: i64 = 300;
/// Attempts of one operation before the run fails (livelock).
const MAX_ATTEMPTS: u32 = 400;
/// Steps before the run fails (something is stuck).
const MAX_STEPS: u64 = 2_000_000;

struct Msg {
    at: u64,
    order: u64,
    shard: u16,
    cmd: Command,
    client: usize,
    epoch: u64,
    req: u64,
}

struct Reply {
    at: u64,
    order: u64,
    client: usize,
    epoch: u64,
    req: u64,
    result: Result<Outcome, Errno>,
}

struct Running {
    cmd: Command,
    driver: TxnDriver,
    epoch: u64,
    req: u64,
    last: Option<(u16, Command)>,
    sent_at: u64,
    attempts: u32,
    wait_until: u64,
}

struct Client {
    id: u64,
    seq: u64,
    nonce: u64,
    run: Option<Running>,
    epoch: u64,
}

/// What a sequential run remembers of the operation in flight.
struct Pending {
    cmd: Command,
    abs: AbsOp,
    outcome: Option<Result<Outcome, Errno>>,
}

type Path = Vec<Vec<u8>>;

/// An operation by path, so the reference (whose inode numbers differ) runs the same one.
#[derive(Clone, Debug)]
enum AbsOp {
    Mkdir(Path, Vec<u8>, u32),
    Mknod(Path, Vec<u8>),
    Symlink(Path, Vec<u8>),
    Unlink(Path, Vec<u8>),
    Rmdir(Path, Vec<u8>),
    Rename(Path, Vec<u8>, Path, Vec<u8>, RenameFlags),
    Link(Path, Vec<u8>, Path, Vec<u8>),
    Chmod(Path, Vec<u8>, u32),
}

fn resolve(ns: &Namespace, path: &[Vec<u8>]) -> Option<InodeId> {
    let mut ino = InodeId::ROOT;
    for c in path {
        ino = ns.lookup(&Creds::root(), ino, c).ok()?.ino;
    }
    Some(ino)
}

impl AbsOp {
    /// The operation in `ns`'s inode numbers (`None` if a path does not resolve: in the
    /// middle of concurrent transactions the merged shards may be between states).
    fn op(&self, ns: &Namespace) -> Option<Op> {
        let child = |p: &Path, n: &Vec<u8>| {
            ns.lookup(&Creds::root(), resolve(ns, p)?, n)
                .ok()
                .map(|a| a.ino)
        };
        Some(match self.clone() {
            AbsOp::Mkdir(p, name, perm) => Op::Mkdir {
                parent: resolve(ns, &p)?,
                name,
                perm,
            },
            AbsOp::Mknod(p, name) => Op::Mknod {
                parent: resolve(ns, &p)?,
                name,
                kind: FileType::Regular,
                perm: 0o644,
                rdev: 0,
            },
            AbsOp::Symlink(p, name) => Op::Symlink {
                parent: resolve(ns, &p)?,
                name,
                target: b"x".to_vec(),
            },
            AbsOp::Unlink(p, name) => Op::Unlink {
                parent: resolve(ns, &p)?,
                name,
            },
            AbsOp::Rmdir(p, name) => Op::Rmdir {
                parent: resolve(ns, &p)?,
                name,
            },
            AbsOp::Rename(p, name, q, newname, flags) => Op::Rename {
                parent: resolve(ns, &p)?,
                name,
                newparent: resolve(ns, &q)?,
                newname,
                flags,
            },
            AbsOp::Link(p, name, q, newname) => Op::Link {
                ino: child(&p, &name)?,
                newparent: resolve(ns, &q)?,
                newname,
            },
            AbsOp::Chmod(p, name, perm) => Op::SetAttr {
                ino: child(&p, &name)?,
                set: SetAttr {
                    perm: Some(perm),
                    ..SetAttr::default()
                },
            },
        })
    }
}

fn at(step: u64) -> Timespec {
    Timespec::new(
        1_700_000_000 + (step / 1000) as i64,
        ((step % 1000) * 1_000_000) as u32,
    )
}

struct World {
    cfg: ShardSimConfig,
    rng: SimRng,
    shards: Vec<Namespace>,
    msgs: Vec<Msg>,
    replies: Vec<Reply>,
    clients: Vec<Client>,
    order: u64,
    step: u64,
    report: ShardReport,
}

impl World {
    fn fail(&self, what: String) -> String {
        format!(
            "seed {} step {}: {what} (replay: CFS_SIM_SEED={} cargo test -p cfs-sim --test shards)",
            self.cfg.seed, self.step, self.cfg.seed
        )
    }

    fn delay(&mut self) -> u64 {
        1 + self.rng.below(12)
    }

    fn send(&mut self, client: usize, shard: u16, cmd: Command) {
        let c = &self.clients[client];
        let r = c.run.as_ref().expect("sending without an operation");
        let (epoch, req) = (r.epoch, r.req);
        let copies = if self.rng.chance(self.cfg.dup_per_mille, 1000) {
            self.report.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            if self.rng.chance(self.cfg.drop_per_mille, 1000) {
                self.report.dropped += 1;
                continue;
            }
            let d = self.delay()
                * if copies == 2 {
                    1 + self.rng.below(20)
                } else {
                    1
                };
            self.order += 1;
            self.msgs.push(Msg {
                at: self.step + d,
                order: self.order,
                shard,
                cmd: cmd.clone(),
                client,
                epoch,
                req,
            });
        }
    }

    fn apply(&mut self, shard: u16, cmd: &Command) -> Result<Result<Outcome, Errno>, String> {
        let s = &mut self.shards[shard as usize];
        let r = s.apply(cmd);
        s.take_dirty();
        s.take_freed();
        if let Err(e) = s.check_invariants() {
            return Err(self.fail(format!("shard {shard} after {:?}: {e}", cmd.op)));
        }
        if self.cfg.trace {
            eprintln!("{} shard {shard} {:?} -> {:?}", self.step, cmd.op, r);
        }
        Ok(r)
    }

    /// A recovery step that must succeed.
    fn must(&mut self, shard: u16, cmd: &Command) -> Result<(), String> {
        match self.apply(shard, cmd)? {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(format!("recovery {:?} on shard {shard}: {e:?}", cmd.op))),
        }
    }

    /// Feeds `action` to client `c`: sends, or finishes.
    fn act(&mut self, c: usize, action: Action) -> Option<Result<Outcome, Errno>> {
        match action {
            Action::Send { shard, cmd } => {
                let r = self.clients[c]
                    .run
                    .as_mut()
                    .expect("acting without an operation");
                r.req += 1;
                r.last = Some((shard, cmd.clone()));
                r.sent_at = self.step;
                if matches!(cmd.op, Op::TxnBegin { .. }) {
                    self.report.txns += 1;
                }
                self.send(c, shard, cmd);
                None
            }
            Action::Finished(r) => Some(r),
        }
    }

    fn new_driver(&mut self, c: usize, cmd: Command) -> TxnDriver {
        let cl = &mut self.clients[c];
        cl.nonce += 1;
        TxnDriver::new(
            self.cfg.shards,
            cmd,
            Session {
                client: cl.id + 1_000_000,
                seq: cl.nonce,
            },
        )
    }

    fn start(&mut self, c: usize, cmd: Command, attempts: u32) {
        let mut driver = self.new_driver(c, cmd.clone());
        let first = driver.start();
        let cl = &mut self.clients[c];
        cl.epoch += 1;
        cl.run = Some(Running {
            cmd,
            driver,
            epoch: cl.epoch,
            req: 0,
            last: None,
            sent_at: self.step,
            attempts,
            wait_until: 0,
        });
        let _ = self.act(c, first);
    }

    /// One recovery round on every shard, as each shard's leader would run it.
    fn recover(&mut self) -> Result<(), String> {
        let now = at(self.step);
        let sys = |op: Op| Command {
            creds: Creds::root(),
            now,
            op,
            session: None,
        };
        for k in 0..self.shards.len() {
            let chores = self.shards[k].txn_chores(now, ASK_AFTER_MS, ABORT_AFTER_MS);
            for id in chores.abort {
                if self.apply(k as u16, &sys(Op::TxnAbort { id }))? == Ok(Outcome::Committed(false))
                {
                    self.report.recovered_aborts += 1;
                }
            }
            for (id, shard, writes) in chores.resend {
                self.must(shard, &sys(Op::TxnCommit { id, writes }))?;
                self.must(
                    id.home(),
                    &sys(Op::TxnAcked {
                        id,
                        shards: vec![shard],
                    }),
                )?;
                self.report.recovered_commits += 1;
            }
            for id in chores.ask {
                match self.shards[id.home() as usize].txn_status(id, k as u16) {
                    TxnStatus::InProgress => {}
                    TxnStatus::Committed(writes) => {
                        self.must(k as u16, &sys(Op::TxnCommit { id, writes }))?;
                        self.must(
                            id.home(),
                            &sys(Op::TxnAcked {
                                id,
                                shards: vec![k as u16],
                            }),
                        )?;
                        self.report.recovered_commits += 1;
                    }
                    TxnStatus::Unknown => {
                        self.must(k as u16, &sys(Op::TxnAbort { id }))?;
                        self.report.recovered_aborts += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Delivers what is due; returns finished operations (client, result).
    #[allow(clippy::type_complexity)]
    fn deliver(&mut self) -> Result<Vec<(usize, Running, Result<Outcome, Errno>)>, String> {
        let mut finished = Vec::new();
        let now = self.step;
        let mut due: Vec<Msg> = Vec::new();
        let mut keep = Vec::new();
        for m in self.msgs.drain(..) {
            if m.at <= now {
                due.push(m);
            } else {
                keep.push(m);
            }
        }
        self.msgs = keep;
        due.sort_by_key(|m| (m.at, m.order));
        for m in due {
            let result = self.apply(m.shard, &m.cmd)?;
            if self.rng.chance(self.cfg.drop_per_mille, 1000) {
                self.report.dropped += 1;
                continue;
            }
            self.order += 1;
            let d = self.delay();
            self.replies.push(Reply {
                at: now + d,
                order: self.order,
                client: m.client,
                epoch: m.epoch,
                req: m.req,
                result,
            });
        }
        let mut due: Vec<Reply> = Vec::new();
        let mut keep = Vec::new();
        for r in self.replies.drain(..) {
            if r.at <= now {
                due.push(r);
            } else {
                keep.push(r);
            }
        }
        self.replies = keep;
        due.sort_by_key(|r| (r.at, r.order));
        for r in due {
            let current = self.clients[r.client]
                .run
                .as_ref()
                .is_some_and(|x| x.epoch == r.epoch && x.req == r.req && x.wait_until == 0);
            if !current {
                continue; // a reply to a dead driver, or to an earlier step
            }
            let action = {
                let run = self.clients[r.client].run.as_mut().expect("checked above");
                run.driver.on_reply(r.result)
            };
            if let Some(res) = self.act(r.client, action) {
                let run = self.clients[r.client].run.take().expect("checked above");
                finished.push((r.client, run, res));
            }
        }
        Ok(finished)
    }

    fn idle(&self) -> bool {
        self.msgs.is_empty() && self.replies.is_empty() && self.shards.iter().all(|s| s.txn_idle())
    }

    /// A random operation on what exists now.
    fn random_op(&mut self, c: usize) -> (Command, AbsOp) {
        let refs: Vec<&Namespace> = self.shards.iter().collect();
        let whole = merge_shards(&refs);
        let dirs = dirs_of(&whole);
        let names: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];
        let rng = &mut self.rng;
        let (dir, dir_ino) = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let (dir2, _) = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let name = names[rng.below(5) as usize].to_vec();
        let name2 = names[rng.below(5) as usize].to_vec();
        let exists = whole.lookup(&Creds::root(), dir_ino, &name).is_ok();
        let abs = match rng.below(100) {
            0..=19 => AbsOp::Mkdir(dir, name, 0o755),
            20..=34 => AbsOp::Mknod(dir, name),
            35..=44 => AbsOp::Unlink(dir, name),
            45..=54 => AbsOp::Rmdir(dir, name),
            55..=79 => AbsOp::Rename(
                dir,
                name,
                dir2,
                name2,
                RenameFlags {
                    noreplace: rng.chance(1, 10),
                    exchange: rng.chance(1, 10),
                },
            ),
            80..=89 if exists => AbsOp::Link(dir, name, dir2, name2),
            80..=89 => AbsOp::Symlink(dir, name),
            _ if exists => AbsOp::Chmod(dir, name, 0o700 | (rng.below(8) as u32)),
            _ => AbsOp::Mkdir(dir, name, 0o700),
        };
        let op = abs.op(&whole).unwrap_or(Op::Mknod {
            parent: InodeId::ROOT,
            name: b"z".to_vec(),
            kind: FileType::Regular,
            perm: 0o644,
            rdev: 0,
        });
        let cl = &mut self.clients[c];
        cl.seq += 1;
        let creds = if self.rng.chance(1, 12) {
            Creds {
                uid: 1000,
                gid: 1000,
                groups: Vec::new(),
            }
        } else {
            Creds::root()
        };
        let cmd = Command {
            creds,
            now: at(self.step),
            op,
            session: Some(Session {
                client: cl.id,
                seq: cl.seq << 8,
            }),
        };
        (cmd, abs)
    }
}

fn dirs_of(ns: &Namespace) -> Vec<(Path, InodeId)> {
    let mut out = vec![(Vec::new(), InodeId::ROOT)];
    let mut i = 0;
    while i < out.len() {
        let (path, d) = out[i].clone();
        if let Ok(es) = ns.readdir(&Creds::root(), d, 0, 1000) {
            for e in es {
                if e.kind == FileType::Directory && e.name != b"." && e.name != b".." {
                    let mut p = path.clone();
                    p.push(e.name);
                    out.push((p, e.ino));
                }
            }
        }
        i += 1;
    }
    out
}

/// Runs one seeded simulation.
pub fn run_shards(cfg: &ShardSimConfig) -> Result<ShardReport, String> {
    let slots = (0..cfg.shards).map(|k| ShardSlot::new(k, cfg.shards).expect("valid shard count"));
    let shards: Vec<Namespace> = slots
        .map(|s| Namespace::new_shard(s, 0, 0, 0o755, at(0)))
        .collect();
    let mut w = World {
        rng: SimRng::new(cfg.seed),
        cfg: cfg.clone(),
        shards,
        msgs: Vec::new(),
        replies: Vec::new(),
        clients: (0..cfg.clients)
            .map(|i| Client {
                id: i as u64 + 1,
                seq: 0,
                nonce: 0,
                run: None,
                epoch: 0,
            })
            .collect(),
        order: 0,
        step: 0,
        report: ShardReport::default(),
    };
    let mut reference = Namespace::new(0, 0, 0o755, at(0));
    let mut started = 0usize;
    let mut pending: Option<Pending> = None;
    loop {
        w.step += 1;
        if w.step > MAX_STEPS {
            return Err(w.fail("did not finish (stuck)".into()));
        }
        let finished = w.deliver()?;
        for (c, run, res) in finished {
            match res {
                Err(Errno::Again) => {
                    w.report.retries += 1;
                    if run.attempts >= MAX_ATTEMPTS {
                        return Err(w.fail(format!("{:?} retried forever", run.cmd.op)));
                    }
                    // Back off, then the same command (same session) again.
                    let pause = 1 + w.rng.below(40 * u64::from(run.attempts.min(8) + 1));
                    let mut driver = w.new_driver(c, run.cmd.clone());
                    let first = driver.start();
                    let cl = &mut w.clients[c];
                    cl.epoch += 1;
                    cl.run = Some(Running {
                        cmd: run.cmd,
                        driver,
                        epoch: cl.epoch,
                        req: 0,
                        last: match first {
                            Action::Send { shard, cmd } => Some((shard, cmd)),
                            Action::Finished(_) => unreachable!("start always sends"),
                        },
                        sent_at: w.step,
                        attempts: run.attempts + 1,
                        wait_until: w.step + pause,
                    });
                }
                res => {
                    w.report.finished += 1;
                    if res.is_ok() {
                        w.report.succeeded += 1;
                    }
                    if let Some(p) = pending.as_mut() {
                        p.outcome = Some(res);
                    }
                }
            }
        }
        // Clients: backoff over, resends, crashes.
        for c in 0..w.clients.len() {
            let (resend, crash) = match w.clients[c].run.as_ref() {
                None => continue,
                Some(r) if r.wait_until > 0 => {
                    if w.step >= r.wait_until {
                        let cl = w.clients[c].run.as_mut().expect("checked");
                        cl.wait_until = 0;
                        cl.req += 1;
                        cl.sent_at = w.step;
                        let (shard, cmd) = cl.last.clone().expect("set at retry");
                        w.send(c, shard, cmd);
                    }
                    continue;
                }
                Some(r) => (
                    w.step - r.sent_at > RESEND_AFTER,
                    r.driver.id().is_some() && w.rng.chance(w.cfg.crash_per_mille, 1000),
                ),
            };
            if crash {
                w.report.crashes += 1;
                let run = w.clients[c].run.take().expect("checked");
                w.clients[c].epoch += 1;
                if w.rng.chance(1, 2) {
                    // Comes back and resends the same operation (same session).
                    w.start(c, run.cmd, run.attempts + 1);
                } else {
                    w.report.abandoned += 1;
                }
            } else if resend {
                let cl = w.clients[c].run.as_mut().expect("checked");
                cl.sent_at = w.step;
                let (shard, cmd) = cl.last.clone().expect("something was sent");
                w.send(c, shard, cmd);
            }
        }
        if w.rng.chance(cfg.restart_per_mille, 1000) {
            let k = w.rng.below(u64::from(cfg.shards)) as usize;
            let snap = w.shards[k].snapshot();
            let back = Namespace::from_snapshot(&snap)
                .map_err(|e| w.fail(format!("shard {k} snapshot does not load: {e}")))?;
            if back.snapshot() != snap {
                return Err(w.fail(format!("shard {k} snapshot does not round-trip")));
            }
            w.shards[k] = back;
            w.report.restarts += 1;
        }
        if w.step.is_multiple_of(10) {
            w.recover()?;
        }
        // New operations.
        let busy = w.clients.iter().any(|c| c.run.is_some());
        if cfg.sequential {
            if !busy && w.idle() {
                if let Some(p) = pending.take() {
                    check_sequential(&w, &mut reference, p)?;
                }
                if started == cfg.ops {
                    break;
                }
                let (cmd, abs) = w.random_op(0);
                pending = Some(Pending {
                    cmd: cmd.clone(),
                    abs,
                    outcome: None,
                });
                started += 1;
                w.start(0, cmd, 0);
            }
        } else {
            for c in 0..w.clients.len() {
                if w.clients[c].run.is_none() && started < cfg.ops && w.rng.chance(1, 20) {
                    let (cmd, _) = w.random_op(c);
                    started += 1;
                    w.start(c, cmd, 0);
                }
            }
            if started == cfg.ops && !busy && w.idle() {
                break;
            }
        }
    }
    let refs: Vec<&Namespace> = w.shards.iter().collect();
    check_shards(&refs).map_err(|e| w.fail(format!("at the end: {e}")))?;
    Ok(w.report)
}

/// After one operation and quiescence: the shards together list like the reference with the
/// operation applied (told success), not applied (told an error: the same one), or either
/// (given up).
fn check_sequential(w: &World, reference: &mut Namespace, p: Pending) -> Result<(), String> {
    let refs: Vec<&Namespace> = w.shards.iter().collect();
    check_shards(&refs).map_err(|e| w.fail(format!("after {:?}: {e}", p.cmd.op)))?;
    let got = merge_shards(&refs).listing();
    let before = reference.listing();
    let mut after_ns = reference.clone();
    let want = after_ns.apply(&Command {
        session: None,
        op: p
            .abs
            .op(reference)
            .expect("the reference resolves what the shards did"),
        ..p.cmd.clone()
    });
    let after = after_ns.listing();
    let took = if got == after {
        true
    } else if got == before {
        false
    } else {
        return Err(w.fail(format!(
            "{:?} (creds {}) left neither the state before nor after it:\n got {got:#?}\n before {before:#?}\n after {after:#?}",
            p.cmd.op, p.cmd.creds.uid
        )));
    };
    match &p.outcome {
        Some(Ok(o)) => {
            if !took && before != after {
                return Err(w.fail(format!("{:?} told success but had no effect", p.cmd.op)));
            }
            let same = match (o, &want) {
                (Outcome::Attr(a), Ok(Outcome::Attr(b))) => {
                    (a.kind, a.perm, a.nlink, a.uid) == (b.kind, b.perm, b.nlink, b.uid)
                }
                (o, Ok(b)) => std::mem::discriminant(o) == std::mem::discriminant(b),
                (_, Err(_)) => false,
            };
            if !same {
                return Err(w.fail(format!(
                    "{:?}: shards answered {o:?}, the reference {want:?}",
                    p.cmd.op
                )));
            }
        }
        Some(Err(e)) => {
            if took && before != after {
                return Err(w.fail(format!("{:?} told {e:?} but took effect", p.cmd.op)));
            }
            if want.as_ref().err() != Some(e) {
                return Err(w.fail(format!(
                    "{:?}: shards answered {e:?}, the reference {want:?}",
                    p.cmd.op
                )));
            }
        }
        None => {}
    }
    if took {
        *reference = after_ns;
    }
    Ok(())
}

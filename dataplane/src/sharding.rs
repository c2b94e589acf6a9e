//! Metadata shards at run time (the shard map and the transaction protocol are in
//! `cfs_meta::shard` and `cfs_meta::txn`): each node runs one Raft group per shard; a request
//! goes to the leader of its shard's group (the shard of the inode or parent directory it
//! names); a command another shard must apply is proposed there through its leader
//! ([`SHARD_METHOD`]); an operation its home shard cannot do alone runs as a cross-shard
//! transaction driven by the node serving it ([`TxnDriver`]), which keeps nothing durable: the
//! leaders of the shards finish or undo transactions whose coordinator died
//! (`FsService::txn_chores`). Shard 0's group holds the cluster membership; the leaders of
//! the other groups make their group's membership follow it (`FsService::mirror_members`).

use crate::cluster::{Cluster, ClusterError};
use crate::fs_service::{
    cluster_error, errno, internal, now, read_error, FsService, NOT_LEADER, OUTCOME_UNKNOWN,
};
use cfs_fabric::{ErrorCode, RpcError, ServiceError};
use cfs_meta::codec::{Reader, Writer};
use cfs_meta::command::{Command, Op, Outcome};
use cfs_meta::namespace::FsStats;
use cfs_meta::session::Session;
use cfs_meta::shard::{preferred_leader, shard_of_id};
use cfs_meta::txn::{decode_writes, encode_writes, home_shard, Action, TxId, TxnDriver, TxnStatus};
use cfs_meta::{ChunkId, Creds, Errno, InodeId};
use cfs_meta_replica::MemberChange;
use cfs_proto::{Reply, Request, ShardRoute};
use std::time::{Duration, Instant};

/// RPC method between nodes for one shard's group: `u8 kind | u16 shard | body`, answered by
/// the group's leader (else NOT_LEADER):
/// - kind 0, propose: body = a command; answer `u8 0 | outcome` or `u8 1 | u32 errno`;
/// - kind 1, transaction status: body = `u64 txid | u16 asking shard`; answer `u8 0` (in
///   progress), `u8 1 | writes` (committed), `u8 2` (unknown: abort);
/// - kind 2, totals: answer `u64 inodes | u64 bytes`.
pub const SHARD_METHOD: u32 = 0x0100_0005;

const KIND_PROPOSE: u8 = 0;
const KIND_STATUS: u8 = 1;
const KIND_STATS: u8 = 2;

/// A participant asks its transaction's home shard after this long.
const ASK_AFTER_MS: i64 = 3_000;
/// A home shard aborts a transaction still undecided after this long (well past the
/// coordinator's own deadline, so a live coordinator is never cut short).
const ABORT_AFTER_MS: i64 = 60_000;
/// How long a coordinator keeps retrying a transaction that finds locks held.
const TXN_DEADLINE: Duration = Duration::from_secs(20);
/// Session client ids of transaction begins: this bit and the node id.
const TXN_CLIENT: u64 = 1 << 62;
/// A group's leader hands leadership to the shard's preferred voter at most this often (a
/// transfer costs a short pause in the group; a voter that keeps failing to take over must
/// not stall it again and again).
const BALANCE_EVERY: Duration = Duration::from_secs(10);

fn encode_result(r: &Result<Outcome, Errno>) -> Vec<u8> {
    let mut w = Writer::default();
    match r {
        Ok(o) => {
            w.u8(0);
            w.0.extend_from_slice(&o.encode());
        }
        Err(e) => {
            w.u8(1);
            w.u32(e.errno() as u32);
        }
    }
    w.0
}

fn decode_result(b: &[u8]) -> Option<Result<Outcome, Errno>> {
    match *b.first()? {
        0 => Some(Ok(Outcome::decode(&b[1..])?)),
        1 => {
            let mut r = Reader::new(&b[1..]);
            let e = Errno::from_errno(r.u32()? as i32)?;
            r.end()?;
            Some(Err(e))
        }
        _ => None,
    }
}

fn encode_status(s: &TxnStatus) -> Vec<u8> {
    let mut w = Writer::default();
    match s {
        TxnStatus::InProgress => w.u8(0),
        TxnStatus::Committed(ws) => {
            w.u8(1);
            encode_writes(&mut w, ws);
        }
        TxnStatus::Unknown => w.u8(2),
    }
    w.0
}

fn decode_status(b: &[u8]) -> Option<TxnStatus> {
    let mut r = Reader::new(b);
    let s = match r.u8()? {
        0 => TxnStatus::InProgress,
        1 => TxnStatus::Committed(decode_writes(&mut r)?),
        2 => TxnStatus::Unknown,
        _ => return None,
    };
    r.end()?;
    Some(s)
}

/// Marks a transaction this node coordinates as running, for as long as it lives.
struct Running<'a>(&'a FsService, u64);

impl<'a> Running<'a> {
    fn new(svc: &'a FsService, seq: u64) -> Running<'a> {
        svc.running_txns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq);
        Running(svc, seq)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .running_txns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

fn bad_request(what: &str) -> ServiceError {
    ServiceError::new(ErrorCode::BadRequest, what.to_string())
}

fn unknown(what: String) -> ServiceError {
    ServiceError::new(ErrorCode::Service(OUTCOME_UNKNOWN), what)
}

impl FsService {
    /// Shards of the namespace (1 on a single node).
    pub(crate) fn shard_count(&self) -> u16 {
        self.groups().len().max(1) as u16
    }

    /// The group serving the shard of `ino` (cluster nodes only).
    pub(crate) fn group_for(&self, ino: InodeId) -> &Cluster {
        &self.groups()[shard_of_id(self.shard_count(), ino.0) as usize]
    }

    /// The group recording `chunk` (that of the file it belongs to).
    pub(crate) fn group_for_chunk(&self, chunk: ChunkId) -> &Cluster {
        &self.groups()[shard_of_id(self.shard_count(), chunk.0) as usize]
    }

    /// The shard whose leader serves `req`: that of the inode, or the parent directory, it
    /// names (shard 0 for requests about the whole file system).
    pub fn request_shard(&self, req: &Request) -> u16 {
        req.shard(self.shard_count())
    }

    /// Each shard's leader as this node knows it ([`Request::Routes`]; empty without shards).
    pub(crate) fn routes(&self) -> Vec<ShardRoute> {
        self.groups()
            .iter()
            .map(|g| {
                // (The replica lock is let go before `address` takes it again.)
                let leader = g.replica().leader();
                let leader = leader.unwrap_or(0);
                let addr = if leader == 0 {
                    String::new()
                } else {
                    g.address(leader).unwrap_or_default()
                };
                ShardRoute { leader, addr }
            })
            .collect()
    }

    /// A mutation in a cluster: proposed on its home shard, run as a transaction if it spans
    /// shards, retried while transactions hold what it needs.
    pub(crate) fn exec_sharded(&self, cmd: Command) -> Result<Outcome, ServiceError> {
        let shard = home_shard(self.shard_count(), &cmd.op);
        let deadline = Instant::now() + TXN_DEADLINE;
        let mut attempt: u32 = 0;
        loop {
            let r = match self.propose_on(shard, &cmd, false)? {
                Err(Errno::XDev) => self.run_txn(&cmd)?,
                r => r,
            };
            match r {
                Err(Errno::Again) if Instant::now() < deadline => {
                    attempt += 1;
                    // Jittered, growing pause: contending transactions drift apart.
                    let jitter = self.txn_seq.load(std::sync::atomic::Ordering::Relaxed) % 7;
                    let ms = (5u64 << attempt.min(5)) + jitter * 3;
                    std::thread::sleep(Duration::from_millis(ms));
                }
                Err(Errno::Again) => {
                    return Err(ServiceError::new(
                        ErrorCode::Busy,
                        "metadata held by other transactions; try again",
                    ))
                }
                r => return r.map_err(errno),
            }
        }
    }

    /// Runs `cmd`, which its home shard answered `XDev` to, as a cross-shard transaction.
    /// A failure after it began is an unknown outcome: the shards' recovery finishes or undoes
    /// it, and a resend (same session) finds the result if it committed.
    fn run_txn(&self, cmd: &Command) -> Result<Result<Outcome, Errno>, ServiceError> {
        let node = self.groups()[0].node_id();
        let nonce = Session {
            client: TXN_CLIENT | node,
            seq: self
                .txn_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let running = Running::new(self, nonce.seq);
        let mut d = TxnDriver::new(self.shard_count(), cmd.clone(), nonce);
        let _ = d.start();
        let mut a = d.on_reply(Err(Errno::XDev));
        loop {
            match a {
                Action::Send { shard, cmd: step } => {
                    let r = match self.propose_on(shard, &step, true) {
                        Ok(r) => r,
                        Err(e) if d.id().is_none() => return Err(e),
                        Err(e) => {
                            return Err(unknown(format!("transaction interrupted: {}", e.message)))
                        }
                    };
                    a = d.on_reply(r);
                }
                Action::Finished(r) => {
                    drop(running);
                    return Ok(r);
                }
            }
        }
    }

    /// Proposes `cmd` on `shard`'s group: here if this node leads it, else through its
    /// leader. `resend`: the command is idempotent, so one whose outcome is unknown (timeout,
    /// lost connection) is proposed again rather than reported.
    pub(crate) fn propose_on(
        &self,
        shard: u16,
        cmd: &Command,
        resend: bool,
    ) -> Result<Result<Outcome, Errno>, ServiceError> {
        let g = &self.groups()[shard as usize];
        let give_up = Instant::now() + g.election_timeout() * 6;
        let mut payload = vec![KIND_PROPOSE];
        payload.extend_from_slice(&shard.to_le_bytes());
        payload.extend_from_slice(&cmd.encode());
        loop {
            // (Each lock on the replica is taken and let go at once: `client` takes it too.)
            let (leads, leader) = {
                let r = g.replica();
                (r.is_leader(), r.leader())
            };
            if leads {
                match g.propose(cmd.clone()) {
                    Ok(r) => return Ok(r),
                    Err(ClusterError::NotLeader(_)) | Err(ClusterError::Busy) => {}
                    Err(ClusterError::Timeout) if resend => {}
                    Err(e) => return Err(cluster_error(e)),
                }
            } else if let Some(l) = leader.filter(|l| *l != g.node_id()) {
                if let Some(client) = g.client(l) {
                    let rt = tokio::runtime::Handle::current();
                    match rt.block_on(client.call(SHARD_METHOD, &payload)) {
                        Ok(b) => {
                            return decode_result(&b)
                                .ok_or_else(|| internal(format!("bad answer from shard {shard}")))
                        }
                        Err(RpcError::Remote {
                            code: ErrorCode::Service(NOT_LEADER) | ErrorCode::Busy,
                            ..
                        }) => {}
                        Err(RpcError::Remote {
                            code: ErrorCode::Service(OUTCOME_UNKNOWN),
                            message,
                        }) => {
                            if !resend {
                                return Err(unknown(message));
                            }
                        }
                        Err(RpcError::Remote { code, message }) => {
                            return Err(ServiceError::new(code, message))
                        }
                        Err(e @ RpcError::Connect { .. }) => {
                            tracing::debug!("shard {shard} leader {l}: {e}")
                        }
                        Err(e) => {
                            if !resend {
                                return Err(unknown(format!("shard {shard} leader {l}: {e}")));
                            }
                        }
                    }
                }
            }
            if Instant::now() >= give_up {
                return Err(ServiceError::new(
                    ErrorCode::Busy,
                    format!("no leader of metadata shard {shard} reachable"),
                ));
            }
            std::thread::sleep(g.tick());
        }
    }

    /// Asks `shard`'s leader (`kind`, `body`) and returns its answer.
    fn ask_shard(&self, shard: u16, kind: u8, body: &[u8]) -> Result<bytes::Bytes, ServiceError> {
        let g = &self.groups()[shard as usize];
        let give_up = Instant::now() + g.election_timeout() * 6;
        let mut payload = vec![kind];
        payload.extend_from_slice(&shard.to_le_bytes());
        payload.extend_from_slice(body);
        loop {
            let (leads, leader) = {
                let r = g.replica();
                (r.is_leader(), r.leader())
            };
            if let Some(l) = leader.filter(|l| *l != g.node_id()) {
                if let Some(client) = g.client(l) {
                    let rt = tokio::runtime::Handle::current();
                    match rt.block_on(client.call(SHARD_METHOD, &payload)) {
                        Ok(b) => return Ok(b),
                        Err(RpcError::Remote {
                            code: ErrorCode::Service(NOT_LEADER) | ErrorCode::Busy,
                            ..
                        }) => {}
                        Err(RpcError::Remote { code, message }) => {
                            return Err(ServiceError::new(code, message))
                        }
                        Err(e) => tracing::debug!("shard {shard} leader {l}: {e}"),
                    }
                }
            } else if leads {
                return Err(ServiceError::new(
                    ErrorCode::Service(NOT_LEADER),
                    "this node leads the shard",
                ));
            }
            if Instant::now() >= give_up {
                return Err(ServiceError::new(
                    ErrorCode::Busy,
                    format!("no leader of metadata shard {shard} reachable"),
                ));
            }
            std::thread::sleep(g.tick());
        }
    }

    /// What `id`'s home shard knows of it, for participant `shard`.
    fn txn_status(&self, id: TxId, shard: u16) -> Result<TxnStatus, ServiceError> {
        let home = &self.groups()[id.home() as usize];
        if home.replica().is_leader() {
            return home.read(|ns| ns.txn_status(id, shard)).map_err(read_error);
        }
        let mut body = id.0.to_le_bytes().to_vec();
        body.extend_from_slice(&shard.to_le_bytes());
        let b = self.ask_shard(id.home(), KIND_STATUS, &body)?;
        decode_status(&b).ok_or_else(|| internal("bad transaction status".into()))
    }

    /// File-system totals: every shard's added up.
    pub(crate) fn statfs(&self) -> Result<FsStats, ServiceError> {
        let groups = self.groups();
        if groups.is_empty() {
            return self.view(InodeId::ROOT, |ns| Ok(ns.stats()));
        }
        let mut total = FsStats {
            inodes: 0,
            bytes: 0,
        };
        for g in groups {
            let st = if g.replica().is_leader() {
                g.read(|ns| ns.stats()).map_err(read_error)?
            } else {
                let b = self.ask_shard(g.shard().index, KIND_STATS, &[])?;
                let mut r = Reader::new(&b);
                (|| {
                    let s = FsStats {
                        inodes: r.u64()?,
                        bytes: r.u64()?,
                    };
                    r.end()?;
                    Some(s)
                })()
                .ok_or_else(|| internal("bad shard totals".into()))?
            };
            total.inodes += st.inodes;
            total.bytes += st.bytes;
        }
        Ok(total)
    }

    /// Runs `req` where it belongs: here if this node leads its shard, else on the leader.
    pub(crate) fn sub_request(&self, creds: &Creds, req: Request) -> Result<Reply, ServiceError> {
        if self.groups().is_empty() {
            return self.handle(creds, req);
        }
        let g = &self.groups()[self.request_shard(&req) as usize];
        if !g.replica().is_leader() {
            let (method, payload) = (req.method(), req.encode(creds));
            let rt = tokio::runtime::Handle::current();
            match rt.block_on(self.forward(g, method, &payload, true)) {
                Ok(b) => {
                    return Reply::decode(&b).ok_or_else(|| internal("bad forwarded reply".into()))
                }
                Err(e) if e.code == ErrorCode::Service(NOT_LEADER) => {}
                Err(e) => return Err(e),
            }
        }
        self.handle(creds, req)
    }

    /// A [`SHARD_METHOD`] request from another node.
    pub(crate) async fn serve_shard_call(
        &self,
        payload: bytes::Bytes,
    ) -> Result<bytes::Bytes, ServiceError> {
        if payload.len() < 3 {
            return Err(bad_request("short shard request"));
        }
        let kind = payload[0];
        let shard = u16::from_le_bytes([payload[1], payload[2]]);
        let Some(g) = self.groups().get(shard as usize).cloned() else {
            return Err(bad_request("no such metadata shard here"));
        };
        if !g.replica().is_leader() {
            return Err(ServiceError::new(
                ErrorCode::Service(NOT_LEADER),
                "not the shard's leader",
            ));
        }
        let body = payload.slice(3..);
        let run = move || -> Result<Vec<u8>, ServiceError> {
            match kind {
                KIND_PROPOSE => {
                    let cmd = Command::decode(&body).ok_or_else(|| bad_request("bad command"))?;
                    match g.propose(cmd) {
                        Ok(r) => Ok(encode_result(&r)),
                        Err(e) => Err(cluster_error(e)),
                    }
                }
                KIND_STATUS => {
                    let mut r = Reader::new(&body);
                    let (id, asking) = (|| Some((TxId(r.u64()?), r.u16()?)))()
                        .ok_or_else(|| bad_request("bad status request"))?;
                    let s = g.read(|ns| ns.txn_status(id, asking)).map_err(read_error)?;
                    Ok(encode_status(&s))
                }
                KIND_STATS => {
                    let st = g.read(|ns| ns.stats()).map_err(read_error)?;
                    let mut w = Writer::default();
                    w.u64(st.inodes);
                    w.u64(st.bytes);
                    Ok(w.0)
                }
                _ => Err(bad_request("unknown shard request")),
            }
        };
        tokio::task::spawn_blocking(run)
            .await
            .map_err(|e| ServiceError::new(ErrorCode::Internal, e.to_string()))?
            .map(bytes::Bytes::from)
    }

    /// Recovery of transactions this leader's shard takes part in and nobody is finishing:
    /// abort the undecided ones it is home to, resend unacknowledged commits, and ask the home
    /// shard about prepares held too long.
    pub(crate) fn txn_chores(&self, c: &Cluster) {
        let me = c.shard().index;
        let chores = c.read_local(|ns| ns.txn_chores(now(), ASK_AFTER_MS, ABORT_AFTER_MS));
        let sys = |op: Op| Command {
            creds: Creds::root(),
            now: now(),
            op,
            session: None,
        };
        // Undecided and its coordinator is gone (this node, restarted or given up on it; or
        // a node silent for a few elections): no need to wait for the long timeout.
        let g0 = &self.groups()[0];
        let gone = |by: &Option<Session>| {
            let Some(by) = by.filter(|b| b.client & TXN_CLIENT != 0) else {
                return false;
            };
            let node = by.client & !TXN_CLIENT;
            if node == c.node_id() {
                return !self
                    .running_txns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&by.seq);
            }
            !g0.members().contains(&node)
                || g0
                    .silent_for(node)
                    .is_some_and(|d| d > g0.election_timeout() * 3)
        };
        let early: Vec<TxId> = chores
            .undecided
            .iter()
            .filter(|(_, by)| gone(by))
            .map(|(id, _)| *id)
            .collect();
        for id in chores.abort.into_iter().chain(early) {
            match self.propose_on(me, &sys(Op::TxnAbort { id }), true) {
                Ok(Ok(Outcome::Committed(false))) => {
                    tracing::warn!("{id}: coordinator gone before deciding; aborted")
                }
                Ok(r) => tracing::debug!("{id}: abort answered {r:?}"),
                Err(e) => tracing::info!("{id}: abort not done yet: {e}"),
            }
        }
        for (id, shard, writes) in chores.resend {
            let done = self
                .propose_on(shard, &sys(Op::TxnCommit { id, writes }), true)
                .and_then(|_| {
                    self.propose_on(
                        me,
                        &sys(Op::TxnAcked {
                            id,
                            shards: vec![shard],
                        }),
                        true,
                    )
                });
            match done {
                Ok(_) => tracing::info!("{id}: commit delivered to shard {shard}"),
                Err(e) => tracing::info!("{id}: commit to shard {shard} not delivered yet: {e}"),
            }
        }
        for id in chores.ask {
            let step = match self.txn_status(id, me) {
                Ok(TxnStatus::InProgress) => continue,
                Ok(TxnStatus::Committed(writes)) => self
                    .propose_on(me, &sys(Op::TxnCommit { id, writes }), true)
                    .and_then(|_| {
                        self.propose_on(
                            id.home(),
                            &sys(Op::TxnAcked {
                                id,
                                shards: vec![me],
                            }),
                            true,
                        )
                    })
                    .map(|_| "committed"),
                Ok(TxnStatus::Unknown) => self
                    .propose_on(me, &sys(Op::TxnAbort { id }), true)
                    .map(|_| "aborted"),
                Err(e) => Err(e),
            };
            match step {
                Ok(what) => tracing::warn!("{id}: coordinator gone; {what} on shard {me}"),
                Err(e) => tracing::info!("{id}: cannot settle yet: {e}"),
            }
        }
    }

    /// With several shards, the leader of `c` hands leadership to the shard's preferred voter
    /// (`preferred_leader`: shards spread over the nodes) once that voter is caught up and
    /// answering; at most once per [`BALANCE_EVERY`] (`last`: this group's last attempt).
    pub(crate) fn balance_leader(&self, c: &Cluster, last: &mut Option<Instant>) {
        if self.shard_count() < 2 || last.is_some_and(|t| t.elapsed() < BALANCE_EVERY) {
            return;
        }
        let voters = c.conf_state().voters;
        let shard = c.shard().index;
        let Some(to) = preferred_leader(shard, &voters).filter(|v| *v != c.node_id()) else {
            return;
        };
        // (The replica lock is taken for this statement only.)
        let started = c.replica().transfer_leader(to);
        if started {
            *last = Some(Instant::now());
            tracing::info!("shard {shard}: handing leadership to node {to} (its preferred leader)");
        }
    }

    /// Makes the membership of `c` (a shard other than 0) follow shard 0's, one change per
    /// call: add members it lacks (as learners), remove members shard 0 removed, promote the
    /// members shard 0 has as voters.
    pub(crate) fn mirror_members(&self, g0: &Cluster, c: &Cluster) {
        let want = g0.read_local(|ns| ns.placement().members().clone());
        let want_cs = g0.conf_state();
        let have = c.read_local(|ns| ns.placement().members().clone());
        let have_cs = c.conf_state();
        let in_conf = |id: &u64| have_cs.voters.contains(id) || have_cs.learners.contains(id);
        let add = |id: u64, m: &cfs_meta::placement::Member| Command {
            creds: Creds::root(),
            now: now(),
            op: Op::AddMember {
                id,
                addr: m.addr.clone(),
                domain: m.domain.clone(),
            },
            session: None,
        };
        let change = if let Some((id, m)) = want
            .iter()
            .find(|(id, _)| !have.contains_key(id) && !in_conf(id))
        {
            Some((add(*id, m), MemberChange::AddLearner, *id))
        } else if let Some(id) = have.keys().find(|id| !want.contains_key(id)) {
            let cmd = Command {
                creds: Creds::root(),
                now: now(),
                op: Op::RemoveMember { id: *id },
                session: None,
            };
            Some((cmd, MemberChange::Remove, *id))
        } else {
            want_cs
                .voters
                .iter()
                .find(|id| have_cs.learners.contains(id))
                .and_then(|id| {
                    want.get(id)
                        .map(|m| (add(*id, m), MemberChange::AddVoter, *id))
                })
        };
        let Some((cmd, how, id)) = change else {
            return;
        };
        let shard = c.shard().index;
        match c.propose_member(cmd, how) {
            Ok(Ok(_)) => tracing::info!("shard {shard}: member {id} {how:?} (following shard 0)"),
            Ok(Err(e)) => tracing::warn!("shard {shard}: member {id} {how:?} refused: {e:?}"),
            Err(e) => tracing::debug!("shard {shard}: member {id} {how:?} not done yet: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip() {
        for r in [
            Ok(Outcome::Unit),
            Ok(Outcome::Committed(true)),
            Err(Errno::XDev),
        ] {
            assert_eq!(decode_result(&encode_result(&r)), Some(r));
        }
        assert_eq!(decode_result(&[7]), None);
        for s in [
            TxnStatus::InProgress,
            TxnStatus::Unknown,
            TxnStatus::Committed(Vec::new()),
        ] {
            assert_eq!(decode_status(&encode_status(&s)), Some(s));
        }
        assert_eq!(decode_status(&[1]), None);
    }
}

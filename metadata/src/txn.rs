//! Operations that span metadata shards (a `mkdir` whose new directory lives on another shard,
//! `rename`, `link`, `unlink` or `rmdir` of an inode on another shard): two-phase commit in which
//! every step is a command in some shard's Raft log, so a crash of any node at any step leaves
//! a state the survivors finish or undo. The protocol (also in `docs/architecture.md`):
//!
//! 1. The coordinator (whoever serves the request; it keeps nothing durable itself) tries the
//!    operation on its home shard; the shard answers [`Errno::XDev`] when it cannot do it alone.
//! 2. `TxnBegin` on the home shard allocates the transaction id, records it **in progress**,
//!    and locks and reads the home shard's part. `TxnPrepare` on each other shard locks and reads
//!    more (inodes; entries of locked directories; the first entry of a locked directory, for
//!    emptiness), until the records read cover everything the operation needs ([`needs`]). A
//!    lock held by another transaction fails the step with [`Errno::Again`]: nobody waits on a
//!    lock, so there is no deadlock; the coordinator aborts and retries after a pause.
//! 3. The coordinator runs the ordinary namespace code on a view built from the locked records
//!    and turns what changed into per-shard writes (whole inode records and entries).
//! 4. `TxnDecide` on the home shard is the commit point: it applies the home shard's writes and
//!    records the others' (**committed**). Then `TxnCommit` on each other shard applies its
//!    writes and unlocks, and `TxnAcked` lets the home shard forget the transaction.
//!
//! Recovery needs no coordinator: a shard's leader looks at what is overdue
//! ([`Namespace::txn_chores`]). A prepared transaction asks its home shard for its status
//! ([`Namespace::txn_status`]): committed -> apply the writes; in progress -> wait; unknown ->
//! abort (presumed abort: a committed record stays until every participant acknowledged it). An
//! in-progress transaction overdue on its home shard is aborted there (`TxnAbort`; a later
//! `TxnDecide` then fails and its coordinator retries). A transaction that ended is remembered
//! for a while, so a duplicated, late `TxnPrepare` cannot lock again.
//!
//! Every transaction command is idempotent (by transaction id; `TxnBegin` by session), so lost
//! replies are handled by resending.

use crate::codec::{Reader, Writer};
use crate::command::{Command, Op, Outcome};
use crate::namespace::{Dentry, Inode, Namespace};
use crate::session::Session;
use crate::shard::{shard_of_id, shard_of_new_dir, ShardSlot};
use crate::types::{Errno, FileType, InodeId, Timespec};
use std::collections::{BTreeMap, BTreeSet};

/// Transactions that ended remembered per shard (a late duplicate `TxnPrepare` of one of them
/// is refused).
pub const MAX_DONE: usize = 65536;
/// How long an ended transaction is remembered at least, in seconds (unless more than
/// [`MAX_DONE`] ended since).
pub const DONE_SECS: i64 = 3600;
/// Most records one prepare may lock.
pub const MAX_LOCKS_PER_PREPARE: usize = 4096;
/// Most prepare rounds of one transaction (a rename's ancestor walk takes one per shard hop).
pub const MAX_ROUNDS: usize = 4096;

/// A transaction: its home shard in the top 16 bits, the home shard's sequence below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TxId(pub u64);

impl TxId {
    /// Transaction `seq` of home shard `home`.
    pub fn new(home: u16, seq: u64) -> TxId {
        assert!(seq < 1 << 48, "transaction sequence overflow");
        TxId(u64::from(home) << 48 | seq)
    }

    /// The home shard: where its decision is recorded.
    pub fn home(self) -> u16 {
        (self.0 >> 48) as u16
    }
}

impl std::fmt::Display for TxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "txn {}.{}", self.home(), self.0 & ((1 << 48) - 1))
    }
}

/// What one prepare locks and reads on one shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnReads {
    /// Inodes to lock and read (a missing one is locked and reported absent).
    pub inodes: Vec<InodeId>,
    /// Entries to read; their directories must be locked by this transaction.
    pub dentries: Vec<(InodeId, Vec<u8>)>,
    /// Locked directories whose first entry to read (whether they are empty).
    pub first_child: Vec<InodeId>,
    /// Reserve an inode number on this shard for a new inode (once per transaction).
    pub reserve: bool,
}

impl TxnReads {
    fn is_empty(&self) -> bool {
        self.inodes.is_empty()
            && self.dentries.is_empty()
            && self.first_child.is_empty()
            && !self.reserve
    }
}

/// What a prepare read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnRecords {
    /// The inodes that exist.
    pub inodes: Vec<Inode>,
    /// The entries that exist (first entries of directories included).
    pub dentries: Vec<(InodeId, Vec<u8>, Dentry)>,
    /// The inode number and generation reserved for a new inode.
    pub reserved: Option<(InodeId, u64)>,
}

/// One change a transaction makes on a shard: a whole record put (`Some`) or deleted (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnWrite {
    /// An inode record (its extents and open count included).
    Inode(InodeId, Option<Inode>),
    /// A directory entry.
    Dentry(InodeId, Vec<u8>, Option<Dentry>),
}

/// A transaction's state as its home shard knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnStatus {
    /// Not decided yet: wait.
    InProgress,
    /// Committed: these are the asking shard's writes.
    Committed(Vec<TxnWrite>),
    /// Aborted, or never begun here: abort.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Prepared {
    since: Timespec,
    locks: BTreeSet<InodeId>,
    reserved: Option<(InodeId, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Coord {
    InProgress {
        since: Timespec,
        /// The `TxnBegin`'s session: who coordinates it (a server may recognise its own, or
        /// a dead node's, and abort early).
        by: Option<Session>,
    },
    Committed {
        since: Timespec,
        pending: BTreeMap<u16, Vec<TxnWrite>>,
    },
}

/// A shard's transaction state: part of the replicated namespace (and of its snapshots).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnState {
    next_seq: u64,
    locks: BTreeMap<InodeId, TxId>,
    prepared: BTreeMap<TxId, Prepared>,
    coord: BTreeMap<TxId, Coord>,
    done: BTreeMap<TxId, Timespec>,
}

/// Work for a shard's leader: see [`Namespace::txn_chores`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnChores {
    /// Prepared here for too long: ask the home shard ([`Namespace::txn_status`]).
    pub ask: Vec<TxId>,
    /// In progress here (as home) for too long: abort (`TxnAbort` here, then on `participants`,
    /// which the shard does not know: they find out by asking).
    pub abort: Vec<TxId>,
    /// Committed here, not yet acknowledged by these shards: send them `TxnCommit`.
    pub resend: Vec<(TxId, u16, Vec<TxnWrite>)>,
    /// In progress here (as home) past `ask_after_ms` but not yet `abort_after_ms`, with who
    /// began it: abort now if that coordinator is known to be gone.
    pub undecided: Vec<(TxId, Option<Session>)>,
}

fn millis_between(from: Timespec, to: Timespec) -> i64 {
    (to.sec - from.sec).saturating_mul(1000)
        + (i64::from(to.nsec) - i64::from(from.nsec)) / 1_000_000
}

impl TxnState {
    /// Whether any transaction holds a lock here.
    pub fn is_idle(&self) -> bool {
        self.locks.is_empty() && self.prepared.is_empty() && self.coord.is_empty()
    }

    fn finish(&mut self, id: TxId, now: Timespec) {
        if let Some(p) = self.prepared.remove(&id) {
            for ino in p.locks {
                let holder = self.locks.remove(&ino);
                assert_eq!(
                    holder,
                    Some(id),
                    "a prepared lock held by another transaction"
                );
            }
        }
        self.done.insert(id, now);
        if self.done.len() > MAX_DONE {
            self.done
                .retain(|_, t| millis_between(*t, now) < DONE_SECS * 1000);
            while self.done.len() > MAX_DONE {
                self.done.pop_first();
            }
        }
    }

    /// Checks locks and prepared transactions agree.
    pub(crate) fn check(&self, slot: ShardSlot) -> Result<(), String> {
        let mut n = 0;
        for (id, p) in &self.prepared {
            for ino in &p.locks {
                if self.locks.get(ino) != Some(id) {
                    return Err(format!("{id} thinks it locks {ino} but does not"));
                }
                if !slot.owns(*ino) {
                    return Err(format!("{id} locks {ino}, which is not on this shard"));
                }
                n += 1;
            }
            if self.done.contains_key(id) {
                return Err(format!("{id} both prepared and ended"));
            }
        }
        if n != self.locks.len() {
            return Err("a lock without a prepared transaction".into());
        }
        for id in self.coord.keys() {
            if id.home() != slot.index {
                return Err(format!(
                    "{id} coordinated by shard {} of another home",
                    slot.index
                ));
            }
            if id.0 & ((1 << 48) - 1) >= self.next_seq {
                return Err(format!("{id} beyond the sequence"));
            }
        }
        Ok(())
    }

    /// Encodes: `u64 next_seq | u32 n x (u64 txid | time since | u8 has_reserved | [u64 ino |
    /// u64 generation] | u32 m x u64 locked ino) | u32 n x (u64 txid | u8 state (0 in progress,
    /// 1 committed) | time since | [u32 k x (u16 shard | writes)]) | u32 n x (u64 txid | time)`.
    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.next_seq);
        w.u32(self.prepared.len() as u32);
        for (id, p) in &self.prepared {
            w.u64(id.0);
            w.time(p.since);
            match p.reserved {
                Some((ino, g)) => {
                    w.u8(1);
                    w.ino(ino);
                    w.u64(g);
                }
                None => w.u8(0),
            }
            w.u32(p.locks.len() as u32);
            for ino in &p.locks {
                w.ino(*ino);
            }
        }
        w.u32(self.coord.len() as u32);
        for (id, c) in &self.coord {
            w.u64(id.0);
            match c {
                Coord::InProgress { since, by } => {
                    w.u8(0);
                    w.time(*since);
                    let by = by.unwrap_or(Session { client: 0, seq: 0 });
                    w.u64(by.client);
                    w.u64(by.seq);
                }
                Coord::Committed { since, pending } => {
                    w.u8(1);
                    w.time(*since);
                    w.u32(pending.len() as u32);
                    for (shard, ws) in pending {
                        w.u16(*shard);
                        encode_writes(w, ws);
                    }
                }
            }
        }
        w.u32(self.done.len() as u32);
        for (id, t) in &self.done {
            w.u64(id.0);
            w.time(*t);
        }
    }

    /// Decodes [`TxnState::encode`]; `None` if malformed.
    pub fn decode(r: &mut Reader) -> Option<TxnState> {
        let mut s = TxnState {
            next_seq: r.u64()?,
            ..TxnState::default()
        };
        for _ in 0..r.u32()? {
            let id = TxId(r.u64()?);
            let since = r.time()?;
            let reserved = match r.u8()? {
                0 => None,
                1 => Some((r.ino()?, r.u64()?)),
                _ => return None,
            };
            let mut locks = BTreeSet::new();
            for _ in 0..r.u32()? {
                let ino = r.ino()?;
                locks.insert(ino);
                if s.locks.insert(ino, id).is_some() {
                    return None;
                }
            }
            s.prepared.insert(
                id,
                Prepared {
                    since,
                    locks,
                    reserved,
                },
            );
        }
        for _ in 0..r.u32()? {
            let id = TxId(r.u64()?);
            let c = match r.u8()? {
                0 => {
                    let since = r.time()?;
                    let by = Session {
                        client: r.u64()?,
                        seq: r.u64()?,
                    };
                    Coord::InProgress {
                        since,
                        by: (by.client != 0).then_some(by),
                    }
                }
                1 => {
                    let since = r.time()?;
                    let mut pending = BTreeMap::new();
                    for _ in 0..r.u32()? {
                        let shard = r.u16()?;
                        pending.insert(shard, decode_writes(r)?);
                    }
                    Coord::Committed { since, pending }
                }
                _ => return None,
            };
            s.coord.insert(id, c);
        }
        for _ in 0..r.u32()? {
            let id = TxId(r.u64()?);
            s.done.insert(id, r.time()?);
        }
        Some(s)
    }
}

fn encode_inode_full(w: &mut Writer, i: &Inode) {
    w.bytes(&crate::codec::encode_inode(i));
    w.u32(i.open);
    w.u32(i.extents.len() as u32);
    for (idx, c) in &i.extents {
        w.u64(*idx);
        w.u64(c.0);
    }
}

fn decode_inode_full(r: &mut Reader) -> Option<Inode> {
    let mut i = crate::codec::decode_inode(&r.bytes()?)?;
    i.open = r.u32()?;
    for _ in 0..r.u32()? {
        let idx = r.u64()?;
        i.extents.insert(idx, crate::types::ChunkId(r.u64()?));
    }
    Some(i)
}

/// Writes: `u32 n x (u8 0 | ino | u8 has | [inode] ; u8 1 | ino parent | bytes name | u8 has |
/// [bytes entry])`, inode = `bytes record | u32 open | u32 n x (u64 index | u64 chunk)`.
pub fn encode_writes(w: &mut Writer, ws: &[TxnWrite]) {
    w.u32(ws.len() as u32);
    for x in ws {
        match x {
            TxnWrite::Inode(ino, rec) => {
                w.u8(0);
                w.ino(*ino);
                w.u8(u8::from(rec.is_some()));
                if let Some(i) = rec {
                    encode_inode_full(w, i);
                }
            }
            TxnWrite::Dentry(p, name, d) => {
                w.u8(1);
                w.ino(*p);
                w.bytes(name);
                w.u8(u8::from(d.is_some()));
                if let Some(d) = d {
                    w.bytes(&crate::codec::encode_dentry(d));
                }
            }
        }
    }
}

/// Decodes [`encode_writes`].
pub fn decode_writes(r: &mut Reader) -> Option<Vec<TxnWrite>> {
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        out.push(match r.u8()? {
            0 => {
                let ino = r.ino()?;
                let rec = if r.bool()? {
                    Some(decode_inode_full(r)?)
                } else {
                    None
                };
                TxnWrite::Inode(ino, rec)
            }
            1 => {
                let (p, name) = (r.ino()?, r.bytes()?);
                let d = if r.bool()? {
                    Some(crate::codec::decode_dentry(&r.bytes()?)?)
                } else {
                    None
                };
                TxnWrite::Dentry(p, name, d)
            }
            _ => return None,
        });
    }
    Some(out)
}

/// Reads: `u32 n x ino | u32 n x (ino | bytes name) | u32 n x ino | u8 reserve`.
pub fn encode_reads(w: &mut Writer, x: &TxnReads) {
    w.u32(x.inodes.len() as u32);
    for i in &x.inodes {
        w.ino(*i);
    }
    w.u32(x.dentries.len() as u32);
    for (p, n) in &x.dentries {
        w.ino(*p);
        w.bytes(n);
    }
    w.u32(x.first_child.len() as u32);
    for i in &x.first_child {
        w.ino(*i);
    }
    w.u8(u8::from(x.reserve));
}

/// Decodes [`encode_reads`].
pub fn decode_reads(r: &mut Reader) -> Option<TxnReads> {
    let mut x = TxnReads::default();
    for _ in 0..r.u32()? {
        x.inodes.push(r.ino()?);
    }
    for _ in 0..r.u32()? {
        x.dentries.push((r.ino()?, r.bytes()?));
    }
    for _ in 0..r.u32()? {
        x.first_child.push(r.ino()?);
    }
    x.reserve = r.bool()?;
    Some(x)
}

/// Records: `u32 n x inode | u32 n x (ino parent | bytes name | bytes entry) | u8 has |
/// [ino | u64 generation]`.
pub fn encode_records(w: &mut Writer, x: &TxnRecords) {
    w.u32(x.inodes.len() as u32);
    for i in &x.inodes {
        encode_inode_full(w, i);
    }
    w.u32(x.dentries.len() as u32);
    for (p, n, d) in &x.dentries {
        w.ino(*p);
        w.bytes(n);
        w.bytes(&crate::codec::encode_dentry(d));
    }
    match x.reserved {
        Some((i, g)) => {
            w.u8(1);
            w.ino(i);
            w.u64(g);
        }
        None => w.u8(0),
    }
}

/// Decodes [`encode_records`].
pub fn decode_records(r: &mut Reader) -> Option<TxnRecords> {
    let mut x = TxnRecords::default();
    for _ in 0..r.u32()? {
        x.inodes.push(decode_inode_full(r)?);
    }
    for _ in 0..r.u32()? {
        let (p, n) = (r.ino()?, r.bytes()?);
        x.dentries
            .push((p, n, crate::codec::decode_dentry(&r.bytes()?)?));
    }
    x.reserved = match r.u8()? {
        0 => None,
        1 => Some((r.ino()?, r.u64()?)),
        _ => return None,
    };
    Some(x)
}

impl Namespace {
    /// Whether shard-local command `op` may run here now: [`Errno::XDev`] if it touches an inode
    /// of another shard (or makes a directory that lives on another one): run it as a
    /// transaction; [`Errno::Again`] if a transaction holds a lock on what it touches.
    pub(crate) fn gate(&self, op: &Op) -> Result<(), Errno> {
        if !self.slot.is_sharded() {
            return Ok(());
        }
        let target = |p: InodeId, n: &[u8]| self.dentries.get(&(p, n.to_vec())).copied();
        let mut touch: Vec<InodeId> = Vec::with_capacity(4);
        match op {
            Op::Mknod { parent, .. } | Op::Symlink { parent, .. } | Op::Create { parent, .. } => {
                touch.push(*parent)
            }
            Op::Mkdir { parent, name, .. } => {
                touch.push(*parent);
                if shard_of_new_dir(self.slot.count, *parent, name) != self.slot.index {
                    return Err(Errno::XDev);
                }
            }
            Op::Link { ino, newparent, .. } => touch.extend([*ino, *newparent]),
            Op::Unlink { parent, name } | Op::Rmdir { parent, name } => {
                touch.push(*parent);
                touch.extend(target(*parent, name).map(|d| d.ino));
            }
            Op::Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => {
                touch.extend([*parent, *newparent]);
                let src = target(*parent, name);
                let dst = target(*newparent, newname);
                touch.extend(src.map(|d| d.ino));
                touch.extend(dst.map(|d| d.ino));
                if parent != newparent {
                    if src.is_some_and(|d| d.kind == FileType::Directory) {
                        self.local_ancestors(*newparent, &mut touch)?;
                    }
                    if flags.exchange && dst.is_some_and(|d| d.kind == FileType::Directory) {
                        self.local_ancestors(*parent, &mut touch)?;
                    }
                }
            }
            op => touch.extend(single_inode(op)),
        }
        if touch.iter().any(|i| !self.slot.owns(*i)) {
            return Err(Errno::XDev);
        }
        if touch.iter().any(|i| self.txn.locks.contains_key(i)) {
            return Err(Errno::Again);
        }
        Ok(())
    }

    /// Adds `dir`'s ancestors to `out`; [`Errno::XDev`] if one is on another shard.
    fn local_ancestors(&self, mut dir: InodeId, out: &mut Vec<InodeId>) -> Result<(), Errno> {
        for _ in 0..=self.inodes.len() {
            if !self.slot.owns(dir) {
                return Err(Errno::XDev);
            }
            out.push(dir);
            if dir == InodeId::ROOT {
                return Ok(());
            }
            match self.inodes.get(&dir) {
                Some(i) => dir = i.parent,
                None => return Ok(()),
            }
        }
        panic!("directory parent chain longer than the number of inodes: a cycle");
    }

    /// Locks and reads for transaction `id`.
    fn txn_lock_read(
        &mut self,
        id: TxId,
        reads: &TxnReads,
        now: Timespec,
    ) -> Result<TxnRecords, Errno> {
        if self.txn.done.contains_key(&id) {
            // A late duplicate of a prepare for a transaction that already ended.
            return Err(Errno::Stale);
        }
        if reads.inodes.len() > MAX_LOCKS_PER_PREPARE {
            return Err(Errno::Inval);
        }
        for ino in &reads.inodes {
            if !self.slot.owns(*ino) {
                return Err(Errno::Inval);
            }
            if self.txn.locks.get(ino).is_some_and(|h| *h != id) {
                return Err(Errno::Again);
            }
        }
        let slot = self.slot;
        let p = self.txn.prepared.entry(id).or_insert(Prepared {
            since: now,
            locks: BTreeSet::new(),
            reserved: None,
        });
        for ino in &reads.inodes {
            p.locks.insert(*ino);
            self.txn.locks.insert(*ino, id);
        }
        if reads.reserve && p.reserved.is_none() {
            let ino = InodeId(self.next_ino);
            assert!(slot.owns(ino), "inode counter not aligned to the shard");
            self.next_ino += u64::from(slot.count);
            let generation = self.next_generation;
            self.next_generation += 1;
            p.reserved = Some((ino, generation));
            p.locks.insert(ino);
            self.txn.locks.insert(ino, id);
        }
        let reserved = p.reserved;
        let locked = |ino: &InodeId| p.locks.contains(ino);
        if !reads.dentries.iter().all(|(d, _)| locked(d)) || !reads.first_child.iter().all(locked) {
            // Entries are read only under their directory's lock.
            return Err(Errno::Inval);
        }
        let mut out = TxnRecords {
            reserved,
            ..TxnRecords::default()
        };
        for ino in &reads.inodes {
            if let Some(i) = self.inodes.get(ino) {
                out.inodes.push(i.clone());
            }
        }
        for (dir, name) in &reads.dentries {
            if let Some(d) = self.dentries.get(&(*dir, name.clone())) {
                out.dentries.push((*dir, name.clone(), *d));
            }
        }
        for dir in &reads.first_child {
            if let Some(((p, n), d)) = self.dentries.range((*dir, Vec::new())..).next() {
                if p == dir {
                    out.dentries.push((*p, n.clone(), *d));
                }
            }
        }
        Ok(out)
    }

    /// Applies a transaction's writes to this shard; every key must be locked by it.
    fn txn_apply_writes(&mut self, id: TxId, ws: &[TxnWrite]) -> Result<(), Errno> {
        let p = self.txn.prepared.get(&id).ok_or(Errno::Stale)?;
        let ok = ws.iter().all(|w| match w {
            TxnWrite::Inode(ino, rec) => {
                p.locks.contains(ino) && rec.as_ref().is_none_or(|r| r.attr.ino == *ino)
            }
            TxnWrite::Dentry(dir, _, _) => p.locks.contains(dir),
        });
        if !ok {
            return Err(Errno::Inval);
        }
        for w in ws {
            match w {
                TxnWrite::Inode(ino, rec) => {
                    let old = self.inodes.remove(ino);
                    let old_extents = old.map(|i| i.extents).unwrap_or_default();
                    let new_extents = rec.as_ref().map(|r| r.extents.clone()).unwrap_or_default();
                    let kept: BTreeSet<_> = new_extents.values().copied().collect();
                    for (idx, c) in &old_extents {
                        if new_extents.get(idx) != Some(c) {
                            self.dirty_extents.insert((*ino, *idx));
                        }
                        if !kept.contains(c) {
                            self.free_chunk(*c);
                        }
                    }
                    for idx in new_extents.keys() {
                        if old_extents.get(idx) != new_extents.get(idx) {
                            self.dirty_extents.insert((*ino, *idx));
                        }
                    }
                    if let Some(r) = rec {
                        self.next_generation = self.next_generation.max(r.attr.generation + 1);
                        self.inodes.insert(*ino, r.clone());
                    }
                    self.dirty_inodes.insert(*ino);
                }
                TxnWrite::Dentry(dir, name, d) => {
                    let key = (*dir, name.clone());
                    if let Some(old) = self.dentries.remove(&key) {
                        self.by_cookie.remove(&(*dir, old.cookie));
                    }
                    if let Some(d) = d {
                        let prev = self.by_cookie.insert((*dir, d.cookie), name.clone());
                        assert!(prev.is_none(), "a transaction reused a readdir cookie");
                        self.dentries.insert(key.clone(), *d);
                    }
                    self.dirty_dentries.insert(key);
                }
            }
        }
        Ok(())
    }

    /// `TxnBegin` on the home shard.
    pub(crate) fn txn_begin(
        &mut self,
        reads: &TxnReads,
        by: Option<Session>,
        now: Timespec,
    ) -> Result<Outcome, Errno> {
        let id = TxId::new(self.slot.index, self.txn.next_seq);
        self.txn.next_seq += 1;
        let records = self.txn_lock_read(id, reads, now)?;
        self.txn
            .coord
            .insert(id, Coord::InProgress { since: now, by });
        Ok(Outcome::Txn { id, records })
    }

    /// `TxnPrepare` on any shard (the home shard too, for more locks).
    pub(crate) fn txn_prepare(
        &mut self,
        id: TxId,
        reads: &TxnReads,
        now: Timespec,
    ) -> Result<Outcome, Errno> {
        if id.home() == self.slot.index
            && !matches!(self.txn.coord.get(&id), Some(Coord::InProgress { .. }))
        {
            return Err(Errno::Stale);
        }
        let records = self.txn_lock_read(id, reads, now)?;
        Ok(Outcome::Txn { id, records })
    }

    /// `TxnDecide` (commit) on the home shard: `Committed(false)` if it was aborted meanwhile.
    pub(crate) fn txn_decide(
        &mut self,
        id: TxId,
        writes: &[(u16, Vec<TxnWrite>)],
        result: Option<(Session, Outcome)>,
        now: Timespec,
    ) -> Result<Outcome, Errno> {
        match self.txn.coord.get(&id) {
            Some(Coord::Committed { .. }) => return Ok(Outcome::Committed(true)),
            None => return Ok(Outcome::Committed(false)),
            Some(Coord::InProgress { .. }) => {}
        }
        let own: Vec<TxnWrite> = writes
            .iter()
            .filter(|(s, _)| *s == self.slot.index)
            .flat_map(|(_, w)| w.iter().cloned())
            .collect();
        if writes.iter().any(|(s, _)| *s >= self.slot.count) {
            return Err(Errno::Inval);
        }
        self.txn_apply_writes(id, &own)?;
        self.txn.finish(id, now);
        let pending: BTreeMap<u16, Vec<TxnWrite>> = writes
            .iter()
            .filter(|(s, _)| *s != self.slot.index)
            .map(|(s, w)| (*s, w.clone()))
            .collect();
        if pending.is_empty() {
            self.txn.coord.remove(&id);
        } else {
            self.txn.coord.insert(
                id,
                Coord::Committed {
                    since: now,
                    pending,
                },
            );
        }
        if let Some((s, o)) = result {
            self.record_session(s, now, Ok(o));
        }
        Ok(Outcome::Committed(true))
    }

    /// `TxnCommit` on a participant: applies its writes if still prepared (else already done).
    pub(crate) fn txn_commit(
        &mut self,
        id: TxId,
        writes: &[TxnWrite],
        now: Timespec,
    ) -> Result<Outcome, Errno> {
        if self.txn.prepared.contains_key(&id) {
            self.txn_apply_writes(id, writes)?;
            self.txn.finish(id, now);
        }
        Ok(Outcome::Unit)
    }

    /// `TxnAbort`: undoes the prepare here and, on the home shard, decides abort unless the
    /// transaction already committed (`Committed(true)`: then nothing changes).
    pub(crate) fn txn_abort(&mut self, id: TxId, now: Timespec) -> Result<Outcome, Errno> {
        if let Some(Coord::Committed { .. }) = self.txn.coord.get(&id) {
            return Ok(Outcome::Committed(true));
        }
        self.txn.coord.remove(&id);
        if self.txn.prepared.contains_key(&id) || id.home() == self.slot.index {
            self.txn.finish(id, now);
        }
        Ok(Outcome::Committed(false))
    }

    /// `TxnAcked` on the home shard: `shard` applied its writes.
    pub(crate) fn txn_acked(&mut self, id: TxId, shards: &[u16]) -> Result<Outcome, Errno> {
        if let Some(Coord::Committed { pending, .. }) = self.txn.coord.get_mut(&id) {
            for s in shards {
                pending.remove(s);
            }
            if pending.is_empty() {
                self.txn.coord.remove(&id);
            }
        }
        Ok(Outcome::Unit)
    }

    /// What the home shard knows of transaction `id`, for participant `shard`.
    pub fn txn_status(&self, id: TxId, shard: u16) -> TxnStatus {
        match self.txn.coord.get(&id) {
            Some(Coord::InProgress { .. }) => TxnStatus::InProgress,
            Some(Coord::Committed { pending, .. }) => match pending.get(&shard) {
                Some(w) => TxnStatus::Committed(w.clone()),
                // Acknowledged already (or not a participant): nothing left to apply.
                None => TxnStatus::Committed(Vec::new()),
            },
            None => TxnStatus::Unknown,
        }
    }

    /// Transactions overdue at `now`: what this shard's leader should chase. A prepare older
    /// than `ask_after_ms` asks its home shard; an undecided transaction older than
    /// `abort_after_ms` is aborted by its home shard; a commit not acknowledged after
    /// `ask_after_ms` is resent. (Asking early is harmless: an undecided answer waits. The
    /// abort gives a slow coordinator its time.)
    pub fn txn_chores(&self, now: Timespec, ask_after_ms: i64, abort_after_ms: i64) -> TxnChores {
        let old = |t: Timespec| millis_between(t, now) >= ask_after_ms;
        let older = |t: Timespec| millis_between(t, now) >= abort_after_ms;
        let mut out = TxnChores::default();
        for (id, p) in &self.txn.prepared {
            if old(p.since) && !(id.home() == self.slot.index && self.txn.coord.contains_key(id)) {
                out.ask.push(*id);
            }
        }
        for (id, c) in &self.txn.coord {
            match c {
                Coord::InProgress { since, .. } if older(*since) => out.abort.push(*id),
                Coord::InProgress { since, by } if old(*since) => {
                    out.undecided.push((*id, *by));
                }
                Coord::Committed { since, pending } if old(*since) => {
                    for (s, w) in pending {
                        out.resend.push((*id, *s, w.clone()));
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Whether transactions hold no lock here and none is in flight.
    pub fn txn_idle(&self) -> bool {
        self.txn.is_idle()
    }

    /// What one shard can check alone: its records are its own, entries live with their
    /// directory, local targets exist, extents are this shard's chunks, locks agree.
    pub(crate) fn check_shard(&self) -> Result<(), String> {
        let slot = self.slot;
        for (ino, i) in &self.inodes {
            if !slot.owns(*ino) || i.attr.ino != *ino {
                return Err(format!("{ino} does not belong on shard {}", slot.index));
            }
            for c in i.extents.values() {
                if shard_of_id(slot.count, c.0) != slot.index || c.0 >= self.next_chunk {
                    return Err(format!("{ino} maps {c}, not a chunk of this shard"));
                }
            }
        }
        for ((parent, name), d) in &self.dentries {
            let p = self
                .inodes
                .get(parent)
                .ok_or(format!("entry {name:?} in missing directory {parent}"))?;
            if p.attr.kind != FileType::Directory {
                return Err(format!("entry {name:?} in non-directory {parent}"));
            }
            if self.by_cookie.get(&(*parent, d.cookie)) != Some(name) {
                return Err(format!("readdir index misses {name:?} in {parent}"));
            }
            if slot.owns(d.ino) {
                let i = self
                    .inodes
                    .get(&d.ino)
                    .ok_or(format!("entry {name:?} points at missing {}", d.ino))?;
                if i.attr.kind != d.kind {
                    return Err(format!("entry {name:?} type differs from inode {}", d.ino));
                }
            }
        }
        if self.by_cookie.len() != self.dentries.len() {
            return Err("readdir index has stale entries".into());
        }
        self.txn.check(slot)?;
        self.check_placement()
    }

    /// A namespace holding only transaction records: where a coordinator runs an operation.
    fn txn_view(
        inodes: &BTreeMap<InodeId, Inode>,
        dentries: &BTreeMap<(InodeId, Vec<u8>), Dentry>,
        reserved: Option<(InodeId, u64)>,
    ) -> Namespace {
        let mut v = Namespace::new_shard(ShardSlot::SINGLE, 0, 0, 0, Timespec::new(0, 0));
        v.inodes = inodes.clone();
        for ((p, n), d) in dentries {
            v.by_cookie.insert((*p, d.cookie), n.clone());
            v.dentries.insert((p.to_owned(), n.clone()), *d);
        }
        // Only a reserved number may be handed out; anything else is a bug caught here.
        let (ino, generation) = reserved.unwrap_or((InodeId(u64::MAX), u64::MAX));
        v.next_ino = ino.0;
        v.next_generation = generation;
        v.take_dirty();
        v
    }
}

/// Everything an operation needs locked and read, by shard, given what is read so far (`view`):
/// the driver prepares until the answer stops growing.
pub fn needs(count: u16, op: &Op, view: &Namespace) -> BTreeMap<u16, TxnReads> {
    let mut out: BTreeMap<u16, TxnReads> = BTreeMap::new();
    let shard = |i: InodeId| shard_of_id(count, i.0);
    let mut lock = |out: &mut BTreeMap<u16, TxnReads>, i: InodeId| {
        let r = out.entry(shard(i)).or_default();
        if !r.inodes.contains(&i) {
            r.inodes.push(i);
        }
    };
    let entry = |out: &mut BTreeMap<u16, TxnReads>, p: InodeId, n: &[u8]| {
        out.entry(shard(p))
            .or_default()
            .dentries
            .push((p, n.to_vec()));
    };
    let target = |p: InodeId, n: &[u8]| view.dentries.get(&(p, n.to_vec())).copied();
    // Walks up from `dir` through what is read; the first unread ancestor is needed next.
    let ancestors = |out: &mut BTreeMap<u16, TxnReads>,
                     lock: &mut dyn FnMut(&mut BTreeMap<u16, TxnReads>, InodeId),
                     mut dir: InodeId| {
        for _ in 0..MAX_ROUNDS {
            lock(out, dir);
            if dir == InodeId::ROOT {
                return;
            }
            match view.inodes.get(&dir) {
                Some(i) => dir = i.parent,
                None => return,
            }
        }
    };
    match op {
        Op::Mkdir { parent, name, .. } => {
            lock(&mut out, *parent);
            entry(&mut out, *parent, name);
            out.entry(shard_of_new_dir(count, *parent, name))
                .or_default()
                .reserve = true;
        }
        Op::Mknod { parent, name, .. }
        | Op::Symlink { parent, name, .. }
        | Op::Create { parent, name, .. } => {
            lock(&mut out, *parent);
            entry(&mut out, *parent, name);
            out.entry(shard(*parent)).or_default().reserve = true;
        }
        Op::Link {
            ino,
            newparent,
            newname,
        } => {
            lock(&mut out, *newparent);
            lock(&mut out, *ino);
            entry(&mut out, *newparent, newname);
        }
        Op::Unlink { parent, name } | Op::Rmdir { parent, name } => {
            lock(&mut out, *parent);
            entry(&mut out, *parent, name);
            if let Some(d) = target(*parent, name) {
                lock(&mut out, d.ino);
                if d.kind == FileType::Directory {
                    out.entry(shard(d.ino)).or_default().first_child.push(d.ino);
                }
            }
        }
        Op::Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
        } => {
            lock(&mut out, *parent);
            lock(&mut out, *newparent);
            entry(&mut out, *parent, name);
            entry(&mut out, *newparent, newname);
            let src = target(*parent, name);
            let dst = target(*newparent, newname);
            for d in src.iter().chain(dst.iter()) {
                lock(&mut out, d.ino);
            }
            if let Some(d) = dst.filter(|d| d.kind == FileType::Directory) {
                out.entry(shard(d.ino)).or_default().first_child.push(d.ino);
            }
            if parent != newparent {
                if src.is_some_and(|d| d.kind == FileType::Directory) {
                    ancestors(&mut out, &mut lock, *newparent);
                }
                if flags.exchange && dst.is_some_and(|d| d.kind == FileType::Directory) {
                    ancestors(&mut out, &mut lock, *parent);
                }
            }
        }
        _ => {}
    }
    out
}

/// What a [`TxnDriver`] wants done next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Apply `cmd` on `shard` and hand the result to [`TxnDriver::on_reply`]. If no reply comes,
    /// send the same command again (every step is idempotent).
    Send {
        /// Target shard.
        shard: u16,
        /// The command.
        cmd: Command,
    },
    /// The operation's result. [`Errno::Again`]: nothing was done; try again after a pause.
    Finished(Result<Outcome, Errno>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Try,
    Begin,
    Prepare(u16),
    Decide,
    Commit(Vec<u16>),
    Acked,
    Abort(Vec<u16>),
    Done,
}

/// Runs one operation as a cross-shard transaction, a step at a time, with no I/O: the caller
/// sends each [`Action::Send`] to its shard and feeds the reply back. Keeps nothing durable:
/// if the caller dies, the shards' recovery finishes or undoes the transaction.
#[derive(Debug)]
pub struct TxnDriver {
    count: u16,
    home: u16,
    cmd: Command,
    nonce: Session,
    phase: Phase,
    id: Option<TxId>,
    asked: BTreeMap<u16, TxnReads>,
    inodes: BTreeMap<InodeId, Inode>,
    dentries: BTreeMap<(InodeId, Vec<u8>), Dentry>,
    reserved: Option<(InodeId, u64)>,
    writes: Vec<(u16, Vec<TxnWrite>)>,
    result: Option<Result<Outcome, Errno>>,
    rounds: usize,
}

/// The one inode a command about a single inode (attributes, xattrs, handles, data) names.
fn single_inode(op: &Op) -> Option<InodeId> {
    match op {
        Op::SetAttr { ino, .. }
        | Op::SetXattr { ino, .. }
        | Op::RemoveXattr { ino, .. }
        | Op::Open { ino, .. }
        | Op::Release { ino }
        | Op::MapChunks { ino, .. }
        | Op::Wrote { ino, .. }
        | Op::Fallocate { ino, .. }
        | Op::Punched { ino, .. } => Some(*ino),
        _ => None,
    }
}

/// The shard a command is sent to first: where its parent directory (or inode) lives.
pub fn home_shard(count: u16, op: &Op) -> u16 {
    let ino = match op {
        Op::Mknod { parent, .. }
        | Op::Mkdir { parent, .. }
        | Op::Symlink { parent, .. }
        | Op::Unlink { parent, .. }
        | Op::Rmdir { parent, .. }
        | Op::Rename { parent, .. }
        | Op::Create { parent, .. } => *parent,
        Op::Link { newparent, .. } => *newparent,

        Op::MarkStale { chunks, .. } => {
            return chunks.first().map_or(0, |c| shard_of_id(count, c.0))
        }
        Op::Repaired { chunk, .. }
        | Op::AddHolders { chunk, .. }
        | Op::DropHolders { chunk, .. } => return shard_of_id(count, chunk.0),
        Op::TxnBegin { .. } | Op::AddMember { .. } | Op::RemoveMember { .. } => return 0,
        Op::TierEvicted { chunk, .. } | Op::TierRestored { chunk } => {
            return shard_of_id(count, chunk.0)
        }
        Op::TierFlushed { blob, .. }
        | Op::BlobDeleteStarted { blob }
        | Op::BlobDeleted { blob }
        | Op::TierUploadStarted { blob }
        | Op::TierUploadAbandoned { blob } => return crate::tier::blob_shard(*blob) % count.max(1),
        Op::TxnPrepare { id, .. }
        | Op::TxnDecide { id, .. }
        | Op::TxnCommit { id, .. }
        | Op::TxnAbort { id }
        | Op::TxnAcked { id, .. } => return id.home(),
        op => single_inode(op).expect("every other op names one inode"),
    };
    shard_of_id(count, ino.0)
}

impl TxnDriver {
    /// A driver for `cmd` on a namespace of `count` shards. `nonce` is a session of the
    /// driver's own (a client id nobody else uses, a fresh sequence) that makes `TxnBegin`
    /// exactly-once.
    pub fn new(count: u16, cmd: Command, nonce: Session) -> TxnDriver {
        TxnDriver {
            count,
            home: home_shard(count, &cmd.op),
            cmd,
            nonce,
            phase: Phase::Try,
            id: None,
            asked: BTreeMap::new(),
            inodes: BTreeMap::new(),
            dentries: BTreeMap::new(),
            reserved: None,
            writes: Vec::new(),
            result: None,
            rounds: 0,
        }
    }

    /// The transaction, once begun.
    pub fn id(&self) -> Option<TxId> {
        self.id
    }

    fn sys(&self, op: Op) -> Command {
        Command {
            creds: self.cmd.creds.clone(),
            now: self.cmd.now,
            op,
            session: None,
        }
    }

    /// The first step: the plain command on its home shard.
    pub fn start(&mut self) -> Action {
        assert_eq!(self.phase, Phase::Try, "a driver starts once");
        Action::Send {
            shard: self.home,
            cmd: self.cmd.clone(),
        }
    }

    fn view(&self) -> Namespace {
        Namespace::txn_view(&self.inodes, &self.dentries, self.reserved)
    }

    fn absorb(&mut self, shard: u16, records: TxnRecords) {
        for i in records.inodes {
            self.inodes.insert(i.attr.ino, i);
        }
        for (p, n, d) in records.dentries {
            self.dentries.insert((p, n), d);
        }
        if records.reserved.is_some() {
            // Only the shard the operation's new inode lives on is asked to reserve.
            assert!(
                self.asked.get(&shard).is_some_and(|r| r.reserve),
                "a reservation nobody asked for"
            );
            self.reserved = records.reserved;
        }
    }

    /// What is needed but not yet asked for, by shard.
    fn missing(&self) -> BTreeMap<u16, TxnReads> {
        let want = needs(self.count, &self.cmd.op, &self.view());
        let mut out = BTreeMap::new();
        for (shard, w) in want {
            let have = self.asked.get(&shard);
            let has_i = |i: &InodeId| have.is_some_and(|h| h.inodes.contains(i));
            let has_d = |d: &(InodeId, Vec<u8>)| have.is_some_and(|h| h.dentries.contains(d));
            let has_f = |i: &InodeId| have.is_some_and(|h| h.first_child.contains(i));
            let m = TxnReads {
                inodes: w.inodes.iter().filter(|i| !has_i(i)).copied().collect(),
                dentries: w.dentries.iter().filter(|d| !has_d(d)).cloned().collect(),
                first_child: w
                    .first_child
                    .iter()
                    .filter(|i| !has_f(i))
                    .copied()
                    .collect(),
                reserve: w.reserve && !have.is_some_and(|h| h.reserve),
            };
            if !m.is_empty() {
                // Entries are read under their directory's lock: lock it in the same step.
                out.insert(shard, m);
            }
        }
        out
    }

    fn record_asked(&mut self, shard: u16, m: &TxnReads) {
        let a = self.asked.entry(shard).or_default();
        a.inodes.extend(m.inodes.iter().copied());
        a.dentries.extend(m.dentries.iter().cloned());
        a.first_child.extend(m.first_child.iter().copied());
        a.reserve |= m.reserve;
    }

    /// Entries and first children need their directory locked by the same or an earlier
    /// prepare: add the directories to the step.
    fn with_dir_locks(&self, shard: u16, mut m: TxnReads) -> TxnReads {
        let have = self.asked.get(&shard);
        let dirs: Vec<InodeId> = m
            .dentries
            .iter()
            .map(|(p, _)| *p)
            .chain(m.first_child.iter().copied())
            .collect();
        for d in dirs {
            if !m.inodes.contains(&d) && !have.is_some_and(|h| h.inodes.contains(&d)) {
                m.inodes.push(d);
            }
        }
        m
    }

    /// The next prepare, or the decision once everything needed is read.
    fn advance(&mut self) -> Action {
        self.rounds += 1;
        if self.rounds > MAX_ROUNDS {
            return self.abort(Err(Errno::Io));
        }
        let missing = self.missing();
        let id = self.id.expect("advance after begin");
        // The home shard first (its locks guard the entries the others are read for).
        let pick = if missing.contains_key(&self.home) {
            Some(self.home)
        } else {
            missing.keys().next().copied()
        };
        if let Some(shard) = pick {
            let m = self.with_dir_locks(shard, missing[&shard].clone());
            self.record_asked(shard, &m);
            self.phase = Phase::Prepare(shard);
            return Action::Send {
                shard,
                cmd: self.sys(Op::TxnPrepare { id, reads: m }),
            };
        }
        // Everything is read and locked: run the operation on the view.
        let mut view = self.view();
        let result = view.apply_op(&self.cmd);
        let Ok(outcome) = result else {
            return self.abort(result);
        };
        let dirty = view.take_dirty();
        let mut per: BTreeMap<u16, Vec<TxnWrite>> =
            self.asked.keys().map(|s| (*s, Vec::new())).collect();
        for ino in dirty.inodes {
            per.entry(shard_of_id(self.count, ino.0))
                .or_default()
                .push(TxnWrite::Inode(ino, view.inodes.get(&ino).cloned()));
        }
        for (p, n) in dirty.dentries {
            let d = view.dentries.get(&(p, n.clone())).copied();
            per.entry(shard_of_id(self.count, p.0))
                .or_default()
                .push(TxnWrite::Dentry(p, n, d));
        }
        self.writes = per.into_iter().collect();
        self.result = Some(Ok(outcome.clone()));
        self.phase = Phase::Decide;
        Action::Send {
            shard: self.home,
            cmd: self.sys(Op::TxnDecide {
                id,
                writes: self.writes.clone(),
                result: self.cmd.session.map(|s| (s, outcome)),
            }),
        }
    }

    /// Undo: abort on the home shard first (the decision), then on every other participant.
    fn abort(&mut self, result: Result<Outcome, Errno>) -> Action {
        self.result = Some(result);
        let Some(id) = self.id else {
            self.phase = Phase::Done;
            return Action::Finished(self.result.clone().expect("set above"));
        };
        let mut rest: Vec<u16> = self
            .asked
            .keys()
            .copied()
            .filter(|s| *s != self.home)
            .collect();
        rest.insert(0, self.home);
        self.next_abort(id, rest)
    }

    fn next_abort(&mut self, id: TxId, mut rest: Vec<u16>) -> Action {
        if rest.is_empty() {
            self.phase = Phase::Done;
            return Action::Finished(self.result.clone().expect("result set before abort"));
        }
        let shard = rest.remove(0);
        self.phase = Phase::Abort(std::iter::once(shard).chain(rest).collect());
        Action::Send {
            shard,
            cmd: self.sys(Op::TxnAbort { id }),
        }
    }

    fn next_commit(&mut self, id: TxId, rest: Vec<u16>) -> Action {
        if rest.is_empty() {
            self.phase = Phase::Acked;
            let shards: Vec<u16> = self
                .writes
                .iter()
                .map(|(s, _)| *s)
                .filter(|s| *s != self.home)
                .collect();
            return Action::Send {
                shard: self.home,
                cmd: self.sys(Op::TxnAcked { id, shards }),
            };
        }
        let shard = rest[0];
        let writes = self
            .writes
            .iter()
            .find(|(s, _)| *s == shard)
            .map(|(_, w)| w.clone())
            .unwrap_or_default();
        self.phase = Phase::Commit(rest);
        Action::Send {
            shard,
            cmd: self.sys(Op::TxnCommit { id, writes }),
        }
    }

    /// Feeds the reply to the last [`Action::Send`]; returns what to do next.
    pub fn on_reply(&mut self, reply: Result<Outcome, Errno>) -> Action {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Try => match reply {
                Err(Errno::XDev) => {
                    let first = self.missing().remove(&self.home).unwrap_or_default();
                    let first = self.with_dir_locks(self.home, first);
                    self.record_asked(self.home, &first);
                    self.phase = Phase::Begin;
                    Action::Send {
                        shard: self.home,
                        cmd: Command {
                            session: Some(self.nonce),
                            ..self.sys(Op::TxnBegin {
                                reads: first,
                                op_session: self.cmd.session,
                            })
                        },
                    }
                }
                r => {
                    self.phase = Phase::Done;
                    Action::Finished(r)
                }
            },
            Phase::Begin => match reply {
                Ok(Outcome::Txn { id, records }) => {
                    assert_eq!(id.home(), self.home, "begun on another shard");
                    self.id = Some(id);
                    self.absorb(self.home, records);
                    self.advance()
                }
                // The operation already took effect (an earlier attempt): its first result.
                Ok(o) => {
                    self.phase = Phase::Done;
                    Action::Finished(Ok(o))
                }
                Err(e) => {
                    self.phase = Phase::Done;
                    Action::Finished(Err(e))
                }
            },
            Phase::Prepare(shard) => match reply {
                Ok(Outcome::Txn { id, records }) => {
                    assert_eq!(
                        Some(id),
                        self.id,
                        "a prepare answered for another transaction"
                    );
                    self.absorb(shard, records);
                    self.advance()
                }
                Ok(o) => panic!("TxnPrepare answered {o:?}"),
                // Locked by another transaction, or aborted by recovery: undo, retry later.
                Err(Errno::Again | Errno::Stale) => self.abort(Err(Errno::Again)),
                Err(e) => self.abort(Err(e)),
            },
            Phase::Decide => match reply {
                Ok(Outcome::Committed(true)) => {
                    let id = self.id.expect("decided after begin");
                    let rest: Vec<u16> = self
                        .writes
                        .iter()
                        .map(|(s, _)| *s)
                        .filter(|s| *s != self.home)
                        .collect();
                    self.next_commit(id, rest)
                }
                // Recovery aborted it meanwhile: undo the rest, retry later.
                Ok(Outcome::Committed(false)) => self.abort(Err(Errno::Again)),
                Ok(o) => panic!("TxnDecide answered {o:?}"),
                Err(e) => self.abort(Err(e)),
            },
            Phase::Commit(mut rest) => {
                let id = self.id.expect("commit after begin");
                if let Err(e) = reply {
                    // The decision stands; the shard's recovery applies it. Report success.
                    let _ = e;
                }
                rest.remove(0);
                self.next_commit(id, rest)
            }
            Phase::Acked => {
                self.phase = Phase::Done;
                Action::Finished(self.result.clone().expect("result set before commit"))
            }
            Phase::Abort(mut rest) => {
                let id = self.id.expect("abort after begin");
                if rest.first() == Some(&self.home) && reply == Ok(Outcome::Committed(true)) {
                    // The home shard says it committed (a decide whose reply was lost):
                    // finish the commit instead.
                    self.phase = Phase::Decide;
                    return self.on_reply(Ok(Outcome::Committed(true)));
                }
                rest.remove(0);
                self.next_abort(id, rest)
            }
            Phase::Done => panic!("reply after the driver finished"),
        }
    }
}

/// The shards of one namespace put together into one (to check or compare it whole).
pub fn merge_shards(shards: &[&Namespace]) -> Namespace {
    let mut whole = Namespace::new_shard(ShardSlot::SINGLE, 0, 0, 0, Timespec::new(0, 0));
    whole.inodes.clear();
    for s in shards {
        for (ino, i) in &s.inodes {
            whole.inodes.insert(*ino, i.clone());
        }
        for (key, d) in &s.dentries {
            whole.dentries.insert(key.clone(), *d);
        }
        for (key, n) in &s.by_cookie {
            whole.by_cookie.insert(*key, n.clone());
        }
        whole.next_chunk = whole.next_chunk.max(s.next_chunk);
        whole.next_ino = whole.next_ino.max(s.next_ino);
        whole.next_generation = whole.next_generation.max(s.next_generation);
    }
    whole.take_dirty();
    whole
}

/// Checks the shards of one namespace together (no transaction in flight): put together they
/// form a valid namespace (every inode reachable or open, link counts, no cycles, readdir
/// index), each shard is valid alone, and ids are owned by the right shards.
pub fn check_shards(shards: &[&Namespace]) -> Result<(), String> {
    for (k, s) in shards.iter().enumerate() {
        if s.slot.index as usize != k || s.slot.count as usize != shards.len() {
            return Err(format!("shard {k} has slot {:?}", s.slot));
        }
        s.check_invariants()?;
        if !s.txn_idle() {
            return Err(format!("shard {k} still has transactions in flight"));
        }
    }
    let whole = merge_shards(shards);
    if !whole.inodes.contains_key(&InodeId::ROOT) {
        return Err("no root directory on any shard".into());
    }
    whole.check_structure()
}

impl Namespace {
    /// The tree as text, one line per path (`/` first), independent of inode numbers: kind,
    /// mode, owner, link count, size, times, symlink target, and for a hard link the first path
    /// naming the same inode. Two namespaces with equal listings hold the same files.
    pub fn listing(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut first_path: BTreeMap<InodeId, String> = BTreeMap::new();
        let mut stack: Vec<(InodeId, String, usize)> = vec![(InodeId::ROOT, String::new(), 0)];
        let describe = |i: &Inode| {
            let a = &i.attr;
            format!(
                "{:?} {:o} {}:{} n{} s{} m{}.{} c{}.{} {:?}",
                a.kind,
                a.perm,
                a.uid,
                a.gid,
                a.nlink,
                a.size,
                a.mtime.sec,
                a.mtime.nsec,
                a.ctime.sec,
                a.ctime.nsec,
                String::from_utf8_lossy(&i.target)
            )
        };
        if let Some(root) = self.inodes.get(&InodeId::ROOT) {
            out.push(format!("/ {}", describe(root)));
        }
        while let Some((dir, path, depth)) = stack.pop() {
            assert!(depth <= self.inodes.len(), "a directory cycle");
            for ((_, name), d) in self
                .dentries
                .range((dir, Vec::new())..)
                .take_while(|((p, _), _)| *p == dir)
            {
                let p = format!("{path}/{}", String::from_utf8_lossy(name));
                let what = match self.inodes.get(&d.ino) {
                    Some(i) => describe(i),
                    None => "MISSING".to_string(),
                };
                let same = match first_path.get(&d.ino) {
                    Some(f) => format!(" = {f}"),
                    None => {
                        first_path.insert(d.ino, p.clone());
                        String::new()
                    }
                };
                out.push(format!("{p} {what}{same}"));
                if d.kind == FileType::Directory {
                    stack.push((d.ino, p, depth + 1));
                }
            }
        }
        out.sort();
        out
    }
}

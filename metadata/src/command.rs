//! Namespace mutations as self-contained commands: what a Raft log carries. A command holds the
//! caller's credentials and the time the leader stamped, so every replica applying the same
//! commands in the same order reaches the same state and the same results ([`Namespace::apply`]).
//!
//! ```text
//! command:  u8 version (2) | creds | time now | u8 has_session | [u64 client | u64 seq] |
//!           u8 op | op fields      (version 1: no session fields)
//! creds:    u32 uid | u32 gid | u16 n | n x u32 group
//! time:     i64 sec | u32 nsec
//! ops (fields in order; bytes = u32 len + bytes, ino = u64):
//!   1 Mknod      ino parent | bytes name | u8 kind | u32 perm | u64 rdev
//!   2 Mkdir      ino parent | bytes name | u32 perm
//!   3 Symlink    ino parent | bytes name | bytes target
//!   4 Link       ino | ino newparent | bytes newname
//!   5 Unlink     ino parent | bytes name
//!   6 Rmdir      ino parent | bytes name
//!   7 Rename     ino parent | bytes name | ino newparent | bytes newname | u8 flags
//!   8 SetAttr    ino | setattr
//!   9 SetXattr   ino | bytes name | bytes value | u8 mode
//!  10 RemoveXattr ino | bytes name
//!  11 Open       ino | u8 read | u8 write
//!  12 Release    ino
//!  13 Create     ino parent | bytes name | u32 perm
//!  14 MapChunks  ino | u64 offset | u64 len
//!  15 Wrote      ino | u64 offset | u64 len | u32 n | n x (u64 index | u64 chunk)
//!  16 Fallocate  ino | u64 offset | u64 len | u8 keep_size
//!  17 Punched    ino | u64 offset | u64 len | u8 extend
//!  18 MarkStale  u32 n x u64 chunk | u32 m x u64 node
//!  19 Repaired   u64 chunk | u64 node
//!  20 AddMember  u64 id | bytes addr | bytes domain
//!  21 RemoveMember u64 id
//!  22 AddHolders u64 chunk | u32 m x u64 node
//!  23 DropHolders u64 chunk | u32 m x u64 node
//!  24 TxnBegin   reads | u8 has | [u64 client | u64 seq]
//!  25 TxnPrepare u64 txid | reads
//!  26 TxnDecide  u64 txid | u32 n x (u16 shard | writes) | u8 has | [u64 client | u64 seq |
//!                bytes outcome]
//!  27 TxnCommit  u64 txid | writes
//!  28 TxnAbort   u64 txid
//!  29 TxnAcked   u64 txid | u32 n x u16 shard
//! outcome:  u8 0 unit | u8 1 attr | u8 2 u32 n x (u64 index | u64 chunk) |
//!           u8 3 u64 txid | records | u8 4 u8 committed
//! ```
//! (reads, writes and records: [`crate::txn::encode_reads`], [`crate::txn::encode_writes`],
//! [`crate::txn::encode_records`].)

use crate::codec::{Reader, Writer};
use crate::namespace::{Namespace, RenameFlags, SetAttr, XattrMode};
use crate::session::Session;
use crate::txn::{TxId, TxnReads, TxnRecords, TxnWrite};
use crate::types::{Attr, ChunkId, Creds, Errno, FileType, InodeId, Timespec};

const VERSION: u8 = 2;

/// A namespace mutation.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are those of the `Namespace` method of the same name
pub enum Op {
    Mknod {
        parent: InodeId,
        name: Vec<u8>,
        kind: FileType,
        perm: u32,
        rdev: u64,
    },
    Mkdir {
        parent: InodeId,
        name: Vec<u8>,
        perm: u32,
    },
    Symlink {
        parent: InodeId,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    Link {
        ino: InodeId,
        newparent: InodeId,
        newname: Vec<u8>,
    },
    Unlink {
        parent: InodeId,
        name: Vec<u8>,
    },
    Rmdir {
        parent: InodeId,
        name: Vec<u8>,
    },
    Rename {
        parent: InodeId,
        name: Vec<u8>,
        newparent: InodeId,
        newname: Vec<u8>,
        flags: RenameFlags,
    },
    SetAttr {
        ino: InodeId,
        set: SetAttr,
    },
    SetXattr {
        ino: InodeId,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
    },
    RemoveXattr {
        ino: InodeId,
        name: Vec<u8>,
    },
    Open {
        ino: InodeId,
        read: bool,
        write: bool,
    },
    Release {
        ino: InodeId,
    },
    /// Make a regular file and open a handle on it.
    Create {
        parent: InodeId,
        name: Vec<u8>,
        perm: u32,
    },
    MapChunks {
        ino: InodeId,
        offset: u64,
        len: u64,
    },
    Wrote {
        ino: InodeId,
        offset: u64,
        len: u64,
        chunks: Vec<(u64, ChunkId)>,
    },
    Fallocate {
        ino: InodeId,
        offset: u64,
        len: u64,
        keep_size: bool,
    },
    Punched {
        ino: InodeId,
        offset: u64,
        len: u64,
        extend: bool,
    },
    /// Replicas `nodes` missed a change to `chunks`.
    MarkStale {
        chunks: Vec<ChunkId>,
        nodes: Vec<u64>,
    },
    /// `node`'s copy of `chunk` is current again.
    Repaired {
        chunk: ChunkId,
        node: u64,
    },
    /// A node joins the cluster (carried by a Raft configuration change).
    AddMember {
        id: u64,
        addr: String,
        domain: String,
    },
    /// A node leaves the cluster for good (carried by a Raft configuration change).
    RemoveMember {
        id: u64,
    },
    /// Placement move, step one: target nodes become (stale) holders of `chunk`.
    AddHolders {
        chunk: ChunkId,
        nodes: Vec<u64>,
    },
    /// Placement move, step two: holders outside the target are dropped.
    DropHolders {
        chunk: ChunkId,
        nodes: Vec<u64>,
    },
    /// Cross-shard transaction, on its home shard: allocate an id, record it in progress,
    /// lock and read ([`crate::txn`]).
    TxnBegin {
        reads: TxnReads,
        /// The client request being carried out: if it already took effect (an earlier
        /// attempt's transaction committed), its result is answered instead.
        op_session: Option<Session>,
    },
    /// Lock and read more for transaction `id`.
    TxnPrepare {
        id: TxId,
        reads: TxnReads,
    },
    /// The commit point, on the home shard: apply its writes, keep the others' until acked,
    /// remember `result` for the client's session.
    TxnDecide {
        id: TxId,
        writes: Vec<(u16, Vec<TxnWrite>)>,
        result: Option<(Session, Outcome)>,
    },
    /// Apply a committed transaction's writes on a participant and unlock.
    TxnCommit {
        id: TxId,
        writes: Vec<TxnWrite>,
    },
    /// Undo a transaction's prepare here (on its home shard: decide abort unless committed).
    TxnAbort {
        id: TxId,
    },
    /// Participants `shards` applied their writes: the home shard may forget them.
    TxnAcked {
        id: TxId,
        shards: Vec<u16>,
    },
    /// Object tier: blob `blob` is on the store with these extents ([`crate::tier`]).
    TierFlushed {
        blob: u128,
        payload_offset: u64,
        payload_bytes: u64,
        extents: Vec<crate::tier::Flushed>,
    },
    /// Object tier: the flash copies of `chunk` at `version` are to be dropped.
    TierEvicted {
        chunk: ChunkId,
        version: u64,
    },
    /// Object tier: `chunk`'s bytes are back on flash.
    TierRestored {
        chunk: ChunkId,
    },
    /// Object tier: `blob` holds nothing live; its DELETE is about to be sent.
    BlobDeleteStarted {
        blob: u128,
    },
    /// Object tier: `blob` is deleted on the store.
    BlobDeleted {
        blob: u128,
    },
    /// Object tier: the upload of `blob` is about to start.
    TierUploadStarted {
        blob: u128,
    },
    /// Object tier: the upload of `blob` was never recorded; its object is deleted.
    TierUploadAbandoned {
        blob: u128,
    },
}

/// A mutation with who asked and when (the leader's clock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The caller.
    pub creds: Creds,
    /// The time the command takes effect at.
    pub now: Timespec,
    /// What to do.
    pub op: Op,
    /// The client request this command carries out, when the client may resend it: applied
    /// once, the result is remembered and returned to a resend ([`crate::session`]).
    pub session: Option<Session>,
}

/// What a successful command returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing.
    Unit,
    /// Attributes of the inode made or changed.
    Attr(Attr),
    /// Chunks mapped (chunk index, chunk).
    Chunks(Vec<(u64, ChunkId)>),
    /// A transaction's id and what its prepare read.
    Txn {
        /// The transaction.
        id: TxId,
        /// Records read under its locks.
        records: TxnRecords,
    },
    /// Whether the transaction is committed (else aborted).
    Committed(bool),
}

impl Namespace {
    /// Applies a command: the only way a replicated namespace changes. Deterministic: same
    /// state and command, same result and same new state.
    pub fn apply(&mut self, c: &Command) -> Result<Outcome, Errno> {
        let Some(s) = c.session else {
            self.gate(&c.op)?;
            return self.apply_op(c);
        };
        if let Some(first) = self.session_result(s) {
            // A resend of a command that already applied: the same answer, no second effect.
            return first;
        }
        // Not run here (spans shards, or locked): nothing to remember.
        self.gate(&c.op)?;
        let r = self.apply_op(c);
        if !matches!(r, Err(Errno::Again | Errno::XDev)) {
            self.record_session(s, c.now, r.clone());
        }
        r
    }

    pub(crate) fn apply_op(&mut self, c: &Command) -> Result<Outcome, Errno> {
        let (cr, t) = (&c.creds, c.now);
        Ok(match &c.op {
            Op::Mknod {
                parent,
                name,
                kind,
                perm,
                rdev,
            } => Outcome::Attr(self.mknod(cr, *parent, name, *kind, *perm, *rdev, t)?),
            Op::Mkdir { parent, name, perm } => {
                Outcome::Attr(self.mkdir(cr, *parent, name, *perm, t)?)
            }
            Op::Symlink {
                parent,
                name,
                target,
            } => Outcome::Attr(self.symlink(cr, *parent, name, target, t)?),
            Op::Link {
                ino,
                newparent,
                newname,
            } => Outcome::Attr(self.link(cr, *ino, *newparent, newname, t)?),
            Op::Unlink { parent, name } => {
                self.unlink(cr, *parent, name, t)?;
                Outcome::Unit
            }
            Op::Rmdir { parent, name } => {
                self.rmdir(cr, *parent, name, t)?;
                Outcome::Unit
            }
            Op::Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => {
                self.rename(cr, *parent, name, *newparent, newname, *flags, t)?;
                Outcome::Unit
            }
            Op::SetAttr { ino, set } => Outcome::Attr(self.setattr(cr, *ino, set, t)?),
            Op::SetXattr {
                ino,
                name,
                value,
                mode,
            } => {
                self.setxattr(cr, *ino, name, value, *mode, t)?;
                Outcome::Unit
            }
            Op::RemoveXattr { ino, name } => {
                self.removexattr(cr, *ino, name, t)?;
                Outcome::Unit
            }
            Op::Open { ino, read, write } => Outcome::Attr(self.open(cr, *ino, *read, *write)?),
            Op::Release { ino } => {
                self.release(*ino)?;
                Outcome::Unit
            }
            Op::Create { parent, name, perm } => {
                let a = self.mknod(cr, *parent, name, FileType::Regular, *perm, 0, t)?;
                // The creator may use the file whatever its mode says (open(O_CREAT)).
                self.open(&Creds::root(), a.ino, false, false)?;
                Outcome::Attr(a)
            }
            Op::MapChunks { ino, offset, len } => {
                if *len == 0 {
                    return Err(Errno::Inval);
                }
                Outcome::Chunks(self.map_chunks(*ino, *offset, *len)?)
            }
            Op::Wrote {
                ino,
                offset,
                len,
                chunks,
            } => Outcome::Attr(self.wrote(cr, *ino, *offset, *len, chunks, t)?),
            Op::Fallocate {
                ino,
                offset,
                len,
                keep_size,
            } => Outcome::Attr(self.fallocate(*ino, *offset, *len, *keep_size, t)?),
            Op::Punched {
                ino,
                offset,
                len,
                extend,
            } => Outcome::Attr(self.punched(*ino, *offset, *len, *extend, t)?),
            Op::MarkStale { chunks, nodes } => {
                self.mark_stale(chunks, nodes);
                Outcome::Unit
            }
            Op::Repaired { chunk, node } => {
                self.repaired(*chunk, *node);
                Outcome::Unit
            }
            Op::AddMember { id, addr, domain } => {
                self.add_member(
                    *id,
                    crate::placement::Member {
                        addr: addr.clone(),
                        domain: domain.clone(),
                    },
                )?;
                Outcome::Unit
            }
            Op::RemoveMember { id } => {
                self.remove_member(*id)?;
                Outcome::Unit
            }
            Op::AddHolders { chunk, nodes } => {
                self.add_holders(*chunk, nodes)?;
                Outcome::Unit
            }
            Op::DropHolders { chunk, nodes } => {
                self.drop_holders(*chunk, nodes);
                Outcome::Unit
            }
            Op::TxnBegin { reads, op_session } => {
                if let Some(first) = op_session.and_then(|s| self.session_result(s)) {
                    return first;
                }
                self.txn_begin(reads, c.session, t)?
            }
            Op::TxnPrepare { id, reads } => self.txn_prepare(*id, reads, t)?,
            Op::TxnDecide { id, writes, result } => {
                self.txn_decide(*id, writes, result.clone(), t)?
            }
            Op::TxnCommit { id, writes } => self.txn_commit(*id, writes, t)?,
            Op::TxnAbort { id } => self.txn_abort(*id, t)?,
            Op::TxnAcked { id, shards } => self.txn_acked(*id, shards)?,
            Op::TierFlushed {
                blob,
                payload_offset,
                payload_bytes,
                extents,
            } => {
                self.tier
                    .flushed(*blob, *payload_offset, *payload_bytes, extents)
                    .map_err(tier_errno)?;
                self.dirty_tier = true;
                Outcome::Unit
            }
            Op::TierEvicted { chunk, version } => {
                let evicted = self.tier.evict(*chunk, *version);
                self.dirty_tier |= evicted;
                Outcome::Committed(evicted)
            }
            Op::TierRestored { chunk } => {
                self.tier.restored(*chunk);
                self.dirty_tier = true;
                Outcome::Unit
            }
            Op::BlobDeleteStarted { blob } => {
                self.tier.delete_started(*blob).map_err(tier_errno)?;
                self.dirty_tier = true;
                Outcome::Unit
            }
            Op::BlobDeleted { blob } => {
                self.tier.blob_deleted(*blob).map_err(tier_errno)?;
                self.dirty_tier = true;
                Outcome::Unit
            }
            Op::TierUploadStarted { blob } => {
                self.tier.upload_started(*blob).map_err(tier_errno)?;
                self.dirty_tier = true;
                Outcome::Unit
            }
            Op::TierUploadAbandoned { blob } => {
                self.tier.upload_abandoned(*blob);
                self.dirty_tier = true;
                Outcome::Unit
            }
        })
    }
}

/// A refused tier index change as the errno a caller sees.
fn tier_errno(e: crate::tier::TierError) -> Errno {
    use crate::tier::TierError;
    match e {
        TierError::Evicted(_) => Errno::Io,
        TierError::BlobExists(_) => Errno::Exist,
        TierError::NoBlob(_) => Errno::NoEnt,
        TierError::BlobLive(_) => Errno::Again,
        TierError::BadFlush(_) => Errno::Inval,
    }
}

impl Op {
    /// The code of [`Op::Wrote`].
    pub const WROTE_CODE: u8 = 15;

    /// The op's code in the encoding (1..=36).
    pub fn code(&self) -> u8 {
        match self {
            Op::Mknod { .. } => 1,
            Op::Mkdir { .. } => 2,
            Op::Symlink { .. } => 3,
            Op::Link { .. } => 4,
            Op::Unlink { .. } => 5,
            Op::Rmdir { .. } => 6,
            Op::Rename { .. } => 7,
            Op::SetAttr { .. } => 8,
            Op::SetXattr { .. } => 9,
            Op::RemoveXattr { .. } => 10,
            Op::Open { .. } => 11,
            Op::Release { .. } => 12,
            Op::Create { .. } => 13,
            Op::MapChunks { .. } => 14,
            Op::Wrote { .. } => Op::WROTE_CODE,
            Op::Fallocate { .. } => 16,
            Op::Punched { .. } => 17,
            Op::MarkStale { .. } => 18,
            Op::Repaired { .. } => 19,
            Op::AddMember { .. } => 20,
            Op::RemoveMember { .. } => 21,
            Op::AddHolders { .. } => 22,
            Op::DropHolders { .. } => 23,
            Op::TxnBegin { .. } => 24,
            Op::TxnPrepare { .. } => 25,
            Op::TxnDecide { .. } => 26,
            Op::TxnCommit { .. } => 27,
            Op::TxnAbort { .. } => 28,
            Op::TxnAcked { .. } => 29,
            Op::TierFlushed { .. } => 30,
            Op::TierEvicted { .. } => 31,
            Op::TierRestored { .. } => 32,
            Op::BlobDeleteStarted { .. } => 33,
            Op::BlobDeleted { .. } => 34,
            Op::TierUploadStarted { .. } => 35,
            Op::TierUploadAbandoned { .. } => 36,
        }
    }
}

impl Command {
    /// Encodes the command (layout in the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        w.u8(VERSION);
        w.creds(&self.creds);
        w.time(self.now);
        match self.session {
            Some(s) => {
                w.u8(1);
                w.u64(s.client);
                w.u64(s.seq);
            }
            None => w.u8(0),
        }
        match &self.op {
            Op::Mknod {
                parent,
                name,
                kind,
                perm,
                rdev,
            } => {
                w.u8(1);
                w.ino(*parent);
                w.bytes(name);
                w.u8(kind.to_byte());
                w.u32(*perm);
                w.u64(*rdev);
            }
            Op::Mkdir { parent, name, perm } => {
                w.u8(2);
                w.ino(*parent);
                w.bytes(name);
                w.u32(*perm);
            }
            Op::Symlink {
                parent,
                name,
                target,
            } => {
                w.u8(3);
                w.ino(*parent);
                w.bytes(name);
                w.bytes(target);
            }
            Op::Link {
                ino,
                newparent,
                newname,
            } => {
                w.u8(4);
                w.ino(*ino);
                w.ino(*newparent);
                w.bytes(newname);
            }
            Op::Unlink { parent, name } => {
                w.u8(5);
                w.ino(*parent);
                w.bytes(name);
            }
            Op::Rmdir { parent, name } => {
                w.u8(6);
                w.ino(*parent);
                w.bytes(name);
            }
            Op::Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => {
                w.u8(7);
                w.ino(*parent);
                w.bytes(name);
                w.ino(*newparent);
                w.bytes(newname);
                w.rename_flags(*flags);
            }
            Op::SetAttr { ino, set } => {
                w.u8(8);
                w.ino(*ino);
                w.setattr(set);
            }
            Op::SetXattr {
                ino,
                name,
                value,
                mode,
            } => {
                w.u8(9);
                w.ino(*ino);
                w.bytes(name);
                w.bytes(value);
                w.xattr_mode(*mode);
            }
            Op::RemoveXattr { ino, name } => {
                w.u8(10);
                w.ino(*ino);
                w.bytes(name);
            }
            Op::Open { ino, read, write } => {
                w.u8(11);
                w.ino(*ino);
                w.u8(u8::from(*read));
                w.u8(u8::from(*write));
            }
            Op::Release { ino } => {
                w.u8(12);
                w.ino(*ino);
            }
            Op::Create { parent, name, perm } => {
                w.u8(13);
                w.ino(*parent);
                w.bytes(name);
                w.u32(*perm);
            }
            Op::MapChunks { ino, offset, len } => {
                w.u8(14);
                w.ino(*ino);
                w.u64(*offset);
                w.u64(*len);
            }
            Op::Wrote {
                ino,
                offset,
                len,
                chunks,
            } => {
                w.u8(15);
                w.ino(*ino);
                w.u64(*offset);
                w.u64(*len);
                w.u32(chunks.len() as u32);
                for (idx, c) in chunks {
                    w.u64(*idx);
                    w.u64(c.0);
                }
            }
            Op::Fallocate {
                ino,
                offset,
                len,
                keep_size,
            } => {
                w.u8(16);
                w.ino(*ino);
                w.u64(*offset);
                w.u64(*len);
                w.u8(u8::from(*keep_size));
            }
            Op::Punched {
                ino,
                offset,
                len,
                extend,
            } => {
                w.u8(17);
                w.ino(*ino);
                w.u64(*offset);
                w.u64(*len);
                w.u8(u8::from(*extend));
            }
            Op::MarkStale { chunks, nodes } => {
                w.u8(18);
                w.u32(chunks.len() as u32);
                for c in chunks {
                    w.u64(c.0);
                }
                w.u32(nodes.len() as u32);
                for n in nodes {
                    w.u64(*n);
                }
            }
            Op::Repaired { chunk, node } => {
                w.u8(19);
                w.u64(chunk.0);
                w.u64(*node);
            }
            Op::AddMember { id, addr, domain } => {
                w.u8(20);
                w.u64(*id);
                w.bytes(addr.as_bytes());
                w.bytes(domain.as_bytes());
            }
            Op::RemoveMember { id } => {
                w.u8(21);
                w.u64(*id);
            }
            Op::AddHolders { chunk, nodes } | Op::DropHolders { chunk, nodes } => {
                w.u8(if matches!(self.op, Op::AddHolders { .. }) {
                    22
                } else {
                    23
                });
                w.u64(chunk.0);
                w.u32(nodes.len() as u32);
                for n in nodes {
                    w.u64(*n);
                }
            }
            Op::TxnBegin { reads, op_session } => {
                w.u8(24);
                crate::txn::encode_reads(&mut w, reads);
                match op_session {
                    Some(s) => {
                        w.u8(1);
                        w.u64(s.client);
                        w.u64(s.seq);
                    }
                    None => w.u8(0),
                }
            }
            Op::TxnPrepare { id, reads } => {
                w.u8(25);
                w.u64(id.0);
                crate::txn::encode_reads(&mut w, reads);
            }
            Op::TxnDecide { id, writes, result } => {
                w.u8(26);
                w.u64(id.0);
                w.u32(writes.len() as u32);
                for (shard, ws) in writes {
                    w.u16(*shard);
                    crate::txn::encode_writes(&mut w, ws);
                }
                match result {
                    Some((s, o)) => {
                        w.u8(1);
                        w.u64(s.client);
                        w.u64(s.seq);
                        w.bytes(&o.encode());
                    }
                    None => w.u8(0),
                }
            }
            Op::TxnCommit { id, writes } => {
                w.u8(27);
                w.u64(id.0);
                crate::txn::encode_writes(&mut w, writes);
            }
            Op::TxnAbort { id } => {
                w.u8(28);
                w.u64(id.0);
            }
            Op::TxnAcked { id, shards } => {
                w.u8(29);
                w.u64(id.0);
                w.u32(shards.len() as u32);
                for s in shards {
                    w.u16(*s);
                }
            }
            Op::TierFlushed {
                blob,
                payload_offset,
                payload_bytes,
                extents,
            } => {
                w.u8(30);
                w.u128(*blob);
                w.u64(*payload_offset);
                w.u64(*payload_bytes);
                w.u32(extents.len() as u32);
                for f in extents {
                    w.u64(f.chunk.0);
                    w.u64(f.version);
                    w.u64(f.blob_offset);
                    w.u32(f.len);
                    w.u32(f.crc32c);
                }
            }
            Op::TierEvicted { chunk, version } => {
                w.u8(31);
                w.u64(chunk.0);
                w.u64(*version);
            }
            Op::TierRestored { chunk } => {
                w.u8(32);
                w.u64(chunk.0);
            }
            Op::BlobDeleteStarted { blob } => {
                w.u8(33);
                w.u128(*blob);
            }
            Op::BlobDeleted { blob } => {
                w.u8(34);
                w.u128(*blob);
            }
            Op::TierUploadStarted { blob } => {
                w.u8(35);
                w.u128(*blob);
            }
            Op::TierUploadAbandoned { blob } => {
                w.u8(36);
                w.u128(*blob);
            }
        }
        w.0
    }

    /// Decodes a command; `None` on any malformed byte.
    pub fn decode(b: &[u8]) -> Option<Command> {
        let mut r = Reader::new(b);
        let version = r.u8()?;
        if version != 1 && version != VERSION {
            return None;
        }
        let creds = r.creds()?;
        let now = r.time()?;
        let session = match version {
            1 => None,
            _ => match r.u8()? {
                0 => None,
                1 => Some(Session {
                    client: r.u64()?,
                    seq: r.u64()?,
                }),
                _ => return None,
            },
        };
        let op = match r.u8()? {
            1 => Op::Mknod {
                parent: r.ino()?,
                name: r.bytes()?,
                kind: FileType::from_byte(r.u8()?)?,
                perm: r.u32()?,
                rdev: r.u64()?,
            },
            2 => Op::Mkdir {
                parent: r.ino()?,
                name: r.bytes()?,
                perm: r.u32()?,
            },
            3 => Op::Symlink {
                parent: r.ino()?,
                name: r.bytes()?,
                target: r.bytes()?,
            },
            4 => Op::Link {
                ino: r.ino()?,
                newparent: r.ino()?,
                newname: r.bytes()?,
            },
            5 => Op::Unlink {
                parent: r.ino()?,
                name: r.bytes()?,
            },
            6 => Op::Rmdir {
                parent: r.ino()?,
                name: r.bytes()?,
            },
            7 => Op::Rename {
                parent: r.ino()?,
                name: r.bytes()?,
                newparent: r.ino()?,
                newname: r.bytes()?,
                flags: r.rename_flags()?,
            },
            8 => Op::SetAttr {
                ino: r.ino()?,
                set: r.setattr()?,
            },
            9 => Op::SetXattr {
                ino: r.ino()?,
                name: r.bytes()?,
                value: r.bytes()?,
                mode: r.xattr_mode()?,
            },
            10 => Op::RemoveXattr {
                ino: r.ino()?,
                name: r.bytes()?,
            },
            11 => Op::Open {
                ino: r.ino()?,
                read: r.bool()?,
                write: r.bool()?,
            },
            12 => Op::Release { ino: r.ino()? },
            13 => Op::Create {
                parent: r.ino()?,
                name: r.bytes()?,
                perm: r.u32()?,
            },
            14 => Op::MapChunks {
                ino: r.ino()?,
                offset: r.u64()?,
                len: r.u64()?,
            },
            15 => {
                let (ino, offset, len) = (r.ino()?, r.u64()?, r.u64()?);
                let n = r.u32()? as usize;
                let mut chunks = Vec::with_capacity(n.min(b.len() / 16));
                for _ in 0..n {
                    chunks.push((r.u64()?, ChunkId(r.u64()?)));
                }
                Op::Wrote {
                    ino,
                    offset,
                    len,
                    chunks,
                }
            }
            16 => Op::Fallocate {
                ino: r.ino()?,
                offset: r.u64()?,
                len: r.u64()?,
                keep_size: r.bool()?,
            },
            17 => Op::Punched {
                ino: r.ino()?,
                offset: r.u64()?,
                len: r.u64()?,
                extend: r.bool()?,
            },
            18 => {
                let n = r.u32()? as usize;
                let mut chunks = Vec::with_capacity(n.min(b.len() / 8));
                for _ in 0..n {
                    chunks.push(ChunkId(r.u64()?));
                }
                let m = r.u32()? as usize;
                let mut nodes = Vec::with_capacity(m.min(b.len() / 8));
                for _ in 0..m {
                    nodes.push(r.u64()?);
                }
                Op::MarkStale { chunks, nodes }
            }
            19 => Op::Repaired {
                chunk: ChunkId(r.u64()?),
                node: r.u64()?,
            },
            20 => Op::AddMember {
                id: r.u64()?,
                addr: String::from_utf8(r.bytes()?).ok()?,
                domain: String::from_utf8(r.bytes()?).ok()?,
            },
            21 => Op::RemoveMember { id: r.u64()? },
            tag @ (22 | 23) => {
                let chunk = ChunkId(r.u64()?);
                let m = r.u32()? as usize;
                let mut nodes = Vec::with_capacity(m.min(b.len() / 8));
                for _ in 0..m {
                    nodes.push(r.u64()?);
                }
                if tag == 22 {
                    Op::AddHolders { chunk, nodes }
                } else {
                    Op::DropHolders { chunk, nodes }
                }
            }
            24 => Op::TxnBegin {
                reads: crate::txn::decode_reads(&mut r)?,
                op_session: match r.u8()? {
                    0 => None,
                    1 => Some(Session {
                        client: r.u64()?,
                        seq: r.u64()?,
                    }),
                    _ => return None,
                },
            },
            25 => Op::TxnPrepare {
                id: TxId(r.u64()?),
                reads: crate::txn::decode_reads(&mut r)?,
            },
            26 => {
                let id = TxId(r.u64()?);
                let n = r.u32()? as usize;
                let mut writes = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    writes.push((r.u16()?, crate::txn::decode_writes(&mut r)?));
                }
                let result = match r.u8()? {
                    0 => None,
                    1 => {
                        let s = Session {
                            client: r.u64()?,
                            seq: r.u64()?,
                        };
                        Some((s, Outcome::decode(&r.bytes()?)?))
                    }
                    _ => return None,
                };
                Op::TxnDecide { id, writes, result }
            }
            27 => Op::TxnCommit {
                id: TxId(r.u64()?),
                writes: crate::txn::decode_writes(&mut r)?,
            },
            28 => Op::TxnAbort { id: TxId(r.u64()?) },
            29 => {
                let id = TxId(r.u64()?);
                let n = r.u32()? as usize;
                let mut shards = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    shards.push(r.u16()?);
                }
                Op::TxnAcked { id, shards }
            }
            30 => {
                let blob = r.u128()?;
                let payload_offset = r.u64()?;
                let payload_bytes = r.u64()?;
                let n = r.u32()? as usize;
                let mut extents = Vec::with_capacity(n.min(b.len() / 32));
                for _ in 0..n {
                    extents.push(crate::tier::Flushed {
                        chunk: ChunkId(r.u64()?),
                        version: r.u64()?,
                        blob_offset: r.u64()?,
                        len: r.u32()?,
                        crc32c: r.u32()?,
                    });
                }
                Op::TierFlushed {
                    blob,
                    payload_offset,
                    payload_bytes,
                    extents,
                }
            }
            31 => Op::TierEvicted {
                chunk: ChunkId(r.u64()?),
                version: r.u64()?,
            },
            32 => Op::TierRestored {
                chunk: ChunkId(r.u64()?),
            },
            33 => Op::BlobDeleteStarted { blob: r.u128()? },
            34 => Op::BlobDeleted { blob: r.u128()? },
            35 => Op::TierUploadStarted { blob: r.u128()? },
            36 => Op::TierUploadAbandoned { blob: r.u128()? },
            _ => return None,
        };
        r.end()?;
        Some(Command {
            creds,
            now,
            op,
            session,
        })
    }
}

impl Outcome {
    /// Encodes the outcome.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Outcome::Unit => w.u8(0),
            Outcome::Attr(a) => {
                w.u8(1);
                w.attr(a);
            }
            Outcome::Chunks(cs) => {
                w.u8(2);
                w.u32(cs.len() as u32);
                for (idx, c) in cs {
                    w.u64(*idx);
                    w.u64(c.0);
                }
            }
            Outcome::Txn { id, records } => {
                w.u8(3);
                w.u64(id.0);
                crate::txn::encode_records(&mut w, records);
            }
            Outcome::Committed(c) => {
                w.u8(4);
                w.u8(u8::from(*c));
            }
        }
        w.0
    }

    /// Decodes an outcome; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<Outcome> {
        let mut r = Reader::new(b);
        let o = match r.u8()? {
            0 => Outcome::Unit,
            1 => Outcome::Attr(r.attr()?),
            2 => {
                let n = r.u32()? as usize;
                let mut cs = Vec::with_capacity(n.min(b.len() / 16));
                for _ in 0..n {
                    cs.push((r.u64()?, ChunkId(r.u64()?)));
                }
                Outcome::Chunks(cs)
            }
            3 => Outcome::Txn {
                id: TxId(r.u64()?),
                records: crate::txn::decode_records(&mut r)?,
            },
            4 => Outcome::Committed(r.bool()?),
            _ => return None,
        };
        r.end()?;
        Some(o)
    }
}

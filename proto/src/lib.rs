//! The file-system RPC: one method id per request type, payloads in a fixed little-endian
//! layout (sized integers; byte strings as u32 length + bytes). Decoders are total: any input
//! gives a value or `None`, never a panic or an allocation larger than the input.
//!
//! Every request starts with the caller's credentials: `u32 uid | u32 gid | u16 ngroups |
//! ngroups x u32`. Errors travel as RPC error frames with code `1000 + errno`.

#![forbid(unsafe_code)]

pub mod resolve;
pub mod rma;

use cfs_meta::codec::{Reader, Writer};
use cfs_meta::namespace::{DirEntry, FsStats};
use cfs_meta::{Attr, Creds, FileType, InodeId, RenameFlags, SetAttr, XattrMode};

/// A file-system request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Find `name` in `parent`.
    Lookup { parent: InodeId, name: Vec<u8> },
    /// Attributes.
    GetAttr { ino: InodeId },
    /// Change attributes.
    SetAttr { ino: InodeId, set: SetAttr },
    /// Create a file, device node, FIFO or socket.
    Mknod {
        parent: InodeId,
        name: Vec<u8>,
        kind: FileType,
        perm: u32,
        rdev: u64,
    },
    /// Create a directory.
    Mkdir {
        parent: InodeId,
        name: Vec<u8>,
        perm: u32,
    },
    /// Create a symlink.
    Symlink {
        parent: InodeId,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    /// Add a hard link.
    Link {
        ino: InodeId,
        newparent: InodeId,
        newname: Vec<u8>,
    },
    /// Remove a non-directory.
    Unlink { parent: InodeId, name: Vec<u8> },
    /// Remove an empty directory.
    Rmdir { parent: InodeId, name: Vec<u8> },
    /// Rename.
    Rename {
        parent: InodeId,
        name: Vec<u8>,
        newparent: InodeId,
        newname: Vec<u8>,
        flags: RenameFlags,
    },
    /// Symlink target.
    Readlink { ino: InodeId },
    /// Open (permission check, handle count); `truncate` empties a regular file.
    Open {
        ino: InodeId,
        read: bool,
        write: bool,
        truncate: bool,
    },
    /// Drop a handle.
    Release { ino: InodeId },
    /// Directory entries after `cookie`.
    ReadDir {
        ino: InodeId,
        cookie: u64,
        limit: u32,
    },
    /// Set an xattr.
    SetXattr {
        ino: InodeId,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
    },
    /// Get an xattr.
    GetXattr { ino: InodeId, name: Vec<u8> },
    /// List xattr names.
    ListXattr { ino: InodeId },
    /// Remove an xattr.
    RemoveXattr { ino: InodeId, name: Vec<u8> },
    /// Permission check.
    Access { ino: InodeId, mask: u32 },
    /// File-system totals.
    Statfs,
    /// Write file data (durable when the reply comes).
    Write {
        ino: InodeId,
        offset: u64,
        data: Vec<u8>,
    },
    /// Read file data (short at end of file).
    Read { ino: InodeId, offset: u64, len: u32 },
    /// Allocate, punch or zero a range; `mode` holds Linux `FALLOC_FL_*` bits.
    Fallocate {
        ino: InodeId,
        offset: u64,
        len: u64,
        mode: u32,
    },
    /// Next data (`whence` = 3, SEEK_DATA) or hole (4, SEEK_HOLE) at or after `offset`.
    Lseek {
        ino: InodeId,
        offset: u64,
        whence: u32,
    },
    /// Directory entries after `cookie`, each with its attributes (readdirplus).
    ReadDirPlus {
        ino: InodeId,
        cookie: u64,
        limit: u32,
    },
    /// Create a regular file and open a handle on it (one round trip for open(O_CREAT)).
    Create {
        parent: InodeId,
        name: Vec<u8>,
        perm: u32,
    },
    /// Make everything acknowledged about the file durable (metadata deferred by writes that
    /// changed only times).
    Fsync { ino: InodeId },
    /// This node's view of the cluster, as JSON text in [`Reply::Data`] (answered by the node
    /// asked, never forwarded).
    Status,
    /// Where each metadata shard's leader is, as the node asked knows it ([`Reply::Routes`];
    /// answered by that node, never forwarded): a client sends each request straight to the
    /// leader of its shard ([`Request::shard`]) and saves the forwarding hop.
    Routes,
}

/// One metadata shard's leader as a node knows it (index in [`Reply::Routes`] = shard).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardRoute {
    /// The leader's node id (0: no leader known).
    pub leader: u64,
    /// Its RPC address (empty when unknown).
    pub addr: String,
}

/// `FALLOC_FL_KEEP_SIZE`: do not change the file size.
pub const FALLOC_KEEP_SIZE: u32 = 0x01;
/// `FALLOC_FL_PUNCH_HOLE`: deallocate the range (must come with KEEP_SIZE).
pub const FALLOC_PUNCH_HOLE: u32 = 0x02;
/// `FALLOC_FL_ZERO_RANGE`: make the range read as zeros.
pub const FALLOC_ZERO_RANGE: u32 = 0x10;
/// `SEEK_DATA`.
pub const SEEK_DATA: u32 = 3;
/// `SEEK_HOLE`.
pub const SEEK_HOLE: u32 = 4;

/// A successful reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing to return.
    Unit,
    /// Attributes.
    Attr(Attr),
    /// Bytes (readlink, getxattr, read).
    Data(Vec<u8>),
    /// Directory entries.
    Entries(Vec<DirEntry>),
    /// Names (listxattr).
    Names(Vec<Vec<u8>>),
    /// Totals.
    Stats(FsStats),
    /// A file offset (lseek).
    Offset(u64),
    /// Directory entries with attributes (readdirplus).
    EntriesPlus(Vec<(DirEntry, Attr)>),
    /// Shard leaders (index = shard; empty on a server without shards).
    Routes(Vec<ShardRoute>),
}

/// Error-frame code for an errno: `ERRNO_BASE + errno`, for errno below [`ERRNO_LIMIT`].
pub const ERRNO_BASE: u32 = 1000;

/// Errno values are below this (Linux's are below 4096).
pub const ERRNO_LIMIT: u32 = 4096;

/// The errno an error-frame code carries, if it carries one.
pub fn errno_of_code(code: u32) -> Option<i32> {
    (ERRNO_BASE..ERRNO_BASE + ERRNO_LIMIT)
        .contains(&code)
        .then(|| (code - ERRNO_BASE) as i32)
}

/// Set on a request's method id when its payload starts with a session (`u64 client | u64
/// seq`, then the request as usual): the client may resend it after a lost reply, and the
/// cluster applies it once ([`cfs_meta::session`]).
pub const SESSION: u32 = 0x4000_0000;

/// Prefixes `payload` with a session (send with `method | SESSION`).
pub fn with_session(s: cfs_meta::session::Session, payload: &[u8]) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(16 + payload.len()));
    w.u64(s.client);
    w.u64(s.seq);
    w.0.extend_from_slice(payload);
    w.0
}

/// Splits a received method and payload into (method, session, request payload); `None` if
/// the session bit is set and the payload is too short for one.
pub fn split_session(
    method: u32,
    payload: &[u8],
) -> Option<(u32, Option<cfs_meta::session::Session>, &[u8])> {
    if method & SESSION == 0 {
        return Some((method, None, payload));
    }
    let head = payload.get(..16)?;
    let mut r = Reader::new(head);
    let s = cfs_meta::session::Session {
        client: r.u64()?,
        seq: r.u64()?,
    };
    Some((method & !SESSION, Some(s), &payload[16..]))
}

impl Request {
    /// Whether the request only reads: running it twice is harmless, so a client may resend
    /// it after a lost connection.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Lookup { .. }
                | Request::GetAttr { .. }
                | Request::Readlink { .. }
                | Request::ReadDir { .. }
                | Request::ReadDirPlus { .. }
                | Request::GetXattr { .. }
                | Request::ListXattr { .. }
                | Request::Access { .. }
                | Request::Statfs
                | Request::Read { .. }
                | Request::Lseek { .. }
                | Request::Status
                | Request::Routes
        )
    }

    /// The inode whose metadata shard serves the request: the inode, or the parent directory,
    /// it names (`None`: a request about the whole file system, served by shard 0 or by the
    /// node asked).
    pub fn route_ino(&self) -> Option<InodeId> {
        match self {
            Request::Lookup { parent, .. }
            | Request::Mknod { parent, .. }
            | Request::Mkdir { parent, .. }
            | Request::Symlink { parent, .. }
            | Request::Unlink { parent, .. }
            | Request::Rmdir { parent, .. }
            | Request::Rename { parent, .. }
            | Request::Create { parent, .. } => Some(*parent),
            Request::Link { newparent, .. } => Some(*newparent),
            Request::GetAttr { ino }
            | Request::SetAttr { ino, .. }
            | Request::Readlink { ino }
            | Request::Open { ino, .. }
            | Request::Release { ino }
            | Request::Fsync { ino }
            | Request::ReadDir { ino, .. }
            | Request::ReadDirPlus { ino, .. }
            | Request::SetXattr { ino, .. }
            | Request::GetXattr { ino, .. }
            | Request::ListXattr { ino }
            | Request::RemoveXattr { ino, .. }
            | Request::Access { ino, .. }
            | Request::Write { ino, .. }
            | Request::Read { ino, .. }
            | Request::Fallocate { ino, .. }
            | Request::Lseek { ino, .. } => Some(*ino),
            Request::Statfs | Request::Status | Request::Routes => None,
        }
    }

    /// The metadata shard (of `shards`) whose leader serves the request.
    pub fn shard(&self, shards: u16) -> u16 {
        self.route_ino()
            .map_or(0, |ino| cfs_meta::shard::shard_of_id(shards, ino.0))
    }

    /// The RPC method id.
    pub fn method(&self) -> u32 {
        match self {
            Request::Lookup { .. } => 1,
            Request::GetAttr { .. } => 2,
            Request::SetAttr { .. } => 3,
            Request::Mknod { .. } => 4,
            Request::Mkdir { .. } => 5,
            Request::Symlink { .. } => 6,
            Request::Link { .. } => 7,
            Request::Unlink { .. } => 8,
            Request::Rmdir { .. } => 9,
            Request::Rename { .. } => 10,
            Request::Readlink { .. } => 11,
            Request::Open { .. } => 12,
            Request::Release { .. } => 13,
            Request::ReadDir { .. } => 14,
            Request::SetXattr { .. } => 15,
            Request::GetXattr { .. } => 16,
            Request::ListXattr { .. } => 17,
            Request::RemoveXattr { .. } => 18,
            Request::Access { .. } => 19,
            Request::Statfs => 20,
            Request::Write { .. } => 21,
            Request::Read { .. } => 22,
            Request::Fallocate { .. } => 23,
            Request::Lseek { .. } => 24,
            Request::ReadDirPlus { .. } => 25,
            Request::Create { .. } => 26,
            Request::Fsync { .. } => 27,
            Request::Status => 28,
            Request::Routes => 29,
        }
    }

    /// Encodes the credentials and the request's fields (the method id travels in the frame).
    pub fn encode(&self, creds: &Creds) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        w.creds(creds);
        match self {
            Request::Lookup { parent, name }
            | Request::Unlink { parent, name }
            | Request::Rmdir { parent, name } => {
                w.ino(*parent);
                w.bytes(name);
            }
            Request::GetAttr { ino }
            | Request::Readlink { ino }
            | Request::Release { ino }
            | Request::ListXattr { ino } => w.ino(*ino),
            Request::SetAttr { ino, set } => {
                w.ino(*ino);
                w.setattr(set);
            }
            Request::Mknod {
                parent,
                name,
                kind,
                perm,
                rdev,
            } => {
                w.ino(*parent);
                w.bytes(name);
                w.u8(kind.to_byte());
                w.u32(*perm);
                w.u64(*rdev);
            }
            Request::Mkdir { parent, name, perm } => {
                w.ino(*parent);
                w.bytes(name);
                w.u32(*perm);
            }
            Request::Symlink {
                parent,
                name,
                target,
            } => {
                w.ino(*parent);
                w.bytes(name);
                w.bytes(target);
            }
            Request::Link {
                ino,
                newparent,
                newname,
            } => {
                w.ino(*ino);
                w.ino(*newparent);
                w.bytes(newname);
            }
            Request::Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => {
                w.ino(*parent);
                w.bytes(name);
                w.ino(*newparent);
                w.bytes(newname);
                w.rename_flags(*flags);
            }
            Request::Open {
                ino,
                read,
                write,
                truncate,
            } => {
                w.ino(*ino);
                w.u8(u8::from(*read) | u8::from(*write) << 1 | u8::from(*truncate) << 2);
            }
            Request::ReadDir { ino, cookie, limit }
            | Request::ReadDirPlus { ino, cookie, limit } => {
                w.ino(*ino);
                w.u64(*cookie);
                w.u32(*limit);
            }
            Request::Create { parent, name, perm } => {
                w.ino(*parent);
                w.bytes(name);
                w.u32(*perm);
            }
            Request::Fsync { ino } => w.ino(*ino),
            Request::Status | Request::Routes => {}
            Request::Fallocate {
                ino,
                offset,
                len,
                mode,
            } => {
                w.ino(*ino);
                w.u64(*offset);
                w.u64(*len);
                w.u32(*mode);
            }
            Request::Lseek {
                ino,
                offset,
                whence,
            } => {
                w.ino(*ino);
                w.u64(*offset);
                w.u32(*whence);
            }
            Request::SetXattr {
                ino,
                name,
                value,
                mode,
            } => {
                w.ino(*ino);
                w.bytes(name);
                w.bytes(value);
                w.xattr_mode(*mode);
            }
            Request::GetXattr { ino, name } | Request::RemoveXattr { ino, name } => {
                w.ino(*ino);
                w.bytes(name);
            }
            Request::Access { ino, mask } => {
                w.ino(*ino);
                w.u32(*mask);
            }
            Request::Statfs => {}
            Request::Write { ino, offset, data } => {
                w.ino(*ino);
                w.u64(*offset);
                w.bytes(data);
            }
            Request::Read { ino, offset, len } => {
                w.ino(*ino);
                w.u64(*offset);
                w.u32(*len);
            }
        }
        w.0
    }

    /// Decodes a request of `method`; `None` if malformed.
    pub fn decode(method: u32, b: &[u8]) -> Option<(Creds, Request)> {
        let mut r = Reader::new(b);
        let creds = r.creds()?;
        let req = match method {
            1 => Request::Lookup {
                parent: r.ino()?,
                name: r.bytes()?,
            },
            2 => Request::GetAttr { ino: r.ino()? },
            3 => Request::SetAttr {
                ino: r.ino()?,
                set: r.setattr()?,
            },
            4 => Request::Mknod {
                parent: r.ino()?,
                name: r.bytes()?,
                kind: FileType::from_byte(r.u8()?)?,
                perm: r.u32()?,
                rdev: r.u64()?,
            },
            5 => Request::Mkdir {
                parent: r.ino()?,
                name: r.bytes()?,
                perm: r.u32()?,
            },
            6 => Request::Symlink {
                parent: r.ino()?,
                name: r.bytes()?,
                target: r.bytes()?,
            },
            7 => Request::Link {
                ino: r.ino()?,
                newparent: r.ino()?,
                newname: r.bytes()?,
            },
            8 => Request::Unlink {
                parent: r.ino()?,
                name: r.bytes()?,
            },
            9 => Request::Rmdir {
                parent: r.ino()?,
                name: r.bytes()?,
            },
            10 => {
                let (parent, name, newparent, newname) =
                    (r.ino()?, r.bytes()?, r.ino()?, r.bytes()?);
                Request::Rename {
                    parent,
                    name,
                    newparent,
                    newname,
                    flags: r.rename_flags()?,
                }
            }
            11 => Request::Readlink { ino: r.ino()? },
            12 => {
                let ino = r.ino()?;
                let f = r.u8()?;
                if f > 7 {
                    return None;
                }
                Request::Open {
                    ino,
                    read: f & 1 != 0,
                    write: f & 2 != 0,
                    truncate: f & 4 != 0,
                }
            }
            13 => Request::Release { ino: r.ino()? },
            14 => Request::ReadDir {
                ino: r.ino()?,
                cookie: r.u64()?,
                limit: r.u32()?,
            },
            15 => {
                let (ino, name, value) = (r.ino()?, r.bytes()?, r.bytes()?);
                let mode = r.xattr_mode()?;
                Request::SetXattr {
                    ino,
                    name,
                    value,
                    mode,
                }
            }
            16 => Request::GetXattr {
                ino: r.ino()?,
                name: r.bytes()?,
            },
            17 => Request::ListXattr { ino: r.ino()? },
            18 => Request::RemoveXattr {
                ino: r.ino()?,
                name: r.bytes()?,
            },
            19 => Request::Access {
                ino: r.ino()?,
                mask: r.u32()?,
            },
            20 => Request::Statfs,
            21 => Request::Write {
                ino: r.ino()?,
                offset: r.u64()?,
                data: r.bytes()?,
            },
            22 => Request::Read {
                ino: r.ino()?,
                offset: r.u64()?,
                len: r.u32()?,
            },
            23 => Request::Fallocate {
                ino: r.ino()?,
                offset: r.u64()?,
                len: r.u64()?,
                mode: r.u32()?,
            },
            24 => Request::Lseek {
                ino: r.ino()?,
                offset: r.u64()?,
                whence: r.u32()?,
            },
            25 => Request::ReadDirPlus {
                ino: r.ino()?,
                cookie: r.u64()?,
                limit: r.u32()?,
            },
            26 => Request::Create {
                parent: r.ino()?,
                name: r.bytes()?,
                perm: r.u32()?,
            },
            27 => Request::Fsync { ino: r.ino()? },
            28 => Request::Status,
            29 => Request::Routes,
            _ => return None,
        };
        r.end()?;
        Some((creds, req))
    }
}

impl Reply {
    /// The data of an encoded [`Reply::Data`], without copying it (`None`: another reply).
    pub fn data_of(b: &[u8]) -> Option<&[u8]> {
        if *b.first()? != 2 {
            return None;
        }
        let len = u32::from_le_bytes(b.get(1..5)?.try_into().ok()?) as usize;
        (b.len() == 5 + len).then(|| &b[5..])
    }

    /// Encodes a reply.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64));
        match self {
            Reply::Unit => w.u8(0),
            Reply::Attr(a) => {
                w.u8(1);
                w.attr(a);
            }
            Reply::Data(d) => {
                w.u8(2);
                w.bytes(d);
            }
            Reply::Entries(es) => {
                w.u8(3);
                w.u32(es.len() as u32);
                for e in es {
                    w.bytes(&e.name);
                    w.ino(e.ino);
                    w.u8(e.kind.to_byte());
                    w.u64(e.cookie);
                }
            }
            Reply::Names(ns) => {
                w.u8(4);
                w.u32(ns.len() as u32);
                for n in ns {
                    w.bytes(n);
                }
            }
            Reply::Stats(s) => {
                w.u8(5);
                w.u64(s.inodes);
                w.u64(s.bytes);
            }
            Reply::Offset(o) => {
                w.u8(6);
                w.u64(*o);
            }
            Reply::EntriesPlus(es) => {
                w.u8(7);
                w.u32(es.len() as u32);
                for (e, a) in es {
                    w.bytes(&e.name);
                    w.ino(e.ino);
                    w.u8(e.kind.to_byte());
                    w.u64(e.cookie);
                    w.attr(a);
                }
            }
            Reply::Routes(rs) => {
                w.u8(8);
                assert!(rs.len() <= usize::from(u16::MAX), "at most 65535 shards");
                w.u16(rs.len() as u16);
                for r in rs {
                    w.u64(r.leader);
                    w.bytes(r.addr.as_bytes());
                }
            }
        }
        w.0
    }

    /// Decodes a reply; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<Reply> {
        let mut r = Reader::new(b);
        let reply = match r.u8()? {
            0 => Reply::Unit,
            1 => Reply::Attr(r.attr()?),
            2 => Reply::Data(r.bytes()?),
            3 => {
                let n = r.u32()? as usize;
                let mut es = Vec::with_capacity(n.min(b.len() / 21));
                for _ in 0..n {
                    es.push(DirEntry {
                        name: r.bytes()?,
                        ino: r.ino()?,
                        kind: FileType::from_byte(r.u8()?)?,
                        cookie: r.u64()?,
                    });
                }
                Reply::Entries(es)
            }
            4 => {
                let n = r.u32()? as usize;
                let mut ns = Vec::with_capacity(n.min(b.len() / 4));
                for _ in 0..n {
                    ns.push(r.bytes()?);
                }
                Reply::Names(ns)
            }
            5 => Reply::Stats(FsStats {
                inodes: r.u64()?,
                bytes: r.u64()?,
            }),
            6 => Reply::Offset(r.u64()?),
            7 => {
                let n = r.u32()? as usize;
                let mut es = Vec::with_capacity(n.min(b.len() / 64));
                for _ in 0..n {
                    let e = DirEntry {
                        name: r.bytes()?,
                        ino: r.ino()?,
                        kind: FileType::from_byte(r.u8()?)?,
                        cookie: r.u64()?,
                    };
                    es.push((e, r.attr()?));
                }
                Reply::EntriesPlus(es)
            }
            8 => {
                let n = usize::from(r.u16()?);
                let mut rs = Vec::with_capacity(n.min(b.len() / 12));
                for _ in 0..n {
                    rs.push(ShardRoute {
                        leader: r.u64()?,
                        addr: String::from_utf8(r.bytes()?).ok()?,
                    });
                }
                Reply::Routes(rs)
            }
            _ => return None,
        };
        r.end()?;
        Some(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cfs_meta::{TimeSet, Timespec};
    use proptest::prelude::*;

    #[test]
    fn errno_codes() {
        assert_eq!(errno_of_code(ERRNO_BASE + 5), Some(5));
        assert_eq!(errno_of_code(ERRNO_BASE), Some(0));
        assert_eq!(errno_of_code(ERRNO_BASE + ERRNO_LIMIT), None);
        assert_eq!(errno_of_code(9_000), None);
        assert_eq!(errno_of_code(999), None);
    }

    fn name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..40)
    }

    fn attr(i: u64) -> Attr {
        Attr {
            ino: InodeId(i),
            generation: i * 3,
            kind: FileType::Regular,
            perm: 0o640,
            uid: 7,
            gid: 8,
            nlink: 1,
            size: i << 33,
            rdev: 0,
            atime: Timespec::new(1, 2),
            mtime: Timespec::new(3, 4),
            ctime: Timespec::new(5, 6),
            btime: Timespec::new(-7, 8),
        }
    }

    fn request() -> impl Strategy<Value = Request> {
        let ino = any::<u64>().prop_map(InodeId);
        prop_oneof![
            (ino.clone(), name()).prop_map(|(parent, name)| Request::Lookup { parent, name }),
            ino.clone().prop_map(|ino| Request::GetAttr { ino }),
            (
                ino.clone(),
                any::<Option<u32>>(),
                any::<Option<u64>>(),
                any::<bool>()
            )
                .prop_map(|(ino, p, s, h)| Request::SetAttr {
                    ino,
                    set: SetAttr {
                        perm: p,
                        uid: p,
                        gid: None,
                        size: s,
                        atime: Some(TimeSet::Now),
                        mtime: Some(TimeSet::At(Timespec::new(5, 7))),
                        via_write_handle: h
                    }
                }),
            (ino.clone(), name(), any::<u32>(), any::<u64>()).prop_map(
                |(parent, name, perm, rdev)| Request::Mknod {
                    parent,
                    name,
                    kind: FileType::Fifo,
                    perm,
                    rdev
                }
            ),
            (ino.clone(), name(), ino.clone(), name(), 0u8..3).prop_map(
                |(parent, name, newparent, newname, f)| Request::Rename {
                    parent,
                    name,
                    newparent,
                    newname,
                    flags: RenameFlags {
                        noreplace: f == 1,
                        exchange: f == 2
                    }
                }
            ),
            (ino.clone(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
                |(ino, read, write, truncate)| Request::Open {
                    ino,
                    read,
                    write,
                    truncate
                }
            ),
            (ino.clone(), any::<u64>(), name()).prop_map(|(ino, offset, data)| Request::Write {
                ino,
                offset,
                data
            }),
            (ino.clone(), name(), name()).prop_map(|(ino, name, value)| Request::SetXattr {
                ino,
                name,
                value,
                mode: XattrMode::Create
            }),
            Just(Request::Statfs),
            (ino.clone(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
                |(ino, offset, len, mode)| Request::Fallocate {
                    ino,
                    offset,
                    len,
                    mode
                }
            ),
            (ino.clone(), any::<u64>(), any::<u32>()).prop_map(|(ino, offset, whence)| {
                Request::Lseek {
                    ino,
                    offset,
                    whence,
                }
            }),
            (ino.clone(), any::<u64>(), any::<u32>())
                .prop_map(|(ino, cookie, limit)| Request::ReadDirPlus { ino, cookie, limit }),
            (ino.clone(), name(), any::<u32>()).prop_map(|(parent, name, perm)| Request::Create {
                parent,
                name,
                perm
            }),
            ino.clone().prop_map(|ino| Request::Fsync { ino }),
            Just(Request::Status),
            Just(Request::Routes),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request(), uid in any::<u32>(), groups in proptest::collection::vec(any::<u32>(), 0..5)) {
            let creds = Creds { uid, gid: uid ^ 1, groups };
            let b = req.encode(&creds);
            prop_assert_eq!(Request::decode(req.method(), &b), Some((creds, req.clone())));
            // Truncated payloads never decode.
            if !b.is_empty() {
                prop_assert_eq!(Request::decode(req.method(), &b[..b.len() - 1]), None);
            }
        }

        #[test]
        fn random_bytes_never_panic(method in 0u32..30, b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode(method, &b);
            let _ = Reply::decode(&b);
        }

        #[test]
        fn replies_round_trip(names in proptest::collection::vec(name(), 0..5), data in name()) {
            for rep in [
                Reply::Unit,
                Reply::Data(data.clone()),
                Reply::Names(names.clone()),
                Reply::Stats(FsStats { inodes: 3, bytes: 9 }),
                Reply::Entries(names.iter().enumerate().map(|(i, n)| DirEntry { name: n.clone(), ino: InodeId(i as u64), kind: FileType::Symlink, cookie: i as u64 * 3 }).collect()),
                Reply::Offset(data.len() as u64 * 77),
                Reply::EntriesPlus(names.iter().enumerate().map(|(i, n)| (DirEntry { name: n.clone(), ino: InodeId(i as u64), kind: FileType::Regular, cookie: i as u64 }, attr(i as u64))).collect()),
                Reply::Routes(names.iter().enumerate().map(|(i, n)| ShardRoute { leader: i as u64, addr: String::from_utf8_lossy(n).into_owned() }).collect()),
            ] {
                let b = rep.encode();
                prop_assert_eq!(Reply::decode(&b), Some(rep.clone()));
                // The data without a copy: exactly Data's, None for the others.
                let want = match &rep { Reply::Data(d) => Some(d.as_slice()), _ => None };
                prop_assert_eq!(Reply::data_of(&b), want);
            }
        }
    }
}

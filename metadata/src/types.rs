//! Identifiers, attributes, credentials and the one errno mapping shared by FUSE and NFS.

use std::fmt;

/// An inode number. Stable for the inode's life; never reused while a generation could be
/// confused with it (see [`Attr::generation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeId(pub u64);

impl InodeId {
    /// The root directory.
    pub const ROOT: InodeId = InodeId(1);
}

impl fmt::Display for InodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A chunk of file data in the chunk store: the extent map points file ranges at these.
/// Allocated by the namespace from a counter that never goes back, so an id is never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub u64);

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk {:#x}", self.0)
    }
}

/// A point in time, as the caller's clock gave it (the state machine has no clock).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timespec {
    /// Seconds since the Unix epoch.
    pub sec: i64,
    /// Nanoseconds, below 1e9.
    pub nsec: u32,
}

impl Timespec {
    /// A timestamp; `nsec` must be below one second.
    pub fn new(sec: i64, nsec: u32) -> Timespec {
        assert!(nsec < 1_000_000_000, "nanoseconds out of range");
        Timespec { sec, nsec }
    }
}

/// File types, as in `st_mode & S_IFMT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileType {
    /// Regular file.
    Regular,
    /// Directory.
    Directory,
    /// Symbolic link.
    Symlink,
    /// Block device node.
    BlockDevice,
    /// Character device node.
    CharDevice,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

impl FileType {
    /// The `S_IFMT` bits.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Directory => 0o040000,
            FileType::Symlink => 0o120000,
            FileType::BlockDevice => 0o060000,
            FileType::CharDevice => 0o020000,
            FileType::Fifo => 0o010000,
            FileType::Socket => 0o140000,
        }
    }

    /// The one-byte code used in records and on the wire (1 regular .. 7 socket).
    pub fn to_byte(self) -> u8 {
        match self {
            FileType::Regular => 1,
            FileType::Directory => 2,
            FileType::Symlink => 3,
            FileType::BlockDevice => 4,
            FileType::CharDevice => 5,
            FileType::Fifo => 6,
            FileType::Socket => 7,
        }
    }

    /// From [`FileType::to_byte`]'s code.
    pub fn from_byte(b: u8) -> Option<FileType> {
        Some(match b {
            1 => FileType::Regular,
            2 => FileType::Directory,
            3 => FileType::Symlink,
            4 => FileType::BlockDevice,
            5 => FileType::CharDevice,
            6 => FileType::Fifo,
            7 => FileType::Socket,
            _ => return None,
        })
    }

    /// From `S_IFMT` bits.
    pub fn from_mode(mode: u32) -> Option<FileType> {
        Some(match mode & 0o170000 {
            0o100000 => FileType::Regular,
            0o040000 => FileType::Directory,
            0o120000 => FileType::Symlink,
            0o060000 => FileType::BlockDevice,
            0o020000 => FileType::CharDevice,
            0o010000 => FileType::Fifo,
            0o140000 => FileType::Socket,
            _ => return None,
        })
    }
}

/// Permission bits.
pub mod mode {
    /// Set-user-id.
    pub const S_ISUID: u32 = 0o4000;
    /// Set-group-id.
    pub const S_ISGID: u32 = 0o2000;
    /// Sticky.
    pub const S_ISVTX: u32 = 0o1000;
    /// Group execute.
    pub const S_IXGRP: u32 = 0o0010;
    /// All permission bits.
    pub const PERM_MASK: u32 = 0o7777;
}

/// An inode's attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: InodeId,
    /// Generation: distinguishes reuses of an inode number (NFS file handles, FUSE).
    pub generation: u64,
    /// Type.
    pub kind: FileType,
    /// Permission bits (`0o7777`).
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links (directories: 2 + subdirectories).
    pub nlink: u32,
    /// Size in bytes (symlinks: target length; directories: 0).
    pub size: u64,
    /// Device number of device nodes.
    pub rdev: u64,
    /// Last access.
    pub atime: Timespec,
    /// Last data change.
    pub mtime: Timespec,
    /// Last status change.
    pub ctime: Timespec,
    /// Creation.
    pub btime: Timespec,
}

impl Attr {
    /// `st_mode`: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | self.perm
    }
}

/// Who is asking: the caller's credentials, as the kernel passes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    /// Effective user.
    pub uid: u32,
    /// Effective group.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Creds {
    /// The superuser.
    pub fn root() -> Creds {
        Creds {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// Whether the caller is in group `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Errors of namespace operations: one mapping to errno for FUSE, NFS and the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Errno {
    /// ENOENT.
    #[error("no such file or directory")]
    NoEnt,
    /// EEXIST.
    #[error("file exists")]
    Exist,
    /// ENOTDIR.
    #[error("not a directory")]
    NotDir,
    /// EISDIR.
    #[error("is a directory")]
    IsDir,
    /// ENOTEMPTY.
    #[error("directory not empty")]
    NotEmpty,
    /// EACCES: permission bits refuse it.
    #[error("permission denied")]
    Access,
    /// EPERM: not allowed for this caller at all.
    #[error("operation not permitted")]
    Perm,
    /// EINVAL.
    #[error("invalid argument")]
    Inval,
    /// ENAMETOOLONG.
    #[error("file name too long")]
    NameTooLong,
    /// EMLINK.
    #[error("too many links")]
    MLink,
    /// ENODATA: no such extended attribute.
    #[error("no such attribute")]
    NoData,
    /// ERANGE: a buffer is too small, or a value too large.
    #[error("result too large")]
    Range,
    /// ENOSPC.
    #[error("no space left on device")]
    NoSpc,
    /// ESTALE: the handle's generation does not match.
    #[error("stale file handle")]
    Stale,
    /// EFBIG.
    #[error("file too large")]
    FBig,
    /// ENOTSUP.
    #[error("operation not supported")]
    NotSup,
    /// EIO.
    #[error("input/output error")]
    Io,
    /// ENXIO: lseek past the end, or no more data.
    #[error("no such device or address")]
    NxIo,
    /// EAGAIN: a cross-shard transaction holds a lock on what this touches; nothing was done,
    /// try again shortly (servers retry; clients should not see it).
    #[error("resource temporarily unavailable")]
    Again,
    /// EXDEV: the operation spans metadata shards and must run as a transaction (servers do
    /// that; clients should not see it).
    #[error("operation spans shards")]
    XDev,
}

impl Errno {
    /// The Linux errno value.
    pub fn errno(self) -> i32 {
        match self {
            Errno::Perm => 1,
            Errno::NoEnt => 2,
            Errno::Io => 5,
            Errno::NxIo => 6,
            Errno::Again => 11,
            Errno::XDev => 18,
            Errno::Access => 13,
            Errno::Exist => 17,
            Errno::NotDir => 20,
            Errno::IsDir => 21,
            Errno::Inval => 22,
            Errno::FBig => 27,
            Errno::NoSpc => 28,
            Errno::MLink => 31,
            Errno::Range => 34,
            Errno::NameTooLong => 36,
            Errno::NotEmpty => 39,
            Errno::NoData => 61,
            Errno::NotSup => 95,
            Errno::Stale => 116,
        }
    }

    /// The variant for a Linux errno value this crate produces.
    pub fn from_errno(v: i32) -> Option<Errno> {
        Some(match v {
            1 => Errno::Perm,
            2 => Errno::NoEnt,
            5 => Errno::Io,
            6 => Errno::NxIo,
            11 => Errno::Again,
            18 => Errno::XDev,
            13 => Errno::Access,
            17 => Errno::Exist,
            20 => Errno::NotDir,
            21 => Errno::IsDir,
            22 => Errno::Inval,
            27 => Errno::FBig,
            28 => Errno::NoSpc,
            31 => Errno::MLink,
            34 => Errno::Range,
            36 => Errno::NameTooLong,
            39 => Errno::NotEmpty,
            61 => Errno::NoData,
            95 => Errno::NotSup,
            116 => Errno::Stale,
            _ => return None,
        })
    }
}

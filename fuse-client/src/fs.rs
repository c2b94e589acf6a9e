//! The FUSE file system: each kernel request becomes one RPC to the server, with the caller's
//! credentials; replies and errno values come back unchanged.

use cfs_fabric::{ErrorCode, FailoverClient, RpcError};
use cfs_meta::namespace::access;
use cfs_meta::{
    Attr, Creds, FileType as MetaType, InodeId, RenameFlags as MetaRename, SetAttr, TimeSet,
    Timespec, XattrMode,
};
use cfs_proto::{errno_of_code, Reply, Request as Req};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Mount-time settings.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// How long the kernel may cache attributes and entries.
    pub cache_ttl: Duration,
    /// Let the kernel cache writes and send them later in large batches (FUSE writeback
    /// cache): faster small writes, but another mount sees them only after close or fsync.
    pub writeback_cache: bool,
}

/// Where each metadata shard's leader is, as an index into the failover client's servers:
/// requests go straight there instead of through whichever member answered last (which would
/// forward them, one more hop). Learned from [`Req::Routes`] and refreshed in the background;
/// a stale entry costs only that hop (the member asked forwards), never a wrong answer.
#[derive(Default)]
pub struct Router {
    leaders: std::sync::RwLock<Vec<Option<usize>>>,
}

impl Router {
    /// Asks the cluster where the shard leaders are. Returns how many shards have a leader
    /// this client can reach directly.
    pub fn refresh(&self, client: &FailoverClient) -> Result<usize, String> {
        let req = Req::Routes;
        let b = client
            .call(req.method(), &req.encode(&Creds::root()))
            .map_err(|e| e.to_string())?;
        let Some(Reply::Routes(routes)) = Reply::decode(&b) else {
            return Err("unexpected reply to a routes request".into());
        };
        let leaders: Vec<Option<usize>> = routes
            .iter()
            .map(|r| (r.leader != 0).then(|| client.index_of(&r.addr)).flatten())
            .collect();
        let known = leaders.iter().flatten().count();
        *self.leaders.write().unwrap_or_else(|p| p.into_inner()) = leaders;
        Ok(known)
    }

    /// The server that leads the shard of `req`, if known.
    pub fn leader_for(&self, req: &Req) -> Option<usize> {
        let leaders = self.leaders.read().unwrap_or_else(|p| p.into_inner());
        let shards = u16::try_from(leaders.len()).ok().filter(|s| *s > 0)?;
        leaders
            .get(usize::from(req.shard(shards)))
            .copied()
            .flatten()
    }
}

/// The mounted file system.
pub struct CfsFs {
    client: std::sync::Arc<FailoverClient>,
    router: std::sync::Arc<Router>,
    opts: FsOptions,
    /// This mount's session id: mutations carry (id, sequence) so a resend after a lost
    /// reply applies once.
    session_id: u64,
    next_seq: std::sync::atomic::AtomicU64,
    /// The one-sided read path, when this mount negotiates it (see [`crate::rma`]).
    rma: Option<std::sync::Arc<crate::rma::RmaClient>>,
}

fn to_system(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::new(t.sec.unsigned_abs(), 0) + Duration::new(0, t.nsec)
    }
}

fn from_system(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec::new(d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec::new(sec, nsec)
        }
    }
}

fn kind(k: MetaType) -> FileType {
    match k {
        MetaType::Regular => FileType::RegularFile,
        MetaType::Directory => FileType::Directory,
        MetaType::Symlink => FileType::Symlink,
        MetaType::BlockDevice => FileType::BlockDevice,
        MetaType::CharDevice => FileType::CharDevice,
        MetaType::Fifo => FileType::NamedPipe,
        MetaType::Socket => FileType::Socket,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: to_system(a.atime),
        mtime: to_system(a.mtime),
        ctime: to_system(a.ctime),
        crtime: to_system(a.btime),
        kind: kind(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 128 << 10,
        flags: 0,
    }
}

/// Supplementary groups of the calling process (FUSE does not pass them).
fn groups_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Groups:")).map(|l| {
                l[7..]
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn creds(req: &Request) -> Creds {
    Creds {
        uid: req.uid(),
        gid: req.gid(),
        groups: groups_of(req.pid()),
    }
}

fn ino(i: INodeNo) -> InodeId {
    InodeId(i.0)
}

impl CfsFs {
    /// A file system talking to `client` (calls run on the FUSE worker threads themselves).
    pub fn new(
        client: std::sync::Arc<FailoverClient>,
        router: std::sync::Arc<Router>,
        opts: FsOptions,
        session_id: u64,
        rma: Option<std::sync::Arc<crate::rma::RmaClient>>,
    ) -> CfsFs {
        CfsFs {
            client,
            router,
            opts,
            session_id,
            next_seq: std::sync::atomic::AtomicU64::new(1),
            rma,
        }
    }

    /// A read over the RMA path, if this mount has one and the server answers it there.
    fn read_rma(&self, creds: &Creds, r: &Req) -> Option<Vec<u8>> {
        let rma = self.rma.as_ref()?;
        let body = r.encode(creds);
        match rma.read(&self.client, self.router.leader_for(r), r.method(), &body)? {
            crate::rma::RmaRead::Data(d) => Some(d),
            crate::rma::RmaRead::Reply(b) => match Reply::decode(&b) {
                Some(Reply::Data(d)) => Some(d),
                _ => None,
            },
        }
    }

    fn call(&self, creds: &Creds, r: Req) -> Result<Reply, Errno> {
        let body = r.encode(creds);
        let (method, payload) = if r.is_read_only() {
            (r.method(), body)
        } else {
            let seq = self
                .next_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let s = cfs_meta::session::Session {
                client: self.session_id,
                seq,
            };
            (
                r.method() | cfs_proto::SESSION,
                cfs_proto::with_session(s, &body),
            )
        };
        // A read, or a mutation with its session, may be sent again after a lost reply or a
        // timeout (the cluster applies a mutation once); the failover client moves to the
        // next member. A few tries: each is bounded by the mount's timeout.
        let mut res = match self.router.leader_for(&r) {
            Some(leader) => self.client.call_at(leader, method, &payload),
            None => self.client.call(method, &payload),
        };
        for _ in 0..3 {
            if !matches!(
                res,
                Err(RpcError::ConnectionLost { .. } | RpcError::Timeout { .. })
            ) {
                break;
            }
            tracing::info!("resending after: {:?}", res.as_ref().err());
            res = self.client.call(method, &payload);
        }
        match res {
            Ok(b) => Reply::decode(&b).ok_or_else(|| {
                tracing::error!("malformed reply from the server");
                Errno::EIO
            }),
            Err(RpcError::Remote {
                code: ErrorCode::Service(c),
                message,
            }) if errno_of_code(c).is_some() => {
                let e = Errno::from_i32(errno_of_code(c).unwrap_or(libc::EIO));
                // An I/O error is worth a line with the server's reason (ENOENT and the
                // like are ordinary answers).
                if e == Errno::EIO {
                    tracing::warn!("the server answered EIO: {message}");
                }
                Err(e)
            }
            Err(e) => {
                tracing::warn!("request failed: {e}");
                Err(Errno::EIO)
            }
        }
    }

    fn attr(&self, creds: &Creds, r: Req) -> Result<Attr, Errno> {
        match self.call(creds, r)? {
            Reply::Attr(a) => Ok(a),
            _ => Err(Errno::EIO),
        }
    }

    fn entry(&self, reply: ReplyEntry, res: Result<Attr, Errno>) {
        match res {
            Ok(a) => reply.entry(
                &self.opts.cache_ttl,
                &file_attr(&a),
                Generation(a.generation),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn empty(reply: ReplyEmpty, res: Result<Reply, Errno>) {
        match res {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn name(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

fn timeset(t: Option<TimeOrNow>) -> Option<TimeSet> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(from_system(s)),
    })
}

impl Filesystem for CfsFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // More reads in flight at once (readahead and parallel readers), bounded.
        if let Err(max) = config.set_max_background(64) {
            let _ = config.set_max_background(max);
        }
        // Without it the kernel turns asynchronous O_DIRECT I/O into one request at a time
        // (measured: 4 KiB random reads at queue depth 16 ran like queue depth 1).
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!("kernel lacks {missing:?}: direct I/O runs one request at a time");
        }
        // Directory listings carry attributes (one round trip for `ls -l`); the kernel picks
        // plain readdir when it does not expect the attributes to be used.
        let plus = fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO;
        if let Err(missing) = config.add_capabilities(plus) {
            tracing::warn!("kernel lacks {missing:?}: no readdirplus");
        }
        if self.opts.writeback_cache {
            if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE) {
                tracing::warn!("kernel lacks {missing:?}: writes go through at once");
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        let r = self.attr(
            &creds(req),
            Req::Lookup {
                parent: ino(parent),
                name: name(n),
            },
        );
        self.entry(reply, r);
    }

    fn getattr(&self, req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(&creds(req), Req::GetAttr { ino: ino(i) }) {
            Ok(a) => reply.attr(&self.opts.cache_ttl, &file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        req: &Request,
        i: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: timeset(atime),
            mtime: timeset(mtime),
            via_write_handle: fh.is_some(),
        };
        match self.attr(&creds(req), Req::SetAttr { ino: ino(i), set }) {
            Ok(a) => reply.attr(&self.opts.cache_ttl, &file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, req: &Request, i: INodeNo, reply: ReplyData) {
        match self.call(&creds(req), Req::Readlink { ino: ino(i) }) {
            Ok(Reply::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let Some(k) = MetaType::from_mode(mode) else {
            reply.error(Errno::EINVAL);
            return;
        };
        let perm = mode & 0o7777 & !umask;
        let r = self.attr(
            &creds(req),
            Req::Mknod {
                parent: ino(parent),
                name: name(n),
                kind: k,
                perm,
                rdev: u64::from(rdev),
            },
        );
        self.entry(reply, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.attr(
            &creds(req),
            Req::Mkdir {
                parent: ino(parent),
                name: name(n),
                perm: mode & 0o7777 & !umask,
            },
        );
        self.entry(reply, r);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        Self::empty(
            reply,
            self.call(
                &creds(req),
                Req::Unlink {
                    parent: ino(parent),
                    name: name(n),
                },
            ),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        Self::empty(
            reply,
            self.call(
                &creds(req),
                Req::Rmdir {
                    parent: ino(parent),
                    name: name(n),
                },
            ),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.attr(
            &creds(req),
            Req::Symlink {
                parent: ino(parent),
                name: name(link),
                target: target.as_os_str().as_bytes().to_vec(),
            },
        );
        self.entry(reply, r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let flags = MetaRename {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
        };
        let r = self.call(
            &creds(req),
            Req::Rename {
                parent: ino(parent),
                name: name(n),
                newparent: ino(newparent),
                newname: name(newname),
                flags,
            },
        );
        Self::empty(reply, r);
    }

    fn link(
        &self,
        req: &Request,
        i: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.attr(
            &creds(req),
            Req::Link {
                ino: ino(i),
                newparent: ino(newparent),
                newname: name(newname),
            },
        );
        self.entry(reply, r);
    }

    fn open(&self, req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let acc = flags.0 & libc::O_ACCMODE;
        let (read, write) = (
            acc == libc::O_RDONLY || acc == libc::O_RDWR,
            acc == libc::O_WRONLY || acc == libc::O_RDWR,
        );
        let truncate = flags.0 & libc::O_TRUNC != 0;
        match self.call(
            &creds(req),
            Req::Open {
                ino: ino(i),
                read,
                write,
                truncate,
            },
        ) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.attr(
            &creds(req),
            Req::Create {
                parent: ino(parent),
                name: name(n),
                perm: mode & 0o7777 & !umask,
            },
        );
        match r {
            Ok(a) => reply.created(
                &self.opts.cache_ttl,
                &file_attr(&a),
                Generation(a.generation),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let c = creds(req);
        let r = Req::Read {
            ino: ino(i),
            offset,
            len: size,
        };
        if let Some(d) = self.read_rma(&c, &r) {
            return reply.data(&d);
        }
        match self.call(&c, r) {
            Ok(Reply::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.call(
            &creds(req),
            Req::Write {
                ino: ino(i),
                offset,
                data: data.to_vec(),
            },
        ) {
            Ok(_) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are durable when acknowledged: nothing is buffered here.
        reply.ok();
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.call(&creds(req), Req::Release { ino: ino(i) }));
    }

    fn fsync(&self, req: &Request, i: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        // Data is durable when a write is acknowledged; times of overwrites may still be
        // pending on the server (fdatasync does not need them).
        if datasync {
            return reply.ok();
        }
        Self::empty(reply, self.call(&creds(req), Req::Fsync { ino: ino(i) }));
    }

    fn readdir(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.call(
            &creds(req),
            Req::ReadDir {
                ino: ino(i),
                cookie: offset,
                limit: 512,
            },
        ) {
            Ok(Reply::Entries(es)) => {
                for e in es {
                    if reply.add(
                        INodeNo(e.ino.0),
                        e.cookie,
                        kind(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, req: &Request, _i: INodeNo, reply: ReplyStatfs) {
        match self.call(&creds(req), Req::Statfs) {
            Ok(Reply::Stats(s)) => {
                let blocks: u64 = 1 << 30;
                let used = s.bytes.div_ceil(4096).min(blocks);
                let files: u64 = 1 << 32;
                reply.statfs(
                    blocks,
                    blocks - used,
                    blocks - used,
                    files,
                    files.saturating_sub(s.inodes),
                    4096,
                    255,
                    4096,
                );
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        i: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        Self::empty(
            reply,
            self.call(
                &creds(req),
                Req::SetXattr {
                    ino: ino(i),
                    name: name(n),
                    value: value.to_vec(),
                    mode,
                },
            ),
        );
    }

    fn getxattr(&self, req: &Request, i: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        match self.call(
            &creds(req),
            Req::GetXattr {
                ino: ino(i),
                name: name(n),
            },
        ) {
            Ok(Reply::Data(d)) if size == 0 => reply.size(d.len() as u32),
            Ok(Reply::Data(d)) if d.len() > size as usize => reply.error(Errno::ERANGE),
            Ok(Reply::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, i: INodeNo, size: u32, reply: ReplyXattr) {
        match self.call(&creds(req), Req::ListXattr { ino: ino(i) }) {
            Ok(Reply::Names(ns)) => {
                let mut buf = Vec::new();
                for n in ns {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32);
                } else if buf.len() > size as usize {
                    reply.error(Errno::ERANGE);
                } else {
                    reply.data(&buf);
                }
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, i: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        Self::empty(
            reply,
            self.call(
                &creds(req),
                Req::RemoveXattr {
                    ino: ino(i),
                    name: name(n),
                },
            ),
        );
    }

    fn access(&self, req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let m = mask.bits() as u32 & (access::R | access::W | access::X);
        Self::empty(
            reply,
            self.call(
                &creds(req),
                Req::Access {
                    ino: ino(i),
                    mask: m,
                },
            ),
        );
    }

    fn readdirplus(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.call(
            &creds(req),
            Req::ReadDirPlus {
                ino: ino(i),
                cookie: offset,
                limit: 256,
            },
        ) {
            Ok(Reply::EntriesPlus(es)) => {
                for (e, a) in es {
                    if reply.add(
                        INodeNo(e.ino.0),
                        e.cookie,
                        OsStr::from_bytes(&e.name),
                        &self.opts.cache_ttl,
                        &file_attr(&a),
                        Generation(a.generation),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        Self::empty(
            reply,
            self.call(
                &creds(req),
                Req::Fallocate {
                    ino: ino(i),
                    offset,
                    len: length,
                    mode: mode as u32,
                },
            ),
        );
    }

    fn lseek(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let (Ok(offset), Ok(whence)) = (u64::try_from(offset), u32::try_from(whence)) else {
            return reply.error(Errno::EINVAL);
        };
        match self.call(
            &creds(req),
            Req::Lseek {
                ino: ino(i),
                offset,
                whence,
            },
        ) {
            Ok(Reply::Offset(o)) => match i64::try_from(o) {
                Ok(o) => reply.offset(o),
                Err(_) => reply.error(Errno::EOVERFLOW),
            },
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }
}

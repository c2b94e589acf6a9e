//! The file-system service: RPC requests from clients, applied to the namespace (persisted in
//! the metadata store before each reply) and to file data in the chunk store.
//!
//! File data layout (until the extent map arrives): byte `o` of inode `i` lives in chunk
//! `(i << 16) | (o / 64 MiB)` at offset `o % 64 MiB`, so files reach 4 TiB. Data is written
//! before the size that makes it visible, so a crash between the two exposes nothing.

use crate::meta_store::MetaStore;
use crate::reactor::Engine;
use crate::store::StoreError;
use cfs_fabric::{ErrorCode, Service, ServiceError, ServiceFuture};
use cfs_meta::namespace::{Namespace, MAX_FILE_SIZE};
use cfs_meta::{Creds, Errno, FileType, InodeId, SetAttr, Timespec};
use cfs_proto::{Reply, Request, ERRNO_BASE};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes of file data per chunk.
pub const CHUNK_BYTES: u64 = 64 << 20;
/// Largest read or write in one request.
pub const MAX_IO: u32 = 16 << 20;

fn chunk_of(ino: InodeId, offset: u64) -> (u64, u64) {
    ((ino.0 << 16) | (offset / CHUNK_BYTES), offset % CHUNK_BYTES)
}

struct Meta {
    store: MetaStore,
    ns: Namespace,
}

/// The service; cheap to clone.
#[derive(Clone)]
pub struct FsService {
    meta: Arc<Mutex<Meta>>,
    engine: Arc<Engine>,
    db_path: std::path::PathBuf,
}

fn errno(e: Errno) -> ServiceError {
    ServiceError::new(
        ErrorCode::Service(ERRNO_BASE + e.errno() as u32),
        e.to_string(),
    )
}

fn io_error(e: StoreError) -> ServiceError {
    tracing::error!("data I/O failed: {e}");
    ServiceError::new(
        ErrorCode::Service(ERRNO_BASE + Errno::Io.errno() as u32),
        e.to_string(),
    )
}

fn now() -> Timespec {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timespec::new(d.as_secs() as i64, d.subsec_nanos())
}

impl FsService {
    /// Opens the metadata database at `db_path` and serves over `engine`.
    pub fn open(
        db_path: &std::path::Path,
        engine: Arc<Engine>,
    ) -> Result<FsService, crate::meta_store::MetaStoreError> {
        let (store, mut ns) = MetaStore::open(db_path, now())?;
        let freed = ns.take_freed();
        let svc = FsService {
            meta: Arc::new(Mutex::new(Meta { store, ns })),
            engine,
            db_path: db_path.to_path_buf(),
        };
        // Files that were unlinked while open when the server stopped: release their data now.
        for (ino, size) in freed {
            svc.free_data(ino, size);
        }
        Ok(svc)
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a namespace change and makes it durable; on a persistence failure the
    /// in-memory namespace is rolled back to what is on disk and the caller gets EIO.
    fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Namespace) -> Result<T, Errno>,
    ) -> Result<T, ServiceError> {
        let mut m = self.lock();
        let out = f(&mut m.ns);
        let persisted = {
            let Meta { store, ns } = &mut *m;
            // Failed operations and handle bookkeeping change nothing durable: no commit.
            if ns.is_dirty() {
                store.persist(ns)
            } else {
                Ok(())
            }
        };
        if let Err(e) = persisted {
            tracing::error!("metadata commit failed, rolling back to the durable state: {e}");
            drop(m);
            self.reload();
            return Err(errno(Errno::Io));
        }
        let freed = m.ns.take_freed();
        drop(m);
        for (ino, size) in freed {
            self.free_data(ino, size);
        }
        out.map_err(errno)
    }

    fn reload(&self) {
        let mut m = self.lock();
        match MetaStore::open(&self.db_path, now()) {
            Ok((store, ns)) => {
                m.store = store;
                m.ns = ns;
            }
            Err(e) => tracing::error!("cannot reload metadata after a failed commit: {e}"),
        }
    }

    fn free_data(&self, ino: InodeId, size: u64) {
        for idx in 0..size.div_ceil(CHUNK_BYTES) {
            let (chunk, _) = chunk_of(ino, idx * CHUNK_BYTES);
            match self.engine.delete(chunk) {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => tracing::warn!("cannot free chunk {chunk:#x} of {ino}: {e}"),
            }
        }
    }

    fn truncate_data(&self, ino: InodeId, old: u64, new: u64) -> Result<(), ServiceError> {
        if new >= old {
            return Ok(());
        }
        let first_gone = new.div_ceil(CHUNK_BYTES);
        for idx in first_gone..old.div_ceil(CHUNK_BYTES) {
            match self.engine.delete(chunk_of(ino, idx * CHUNK_BYTES).0) {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        if !new.is_multiple_of(CHUNK_BYTES) {
            let (chunk, off) = chunk_of(ino, new);
            match self.engine.truncate(chunk, off) {
                Ok(()) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(())
    }

    fn write(
        &self,
        creds: &Creds,
        ino: InodeId,
        offset: u64,
        data: &[u8],
    ) -> Result<Reply, ServiceError> {
        if data.len() > MAX_IO as usize {
            return Err(errno(Errno::Inval));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| errno(Errno::FBig))?;
        if end > MAX_FILE_SIZE.min(CHUNK_BYTES << 16) {
            return Err(errno(Errno::FBig));
        }
        let kind = self.lock().ns.getattr(ino).map_err(errno)?.kind;
        if kind != FileType::Regular {
            return Err(errno(Errno::Inval));
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let (chunk, off) = chunk_of(ino, pos);
            let n = rest.len().min((CHUNK_BYTES - off) as usize);
            self.engine
                .write(chunk, off, rest[..n].to_vec())
                .map_err(io_error)?;
            pos += n as u64;
            rest = &rest[n..];
        }
        let t = now();
        self.mutate(|ns| ns.wrote(creds, ino, offset, data.len() as u64, t))
            .map(Reply::Attr)
    }

    fn read(&self, ino: InodeId, offset: u64, len: u32) -> Result<Reply, ServiceError> {
        let attr = self.lock().ns.getattr(ino).map_err(errno)?;
        match attr.kind {
            FileType::Regular => {}
            FileType::Directory => return Err(errno(Errno::IsDir)),
            _ => return Err(errno(Errno::Inval)),
        }
        let end = attr
            .size
            .min(offset.saturating_add(u64::from(len.min(MAX_IO))));
        if offset >= end {
            return Ok(Reply::Data(Vec::new()));
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let (chunk, off) = chunk_of(ino, pos);
            let n = (end - pos).min(CHUNK_BYTES - off);
            match self.engine.read(chunk, off, n as usize) {
                Ok(d) => out.extend_from_slice(&d),
                Err(StoreError::NotFound { .. }) => out.resize(out.len() + n as usize, 0),
                Err(e) => return Err(io_error(e)),
            }
            pos += n;
        }
        Ok(Reply::Data(out))
    }

    /// Handles one decoded request (blocking: call from a blocking-capable thread).
    pub fn handle(&self, creds: &Creds, req: Request) -> Result<Reply, ServiceError> {
        let t = now();
        match req {
            Request::Lookup { parent, name } => self
                .lock()
                .ns
                .lookup(creds, parent, &name)
                .map(Reply::Attr)
                .map_err(errno),
            Request::GetAttr { ino } => self.lock().ns.getattr(ino).map(Reply::Attr).map_err(errno),
            Request::SetAttr { ino, set } => {
                if let Some(size) = set.size {
                    let old = self.lock().ns.getattr(ino).map_err(errno)?;
                    // Check every rule before cutting any data.
                    self.lock()
                        .ns
                        .setattr_preview(creds, ino, &set, t)
                        .map_err(errno)?;
                    if old.kind == FileType::Regular {
                        self.truncate_data(ino, old.size, size)?;
                    }
                }
                self.mutate(|ns| ns.setattr(creds, ino, &set, t))
                    .map(Reply::Attr)
            }
            Request::Mknod {
                parent,
                name,
                kind,
                perm,
                rdev,
            } => self
                .mutate(|ns| ns.mknod(creds, parent, &name, kind, perm, rdev, t))
                .map(Reply::Attr),
            Request::Mkdir { parent, name, perm } => self
                .mutate(|ns| ns.mkdir(creds, parent, &name, perm, t))
                .map(Reply::Attr),
            Request::Symlink {
                parent,
                name,
                target,
            } => self
                .mutate(|ns| ns.symlink(creds, parent, &name, &target, t))
                .map(Reply::Attr),
            Request::Link {
                ino,
                newparent,
                newname,
            } => self
                .mutate(|ns| ns.link(creds, ino, newparent, &newname, t))
                .map(Reply::Attr),
            Request::Unlink { parent, name } => self
                .mutate(|ns| ns.unlink(creds, parent, &name, t))
                .map(|()| Reply::Unit),
            Request::Rmdir { parent, name } => self
                .mutate(|ns| ns.rmdir(creds, parent, &name, t))
                .map(|()| Reply::Unit),
            Request::Rename {
                parent,
                name,
                newparent,
                newname,
                flags,
            } => self
                .mutate(|ns| ns.rename(creds, parent, &name, newparent, &newname, flags, t))
                .map(|()| Reply::Unit),
            Request::Readlink { ino } => {
                self.lock().ns.readlink(ino).map(Reply::Data).map_err(errno)
            }
            Request::Open {
                ino,
                read,
                write,
                truncate,
            } => {
                let attr = self.mutate(|ns| ns.open(creds, ino, read, write))?;
                if truncate && write && attr.kind == FileType::Regular && attr.size > 0 {
                    let set = SetAttr {
                        size: Some(0),
                        via_write_handle: true,
                        ..SetAttr::default()
                    };
                    self.truncate_data(ino, attr.size, 0)?;
                    return self
                        .mutate(|ns| ns.setattr(creds, ino, &set, t))
                        .map(Reply::Attr);
                }
                Ok(Reply::Attr(attr))
            }
            Request::Release { ino } => self.mutate(|ns| ns.release(ino)).map(|()| Reply::Unit),
            Request::ReadDir { ino, cookie, limit } => self
                .lock()
                .ns
                .readdir(creds, ino, cookie, limit.min(4096) as usize)
                .map(Reply::Entries)
                .map_err(errno),
            Request::SetXattr {
                ino,
                name,
                value,
                mode,
            } => self
                .mutate(|ns| ns.setxattr(creds, ino, &name, &value, mode, t))
                .map(|()| Reply::Unit),
            Request::GetXattr { ino, name } => self
                .lock()
                .ns
                .getxattr(creds, ino, &name)
                .map(Reply::Data)
                .map_err(errno),
            Request::ListXattr { ino } => self
                .lock()
                .ns
                .listxattr(creds, ino)
                .map(Reply::Names)
                .map_err(errno),
            Request::RemoveXattr { ino, name } => self
                .mutate(|ns| ns.removexattr(creds, ino, &name, t))
                .map(|()| Reply::Unit),
            Request::Access { ino, mask } => self
                .lock()
                .ns
                .access(creds, ino, mask)
                .map(|()| Reply::Unit)
                .map_err(errno),
            Request::Statfs => Ok(Reply::Stats(self.lock().ns.stats())),
            Request::Write { ino, offset, data } => self.write(creds, ino, offset, &data),
            Request::Read { ino, offset, len } => self.read(ino, offset, len),
        }
    }
}

impl Service for FsService {
    fn call(&self, method: u32, payload: bytes::Bytes) -> ServiceFuture {
        let this = self.clone();
        Box::pin(async move {
            let (creds, req) = Request::decode(method, &payload).ok_or_else(|| {
                ServiceError::new(
                    ErrorCode::BadRequest,
                    format!("malformed request for method {method}"),
                )
            })?;
            let read_only = matches!(
                req,
                Request::Lookup { .. }
                    | Request::GetAttr { .. }
                    | Request::Readlink { .. }
                    | Request::ReadDir { .. }
                    | Request::GetXattr { .. }
                    | Request::ListXattr { .. }
                    | Request::Access { .. }
                    | Request::Statfs
            );
            let reply = if read_only {
                // In-memory lookups answer at once: a hand-off to another thread would cost
                // more than the work (measured: thread wake-ups dominated stat latency).
                this.handle(&creds, req)
            } else {
                // Commits and data I/O block: keep them off the async workers.
                tokio::task::spawn_blocking(move || this.handle(&creds, req))
                    .await
                    .map_err(|e| ServiceError::new(ErrorCode::Internal, e.to_string()))?
            };
            reply.map(|r| bytes::Bytes::from(r.encode()))
        })
    }
}

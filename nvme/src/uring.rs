//! io_uring backend over an `O_DIRECT` file or block device: one ring per queue pair, the file
//! and the buffer pool registered with each ring, optional SQPOLL so submission needs no syscall.

use crate::sys::{self, Ring, RingOp};
use crate::{
    validate, BlockDevice, Command, Completion, DeviceError, IoError, IoStatus, Namespace, Opcode,
    QueuePair, QueuePairConfig, SubmitError,
};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// LBA size used for regular files: O_DIRECT needs at least the file system's block alignment.
pub const FILE_LBA_SIZE: u32 = 4096;

/// A file or block device driven through io_uring.
pub struct UringDevice {
    name: Arc<str>,
    file: File,
    ns: Namespace,
    is_block: bool,
}

impl UringDevice {
    /// Creates (or extends) a regular file of `bytes` (rounded down to whole LBAs), sparse.
    pub fn create_file(path: &Path, bytes: u64) -> Result<(), DeviceError> {
        let err = |source| DeviceError::Open {
            path: path.display().to_string(),
            source,
        };
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(err)?;
        let len = f.metadata().map_err(err)?.len();
        let want = bytes / u64::from(FILE_LBA_SIZE) * u64::from(FILE_LBA_SIZE);
        if len < want {
            f.set_len(want).map_err(err)?;
        }
        f.sync_all().map_err(err)?;
        Ok(())
    }

    /// Opens a regular file or block device with `O_DIRECT`.
    pub fn open(path: &Path) -> Result<UringDevice, DeviceError> {
        let name = path.display().to_string();
        let err = |source| DeviceError::Open {
            path: name.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(err)?;
        let meta = file.metadata().map_err(err)?;
        let is_block = meta.file_type().is_block_device();
        let (lba_size, bytes) = if is_block {
            let fd = file.as_raw_fd();
            (
                sys::block_device_lba_size(fd).map_err(err)?,
                sys::block_device_bytes(fd).map_err(err)?,
            )
        } else if meta.is_file() {
            (FILE_LBA_SIZE, meta.len())
        } else {
            return Err(DeviceError::Geometry {
                path: name,
                reason: "neither a regular file nor a block device".into(),
            });
        };
        if !lba_size.is_power_of_two() || !(512..=65536).contains(&lba_size) {
            return Err(DeviceError::Geometry {
                path: name,
                reason: format!("unusable LBA size {lba_size}"),
            });
        }
        let lba_count = bytes / u64::from(lba_size);
        if lba_count == 0 {
            return Err(DeviceError::Geometry {
                path: name,
                reason: "device is empty".into(),
            });
        }
        Ok(UringDevice {
            name: name.into(),
            file,
            ns: Namespace {
                lba_size,
                lba_count,
            },
            is_block,
        })
    }

    /// Whether this is a block device (rather than a file).
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }
}

impl BlockDevice for UringDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn namespace(&self) -> Namespace {
        self.ns
    }
    fn create_queue_pair(&self, cfg: QueuePairConfig) -> Result<Box<dyn QueuePair>, DeviceError> {
        let ring = Ring::new(
            cfg.depth,
            cfg.sqpoll,
            self.file.as_raw_fd(),
            cfg.region,
            &cfg.worker_cpus,
        )
        .map_err(|source| DeviceError::QueuePair {
            path: self.name.to_string(),
            source,
        })?;
        Ok(Box::new(UringQueuePair {
            name: Arc::clone(&self.name),
            ns: self.ns,
            ring,
            // Keeps the fd alive for as long as the ring refers to it.
            _file: self
                .file
                .try_clone()
                .map_err(|source| DeviceError::QueuePair {
                    path: self.name.to_string(),
                    source,
                })?,
            rejected: Vec::new(),
        }))
    }
}

struct UringQueuePair {
    name: Arc<str>,
    ns: Namespace,
    ring: Ring,
    _file: File,
    /// Commands that failed validation: completed at the next poll, like a device would.
    rejected: Vec<(Command, IoStatus)>,
}

impl UringQueuePair {
    fn error(&self, cmd: &Command, status: IoStatus) -> IoError {
        IoError {
            device: Arc::clone(&self.name),
            opcode: cmd.opcode,
            lba: cmd.lba,
            nlb: cmd.nlb,
            status,
        }
    }
}

impl QueuePair for UringQueuePair {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        if self.in_flight() >= self.depth() {
            return Err(SubmitError::QueueFull(cmd));
        }
        if let Some(status) = validate(&self.ns, &cmd) {
            self.rejected.push((cmd, status));
            return Ok(());
        }
        let lba = u64::from(self.ns.lba_size);
        let offset = cmd.lba * lba;
        let len = u64::from(cmd.nlb) * lba;
        let op = match cmd.opcode {
            Opcode::Read => RingOp::Read {
                offset,
                len: len as u32,
            },
            Opcode::Write => RingOp::Write {
                offset,
                len: len as u32,
            },
            Opcode::Flush => RingOp::Fsync,
            Opcode::WriteZeroes => RingOp::Fallocate {
                offset,
                len,
                mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            },
            Opcode::Deallocate => RingOp::Fallocate {
                offset,
                len,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            },
        };
        self.ring.push(cmd, op).map_err(SubmitError::QueueFull)
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some((mut cmd, status)) = self.rejected.pop() else {
                break;
            };
            let e = self.error(&cmd, status);
            out.push(Completion {
                tag: cmd.tag,
                result: Err(e),
                buf: cmd.buf.take(),
            });
            n += 1;
        }
        if let Err(e) = self.ring.submit() {
            // EBUSY/EAGAIN: the completion queue is full; reaping below makes room.
            tracing::trace!(device = %self.name, "io_uring submit: {e}");
        }
        let name = Arc::clone(&self.name);
        n += self.ring.reap(max - n, |mut cmd, res, expect| {
            let result = if res < 0 {
                Err(IoStatus::Os(-res))
            } else if (res as u32) < expect {
                Err(IoStatus::Short(res as u32))
            } else {
                Ok(())
            };
            let result = result.map_err(|status| IoError {
                device: Arc::clone(&name),
                opcode: cmd.opcode,
                lba: cmd.lba,
                nlb: cmd.nlb,
                status,
            });
            out.push(Completion {
                tag: cmd.tag,
                result,
                buf: cmd.buf.take(),
            });
        });
        n
    }

    fn in_flight(&self) -> u32 {
        self.ring.in_flight() + self.rejected.len() as u32
    }

    fn depth(&self) -> u32 {
        self.ring.depth()
    }
}

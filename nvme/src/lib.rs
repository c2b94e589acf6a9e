//! An NVMe-shaped block layer.
//!
//! A [`BlockDevice`] exposes its namespace (LBA size, capacity) and creates [`QueuePair`]s. A
//! queue pair belongs to one thread (it is `Send`, never `Sync`): the owner submits
//! [`Command`]s carrying pool buffers ([`DmaBuf`]) and polls for [`Completion`]s, which hand
//! the buffers back. Nothing blocks; a full queue returns the command to the caller.
//!
//! Backends: [`uring`] (io_uring over an `O_DIRECT` file or block device, one ring per queue
//! pair, registered buffers and file), [`mem`] (in memory, with seeded fault injection and
//! power loss, for tests and simulation) and [`vfio`] (our own userspace NVMe driver: the
//! controller bound to vfio-pci, polled queue pairs, DMA through the IOMMU).

#![deny(unsafe_code)]

pub mod mem;
pub mod rng;
#[allow(unsafe_code)]
mod sys;
pub mod uring;
pub mod vfio;

pub use cfs_hugepages::DmaBuf;
use std::fmt;
use std::sync::Arc;

/// Facts about the namespace a device exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Bytes per logical block.
    pub lba_size: u32,
    /// Number of logical blocks.
    pub lba_count: u64,
}

impl Namespace {
    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.lba_count * u64::from(self.lba_size)
    }
}

/// The I/O commands a queue pair accepts (the NVMe NVM command set's core).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// Read `nlb` blocks into the buffer.
    Read,
    /// Write `nlb` blocks from the buffer.
    Write,
    /// Make every write completed before this command durable.
    Flush,
    /// Set `nlb` blocks to zero without a data buffer.
    WriteZeroes,
    /// Deallocate (trim) `nlb` blocks; they read back as zeroes afterwards.
    Deallocate,
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Opcode::Read => "read",
            Opcode::Write => "write",
            Opcode::Flush => "flush",
            Opcode::WriteZeroes => "write-zeroes",
            Opcode::Deallocate => "deallocate",
        })
    }
}

/// One command. `tag` comes back in the completion unchanged.
#[derive(Debug)]
pub struct Command {
    /// What to do.
    pub opcode: Opcode,
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks (0 for flush).
    pub nlb: u32,
    /// Data buffer for read and write; data lives at the buffer's start.
    pub buf: Option<DmaBuf>,
    /// Caller's identifier for the completion.
    pub tag: u64,
}

impl Command {
    /// A read of `nlb` blocks at `lba` into `buf`.
    pub fn read(lba: u64, nlb: u32, buf: DmaBuf, tag: u64) -> Command {
        Command {
            opcode: Opcode::Read,
            lba,
            nlb,
            buf: Some(buf),
            tag,
        }
    }
    /// A write of `nlb` blocks at `lba` from `buf`.
    pub fn write(lba: u64, nlb: u32, buf: DmaBuf, tag: u64) -> Command {
        Command {
            opcode: Opcode::Write,
            lba,
            nlb,
            buf: Some(buf),
            tag,
        }
    }
    /// A flush.
    pub fn flush(tag: u64) -> Command {
        Command {
            opcode: Opcode::Flush,
            lba: 0,
            nlb: 0,
            buf: None,
            tag,
        }
    }
    /// Write zeroes over `nlb` blocks at `lba`.
    pub fn write_zeroes(lba: u64, nlb: u32, tag: u64) -> Command {
        Command {
            opcode: Opcode::WriteZeroes,
            lba,
            nlb,
            buf: None,
            tag,
        }
    }
    /// Deallocate `nlb` blocks at `lba`.
    pub fn deallocate(lba: u64, nlb: u32, tag: u64) -> Command {
        Command {
            opcode: Opcode::Deallocate,
            lba,
            nlb,
            buf: None,
            tag,
        }
    }
}

/// Why a command failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoStatus {
    /// The kernel returned this errno.
    Os(i32),
    /// A short transfer: this many bytes instead of the whole request.
    Short(u32),
    /// The LBA range lies outside the namespace.
    LbaOutOfRange,
    /// The buffer is missing or smaller than the transfer.
    InvalidBuffer,
    /// An injected fault (memory backend).
    InjectedFault,
    /// The device lost power; commands fail until it is power-cycled (memory backend).
    PowerLost,
    /// The transfer is larger than the device takes in one command (its limit, bytes).
    TooLarge(u32),
    /// The controller was reset (after a command timed out, a fatal status, or on request)
    /// while the command was in flight: it may or may not have been carried out.
    Reset,
    /// The NVMe controller failed the command: status code type and status code.
    Nvme {
        /// Status code type (0 generic, 1 command specific, 2 media and data integrity).
        sct: u8,
        /// Status code.
        sc: u8,
    },
}

impl fmt::Display for IoStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoStatus::Os(errno) => write!(
                f,
                "{} (errno {errno})",
                std::io::Error::from_raw_os_error(*errno)
            ),
            IoStatus::Short(n) => write!(f, "short transfer of {n} bytes"),
            IoStatus::LbaOutOfRange => f.write_str("LBA out of range"),
            IoStatus::InvalidBuffer => f.write_str("missing or too small data buffer"),
            IoStatus::InjectedFault => f.write_str("injected media error"),
            IoStatus::PowerLost => f.write_str("device lost power"),
            IoStatus::TooLarge(max) => write!(f, "transfer larger than the device's {max} bytes"),
            IoStatus::Reset => f.write_str("controller reset while the command was in flight"),
            IoStatus::Nvme { sct, sc } => write!(f, "NVMe status type {sct:#x} code {sc:#04x}"),
        }
    }
}

/// A failed command, naming the device, the LBA range and the status.
#[derive(Clone, Debug, thiserror::Error)]
#[error("device {device}: {opcode} at lba {lba} (+{nlb} blocks) failed: {status}")]
pub struct IoError {
    /// Device name (path or test name).
    pub device: Arc<str>,
    /// The failed command.
    pub opcode: Opcode,
    /// First LBA of the command.
    pub lba: u64,
    /// Block count of the command.
    pub nlb: u32,
    /// What went wrong.
    pub status: IoStatus,
}

/// A finished command.
#[derive(Debug)]
pub struct Completion {
    /// The command's tag.
    pub tag: u64,
    /// Success or the error.
    pub result: Result<(), IoError>,
    /// The command's buffer, handed back.
    pub buf: Option<DmaBuf>,
}

/// Why a command could not be queued; the command comes back.
#[derive(Debug)]
pub enum SubmitError {
    /// Every slot is in flight: poll and try again.
    QueueFull(Command),
}

/// Errors from opening devices and creating queue pairs.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device or file could not be opened or inspected.
    #[error("cannot open device {path}: {source}")]
    Open {
        /// What was opened.
        path: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// The device's geometry is unusable.
    #[error("device {path}: {reason}")]
    Geometry {
        /// What was opened.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A queue pair could not be created.
    #[error("device {path}: cannot create queue pair: {source}")]
    QueuePair {
        /// Device name.
        path: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
}

/// Options for a new queue pair.
#[derive(Clone, Debug, Default)]
pub struct QueuePairConfig {
    /// Commands in flight at most.
    pub depth: u32,
    /// The buffer pool region to register for zero-copy fixed-buffer I/O.
    pub region: Option<cfs_hugepages::RegionInfo>,
    /// Let a kernel thread poll the submission queue (io_uring SQPOLL): no syscall per submit.
    pub sqpoll: bool,
    /// CPUs for the backend's helper threads (io_uring's io-wq workers, which run blocking
    /// work such as fsync); empty: inherit the caller's affinity.
    pub worker_cpus: Vec<usize>,
}

/// A submission/completion queue pair, owned by exactly one thread.
pub trait QueuePair: Send {
    /// Queues a command. Errors only when the queue is full; the command comes back.
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError>;
    /// Pushes queued commands to the device and reaps up to `max` completions into `out`.
    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> usize;
    /// Commands submitted and not yet reaped.
    fn in_flight(&self) -> u32;
    /// Maximum commands in flight.
    fn depth(&self) -> u32;
}

/// A block device with an NVMe-like namespace.
pub trait BlockDevice: Send + Sync {
    /// Name used in errors and logs.
    fn name(&self) -> &str;
    /// Namespace geometry.
    fn namespace(&self) -> Namespace;
    /// Creates a queue pair for the calling thread.
    fn create_queue_pair(&self, cfg: QueuePairConfig) -> Result<Box<dyn QueuePair>, DeviceError>;
}

/// Checks a command against the namespace; `Some(status)` means it must fail without I/O.
pub(crate) fn validate(ns: &Namespace, cmd: &Command) -> Option<IoStatus> {
    match cmd.opcode {
        Opcode::Flush => None,
        op => {
            let end = cmd.lba.checked_add(u64::from(cmd.nlb));
            if cmd.nlb == 0 || end.is_none_or(|e| e > ns.lba_count) {
                return Some(IoStatus::LbaOutOfRange);
            }
            if matches!(op, Opcode::Read | Opcode::Write) {
                let need = u64::from(cmd.nlb) * u64::from(ns.lba_size);
                match &cmd.buf {
                    Some(b) if b.len() as u64 >= need => {}
                    _ => return Some(IoStatus::InvalidBuffer),
                }
            }
            None
        }
    }
}

//! The only `unsafe` in this crate: io_uring submission with buffers the ring owns until their
//! completion, buffer registration, and block-device geometry ioctls.

use crate::Command;
use cfs_hugepages::RegionInfo;
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::RawFd;

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
/// io_uring's limit for one registered buffer.
const FIXED_CHUNK: usize = 1 << 30;

/// Size in bytes of the block device open as `fd`.
pub(crate) fn block_device_bytes(fd: RawFd) -> io::Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut bytes as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bytes)
}

/// Logical sector size of the block device open as `fd`.
pub(crate) fn block_device_lba_size(fd: RawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(fd, BLKSSZGET, &mut size as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size as u32)
}

/// What the ring should do with a command.
pub(crate) enum RingOp {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32 },
    Fsync,
    Fallocate { offset: u64, len: u64, mode: i32 },
}

/// An io_uring that owns every buffer it has handed to the kernel until its completion is
/// reaped, so no buffer can be reused or freed while the kernel may still DMA into it.
pub(crate) struct Ring {
    ring: IoUring,
    /// In-flight commands by slot (the SQE's user_data); they hold their buffers.
    slots: Vec<Option<(Command, u32)>>,
    free_slots: Vec<u32>,
    /// Registered buffer region (base address), if any.
    region: Option<RegionInfo>,
    pending_submit: bool,
}

impl Ring {
    pub(crate) fn new(
        depth: u32,
        sqpoll: bool,
        fd: RawFd,
        region: Option<RegionInfo>,
        worker_cpus: &[usize],
    ) -> io::Result<Ring> {
        let depth = depth.clamp(1, 4096).next_power_of_two();
        let ring = if sqpoll {
            IoUring::builder().setup_sqpoll(1000).build(depth)?
        } else {
            // One thread owns the ring: completions are reaped only when it enters the kernel
            // (deferred task work), flagged in the SQ ring, instead of interrupting it.
            match IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .build(depth)
            {
                Ok(r) => r,
                Err(_) => IoUring::builder()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .build(depth)?,
            }
        };
        ring.submitter().register_files(&[fd])?;
        if !worker_cpus.is_empty() {
            // SAFETY: cpu_set_t is a plain bit array for which all-zero is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            for &cpu in worker_cpus {
                if cpu < libc::CPU_SETSIZE as usize {
                    // SAFETY: `cpu` is below CPU_SETSIZE, so the bit lies inside `set`.
                    unsafe { libc::CPU_SET(cpu, &mut set) };
                }
            }
            // Keeps io-wq helpers (fsync, fallocate) off the polling core that owns this ring.
            ring.submitter().register_iowq_aff(&set)?;
        }
        if let Some(r) = &region {
            let iovecs: Vec<libc::iovec> = (0..r.len)
                .step_by(FIXED_CHUNK)
                .map(|off| libc::iovec {
                    iov_base: (r.base + off) as *mut libc::c_void,
                    iov_len: (r.len - off).min(FIXED_CHUNK),
                })
                .collect();
            // SAFETY: the iovecs describe the pool's mapping, which outlives every ring: the
            // pool's `Arc` is held by each buffer and by the queue pair's owner, and the ring is
            // dropped (unregistering) before the reactor drops its pool share.
            unsafe { ring.submitter().register_buffers(&iovecs)? };
        }
        Ok(Ring {
            ring,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            region,
            pending_submit: false,
        })
    }

    pub(crate) fn depth(&self) -> u32 {
        self.slots.len() as u32
    }

    pub(crate) fn in_flight(&self) -> u32 {
        (self.slots.len() - self.free_slots.len()) as u32
    }

    /// Queues `cmd` as `op`; the ring keeps `cmd` (and its buffer) until the completion.
    pub(crate) fn push(&mut self, cmd: Command, op: RingOp) -> Result<(), Command> {
        let Some(slot) = self.free_slots.pop() else {
            return Err(cmd);
        };
        let file = types::Fixed(0);
        let (entry, expect): (squeue::Entry, u32) = match op {
            RingOp::Read { offset, len } | RingOp::Write { offset, len } => {
                let is_read = matches!(op, RingOp::Read { .. });
                let Some(buf) = cmd.buf.as_ref() else {
                    self.free_slots.push(slot);
                    return Err(cmd);
                };
                assert!(len as usize <= buf.len(), "transfer larger than its buffer");
                let ptr = buf.addr() as *mut u8;
                let fixed = self.region.and_then(|r| {
                    let a = buf.addr();
                    (a >= r.base && a + len as usize <= r.base + r.len)
                        .then(|| ((a - r.base) / FIXED_CHUNK) as u16)
                });
                let e = match (is_read, fixed) {
                    (true, Some(i)) => opcode::ReadFixed::new(file, ptr, len, i)
                        .offset(offset)
                        .build(),
                    (false, Some(i)) => opcode::WriteFixed::new(file, ptr, len, i)
                        .offset(offset)
                        .build(),
                    (true, None) => opcode::Read::new(file, ptr, len).offset(offset).build(),
                    (false, None) => opcode::Write::new(file, ptr, len).offset(offset).build(),
                };
                (e, len)
            }
            RingOp::Fsync => (
                opcode::Fsync::new(file)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
                0,
            ),
            RingOp::Fallocate { offset, len, mode } => (
                opcode::Fallocate::new(file, len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                0,
            ),
        };
        let entry = entry.user_data(u64::from(slot));
        // SAFETY: the entry's buffer pointer (if any) belongs to `cmd.buf`, which is stored in
        // `self.slots[slot]` below and stays there, unmoved in the pool, until the completion
        // for `slot` is reaped; the file is the registered fixed file 0, open for the ring's life.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free_slots.push(slot);
            return Err(cmd);
        }
        self.slots[slot as usize] = Some((cmd, expect));
        self.pending_submit = true;
        Ok(())
    }

    /// Hands queued entries to the kernel (a no-op syscall-wise under SQPOLL unless it sleeps).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        if self.pending_submit || (self.in_flight() > 0 && self.ring.submission().taskrun()) {
            self.ring.submit()?;
            self.pending_submit = false;
        }
        Ok(())
    }

    /// Reaps up to `max` completions: (command with its buffer, result, expected bytes).
    pub(crate) fn reap(&mut self, max: usize, mut f: impl FnMut(Command, i32, u32)) -> usize {
        let mut n = 0;
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            done.push((cqe.user_data(), cqe.result()));
            n += 1;
            if n == max {
                break;
            }
        }
        for (slot, res) in done {
            let taken = self.slots.get_mut(slot as usize).and_then(Option::take);
            let (cmd, expect) = taken.expect("completion for a slot with no command");
            self.free_slots.push(slot as u32);
            f(cmd, res, expect);
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still be writing into in-flight buffers: wait for all of them before
        // the buffers go back to the pool.
        let _ = self.ring.submit();
        while self.in_flight() > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap(usize::MAX, |_, _, _| {});
        }
        // Unregister now: closing a ring releases its registered pages later, from a kernel
        // worker, which would keep hugepages allocated after the pool itself is unmapped.
        if self.region.is_some() {
            let _ = self.ring.submitter().unregister_buffers();
        }
    }
}

//! Userspace NVMe driver over VFIO: the controller is taken from the kernel (bound to
//! vfio-pci), its BAR0 mapped into this process, and its queues placed in memory this process
//! owns and maps for DMA through the IOMMU. Each [`QueuePair`] is one NVMe I/O submission and
//! completion queue pair with interrupts off, owned by one thread, which polls completions by
//! their phase bit: no system call and no lock on the I/O path.
//!
//! Bus addresses (IOVAs) are this driver's own, handed out from 1 MiB upwards (the emulated
//! IOMMU may be narrower than the process's virtual addresses): the admin queue, each queue
//! pair's queues and PRP-list pages, and the buffer-pool region given at queue-pair creation
//! (mapped once, whole; a [`DmaBuf`]'s IOVA is the region's plus its offset).

#[allow(unsafe_code)]
mod sys;

pub mod regs;

use crate::{
    validate, BlockDevice, Command, Completion, DeviceError, IoError, IoStatus, Namespace, Opcode,
    QueuePair, QueuePairConfig, SubmitError,
};
use cfs_hugepages::{DmaBuf, RegionInfo};
use regs::{admin, nvm, Capabilities, ControllerId, Cqe, NamespaceId, Sqe};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sys::{Container, Device, DmaMem, Group, Mmio};

/// First IOVA handed out.
const IOVA_START: u64 = 1 << 20;
/// Entries of the admin queues.
const ADMIN_ENTRIES: u32 = 32;
/// How long an admin command may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// I/O queues asked for (the controller may grant fewer).
const WANT_IO_QUEUES: u16 = 16;
/// The largest transfer this driver builds PRP lists for.
const MAX_TRANSFER_CAP: usize = 2 << 20;
/// A queue pair checks its oldest command's age and the controller's status (one MMIO read)
/// at most this often, not on every poll.
const HEALTH_EVERY: Duration = Duration::from_millis(100);

/// Driver options.
#[derive(Clone, Debug)]
pub struct VfioOptions {
    /// A command not completed after this long makes the controller reset (every command in
    /// flight then fails with [`IoStatus::Reset`]).
    pub command_timeout_ms: u64,
    /// Describe data with one SGL descriptor when the controller supports SGLs (else, or
    /// when false, with PRPs).
    pub use_sgls: bool,
}

impl Default for VfioOptions {
    fn default() -> VfioOptions {
        VfioOptions {
            command_timeout_ms: 30_000,
            use_sgls: true,
        }
    }
}

/// Why the controller could not be opened or driven.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// A VFIO or sysfs step failed.
    #[error("{pci}: {what}: {source}")]
    Os {
        /// The device.
        pci: String,
        /// The step.
        what: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The controller does not behave as this driver needs.
    #[error("{pci}: {0}", pci = .1)]
    Controller(String, String),
    /// An admin command failed or timed out.
    #[error("{pci}: admin command {opcode:#04x} failed: {why}")]
    Admin {
        /// The device.
        pci: String,
        /// The command's opcode.
        opcode: u8,
        /// Status or timeout.
        why: String,
    },
}

/// A queue pair's state that a reset on another thread reads.
#[derive(Default)]
struct QpShared {
    /// Odd while the pair writes a doorbell.
    ringing: AtomicU64,
    /// Commands the pair has in flight on the device.
    in_flight: AtomicU64,
}

/// How long a reset lets commands in flight finish before it disables the controller
/// (at most half the command timeout).
const RESET_DRAIN: Duration = Duration::from_secs(1);

/// A buffer-pool region mapped for the device.
struct MappedRegion {
    base: usize,
    len: usize,
    iova: u64,
    /// Queue pairs using it: the mapping goes with the last (a pool freed and another mapped
    /// at the same address later must get a mapping of its own pages, not the old ones).
    users: u32,
}

/// The bus addresses handed out and the memory mapped at them.
struct IovaSpace {
    next: u64,
    regions: Vec<MappedRegion>,
}

impl IovaSpace {
    fn take(&mut self, len: usize) -> u64 {
        let iova = self.next;
        // Keep every mapping 2 MiB aligned so huge pages map as huge IOMMU pages.
        self.next += (len as u64).div_ceil(2 << 20) * (2 << 20);
        iova
    }
}

/// The admin queue pair (used under the controller's lock: admin commands are rare).
struct AdminQueue {
    sq: DmaMem,
    cq: DmaMem,
    sq_iova: u64,
    cq_iova: u64,
    tail: u32,
    head: u32,
    phase: bool,
    next_cid: u16,
    /// A page for data the controller returns (identify).
    data: DmaMem,
    data_iova: u64,
}

struct Ctrl {
    pci: String,
    container: Container,
    _group: Group,
    _device: Device,
    bar: Mmio,
    caps: Capabilities,
    id: ControllerId,
    ns: NamespaceId,
    nsid: u32,
    max_transfer: usize,
    io_queues: u16,
    admin: Mutex<AdminQueue>,
    iova: Mutex<IovaSpace>,
    /// Which I/O queue ids are in use (index = qid - 1).
    qids: Mutex<Vec<bool>>,
    /// Bumped twice by every controller reset: odd while it runs (queue pairs ring no doorbell
    /// then: touching a controller's queues while it resets can wedge real drives), even
    /// after; a queue pair that sees a new even value fails what it had in flight and creates
    /// its queues again.
    epoch: AtomicU64,
    /// What each queue pair shows a reset: whether it is writing a doorbell, and how many
    /// commands it has in flight.
    ringers: Mutex<Vec<Arc<QpShared>>>,
    /// One reset at a time.
    resetting: Mutex<()>,
    command_timeout: Duration,
    /// New queue pairs describe data with SGLs (controller supports them and options allow).
    use_sgls: std::sync::atomic::AtomicBool,
    /// Resets so far.
    resets: AtomicU64,
}

fn os<'a>(pci: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> VfioError + 'a {
    move |source| VfioError::Os {
        pci: pci.to_string(),
        what,
        source,
    }
}

/// The IOMMU group of PCI device `pci` (from sysfs).
pub fn iommu_group(pci: &str) -> io::Result<u32> {
    let link = std::fs::read_link(format!("/sys/bus/pci/devices/{pci}/iommu_group"))?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other(format!("odd iommu_group link {}", link.display())))
}

impl Ctrl {
    fn wait_csts(&self, want: impl Fn(u32) -> bool, what: &str) -> Result<(), VfioError> {
        let deadline = Instant::now() + Duration::from_millis(self.caps.ready_timeout_ms.max(500));
        loop {
            let csts = self.bar.read32(regs::CSTS);
            if csts != u32::MAX && want(csts) {
                return Ok(());
            }
            if csts & regs::CSTS_FATAL != 0 && csts != u32::MAX {
                return Err(VfioError::Controller(
                    format!("controller fatal status while waiting for {what}"),
                    self.pci.clone(),
                ));
            }
            if Instant::now() >= deadline {
                return Err(VfioError::Controller(
                    format!("timed out waiting for {what} (CSTS {csts:#x})"),
                    self.pci.clone(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs one admin command to completion; returns its completion dword 0.
    fn admin(&self, sqe: Sqe) -> Result<u32, VfioError> {
        let mut q = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let cid = q.next_cid;
        q.next_cid = q.next_cid.wrapping_add(1);
        let mut sqe = sqe;
        sqe.0[0] = (sqe.0[0] & 0xFFFF) | (u32::from(cid) << 16);
        let opcode = sqe.0[0] as u8;
        let slot = q.tail as usize * regs::SQE_BYTES;
        for (i, d) in sqe.0.iter().enumerate() {
            q.sq.write32(slot + i * 4, *d);
        }
        q.tail = (q.tail + 1) % ADMIN_ENTRIES;
        sys::dma_wmb();
        self.bar.write32(self.caps.sq_tail_doorbell(0), q.tail);
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            let at = q.head as usize * regs::CQE_BYTES;
            let dw3 = q.cq.read32(at + 12);
            if (dw3 & (1 << 16) != 0) == q.phase {
                sys::dma_rmb();
                let cqe = Cqe::decode([
                    q.cq.read32(at),
                    q.cq.read32(at + 4),
                    q.cq.read32(at + 8),
                    dw3,
                ]);
                q.head += 1;
                if q.head == ADMIN_ENTRIES {
                    q.head = 0;
                    q.phase = !q.phase;
                }
                self.bar.write32(self.caps.cq_head_doorbell(0), q.head);
                if cqe.cid != cid {
                    // A late completion of an earlier command that timed out: skip it.
                    continue;
                }
                if !cqe.ok() {
                    let (sct, sc) = cqe.status_parts();
                    return Err(VfioError::Admin {
                        pci: self.pci.clone(),
                        opcode,
                        why: format!("status type {sct:#x} code {sc:#04x}"),
                    });
                }
                return Ok(cqe.result);
            }
            if Instant::now() >= deadline {
                return Err(VfioError::Admin {
                    pci: self.pci.clone(),
                    opcode,
                    why: format!("no completion within {} s", ADMIN_TIMEOUT.as_secs()),
                });
            }
            std::hint::spin_loop();
        }
    }

    /// Identify with `cns` (and `nsid`); returns the 4096 bytes.
    fn identify(&self, cns: u32, nsid: u32) -> Result<Vec<u8>, VfioError> {
        let data_iova = self
            .admin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .data_iova;
        self.admin(
            Sqe::new(admin::IDENTIFY, 0, nsid)
                .prps(data_iova, 0)
                .cdw(10, cns),
        )?;
        let q = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![0u8; 4096];
        q.data.read_bytes(0, &mut out);
        Ok(out)
    }

    fn map(&self, mem: &DmaMem) -> Result<u64, VfioError> {
        let iova = self
            .iova
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(mem.len());
        self.container
            .map_dma(mem.addr(), iova, mem.len())
            .map_err(os(&self.pci, "mapping DMA memory"))?;
        Ok(iova)
    }

    /// Maps a buffer-pool region (once while queue pairs use it); returns its IOVA.
    fn map_region(&self, r: &RegionInfo) -> Result<u64, VfioError> {
        let mut space = self.iova.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = space
            .regions
            .iter_mut()
            .find(|m| m.base == r.base && m.len == r.len)
        {
            m.users += 1;
            return Ok(m.iova);
        }
        let iova = space.take(r.len);
        self.container
            .map_dma(r.base, iova, r.len)
            .map_err(os(&self.pci, "mapping the buffer pool for DMA"))?;
        space.regions.push(MappedRegion {
            base: r.base,
            len: r.len,
            iova,
            users: 1,
        });
        Ok(iova)
    }

    /// A queue pair stops using a region: the last one unmaps it.
    fn unmap_region(&self, base: usize, len: usize) {
        let mut space = self.iova.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = space
            .regions
            .iter()
            .position(|m| m.base == base && m.len == len)
        else {
            return;
        };
        space.regions[i].users -= 1;
        if space.regions[i].users == 0 {
            let m = space.regions.swap_remove(i);
            if let Err(e) = self.container.unmap_dma(m.iova, m.len) {
                tracing::warn!("{}: unmapping a buffer pool: {e}", self.pci);
            }
        }
    }

    /// Disables the controller, starts the admin queue afresh and enables it again. Every
    /// I/O queue is gone afterwards (the queue pairs re-create theirs).
    fn restart(&self) -> Result<(), VfioError> {
        if self.bar.read32(regs::CC) & 1 != 0 {
            self.bar.write32(regs::CC, 0);
        }
        // Once RDY is clear the controller has stopped: nothing in flight touches memory.
        self.wait_csts(|c| c & regs::CSTS_READY == 0, "the controller to stop")?;
        let (sq_iova, cq_iova) = {
            let mut q = self.admin.lock().unwrap_or_else(|p| p.into_inner());
            q.sq.zero();
            q.cq.zero();
            q.tail = 0;
            q.head = 0;
            q.phase = true;
            (q.sq_iova, q.cq_iova)
        };
        self.bar.write32(regs::AQA, regs::aqa(ADMIN_ENTRIES));
        self.bar.write64(regs::ASQ, sq_iova);
        self.bar.write64(regs::ACQ, cq_iova);
        self.bar.write32(regs::INTMS, u32::MAX);
        self.bar.write32(regs::CC, regs::CC_ENABLE);
        self.wait_csts(
            |c| c & regs::CSTS_READY != 0,
            "the controller to become ready",
        )
    }

    /// Asks for I/O queues; returns how many were granted (at most [`WANT_IO_QUEUES`]).
    fn ask_queues(&self) -> Result<u16, VfioError> {
        let granted = self.admin(
            Sqe::new(admin::SET_FEATURES, 0, 0)
                .cdw(10, admin::FEATURE_NUM_QUEUES)
                .cdw(
                    11,
                    u32::from(WANT_IO_QUEUES - 1) | (u32::from(WANT_IO_QUEUES - 1) << 16),
                ),
        )?;
        Ok(((granted & 0xFFFF) as u16)
            .min((granted >> 16) as u16)
            .saturating_add(1)
            .min(WANT_IO_QUEUES))
    }

    /// Controller reset and recovery: restart, ask for the same queues, and tell the queue
    /// pairs (they fail their commands in flight, with [`IoStatus::Reset`], and create their
    /// queues again on their next poll).
    fn reset(&self, why: &str) -> Result<(), VfioError> {
        let _one = self.resetting.lock().unwrap_or_else(|p| p.into_inner());
        tracing::warn!("{}: resetting the controller: {why}", self.pci);
        // Quiesce: no new doorbell from now on; wait out those under way; give commands in
        // flight a moment to complete (the pairs keep reaping). Disabling a controller with
        // I/O outstanding is what a hung command needs, but it is also what QEMU's emulated
        // controller mishandles (use-after-free in its completion callback, seen here).
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let qps = self
            .ringers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for q in &qps {
            while q.ringing.load(Ordering::SeqCst) % 2 == 1 {
                std::hint::spin_loop();
            }
        }
        let drain_until = Instant::now() + RESET_DRAIN.min(self.command_timeout / 2);
        while qps.iter().any(|q| q.in_flight.load(Ordering::SeqCst) > 0)
            && Instant::now() < drain_until
        {
            std::thread::sleep(Duration::from_micros(100));
        }
        // On failure the epoch stays odd: the queue pairs keep failing commands rather than
        // touch a controller in an unknown state.
        self.restart()?;
        let granted = self.ask_queues()?;
        if granted < self.io_queues {
            return Err(VfioError::Controller(
                format!(
                    "after a reset only {granted} of {} I/O queues",
                    self.io_queues
                ),
                self.pci.clone(),
            ));
        }
        self.resets.fetch_add(1, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Orderly shutdown (CC.SHN): the controller finishes writing its cache.
    fn shutdown(&self) {
        let cc = self.bar.read32(regs::CC);
        if cc & 1 == 0 || cc == u32::MAX {
            return; // never enabled (open failed early), or the device is gone
        }
        self.bar
            .write32(regs::CC, (cc & !regs::CC_SHN_MASK) | regs::CC_SHN_NORMAL);
        if let Err(e) = self.wait_csts(
            |c| c & regs::CSTS_SHST_MASK == regs::CSTS_SHUTDOWN_DONE,
            "shutdown",
        ) {
            tracing::warn!("{e}");
        }
    }
}

impl Drop for Ctrl {
    fn drop(&mut self) {
        // Every queue pair is gone (each holds the controller), so only the admin queue is
        // live: shut the controller down, then nothing of ours can be reached by DMA.
        self.shutdown();
        self.bar.write32(regs::CC, 0);
    }
}

/// An NVMe controller driven from userspace (namespace 1).
pub struct VfioNvme {
    name: String,
    ctrl: Arc<Ctrl>,
}

/// What the controller reported, for logs and tests.
#[derive(Clone, Debug)]
pub struct ControllerInfo {
    /// Identify Controller fields.
    pub id: ControllerId,
    /// NVMe version (VS register: major << 16 | minor << 8).
    pub version: u32,
    /// Capabilities.
    pub caps: Capabilities,
    /// Largest transfer of one command, bytes.
    pub max_transfer_bytes: usize,
    /// I/O queue pairs granted.
    pub io_queues: u16,
    /// New queue pairs describe data with SGLs.
    pub sgls: bool,
}

impl VfioNvme {
    /// Takes the controller at PCI address `pci` (bound to vfio-pci), resets and enables it,
    /// identifies it and namespace 1, and asks for I/O queues.
    pub fn open(pci: &str) -> Result<VfioNvme, VfioError> {
        VfioNvme::open_with(pci, &VfioOptions::default())
    }

    /// [`VfioNvme::open`] with options.
    pub fn open_with(pci: &str, opts: &VfioOptions) -> Result<VfioNvme, VfioError> {
        let group = iommu_group(pci).map_err(os(pci, "finding the IOMMU group"))?;
        let container = Container::open().map_err(os(pci, "opening /dev/vfio/vfio"))?;
        let group = container
            .attach(group)
            .map_err(os(pci, "attaching the IOMMU group"))?;
        let device = group.device(pci).map_err(os(pci, "opening the device"))?;
        if device.regions <= sys::CONFIG_REGION {
            return Err(VfioError::Controller(
                format!("only {} device regions: not a PCI function", device.regions),
                pci.into(),
            ));
        }
        // Memory space and bus mastering on (PCI command register).
        let config = device
            .region(sys::CONFIG_REGION)
            .map_err(os(pci, "config space"))?;
        let mut cmd = [0u8; 2];
        device
            .read_region(&config, 4, &mut cmd)
            .map_err(os(pci, "reading the PCI command register"))?;
        let cmd = u16::from_le_bytes(cmd) | 0b110;
        device
            .write_region(&config, 4, &cmd.to_le_bytes())
            .map_err(os(pci, "enabling bus mastering"))?;
        let bar0 = device.region(sys::BAR0_REGION).map_err(os(pci, "BAR0"))?;
        let bar = device.map(&bar0).map_err(os(pci, "mapping BAR0"))?;
        let caps = Capabilities::decode(bar.read64(regs::CAP));
        if !caps.nvm_command_set {
            return Err(VfioError::Controller(
                "no NVM command set".into(),
                pci.into(),
            ));
        }
        if caps.min_page_bytes > regs::PAGE_BYTES || caps.max_page_bytes < regs::PAGE_BYTES {
            return Err(VfioError::Controller(
                "4 KiB memory pages unsupported".into(),
                pci.into(),
            ));
        }
        let data = DmaMem::new(4096).map_err(os(pci, "allocating DMA memory"))?;
        let sq = DmaMem::new(ADMIN_ENTRIES as usize * regs::SQE_BYTES)
            .map_err(os(pci, "allocating DMA memory"))?;
        let cq = DmaMem::new(ADMIN_ENTRIES as usize * regs::CQE_BYTES)
            .map_err(os(pci, "allocating DMA memory"))?;
        let mut ctrl = Ctrl {
            pci: pci.to_string(),
            container,
            _group: group,
            _device: device,
            bar,
            caps,
            id: ControllerId::decode(&[0u8; 4096]).expect("a zeroed identify decodes"),
            ns: NamespaceId {
                blocks: 0,
                lba_bytes: 512,
                metadata_bytes: 0,
            },
            nsid: 1,
            max_transfer: 0,
            io_queues: 0,
            admin: Mutex::new(AdminQueue {
                sq,
                cq,
                sq_iova: 0,
                cq_iova: 0,
                tail: 0,
                head: 0,
                phase: true,
                next_cid: 0,
                data,
                data_iova: 0,
            }),
            iova: Mutex::new(IovaSpace {
                next: IOVA_START,
                regions: Vec::new(),
            }),
            qids: Mutex::new(Vec::new()),
            epoch: AtomicU64::new(0),
            ringers: Mutex::new(Vec::new()),
            resetting: Mutex::new(()),
            command_timeout: Duration::from_millis(opts.command_timeout_ms.max(1)),
            use_sgls: std::sync::atomic::AtomicBool::new(false),
            resets: AtomicU64::new(0),
        };
        // Map the admin memory, then disable (a previous owner may have left it running) and
        // enable with our admin queue.
        {
            let (sq_iova, cq_iova, data_iova) = {
                let q = ctrl.admin.lock().unwrap_or_else(|p| p.into_inner());
                (ctrl.map(&q.sq)?, ctrl.map(&q.cq)?, ctrl.map(&q.data)?)
            };
            let mut q = ctrl.admin.lock().unwrap_or_else(|p| p.into_inner());
            q.sq_iova = sq_iova;
            q.cq_iova = cq_iova;
            q.data_iova = data_iova;
        }
        ctrl.restart()?;

        let id = ControllerId::decode(&ctrl.identify(admin::CNS_CONTROLLER, 0)?)
            .expect("4096 bytes decode");
        let ns =
            NamespaceId::decode(&ctrl.identify(admin::CNS_NAMESPACE, 1)?).ok_or_else(|| {
                VfioError::Controller("namespace 1 has an unusable format".into(), pci.into())
            })?;
        if ns.metadata_bytes != 0 || ns.blocks == 0 {
            return Err(VfioError::Controller(
                format!(
                    "namespace 1: {} blocks with {} metadata bytes each (need > 0 blocks, no metadata)",
                    ns.blocks, ns.metadata_bytes
                ),
                pci.into(),
            ));
        }
        let io_queues = ctrl.ask_queues()?;
        ctrl.max_transfer = id.max_transfer_bytes(caps.min_page_bytes, MAX_TRANSFER_CAP);
        ctrl.use_sgls = std::sync::atomic::AtomicBool::new(opts.use_sgls && id.sgl_supported());
        ctrl.id = id;
        ctrl.ns = ns;
        ctrl.io_queues = io_queues;
        ctrl.qids = Mutex::new(vec![false; usize::from(io_queues)]);
        tracing::info!(
            "{pci}: NVMe {} (serial {}), {} blocks of {} bytes, {io_queues} I/O queues, transfers up to {} KiB",
            ctrl.id.model,
            ctrl.id.serial,
            ns.blocks,
            ns.lba_bytes,
            ctrl.max_transfer >> 10
        );
        Ok(VfioNvme {
            name: format!("vfio:{pci}"),
            ctrl: Arc::new(ctrl),
        })
    }

    /// Resets the controller now (recovery, or a test): commands in flight on every queue
    /// pair fail with [`IoStatus::Reset`]; the queue pairs go on after re-creating their
    /// queues.
    pub fn reset(&self) -> Result<(), VfioError> {
        self.ctrl.reset("requested")
    }

    /// Whether queue pairs created from now on describe data with SGLs (`on` only takes effect
    /// if the controller supports them). Returns what new queue pairs will use.
    pub fn set_sgls(&self, on: bool) -> bool {
        let on = on && self.ctrl.id.sgl_supported();
        self.ctrl.use_sgls.store(on, Ordering::Relaxed);
        on
    }

    /// Controller resets so far.
    pub fn resets(&self) -> u64 {
        self.ctrl.resets.load(Ordering::Relaxed)
    }

    /// What the controller reported.
    pub fn info(&self) -> ControllerInfo {
        ControllerInfo {
            id: self.ctrl.id.clone(),
            version: self.ctrl.bar.read32(regs::VS),
            caps: self.ctrl.caps,
            max_transfer_bytes: self.ctrl.max_transfer,
            io_queues: self.ctrl.io_queues,
            sgls: self.ctrl.use_sgls.load(Ordering::Relaxed),
        }
    }
}

impl BlockDevice for VfioNvme {
    fn name(&self) -> &str {
        &self.name
    }

    fn namespace(&self) -> Namespace {
        Namespace {
            lba_size: self.ctrl.ns.lba_bytes,
            lba_count: self.ctrl.ns.blocks,
        }
    }

    fn create_queue_pair(&self, cfg: QueuePairConfig) -> Result<Box<dyn QueuePair>, DeviceError> {
        let err = |e: VfioError| DeviceError::QueuePair {
            path: self.name.clone(),
            source: io::Error::other(e.to_string()),
        };
        let qp = VfioQueuePair::new(Arc::clone(&self.ctrl), &self.name, cfg).map_err(err)?;
        Ok(Box::new(qp))
    }
}

/// One command in flight.
struct Slot {
    tag: u64,
    submitted: Instant,
    opcode: Opcode,
    lba: u64,
    nlb: u32,
    buf: Option<DmaBuf>,
}

/// A queue pair's DMA memory.
struct QueueMem {
    sq: DmaMem,
    cq: DmaMem,
    /// PRP list pages, `list_pages` per slot.
    lists: DmaMem,
}

/// An I/O queue pair: one submission and one completion queue, polled.
pub struct VfioQueuePair {
    ctrl: Arc<Ctrl>,
    name: Arc<str>,
    qid: u16,
    /// Always present until drop, which may have to leak it (see `Drop`).
    mem: Option<QueueMem>,
    sq_iova: u64,
    cq_iova: u64,
    lists_iova: u64,
    list_pages: usize,
    entries: u32,
    /// Completion queue entries (2 x depth + 1).
    cq_entries: u32,
    /// Completions reaped since the head doorbell was last written.
    cq_unacked: u32,
    /// Data described by one SGL descriptor instead of PRPs.
    sgl: bool,
    /// When the last poll began (submission times of commands, for the timeout).
    now: Instant,
    tail: u32,
    head: u32,
    phase: bool,
    /// Submissions written since the last doorbell.
    unrung: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    /// Commands that failed before reaching the device.
    failed: VecDeque<Completion>,
    /// The buffer-pool region mapped for this pair: (virtual base, length, IOVA).
    region: Option<(usize, usize, u64)>,
    ns: Namespace,
    /// The controller epoch this pair's queues were created in.
    epoch: u64,
    /// What a reset on another thread reads (see `Ctrl::ringers`).
    shared: Arc<QpShared>,
    /// When the health check last ran.
    last_health: Instant,
    /// The queues could not be re-created after a reset: every command fails.
    broken: bool,
}

impl VfioQueuePair {
    fn new(ctrl: Arc<Ctrl>, name: &str, cfg: QueuePairConfig) -> Result<VfioQueuePair, VfioError> {
        let pci = ctrl.pci.clone();
        let depth = cfg
            .depth
            .clamp(1, (ctrl.caps.max_queue_entries.min(4096) - 1) / 2);
        // The completion queue is twice as deep as the commands in flight, so its head
        // doorbell can be written once per depth/2 completions instead of after every poll
        // (an MMIO write each, and the controller never finds it full: see `poll`).
        let entries = depth + 1;
        let cq_entries = 2 * depth + 1;
        let qid = {
            let mut q = ctrl.qids.lock().unwrap_or_else(|p| p.into_inner());
            let i = q.iter().position(|u| !u).ok_or_else(|| {
                VfioError::Controller(
                    format!("all {} I/O queues are in use", ctrl.io_queues),
                    pci.clone(),
                )
            })?;
            q[i] = true;
            i as u16 + 1
        };
        let release = |ctrl: &Ctrl| {
            ctrl.qids.lock().unwrap_or_else(|p| p.into_inner())[usize::from(qid) - 1] = false;
        };
        let alloc = |len: usize| DmaMem::new(len).map_err(os(&pci, "allocating DMA memory"));
        let setup = || -> Result<VfioQueuePair, VfioError> {
            let sq = alloc(entries as usize * regs::SQE_BYTES)?;
            let cq = alloc(cq_entries as usize * regs::CQE_BYTES)?;
            let max_pages = ctrl.max_transfer / regs::PAGE_BYTES + 1;
            let list_pages = max_pages.div_ceil(regs::PAGE_BYTES / 8 - 1).max(1);
            let lists = alloc(depth as usize * list_pages * regs::PAGE_BYTES)?;
            // Map everything, then create the queues; on a failure undo the mappings made.
            let mut mapped: Vec<(u64, usize)> = Vec::new();
            let mut region = None;
            let made = (|| -> Result<(u64, u64, u64, u64), VfioError> {
                let mut map = |m: &DmaMem| -> Result<u64, VfioError> {
                    let iova = ctrl.map(m)?;
                    mapped.push((iova, m.len()));
                    Ok(iova)
                };
                let (sq_iova, cq_iova, lists_iova) = (map(&sq)?, map(&cq)?, map(&lists)?);
                // Data buffers must come from this region (mapped while the pair lives).
                if let Some(r) = &cfg.region {
                    region = Some((r.base, r.len, ctrl.map_region(r)?));
                }
                let created_in = ctrl.epoch.load(Ordering::SeqCst);
                if created_in % 2 == 1 {
                    return Err(VfioError::Controller(
                        "the controller is being reset".into(),
                        pci.clone(),
                    ));
                }
                create_queues(&ctrl, qid, entries, cq_entries, sq_iova, cq_iova)?;
                Ok((sq_iova, cq_iova, lists_iova, created_in))
            })();
            let (sq_iova, cq_iova, lists_iova, created_in) = match made {
                Ok(m) => m,
                Err(e) => {
                    for (iova, len) in mapped {
                        if let Err(u) = ctrl.container.unmap_dma(iova, len) {
                            tracing::warn!("{pci}: unmapping after a failed queue pair: {u}");
                        }
                    }
                    if let Some((base, len, _)) = region {
                        ctrl.unmap_region(base, len);
                    }
                    return Err(e);
                }
            };
            let shared = Arc::new(QpShared::default());
            ctrl.ringers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::clone(&shared));
            Ok(VfioQueuePair {
                ns: Namespace {
                    lba_size: ctrl.ns.lba_bytes,
                    lba_count: ctrl.ns.blocks,
                },
                ctrl: Arc::clone(&ctrl),
                name: Arc::from(name),
                qid,
                mem: Some(QueueMem { sq, cq, lists }),
                sq_iova,
                cq_iova,
                lists_iova,
                list_pages,
                entries,
                cq_entries,
                cq_unacked: 0,
                sgl: ctrl.use_sgls.load(Ordering::Relaxed),
                now: Instant::now(),
                tail: 0,
                head: 0,
                phase: true,
                unrung: false,
                slots: (0..depth).map(|_| None).collect(),
                free: (0..depth as u16).rev().collect(),
                failed: VecDeque::new(),
                region,
                epoch: created_in,
                shared,
                last_health: Instant::now(),
                broken: false,
            })
        };
        setup().inspect_err(|_| release(&ctrl))
    }

    fn mem(&self) -> &QueueMem {
        self.mem.as_ref().expect("queue memory lives until drop")
    }

    fn iova_of(&self, buf: &DmaBuf) -> Option<u64> {
        let a = buf.addr();
        self.region
            .filter(|(base, len, _)| a >= *base && a + buf.len() <= base + len)
            .map(|(base, _, iova)| iova + (a - base) as u64)
    }

    fn fail(&mut self, cmd: Command, status: IoStatus) {
        self.failed.push_back(Completion {
            tag: cmd.tag,
            result: Err(IoError {
                device: Arc::clone(&self.name),
                opcode: cmd.opcode,
                lba: cmd.lba,
                nlb: cmd.nlb,
                status,
            }),
            buf: cmd.buf,
        });
    }

    /// The data pointer of slot `cid`'s transfer of `len` bytes from `iova`.
    fn prps(&self, cid: u16, iova: u64, len: usize) -> (u64, u64) {
        let list_at = usize::from(cid) * self.list_pages * regs::PAGE_BYTES;
        let list_iova = self.lists_iova + list_at as u64;
        let plan = regs::prp_plan(iova, len, list_iova);
        for (p, page) in regs::prp_list_pages(&plan.list, list_iova)
            .iter()
            .enumerate()
        {
            assert!(p < self.list_pages, "PRP list longer than the slot's pages");
            for (i, e) in page.iter().enumerate() {
                self.mem()
                    .lists
                    .write64(list_at + p * regs::PAGE_BYTES + i * 8, *e);
            }
        }
        (plan.prp1, plan.prp2)
    }
}

/// Creates I/O queue pair `qid` on the controller: the completion queue (physically
/// contiguous, interrupts off), then the submission queue bound to it.
fn create_queues(
    ctrl: &Ctrl,
    qid: u16,
    sq_entries: u32,
    cq_entries: u32,
    sq_iova: u64,
    cq_iova: u64,
) -> Result<(), VfioError> {
    ctrl.admin(
        Sqe::new(admin::CREATE_CQ, 0, 0)
            .prps(cq_iova, 0)
            .cdw(10, u32::from(qid) | ((cq_entries - 1) << 16))
            .cdw(11, 1),
    )?;
    ctrl.admin(
        Sqe::new(admin::CREATE_SQ, 0, 0)
            .prps(sq_iova, 0)
            .cdw(10, u32::from(qid) | ((sq_entries - 1) << 16))
            .cdw(11, 1 | (u32::from(qid) << 16)),
    )?;
    Ok(())
}

impl VfioQueuePair {
    /// After a controller reset: every command in flight fails (the controller was disabled,
    /// so none of their buffers is touched any more) and the queues start afresh.
    fn recover(&mut self, epoch: u64) {
        for cid in 0..self.slots.len() {
            if let Some(s) = self.slots[cid].take() {
                self.free.push(cid as u16);
                self.failed.push_back(Completion {
                    tag: s.tag,
                    result: Err(IoError {
                        device: Arc::clone(&self.name),
                        opcode: s.opcode,
                        lba: s.lba,
                        nlb: s.nlb,
                        status: IoStatus::Reset,
                    }),
                    buf: s.buf,
                });
            }
        }
        self.publish_in_flight();
        let mem = self.mem();
        mem.sq.zero();
        mem.cq.zero();
        self.tail = 0;
        self.head = 0;
        self.phase = true;
        self.unrung = false;
        self.cq_unacked = 0;
        self.epoch = epoch;
        match create_queues(
            &self.ctrl,
            self.qid,
            self.entries,
            self.cq_entries,
            self.sq_iova,
            self.cq_iova,
        ) {
            Ok(()) => self.broken = false,
            Err(e) => {
                tracing::error!("{}: queue {} lost after a reset: {e}", self.name, self.qid);
                self.broken = true;
            }
        }
    }

    /// Tells a resetting thread how many commands are on the device.
    fn publish_in_flight(&self) {
        let n = (self.slots.len() - self.free.len()) as u64;
        // A hint for the reset's bounded wait, not a synchronisation point.
        self.shared.in_flight.store(n, Ordering::Release);
    }

    /// Every [`HEALTH_EVERY`]: a command in flight for longer than the timeout,
    /// or a controller reporting fatal status, resets the controller.
    fn check_health(&mut self) {
        let oldest = self.slots.iter().flatten().map(|s| s.submitted).min();
        let why = if oldest.is_some_and(|t| t.elapsed() > self.ctrl.command_timeout) {
            Some(format!(
                "a command on queue {} took over {} ms",
                self.qid,
                self.ctrl.command_timeout.as_millis()
            ))
        } else {
            let csts = self.ctrl.bar.read32(regs::CSTS);
            (csts & regs::CSTS_FATAL != 0).then(|| format!("fatal status (CSTS {csts:#x})"))
        };
        if let Some(why) = why {
            if let Err(e) = self.ctrl.reset(&why) {
                tracing::error!("{e}");
            }
        }
    }
}

impl QueuePair for VfioQueuePair {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        // A reset since the last poll: re-create the queues first, so this command goes to
        // them (during a reset it fails at once).
        let epoch = self.ctrl.epoch.load(Ordering::SeqCst);
        if epoch != self.epoch {
            if epoch % 2 == 1 {
                self.fail(cmd, IoStatus::Reset);
                return Ok(());
            }
            self.recover(epoch);
        }
        if self.broken {
            self.fail(cmd, IoStatus::Reset);
            return Ok(());
        }
        if let Some(status) = validate(&self.ns, &cmd) {
            self.fail(cmd, status);
            return Ok(());
        }
        let bytes = cmd.nlb as usize * self.ns.lba_size as usize;
        if matches!(cmd.opcode, Opcode::Read | Opcode::Write) && bytes > self.ctrl.max_transfer {
            self.fail(cmd, IoStatus::TooLarge(self.ctrl.max_transfer as u32));
            return Ok(());
        }
        // Write Zeroes counts blocks in 16 bits (DSM ranges in 32: any `nlb` fits).
        if cmd.opcode == Opcode::WriteZeroes && cmd.nlb > 1 << 16 {
            let max = (1u64 << 16) * u64::from(self.ns.lba_size);
            self.fail(cmd, IoStatus::TooLarge(max.min(u64::from(u32::MAX)) as u32));
            return Ok(());
        }
        // Submission times come from the last poll's clock read; a pair with nothing in flight
        // may not have polled for a while (its reactor sleeps when idle), so read it afresh.
        if self.free.len() == self.slots.len() {
            self.now = Instant::now();
        }
        let Some(cid) = self.free.pop() else {
            return Err(SubmitError::QueueFull(cmd));
        };
        let nsid = self.ctrl.nsid;
        let sqe = match cmd.opcode {
            Opcode::Read | Opcode::Write => {
                let Some(iova) = cmd.buf.as_ref().and_then(|b| self.iova_of(b)) else {
                    self.free.push(cid);
                    self.fail(cmd, IoStatus::InvalidBuffer);
                    return Ok(());
                };
                let op = if cmd.opcode == Opcode::Read {
                    nvm::READ
                } else {
                    nvm::WRITE
                };
                let sqe = Sqe::rw(op, cid, nsid, cmd.lba, cmd.nlb);
                if self.sgl {
                    sqe.sgl(iova, bytes as u32)
                } else {
                    let (prp1, prp2) = self.prps(cid, iova, bytes);
                    sqe.prps(prp1, prp2)
                }
            }
            Opcode::Flush => Sqe::new(nvm::FLUSH, cid, nsid),
            Opcode::WriteZeroes => Sqe::rw(nvm::WRITE_ZEROES, cid, nsid, cmd.lba, cmd.nlb),
            Opcode::Deallocate => {
                // One range, in the slot's PRP-list page (unused by this command).
                let at = usize::from(cid) * self.list_pages * regs::PAGE_BYTES;
                let lists = &self.mem().lists;
                lists.write32(at, 0);
                lists.write32(at + 4, cmd.nlb);
                lists.write64(at + 8, cmd.lba);
                Sqe::new(nvm::DSM, cid, nsid)
                    .prps(self.lists_iova + at as u64, 0)
                    .cdw(10, 0)
                    .cdw(11, nvm::DSM_DEALLOCATE)
            }
        };
        let at = self.tail as usize * regs::SQE_BYTES;
        for (i, d) in sqe.0.iter().enumerate() {
            self.mem().sq.write32(at + i * 4, *d);
        }
        self.tail = (self.tail + 1) % self.entries;
        self.unrung = true;
        self.publish_in_flight();
        self.slots[usize::from(cid)] = Some(Slot {
            tag: cmd.tag,
            // The time of the last poll: one clock read per poll, not per command.
            submitted: self.now,
            opcode: cmd.opcode,
            lba: cmd.lba,
            nlb: cmd.nlb,
            buf: cmd.buf,
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize) -> usize {
        self.now = Instant::now();
        if self.now.duration_since(self.last_health) >= HEALTH_EVERY {
            self.last_health = self.now;
            if self.slots.iter().any(Option::is_some) {
                self.check_health();
            }
        }
        // During a reset (odd epoch) completions are still reaped, but no doorbell is written.
        let epoch = self.ctrl.epoch.load(Ordering::SeqCst);
        if epoch != self.epoch && epoch.is_multiple_of(2) {
            self.recover(epoch);
        }
        if self.unrung {
            sys::dma_wmb();
            self.shared.ringing.fetch_add(1, Ordering::SeqCst);
            // Checked again inside the ring section: a reset that began meanwhile waits for
            // this section to end, or this doorbell is skipped.
            if self.ctrl.epoch.load(Ordering::SeqCst) == self.epoch {
                self.ctrl
                    .bar
                    .write32(self.ctrl.caps.sq_tail_doorbell(self.qid), self.tail);
                self.unrung = false;
            }
            self.shared.ringing.fetch_add(1, Ordering::SeqCst);
        }
        let mut n = 0;
        let mut reaped = false;
        while n < max {
            if let Some(c) = self.failed.pop_front() {
                out.push(c);
                n += 1;
                continue;
            }
            let at = self.head as usize * regs::CQE_BYTES;
            let cq = &self.mem().cq;
            let dw3 = cq.read32(at + 12);
            if (dw3 & (1 << 16) != 0) != self.phase {
                break;
            }
            sys::dma_rmb();
            let cqe = Cqe::decode([cq.read32(at), cq.read32(at + 4), cq.read32(at + 8), dw3]);
            self.head += 1;
            if self.head == self.cq_entries {
                self.head = 0;
                self.phase = !self.phase;
            }
            self.cq_unacked += 1;
            let slot = self
                .slots
                .get_mut(usize::from(cqe.cid))
                .and_then(Option::take);
            // A completion for a command id not in flight is a controller bug: never hand a
            // buffer back twice.
            assert!(
                slot.is_some(),
                "{}: completion for command id {} not in flight",
                self.name,
                cqe.cid
            );
            let Some(s) = slot else { break };
            self.free.push(cqe.cid);
            let result = if cqe.ok() {
                Ok(())
            } else {
                let (sct, sc) = cqe.status_parts();
                Err(IoError {
                    device: Arc::clone(&self.name),
                    opcode: s.opcode,
                    lba: s.lba,
                    nlb: s.nlb,
                    status: IoStatus::Nvme { sct, sc },
                })
            };
            out.push(Completion {
                tag: s.tag,
                result,
                buf: s.buf,
            });
            n += 1;
            reaped = true;
        }
        if reaped {
            self.publish_in_flight();
        }
        // Tell the controller which entries it may reuse once half a depth has piled up. The
        // controller sees at most that many too few free entries, plus at most `depth`
        // completions of commands in flight: fewer than the 2 x depth entries it has.
        if self.cq_unacked >= (self.slots.len() as u32 / 2).max(1) {
            self.shared.ringing.fetch_add(1, Ordering::SeqCst);
            if self.ctrl.epoch.load(Ordering::SeqCst) == self.epoch {
                self.ctrl
                    .bar
                    .write32(self.ctrl.caps.cq_head_doorbell(self.qid), self.head);
                self.cq_unacked = 0;
            }
            self.shared.ringing.fetch_add(1, Ordering::SeqCst);
        }
        n
    }

    fn in_flight(&self) -> u32 {
        (self.slots.len() - self.free.len()) as u32 + self.failed.len() as u32
    }

    fn depth(&self) -> u32 {
        self.slots.len() as u32
    }
}

impl Drop for VfioQueuePair {
    fn drop(&mut self) {
        // Wait (bounded) for commands in flight, so the device never writes a buffer that was
        // handed back; then delete the queues before their memory goes.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut sink = Vec::new();
        while self.slots.iter().any(Option::is_some) && Instant::now() < deadline {
            sink.clear();
            self.poll(&mut sink, usize::MAX);
        }
        let leaked = self.slots.iter().any(Option::is_some);
        let deleted = self
            .ctrl
            .admin(Sqe::new(admin::DELETE_SQ, 0, 0).cdw(10, u32::from(self.qid)))
            .and_then(|_| {
                self.ctrl
                    .admin(Sqe::new(admin::DELETE_CQ, 0, 0).cdw(10, u32::from(self.qid)))
            });
        let Some(mem) = self.mem.take() else { return };
        if leaked || deleted.is_err() {
            // The device may still write this memory: keep it mapped and never free it.
            tracing::error!(
                "{}: queue {} did not drain or could not be deleted ({deleted:?}); its memory is kept",
                self.name,
                self.qid
            );
            std::mem::forget(mem);
            for s in self.slots.iter_mut().filter_map(Option::take) {
                std::mem::forget(s.buf);
            }
            return;
        }
        for (m, iova) in [
            (&mem.sq, self.sq_iova),
            (&mem.cq, self.cq_iova),
            (&mem.lists, self.lists_iova),
        ] {
            if let Err(e) = self.ctrl.container.unmap_dma(iova, m.len()) {
                tracing::warn!("{}: unmapping queue memory: {e}", self.name);
            }
        }
        drop(mem);
        if let Some((base, len, _)) = self.region {
            self.ctrl.unmap_region(base, len);
        }
        self.ctrl
            .ringers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| !Arc::ptr_eq(r, &self.shared));
        self.ctrl.qids.lock().unwrap_or_else(|p| p.into_inner())[usize::from(self.qid) - 1] = false;
    }
}

/// An NVMe controller as sysfs shows it (`cfs-dataplane devices`).
#[derive(Clone, Debug)]
pub struct ControllerEntry {
    /// PCI address.
    pub pci: String,
    /// The driver it is bound to ("nvme", "vfio-pci", or empty).
    pub driver: String,
    /// Its IOMMU group, if the IOMMU is on.
    pub iommu_group: Option<u32>,
    /// Model (while the kernel's nvme driver has it).
    pub model: String,
    /// Whether this driver can take it now, or why not.
    pub claimable: Result<(), String>,
}

/// The NVMe controllers (PCI class 0x010802) on this machine.
pub fn list_controllers() -> Vec<ControllerEntry> {
    let read = |p: String| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let link_name = |p: String| {
        std::fs::read_link(p)
            .ok()
            .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    let mut out: Vec<ControllerEntry> = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|pci| {
            read(format!("/sys/bus/pci/devices/{pci}/class")).is_ok_and(|c| c == "0x010802")
        })
        .map(|pci| {
            let dev = format!("/sys/bus/pci/devices/{pci}");
            let driver = link_name(format!("{dev}/driver")).unwrap_or_default();
            let iommu_group = iommu_group(&pci).ok();
            let model = std::fs::read_dir(format!("{dev}/nvme"))
                .into_iter()
                .flatten()
                .flatten()
                .find_map(|c| read(format!("{}/model", c.path().display())).ok())
                .unwrap_or_default();
            let claimable = match (driver.as_str(), iommu_group) {
                (_, None) => Err("no IOMMU group (enable the IOMMU)".to_string()),
                ("vfio-pci", Some(g))
                    if std::path::Path::new(&format!("/dev/vfio/{g}")).exists() =>
                {
                    Ok(())
                }
                ("vfio-pci", Some(g)) => Err(format!("/dev/vfio/{g} missing")),
                (d, Some(_)) => Err(format!(
                    "bound to {}: run scripts/nvme-bind {pci}",
                    if d.is_empty() { "no driver" } else { d }
                )),
            };
            ControllerEntry {
                pci,
                driver,
                iommu_group,
                model,
                claimable,
            }
        })
        .collect();
    out.sort_by(|a, b| a.pci.cmp(&b.pci));
    out
}

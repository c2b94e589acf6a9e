//! Pinned, DMA-able buffer pool carved from hugepages.
//!
//! One [`BufferPool`] maps a single contiguous virtual region (2 MiB or 1 GiB hugepages, or
//! ordinary locked pages as a fallback), splits it into equal buffers and hands each reactor core
//! a [`PoolCore`] owning its share of them. Allocation and local frees touch only the core's own
//! free list (no locks, no atomics beyond the buffer's `Arc`); a buffer dropped on another thread
//! goes back to its owner through a lock-free queue that the owner drains when its list runs dry.
//!
//! The region's base and length are exposed so the whole pool can be registered once for DMA
//! (VFIO IOMMU map, io_uring fixed buffers) and for RDMA; physical addresses come from
//! `/proc/self/pagemap` where the kernel shows them (root).
//!
//! Ownership is the DMA safety rule: a [`DmaBuf`] is held by value by exactly one party. While a
//! device may touch it, it is owned by the queue pair that submitted it, so no Rust reference to
//! its bytes can exist at that time.

#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod sys;

use crossbeam_queue::ArrayQueue;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Hugepage sizes the pool can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 2 MiB hugepages (`MAP_HUGE_2MB`).
    Huge2M,
    /// 1 GiB hugepages (`MAP_HUGE_1GB`).
    Huge1G,
}

impl PageSize {
    /// Size of one page in bytes.
    pub fn bytes(self) -> usize {
        match self {
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
        }
    }
    /// The `--size` flag of `scripts/hugepages` for this size.
    pub fn flag(self) -> &'static str {
        match self {
            PageSize::Huge2M => "2M",
            PageSize::Huge1G => "1G",
        }
    }
    fn shift(self) -> u32 {
        match self {
            PageSize::Huge2M => 21,
            PageSize::Huge1G => 30,
        }
    }
}

/// What actually backs a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Hugepages of this size.
    Hugepages(PageSize),
    /// Ordinary pages, populated and locked (no hugepages were reserved).
    LockedPages,
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::Hugepages(PageSize::Huge2M) => f.write_str("2 MiB hugepages"),
            Backing::Hugepages(PageSize::Huge1G) => f.write_str("1 GiB hugepages"),
            Backing::LockedPages => f.write_str("locked 4 KiB pages"),
        }
    }
}

/// Pool configuration.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Bytes to map in total (rounded up to a whole number of pages).
    pub total_bytes: usize,
    /// Size of each buffer; a power of two, at least 4 KiB, at most one hugepage.
    pub buf_bytes: usize,
    /// Number of per-core shares (one per reactor).
    pub cores: usize,
    /// Hugepage size to ask for.
    pub page_size: PageSize,
    /// Fail instead of falling back to ordinary pages when no hugepages are reserved.
    pub require_hugepages: bool,
}

/// Errors from creating a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The configuration cannot describe a pool.
    #[error("invalid buffer pool config: {0}")]
    InvalidConfig(String),
    /// `require_hugepages` was set and the hugepage mapping failed.
    #[error("cannot map {bytes} bytes of {size:?} hugepages: {source} (reserve them as root with `scripts/hugepages setup --size {flag} --mem {mib}M`)")]
    NoHugepages {
        /// Bytes requested.
        bytes: usize,
        /// Page size requested.
        size: PageSize,
        /// Megabytes to suggest reserving.
        mib: usize,
        /// `--size` value for the script.
        flag: &'static str,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// Even ordinary memory could not be mapped or locked.
    #[error("cannot map or lock {bytes} bytes for the buffer pool: {source}")]
    Map {
        /// Bytes requested.
        bytes: usize,
        /// The kernel's answer.
        source: std::io::Error,
    },
}

/// Facts about the mapped region, for DMA and RDMA registration.
#[derive(Clone, Copy, Debug)]
pub struct RegionInfo {
    /// Virtual address of the first byte.
    pub base: usize,
    /// Length in bytes.
    pub len: usize,
    /// What backs it.
    pub backing: Backing,
    /// Size of one backing page.
    pub page_bytes: usize,
}

struct Shared {
    mapping: sys::Mapping,
    info: RegionInfo,
    buf_bytes: usize,
    bufs_per_core: usize,
    /// Buffers freed on a thread other than their owner's, one queue per owner core.
    remote: Vec<ArrayQueue<u32>>,
    /// Physical address of each backing page, when `/proc/self/pagemap` shows them.
    phys_pages: Option<Vec<u64>>,
}

/// Keeps a pool's memory mapped while something outside the pool uses its addresses (an RDMA
/// provider's registration of the whole region must end before the memory goes).
#[derive(Clone)]
pub struct PoolMapping {
    shared: Arc<Shared>,
}

impl fmt::Debug for PoolMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolMapping")
            .field("region", &self.shared.info)
            .finish()
    }
}

impl PoolMapping {
    /// The mapped region.
    pub fn region(&self) -> RegionInfo {
        self.shared.info
    }
}

/// A buffer pool; clone-free handle used to take the per-core shares and inspect the region.
pub struct BufferPool {
    shared: Arc<Shared>,
    cores: Vec<Option<PoolCore>>,
}

static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

impl BufferPool {
    /// Maps and locks the region and builds one free list per core.
    pub fn new(cfg: &PoolConfig) -> Result<BufferPool, PoolError> {
        if cfg.cores == 0 {
            return Err(PoolError::InvalidConfig("cores must be at least 1".into()));
        }
        if !cfg.buf_bytes.is_power_of_two()
            || cfg.buf_bytes < 4096
            || cfg.buf_bytes > cfg.page_size.bytes()
        {
            return Err(PoolError::InvalidConfig(format!(
                "buf_bytes {} must be a power of two between 4 KiB and the page size",
                cfg.buf_bytes
            )));
        }
        let min = cfg.buf_bytes * cfg.cores;
        let wanted = cfg.total_bytes.max(min);
        let page = cfg.page_size.bytes();
        let huge_len = wanted.div_ceil(page) * page;
        let (mapping, backing, page_bytes) = match sys::map_anonymous(
            huge_len,
            sys::MapKind::Huge {
                shift: cfg.page_size.shift(),
            },
        ) {
            Ok(ptr) => (
                sys::Mapping { ptr, len: huge_len },
                Backing::Hugepages(cfg.page_size),
                page,
            ),
            Err(source) if cfg.require_hugepages => {
                return Err(PoolError::NoHugepages {
                    bytes: huge_len,
                    size: cfg.page_size,
                    mib: huge_len.div_ceil(1 << 20),
                    flag: cfg.page_size.flag(),
                    source,
                })
            }
            Err(e) => {
                if !FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "no {:?} hugepages available ({e}); the buffer pool uses ordinary locked \
                         pages instead (slower DMA mapping, no contiguous physical pages). Reserve \
                         hugepages as root with: scripts/hugepages setup --size {} --mem {}M",
                        cfg.page_size,
                        cfg.page_size.flag(),
                        huge_len.div_ceil(1 << 20)
                    );
                }
                let small = sys::base_page_size();
                let len = wanted.div_ceil(small) * small;
                let ptr = sys::map_anonymous(len, sys::MapKind::Normal)
                    .map_err(|source| PoolError::Map { bytes: len, source })?;
                (sys::Mapping { ptr, len }, Backing::LockedPages, small)
            }
        };
        sys::lock(mapping.ptr, mapping.len).map_err(|source| PoolError::Map {
            bytes: mapping.len,
            source,
        })?;
        let info = RegionInfo {
            base: mapping.ptr.as_ptr() as usize,
            len: mapping.len,
            backing,
            page_bytes,
        };
        let total_bufs = mapping.len / cfg.buf_bytes;
        let bufs_per_core = total_bufs / cfg.cores;
        assert!(bufs_per_core >= 1);
        assert!(total_bufs <= u32::MAX as usize);
        let phys_pages = read_phys_pages(&info);
        let remote = (0..cfg.cores)
            .map(|_| ArrayQueue::new(bufs_per_core))
            .collect();
        let shared = Arc::new(Shared {
            mapping,
            info,
            buf_bytes: cfg.buf_bytes,
            bufs_per_core,
            remote,
            phys_pages,
        });
        let cores = (0..cfg.cores)
            .map(|core| {
                let first = (core * bufs_per_core) as u32;
                // Reversed so the lowest index is handed out first.
                let free = (first..first + bufs_per_core as u32).rev().collect();
                Some(PoolCore {
                    shared: Arc::clone(&shared),
                    core,
                    free,
                })
            })
            .collect();
        Ok(BufferPool { shared, cores })
    }

    /// Takes core `core`'s share. Each share can be taken once; it is then owned by that core.
    pub fn take_core(&mut self, core: usize) -> Option<PoolCore> {
        self.cores.get_mut(core).and_then(Option::take)
    }

    /// The mapped region, for DMA/RDMA registration.
    pub fn region(&self) -> RegionInfo {
        self.shared.info
    }

    /// A handle keeping the region mapped (see [`PoolMapping`]).
    pub fn mapping(&self) -> PoolMapping {
        PoolMapping {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Bytes per buffer.
    pub fn buf_bytes(&self) -> usize {
        self.shared.buf_bytes
    }

    /// Buffers in each core's share.
    pub fn bufs_per_core(&self) -> usize {
        self.shared.bufs_per_core
    }

    /// Whether physical addresses are known (the kernel shows PFNs only to privileged users).
    pub fn has_phys_addrs(&self) -> bool {
        self.shared.phys_pages.is_some()
    }
}

/// Reads the physical address of each backing page from `/proc/self/pagemap`.
fn read_phys_pages(info: &RegionInfo) -> Option<Vec<u64>> {
    let small = sys::base_page_size();
    let mut f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let pages = info.len / info.page_bytes;
    let mut out = Vec::with_capacity(pages);
    for i in 0..pages {
        let vaddr = info.base + i * info.page_bytes;
        let entry_off = (vaddr / small) as u64 * 8;
        f.seek(SeekFrom::Start(entry_off)).ok()?;
        let mut raw = [0u8; 8];
        f.read_exact(&mut raw).ok()?;
        let entry = u64::from_le_bytes(raw);
        let present = entry >> 63 == 1;
        let pfn = entry & ((1u64 << 55) - 1);
        if !present || pfn == 0 {
            return None;
        }
        out.push(pfn * small as u64);
    }
    Some(out)
}

/// One core's share of the pool. Not `Sync`: it belongs to one reactor thread.
pub struct PoolCore {
    shared: Arc<Shared>,
    core: usize,
    free: Vec<u32>,
}

impl fmt::Debug for PoolCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCore")
            .field("core", &self.core)
            .field("free", &self.free.len())
            .finish()
    }
}

impl PoolCore {
    /// Takes a free buffer, or `None` when this core's share is exhausted (back-pressure).
    pub fn alloc(&mut self) -> Option<DmaBuf> {
        if self.free.is_empty() {
            while let Some(idx) = self.shared.remote[self.core].pop() {
                self.free.push(idx);
            }
        }
        let index = self.free.pop()?;
        Some(DmaBuf {
            shared: Some(Arc::clone(&self.shared)),
            index,
            len: self.shared.buf_bytes as u32,
        })
    }

    /// Returns a buffer. Buffers of this core go straight to its list; others go home.
    pub fn free(&mut self, mut buf: DmaBuf) {
        let owner = buf.owner();
        if owner == self.core {
            buf.shared = None;
            self.free.push(buf.index);
        }
        // Otherwise Drop sends it to its owner's remote queue.
    }

    /// Buffers currently free on this core (not counting ones waiting in the remote queue).
    pub fn free_count(&self) -> usize {
        self.free.len() + self.shared.remote[self.core].len()
    }

    /// Total buffers owned by this core.
    pub fn capacity(&self) -> usize {
        self.shared.bufs_per_core
    }

    /// Bytes per buffer.
    pub fn buf_bytes(&self) -> usize {
        self.shared.buf_bytes
    }

    /// The region this pool's buffers live in.
    pub fn region(&self) -> RegionInfo {
        self.shared.info
    }

    /// This share's core index.
    pub fn core(&self) -> usize {
        self.core
    }
}

/// One pinned buffer, held by value by exactly one owner.
pub struct DmaBuf {
    shared: Option<Arc<Shared>>,
    index: u32,
    len: u32,
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("index", &self.index)
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .finish()
    }
}

impl DmaBuf {
    fn shared(&self) -> &Shared {
        // Only `PoolCore::free` clears it, and that consumes the buffer.
        self.shared.as_deref().expect("live DmaBuf has its pool")
    }

    fn owner(&self) -> usize {
        self.index as usize / self.shared().bufs_per_core
    }

    fn offset(&self) -> usize {
        self.index as usize * self.shared().buf_bytes
    }

    /// Capacity in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Always false: buffers have a fixed, non-zero size.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Virtual address of the first byte (what io_uring, VFIO IOVAs and RDMA use).
    pub fn addr(&self) -> usize {
        self.shared().info.base + self.offset()
    }

    /// Index of the buffer within the pool.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Physical address of the first byte, if the kernel exposes it.
    ///
    /// A buffer never straddles a backing page (buffers are at most one page and aligned), so
    /// the whole buffer is physically contiguous when this returns `Some`.
    pub fn phys_addr(&self) -> Option<u64> {
        let s = self.shared();
        let pages = s.phys_pages.as_ref()?;
        let off = self.offset();
        let page = off / s.info.page_bytes;
        Some(pages[page] + (off % s.info.page_bytes) as u64)
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.shared().mapping.bytes(self.offset(), self.len())
    }

    /// The buffer's bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let (off, len) = (self.offset(), self.len());
        self.shared().mapping.bytes_mut(off, len)
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let owner = self.index as usize / shared.bufs_per_core;
            // The queue holds every buffer of its core, so it cannot be full.
            let pushed = shared.remote[owner].push(self.index);
            assert!(
                pushed.is_ok(),
                "remote free queue overflow: buffer freed twice"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cores: usize) -> BufferPool {
        BufferPool::new(&PoolConfig {
            total_bytes: 4 << 20,
            buf_bytes: 64 << 10,
            cores,
            page_size: PageSize::Huge2M,
            require_hugepages: false,
        })
        .unwrap()
    }

    #[test]
    fn alloc_free_roundtrip_and_exhaustion() {
        let mut p = pool(2);
        let mut c0 = p.take_core(0).unwrap();
        assert!(p.take_core(0).is_none(), "a share is taken once");
        let n = c0.capacity();
        assert_eq!(n, 32);
        let bufs: Vec<_> = (0..n).map(|_| c0.alloc().unwrap()).collect();
        assert!(c0.alloc().is_none(), "exhausted share gives back-pressure");
        let mut addrs: Vec<_> = bufs.iter().map(|b| b.addr()).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), n, "no buffer handed out twice");
        for b in &bufs {
            assert_eq!(
                b.addr() % 4096,
                0,
                "buffers are page aligned for O_DIRECT and DMA"
            );
            assert!(
                b.addr() >= p.region().base
                    && b.addr() + b.len() <= p.region().base + p.region().len
            );
        }
        for b in bufs {
            c0.free(b);
        }
        assert_eq!(c0.free_count(), n);
    }

    #[test]
    fn cross_thread_free_returns_to_owner() {
        let mut p = pool(2);
        let mut c0 = p.take_core(0).unwrap();
        let mut c1 = p.take_core(1).unwrap();
        let mut b = c0.alloc().unwrap();
        b.as_mut_slice()[..5].copy_from_slice(b"hello");
        let before = c0.free_count();
        // Freed by core 1's thread: goes back to core 0 through its queue.
        std::thread::spawn(move || {
            assert_eq!(&b.as_slice()[..5], b"hello");
            c1.free(b);
            c1
        })
        .join()
        .unwrap();
        assert_eq!(c0.free_count(), before + 1);
        // Drained when the local list is empty.
        let all: Vec<_> = std::iter::from_fn(|| c0.alloc()).collect();
        assert_eq!(all.len(), c0.capacity());
    }

    #[test]
    fn bad_config_is_rejected() {
        let e = BufferPool::new(&PoolConfig {
            total_bytes: 1 << 20,
            buf_bytes: 3000,
            cores: 1,
            page_size: PageSize::Huge2M,
            require_hugepages: false,
        });
        assert!(matches!(e, Err(PoolError::InvalidConfig(_))));
    }
}

//! The VFIO driver's only `unsafe`: VFIO ioctls (container, group, device, IOMMU mappings),
//! the mapped BAR0 (MMIO through volatile accesses only) and DMA memory (anonymous, locked,
//! read and written only through raw pointers with volatile accesses, never behind a Rust
//! reference, since the device writes it behind the compiler's back).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, Ordering};

// ioctl numbers: _IO(';', 100 + n) (linux/vfio.h).
const VFIO_GET_API_VERSION: libc::c_ulong = 0x3B64;
const VFIO_CHECK_EXTENSION: libc::c_ulong = 0x3B65;
const VFIO_SET_IOMMU: libc::c_ulong = 0x3B66;
const VFIO_GROUP_GET_STATUS: libc::c_ulong = 0x3B67;
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = 0x3B68;
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = 0x3B6A;
const VFIO_DEVICE_GET_INFO: libc::c_ulong = 0x3B6B;
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = 0x3B6C;
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = 0x3B71;
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = 0x3B72;

const VFIO_API_VERSION: libc::c_int = 0;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 4;
/// Region index of BAR0 and of the PCI configuration space (vfio-pci).
pub const BAR0_REGION: u32 = 0;
/// Region index of the PCI configuration space.
pub const CONFIG_REGION: u32 = 7;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct DeviceInfo {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegionInfoRaw {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A VFIO container with the type-1 (v2) IOMMU set.
pub struct Container {
    file: File,
}

/// A VFIO group attached to a container.
pub struct Group {
    file: File,
}

/// Where a device region lives in the device file.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// Bytes.
    pub size: u64,
    /// Offset in the device file.
    pub offset: u64,
    /// The region can be mapped.
    pub mmap: bool,
}

/// A VFIO device (one PCI function).
pub struct Device {
    file: File,
    /// Regions the device has.
    pub regions: u32,
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks the API version and type-1 v2 IOMMU support.
    pub fn open() -> io::Result<Container> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns a number.
        let v = check(unsafe { libc::ioctl(file.as_raw_fd(), VFIO_GET_API_VERSION) })?;
        if v != VFIO_API_VERSION {
            return Err(io::Error::other(format!("VFIO API version {v}, want 0")));
        }
        // SAFETY: VFIO_CHECK_EXTENSION takes an integer by value and returns a number.
        let ok = check(unsafe {
            libc::ioctl(file.as_raw_fd(), VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU)
        })?;
        if ok == 0 {
            return Err(io::Error::other(
                "the kernel offers no type-1 v2 VFIO IOMMU",
            ));
        }
        Ok(Container { file })
    }

    /// Opens group `/dev/vfio/GROUP`, checks it is viable (every device in it bound to
    /// vfio-pci) and attaches it; then sets the IOMMU type (needs an attached group).
    pub fn attach(&self, group: u32) -> io::Result<Group> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/dev/vfio/{group}"))?;
        let mut st = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: the kernel writes a vfio_group_status into `st`, whose argsz says its size.
        check(unsafe { libc::ioctl(file.as_raw_fd(), VFIO_GROUP_GET_STATUS, &mut st) })?;
        if st.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(io::Error::other(format!(
                "VFIO group {group} is not viable: bind every device in it to vfio-pci"
            )));
        }
        let fd: libc::c_int = self.file.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) through the pointer.
        check(unsafe { libc::ioctl(file.as_raw_fd(), VFIO_GROUP_SET_CONTAINER, &fd) })?;
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU) })?;
        Ok(Group { file })
    }

    /// Maps `size` bytes of this process at `vaddr` for device DMA at bus address `iova`.
    pub fn map_dma(&self, vaddr: usize, iova: u64, size: usize) -> io::Result<()> {
        let m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: size as u64,
        };
        // SAFETY: the kernel reads a vfio_iommu_type1_dma_map; it pins the pages itself and
        // fails for addresses that are not mapped in this process.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_IOMMU_MAP_DMA, &m) })?;
        Ok(())
    }

    /// Removes the mapping at `iova` (the device can no longer reach that memory).
    pub fn unmap_dma(&self, iova: u64, size: usize) -> io::Result<()> {
        let mut m = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size: size as u64,
        };
        // SAFETY: the kernel reads a vfio_iommu_type1_dma_unmap and writes back the size.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA, &mut m) })?;
        Ok(())
    }
}

impl Group {
    /// Opens the device `bdf` (e.g. "0000:00:02.0") of an attached group.
    pub fn device(&self, bdf: &str) -> io::Result<Device> {
        let name = CString::new(bdf).map_err(|_| io::Error::other("bad PCI address"))?;
        // SAFETY: the kernel reads a NUL-terminated string and returns a new file descriptor.
        let fd = check(unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                VFIO_GROUP_GET_DEVICE_FD,
                name.as_ptr(),
            )
        })?;
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut info = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            ..DeviceInfo::default()
        };
        // SAFETY: the kernel writes a vfio_device_info no larger than argsz says.
        check(unsafe { libc::ioctl(file.as_raw_fd(), VFIO_DEVICE_GET_INFO, &mut info) })?;
        Ok(Device {
            file,
            regions: info.num_regions,
        })
    }
}

impl Device {
    /// Where region `index` is.
    pub fn region(&self, index: u32) -> io::Result<Region> {
        let mut r = RegionInfoRaw {
            argsz: std::mem::size_of::<RegionInfoRaw>() as u32,
            index,
            ..RegionInfoRaw::default()
        };
        // SAFETY: the kernel writes a vfio_region_info no larger than argsz says.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO, &mut r) })?;
        Ok(Region {
            size: r.size,
            offset: r.offset,
            mmap: r.flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
        })
    }

    /// Reads `buf.len()` bytes of a region (e.g. PCI configuration space) at `at`.
    pub fn read_region(&self, r: &Region, at: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, r.offset + at)
    }

    /// Writes a region at `at`.
    pub fn write_region(&self, r: &Region, at: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, r.offset + at)
    }

    /// Maps a region (BAR0) for MMIO.
    pub fn map(&self, r: &Region) -> io::Result<Mmio> {
        if !r.mmap {
            return Err(io::Error::other("the region cannot be mapped"));
        }
        let len = usize::try_from(r.size).map_err(|_| io::Error::other("region too large"))?;
        let offset =
            libc::off_t::try_from(r.offset).map_err(|_| io::Error::other("region offset"))?;
        // SAFETY: a fresh shared mapping of the device file; the kernel checks the range and
        // the result is checked for MAP_FAILED. Nothing else aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mmio {
            map: Mapping {
                base: p.cast(),
                len,
            },
        })
    }
}

/// A mapping of this process (BAR0, or DMA memory) reached only by volatile loads and stores
/// of aligned, bounds-checked little-endian words: never a Rust reference, since the device
/// reads and writes it behind the compiler's back. Unmapped on drop.
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Mapping {
    fn at<T>(&self, offset: usize) -> *mut T {
        let size = std::mem::size_of::<T>();
        assert!(
            offset.is_multiple_of(size) && offset + size <= self.len,
            "access at {offset:#x} outside a {}-byte device mapping, or unaligned",
            self.len
        );
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.base.add(offset).cast() }
    }

    fn read8(&self, offset: usize) -> u8 {
        // SAFETY: in bounds of a live mapping (checked by `at`).
        unsafe { std::ptr::read_volatile(self.at::<u8>(offset)) }
    }

    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: aligned and in bounds of a live mapping (checked by `at`).
        u32::from_le(unsafe { std::ptr::read_volatile(self.at::<u32>(offset)) })
    }

    fn write32(&self, offset: usize, v: u32) {
        // SAFETY: aligned and in bounds of a live mapping (checked by `at`).
        unsafe { std::ptr::write_volatile(self.at::<u32>(offset), v.to_le()) }
    }

    fn write64(&self, offset: usize, v: u64) {
        // SAFETY: aligned and in bounds of a live mapping (checked by `at`).
        unsafe { std::ptr::write_volatile(self.at::<u64>(offset), v.to_le()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value was made for (`Device::map`,
        // `DmaMem::new`); no pointer into it outlives it. DMA memory is unmapped from the
        // IOMMU (the device stopped using it) before its owner drops it.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A mapped MMIO region (BAR0): registers read and written with volatile accesses only.
pub struct Mmio {
    map: Mapping,
}

// SAFETY: the mapping is process-wide and has no thread affinity; the driver decides which
// thread touches which registers (the controller's state on one, each doorbell on its queue's).
unsafe impl Send for Mmio {}
// SAFETY: see Send; every access is a single volatile load or store of an aligned register.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Reads a 32-bit register.
    pub fn read32(&self, offset: usize) -> u32 {
        self.map.read32(offset)
    }

    /// Writes a 32-bit register.
    pub fn write32(&self, offset: usize, v: u32) {
        self.map.write32(offset, v)
    }

    /// Reads a 64-bit register as two 32-bit halves (low first), as the spec allows.
    pub fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }

    /// Writes a 64-bit register as two 32-bit halves (low first).
    pub fn write64(&self, offset: usize, v: u64) {
        self.write32(offset, v as u32);
        self.write32(offset + 4, (v >> 32) as u32);
    }
}

/// Anonymous, locked memory for the device to read and write (queues, PRP lists, identify
/// data). Accessed only through volatile reads and writes at offsets, never as a slice.
pub struct DmaMem {
    map: Mapping,
}

// SAFETY: plain memory with no thread affinity; the owner (a queue pair, the admin queue)
// is the only one touching it.
unsafe impl Send for DmaMem {}

impl DmaMem {
    /// `len` bytes (rounded up to whole pages), zeroed and locked in memory.
    pub fn new(len: usize) -> io::Result<DmaMem> {
        let len = len.div_ceil(4096) * 4096;
        // SAFETY: a fresh private anonymous mapping, checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = Mapping {
            base: p.cast(),
            len,
        };
        // SAFETY: locks the mapping just made (VFIO pins it too; this keeps it resident
        // before the mapping is made). On failure `map` unmaps it.
        if unsafe { libc::mlock(p, len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DmaMem { map })
    }

    /// Virtual address (what VFIO maps).
    pub fn addr(&self) -> usize {
        self.map.base as usize
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Reads a little-endian u32 the device may have written.
    pub fn read32(&self, offset: usize) -> u32 {
        self.map.read32(offset)
    }

    /// Writes a little-endian u32 for the device.
    pub fn write32(&self, offset: usize, v: u32) {
        self.map.write32(offset, v)
    }

    /// Writes a little-endian u64 for the device.
    pub fn write64(&self, offset: usize, v: u64) {
        self.map.write64(offset, v)
    }

    /// Copies `out.len()` bytes at `offset` out (byte-wise volatile: the device wrote them).
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.map.len, "DMA read out of bounds");
        fence(Ordering::Acquire);
        for (i, b) in out.iter_mut().enumerate() {
            *b = self.map.read8(offset + i);
        }
    }

    /// Zeroes the whole memory (a queue started afresh after a reset).
    pub fn zero(&self) {
        for o in (0..self.map.len).step_by(8) {
            self.map.write64(o, 0);
        }
    }
}

/// Orders this thread's writes to DMA memory before a following doorbell write.
pub fn dma_wmb() {
    fence(Ordering::Release);
}

/// Orders a completion's phase check before reading the rest of it.
pub fn dma_rmb() {
    fence(Ordering::Acquire);
}

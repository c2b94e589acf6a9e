//! The only `unsafe` in this crate: raw `mmap`/`mlock`/`munmap` of the pool's backing memory.

use std::io;
use std::ptr::NonNull;

/// How the mapping was made, which decides the flags used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapKind {
    /// `MAP_HUGETLB` with an explicit page-size shift (21 for 2 MiB, 30 for 1 GiB).
    Huge { shift: u32 },
    /// Ordinary anonymous pages, populated and locked.
    Normal,
}

/// Maps `len` bytes of anonymous memory, populated (so every page is backed before any DMA).
pub(crate) fn map_anonymous(len: usize, kind: MapKind) -> io::Result<NonNull<u8>> {
    assert!(len > 0, "zero-length mapping");
    let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
    if let MapKind::Huge { shift } = kind {
        flags |= libc::MAP_HUGETLB | ((shift as i32) << libc::MAP_HUGE_SHIFT);
    }
    // SAFETY: an anonymous mapping at a kernel-chosen address touches no existing memory; the
    // result is checked against MAP_FAILED before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))
}

/// Locks the mapping in RAM so the kernel never migrates or swaps pages under a DMA.
pub(crate) fn lock(ptr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: `ptr..ptr+len` is a live mapping created by `map_anonymous` and owned by the caller.
    let rc = unsafe { libc::mlock(ptr.as_ptr().cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmaps a mapping made by `map_anonymous`.
///
/// Callers guarantee no device can still access it (every DMA/RDMA registration is gone).
pub(crate) fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: the region was mapped by `map_anonymous` with exactly this length and is dropped
    // once, by its owning `Region`, after all buffers referencing it are gone.
    let rc = unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
    assert_eq!(rc, 0, "munmap of a pool region failed");
}

/// The system's base page size in bytes.
pub(crate) fn base_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 {
        4096
    } else {
        v as usize
    }
}

/// A mapped, locked span of memory. Dropping it unmaps it.
#[derive(Debug)]
pub(crate) struct Mapping {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; concurrent access to distinct
// buffers inside it is coordinated by the pool (each buffer has exactly one owner at a time).
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only read the base address and length.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        unmap(self.ptr, self.len);
    }
}

impl Mapping {
    /// Shared view of `len` bytes at `offset`.
    ///
    /// The pool only calls this for a buffer held by value (`DmaBuf`), which is never handed to
    /// a device while a caller can reach it, so no DMA can race with the reference.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: bounds checked above; the memory is mapped for the life of `self`, initialised
        // (anonymous mappings are zero-filled) and not mutated through another path while the
        // unique owning `DmaBuf` is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }

    /// Mutable view of `len` bytes at `offset`; same ownership argument as [`Mapping::bytes`],
    /// and the caller holds the buffer mutably, so the view is unique.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bytes_mut(&self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: bounds checked above; the caller holds `&mut DmaBuf`, the only handle to this
        // byte range, so no other reference to it exists; no device owns it (see above).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) }
    }
}

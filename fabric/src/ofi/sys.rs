//! The only unsafe code of the libfabric provider: declarations of the C shim
//! (`csrc/ofi_shim.c`, which loads libfabric with dlopen) and thin wrappers that check
//! pointers and lengths before every call. Without libfabric's headers at build time the shim
//! is not compiled and [`open`] answers that the provider is unavailable.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::NonNull;

/// Bytes reserved per operation context (the provider's `struct fi_context`: 32 bytes).
pub const CONTEXT_BYTES: usize = 64;

/// An open endpoint (fabric, domain, address vector, completion queue, RDM endpoint).
pub struct RawEndpoint(NonNull<c_void>);

// SAFETY: the endpoint is used from one thread at a time: every call goes through the owner's
// mutex (libfabric's FI_THREAD_DOMAIN contract), and the pointer itself is plain data.
unsafe impl Send for RawEndpoint {}

/// A memory registration.
pub struct RawMr {
    mr: NonNull<c_void>,
    /// Provider descriptor for local use (may be null).
    pub desc: usize,
    /// Key peers present.
    pub key: u64,
}

// SAFETY: as `RawEndpoint`: closed under the endpoint's mutex; the handle is plain data.
unsafe impl Send for RawMr {}
// SAFETY: the fields are only read (key, desc) without the lock; closing takes `&mut`.
unsafe impl Sync for RawMr {}

/// Memory that may be registered: it stays at the same address, readable and writable, for
/// as long as the value lives (the registration keeps an `Arc` of it).
///
/// # Safety
/// `base()..base()+len()` must be valid, writable memory that is not moved or freed while the
/// value is alive, and must not be accessed through Rust references while an RMA read may
/// write it (readers copy out with [`RmaMemory::copy_out`]).
pub unsafe trait RmaMemory: Send + Sync + 'static {
    /// First byte.
    fn base(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether it is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `out.len()` bytes at `offset` out. Only for a range no read is writing any more
    /// (its completion was collected, which orders the device's writes before this).
    fn copy_out(&self, offset: usize, out: &mut [u8]) {
        assert!(offset
            .checked_add(out.len())
            .is_some_and(|e| e <= self.len()));
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: in bounds (asserted), valid memory by the trait's contract; no device write
        // to the range is in flight (the method's contract), and `out` is ours.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base().add(offset), out.as_mut_ptr(), out.len())
        }
    }
    /// Copies `data` in at `offset`.
    fn copy_in(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|e| e <= self.len()));
        // SAFETY: in bounds (asserted), valid writable memory by the trait's contract; no Rust
        // reference to it exists (the contract), so a plain copy is fine.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base().add(offset), data.len()) }
    }
}

/// Page-aligned heap memory for registration (tests, clients without hugepages).
pub struct HeapMemory {
    ptr: NonNull<u8>,
    len: usize,
}

const PAGE: usize = 4096;

impl HeapMemory {
    /// `len` zeroed bytes (at least one page), page aligned.
    pub fn new(len: usize) -> HeapMemory {
        let layout =
            std::alloc::Layout::from_size_align(len.max(PAGE).next_multiple_of(PAGE), PAGE)
                .expect("region size overflows");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout);
        };
        HeapMemory { ptr, len }
    }
}

impl Drop for HeapMemory {
    fn drop(&mut self) {
        let layout =
            std::alloc::Layout::from_size_align(self.len.max(PAGE).next_multiple_of(PAGE), PAGE)
                .expect("region size overflows");
        // SAFETY: allocated in `new` with this very layout; freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

// SAFETY: the allocation is owned, never moved, and only accessed through the trait's
// volatile/raw copies.
unsafe impl Send for HeapMemory {}
// SAFETY: as above; concurrent copies of disjoint or read-only ranges are fine for plain bytes.
unsafe impl Sync for HeapMemory {}

// SAFETY: `ptr..ptr+len` is the live allocation described above.
unsafe impl RmaMemory for HeapMemory {
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

// SAFETY: the pool's mapping stays mapped and locked while a `PoolMapping` lives (it holds the
// pool's shared state, which unmaps on its last drop), at a fixed address; its users write the
// registered range only through `copy_in` (never through `DmaBuf` slices while registered for
// remote reads), and device reads of staged bytes need no exclusivity.
unsafe impl RmaMemory for cfs_hugepages::PoolMapping {
    fn base(&self) -> *mut u8 {
        self.region().base as *mut u8
    }
    fn len(&self) -> usize {
        self.region().len
    }
}

/// A libfabric failure: the operation, libfabric's error code (negative) and message.
#[derive(Clone, Debug)]
pub struct SysError {
    /// Negative libfabric error code.
    pub code: i32,
    /// What failed, with libfabric's text.
    pub message: String,
}

#[cfg(cfs_ofi)]
mod ffi {
    use super::*;
    extern "C" {
        pub fn cfs_ofi_load(err: *mut c_char, errlen: usize) -> c_int;
        pub fn cfs_ofi_open(
            prov: *const c_char,
            node: *const c_char,
            out: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn cfs_ofi_close(o: *mut c_void);
        pub fn cfs_ofi_provider(o: *const c_void) -> *const c_char;
        pub fn cfs_ofi_domain_name(o: *const c_void) -> *const c_char;
        pub fn cfs_ofi_mr_mode(o: *const c_void) -> u64;
        pub fn cfs_ofi_max_msg(o: *const c_void) -> u64;
        pub fn cfs_ofi_name(
            o: *mut c_void,
            buf: *mut c_void,
            len: *mut usize,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn cfs_ofi_av_insert(
            o: *mut c_void,
            addr: *const c_void,
            fi_addr: *mut u64,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn cfs_ofi_av_remove(o: *mut c_void, fi_addr: u64) -> c_int;
        pub fn cfs_ofi_mr_reg(
            o: *mut c_void,
            buf: *mut c_void,
            len: usize,
            remote: c_int,
            requested_key: u64,
            mr: *mut *mut c_void,
            key: *mut u64,
            desc: *mut *mut c_void,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
        pub fn cfs_ofi_mr_close(mr: *mut c_void) -> c_int;
        pub fn cfs_ofi_read(
            o: *mut c_void,
            buf: *mut c_void,
            len: usize,
            desc: *mut c_void,
            peer: u64,
            addr: u64,
            key: u64,
            ctx: *mut c_void,
        ) -> isize;
        pub fn cfs_ofi_send(
            o: *mut c_void,
            buf: *mut c_void,
            len: usize,
            desc: *mut c_void,
            peer: u64,
            ctx: *mut c_void,
        ) -> isize;
        pub fn cfs_ofi_recv(
            o: *mut c_void,
            buf: *mut c_void,
            len: usize,
            desc: *mut c_void,
            ctx: *mut c_void,
        ) -> isize;
        pub fn cfs_ofi_context_size() -> usize;
        pub fn cfs_ofi_cq_read(
            o: *mut c_void,
            ctxs: *mut *mut c_void,
            lens: *mut usize,
            errs: *mut c_int,
            count: usize,
            err: *mut c_char,
            errlen: usize,
        ) -> isize;
        pub fn cfs_ofi_strerror(rc: c_int) -> *const c_char;
    }
}

const ERR_LEN: usize = 512;

fn err_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether libfabric could be loaded; `Err` says why not.
pub fn load() -> Result<(), SysError> {
    #[cfg(cfs_ofi)]
    {
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `err` is a writable buffer of the length passed.
        let rc = unsafe { ffi::cfs_ofi_load(err.as_mut_ptr().cast(), err.len()) };
        if rc != 0 {
            return Err(SysError {
                code: rc,
                message: err_text(&err),
            });
        }
        Ok(())
    }
    #[cfg(not(cfs_ofi))]
    Err(SysError {
        code: -38,
        message: "built without libfabric's headers (install libfabric-dev and rebuild)".into(),
    })
}

/// Opens an endpoint of `provider` (None: any with RMA) bound to `node`.
pub fn open(provider: Option<&str>, node: &str) -> Result<RawEndpoint, SysError> {
    load()?;
    #[cfg(cfs_ofi)]
    {
        let bad = |what: &str| SysError {
            code: -22,
            message: format!("{what} contains a NUL byte"),
        };
        let prov = provider
            .map(std::ffi::CString::new)
            .transpose()
            .map_err(|_| bad("provider"))?;
        let node = std::ffi::CString::new(node).map_err(|_| bad("node"))?;
        let mut out: *mut c_void = std::ptr::null_mut();
        let mut err = [0u8; ERR_LEN];
        // SAFETY: the strings are NUL-terminated and outlive the call; `out` and `err` are
        // writable; the shim writes `out` only on success.
        let rc = unsafe {
            ffi::cfs_ofi_open(
                prov.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                node.as_ptr(),
                &mut out,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            return Err(SysError {
                code: rc,
                message: err_text(&err),
            });
        }
        let ptr = NonNull::new(out).ok_or(SysError {
            code: -5,
            message: "the shim returned no endpoint".into(),
        })?;
        // SAFETY: the shim's contract: a context is at most this large.
        assert!(unsafe { ffi::cfs_ofi_context_size() } <= CONTEXT_BYTES);
        Ok(RawEndpoint(ptr))
    }
    #[cfg(not(cfs_ofi))]
    {
        let _ = (provider, node);
        unreachable!("load() fails without the shim")
    }
}

fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the shim returns NUL-terminated strings owned by the endpoint's fi_info.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl RawEndpoint {
    /// Provider name, domain name, memory-registration mode bits, largest message.
    pub fn describe(&self) -> (String, String, u64, u64) {
        let o = self.0.as_ptr();
        // SAFETY: `o` is an open endpoint; these only read its fi_info.
        unsafe {
            (
                cstr(ffi::cfs_ofi_provider(o)),
                cstr(ffi::cfs_ofi_domain_name(o)),
                ffi::cfs_ofi_mr_mode(o),
                ffi::cfs_ofi_max_msg(o),
            )
        }
    }

    /// This endpoint's address, as peers insert it.
    pub fn name(&mut self) -> Result<Vec<u8>, SysError> {
        let mut buf = vec![0u8; 256];
        let mut len = buf.len();
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `buf` has `len` writable bytes; the shim updates `len` to the bytes used.
        let rc = unsafe {
            ffi::cfs_ofi_name(
                self.0.as_ptr(),
                buf.as_mut_ptr().cast(),
                &mut len,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            return Err(SysError {
                code: rc,
                message: err_text(&err),
            });
        }
        buf.truncate(len.min(256));
        Ok(buf)
    }

    /// Inserts a peer's address; returns its handle.
    pub fn insert_peer(&mut self, addr: &[u8]) -> Result<u64, SysError> {
        // Provider addresses are at most a few dozen bytes; a short one would be over-read.
        if addr.len() < 16 || addr.len() > 256 {
            return Err(SysError {
                code: -22,
                message: format!("a peer address of {} bytes", addr.len()),
            });
        }
        let mut a = 0u64;
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `addr` is readable for its length, which is at least the provider's address
        // length for the formats in use (sockaddr_in/in6); `a` and `err` are writable.
        let rc = unsafe {
            ffi::cfs_ofi_av_insert(
                self.0.as_ptr(),
                addr.as_ptr().cast(),
                &mut a,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            return Err(SysError {
                code: rc,
                message: err_text(&err),
            });
        }
        Ok(a)
    }

    /// Removes a peer.
    pub fn remove_peer(&mut self, peer: u64) {
        // SAFETY: an open endpoint; an unknown handle is an error the provider reports.
        let _ = unsafe { ffi::cfs_ofi_av_remove(self.0.as_ptr(), peer) };
    }

    /// Registers `mem` (remote: peers may read it).
    pub fn register(&mut self, mem: &dyn RmaMemory, remote: bool) -> Result<RawMr, SysError> {
        // Without FI_MR_PROV_KEY the caller picks the key, unique within the domain (a second
        // registration under a used key fails with FI_ENOKEY).
        const FI_MR_PROV_KEY: u64 = 1 << 6;
        static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let requested_key = if self.describe().2 & FI_MR_PROV_KEY == 0 {
            NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        } else {
            0
        };
        let mut mr: *mut c_void = std::ptr::null_mut();
        let (mut key, mut desc) = (0u64, std::ptr::null_mut::<c_void>());
        let mut err = [0u8; ERR_LEN];
        // SAFETY: `mem` is valid memory of its length for as long as the caller keeps it
        // (the caller holds an Arc of it until the registration is closed); outputs writable.
        let rc = unsafe {
            ffi::cfs_ofi_mr_reg(
                self.0.as_ptr(),
                mem.base().cast(),
                mem.len(),
                c_int::from(remote),
                requested_key,
                &mut mr,
                &mut key,
                &mut desc,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            return Err(SysError {
                code: rc,
                message: err_text(&err),
            });
        }
        let mr = NonNull::new(mr).ok_or(SysError {
            code: -5,
            message: "fi_mr_reg returned no region".into(),
        })?;
        Ok(RawMr {
            mr,
            desc: desc as usize,
            key,
        })
    }

    /// Closes a registration (before its memory may be freed).
    pub fn deregister(&mut self, mr: RawMr) {
        // SAFETY: `mr` came from `register` on this endpoint and is closed once (moved in).
        let rc = unsafe { ffi::cfs_ofi_mr_close(mr.mr.as_ptr()) };
        assert!(rc == 0, "fi_close of a memory region failed ({rc})");
    }

    /// Posts a read of `len` bytes at the peer's (`addr`, `key`) into `mem[offset..]`.
    /// `ctx` must stay allocated (and unmoved) until its completion is read.
    #[allow(clippy::too_many_arguments)]
    pub fn post_read(
        &mut self,
        mem: &dyn RmaMemory,
        mr: &RawMr,
        offset: usize,
        len: usize,
        peer: u64,
        (addr, key): (u64, u64),
        ctx: *mut u8,
    ) -> Result<(), SysError> {
        assert!(offset.checked_add(len).is_some_and(|e| e <= mem.len()));
        // SAFETY: the destination range is inside `mem` (asserted), which the caller keeps
        // alive until completion; `ctx` is CONTEXT_BYTES of memory the caller keeps until the
        // completion is read.
        let rc = unsafe {
            ffi::cfs_ofi_read(
                self.0.as_ptr(),
                mem.base().add(offset).cast(),
                len,
                mr.desc as *mut c_void,
                peer,
                addr,
                key,
                ctx.cast(),
            )
        };
        if rc != 0 {
            return Err(SysError {
                code: rc as i32,
                message: format!("fi_read: {}", strerror(rc as i32)),
            });
        }
        Ok(())
    }

    /// Posts a send of `mem[offset..offset+len]` to `peer`. `ctx` as for [`Self::post_read`];
    /// the bytes must stay unchanged until the completion is read.
    pub fn post_send(
        &mut self,
        mem: &dyn RmaMemory,
        mr: &RawMr,
        (offset, len): (usize, usize),
        peer: u64,
        ctx: *mut u8,
    ) -> Result<(), SysError> {
        assert!(offset.checked_add(len).is_some_and(|e| e <= mem.len()));
        // SAFETY: the source range is inside `mem` (asserted), kept alive and unchanged by the
        // caller until completion; `ctx` as in `post_read`.
        let rc = unsafe {
            ffi::cfs_ofi_send(
                self.0.as_ptr(),
                mem.base().add(offset).cast(),
                len,
                mr.desc as *mut c_void,
                peer,
                ctx.cast(),
            )
        };
        if rc != 0 {
            return Err(SysError {
                code: rc as i32,
                message: format!("fi_send: {}", strerror(rc as i32)),
            });
        }
        Ok(())
    }

    /// Posts `mem[offset..offset+len]` to receive one message from any peer. `ctx` as for
    /// [`Self::post_read`]; the range must not be touched until the completion is read.
    pub fn post_recv(
        &mut self,
        mem: &dyn RmaMemory,
        mr: &RawMr,
        (offset, len): (usize, usize),
        ctx: *mut u8,
    ) -> Result<(), SysError> {
        assert!(offset.checked_add(len).is_some_and(|e| e <= mem.len()));
        // SAFETY: the destination range is inside `mem` (asserted), kept alive by the caller
        // until completion; `ctx` as in `post_read`.
        let rc = unsafe {
            ffi::cfs_ofi_recv(
                self.0.as_ptr(),
                mem.base().add(offset).cast(),
                len,
                mr.desc as *mut c_void,
                ctx.cast(),
            )
        };
        if rc != 0 {
            return Err(SysError {
                code: rc as i32,
                message: format!("fi_recv: {}", strerror(rc as i32)),
            });
        }
        Ok(())
    }

    /// Reads completions: (context, 0 or a negative error code, bytes received) triples, and
    /// the error text of a failed one.
    pub fn poll(&mut self, out: &mut Vec<(usize, i32, usize)>) -> Result<Option<String>, SysError> {
        let mut ctxs = [std::ptr::null_mut::<c_void>(); 64];
        let mut lens = [0usize; 64];
        let mut errs = [0 as c_int; 64];
        let mut err = [0u8; ERR_LEN];
        // SAFETY: the arrays hold 64 entries, as passed; `err` is writable.
        let n = unsafe {
            ffi::cfs_ofi_cq_read(
                self.0.as_ptr(),
                ctxs.as_mut_ptr(),
                lens.as_mut_ptr(),
                errs.as_mut_ptr(),
                64,
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if n < 0 {
            return Err(SysError {
                code: n as i32,
                message: err_text(&err),
            });
        }
        let n = n as usize;
        assert!(n <= 64);
        let mut failed = None;
        for i in 0..n {
            out.push((ctxs[i] as usize, errs[i], lens[i]));
            if errs[i] != 0 {
                failed = Some(err_text(&err));
            }
        }
        Ok(failed)
    }
}

impl Drop for RawEndpoint {
    fn drop(&mut self) {
        // SAFETY: opened by `open`, closed once, here.
        unsafe { ffi::cfs_ofi_close(self.0.as_ptr()) }
    }
}

/// libfabric's text for an error code.
pub fn strerror(rc: i32) -> String {
    if load().is_err() {
        return format!("error {rc}");
    }
    // SAFETY: returns a static NUL-terminated string (libfabric is loaded).
    cstr(unsafe { ffi::cfs_ofi_strerror(rc) })
}

/// Built without libfabric's headers: `load` fails, so no endpoint (and no call below) exists.
#[cfg(not(cfs_ofi))]
#[allow(clippy::missing_safety_doc)]
mod ffi {
    use super::*;
    pub unsafe fn cfs_ofi_close(_: *mut c_void) {}
    pub unsafe fn cfs_ofi_provider(_: *const c_void) -> *const c_char {
        std::ptr::null()
    }
    pub unsafe fn cfs_ofi_domain_name(_: *const c_void) -> *const c_char {
        std::ptr::null()
    }
    pub unsafe fn cfs_ofi_mr_mode(_: *const c_void) -> u64 {
        0
    }
    pub unsafe fn cfs_ofi_max_msg(_: *const c_void) -> u64 {
        0
    }
    pub unsafe fn cfs_ofi_name(
        _: *mut c_void,
        _: *mut c_void,
        _: *mut usize,
        _: *mut c_char,
        _: usize,
    ) -> c_int {
        -38
    }
    pub unsafe fn cfs_ofi_av_insert(
        _: *mut c_void,
        _: *const c_void,
        _: *mut u64,
        _: *mut c_char,
        _: usize,
    ) -> c_int {
        -38
    }
    pub unsafe fn cfs_ofi_av_remove(_: *mut c_void, _: u64) -> c_int {
        -38
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn cfs_ofi_mr_reg(
        _: *mut c_void,
        _: *mut c_void,
        _: usize,
        _: c_int,
        _: u64,
        _: *mut *mut c_void,
        _: *mut u64,
        _: *mut *mut c_void,
        _: *mut c_char,
        _: usize,
    ) -> c_int {
        -38
    }
    pub unsafe fn cfs_ofi_mr_close(_: *mut c_void) -> c_int {
        0
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn cfs_ofi_read(
        _: *mut c_void,
        _: *mut c_void,
        _: usize,
        _: *mut c_void,
        _: u64,
        _: u64,
        _: u64,
        _: *mut c_void,
    ) -> isize {
        -38
    }
    pub unsafe fn cfs_ofi_send(
        _: *mut c_void,
        _: *mut c_void,
        _: usize,
        _: *mut c_void,
        _: u64,
        _: *mut c_void,
    ) -> isize {
        -38
    }
    pub unsafe fn cfs_ofi_recv(
        _: *mut c_void,
        _: *mut c_void,
        _: usize,
        _: *mut c_void,
        _: *mut c_void,
    ) -> isize {
        -38
    }
    pub unsafe fn cfs_ofi_cq_read(
        _: *mut c_void,
        _: *mut *mut c_void,
        _: *mut usize,
        _: *mut c_int,
        _: usize,
        _: *mut c_char,
        _: usize,
    ) -> isize {
        -38
    }
    pub unsafe fn cfs_ofi_strerror(_: c_int) -> *const c_char {
        std::ptr::null()
    }
}

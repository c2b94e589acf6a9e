//! The few system calls the `cfs` tool makes directly (extended attributes on a mounted
//! file), each wrapped in a safe function.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Sets extended attribute `name` of `path` to `value` (following symlinks).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (p, n) = (cstr(path.as_os_str().as_bytes())?, cstr(name.as_bytes())?);
    // SAFETY: `p` and `n` are NUL-terminated strings that outlive the call; `value` is a
    // valid buffer of `value.len()` bytes the kernel only reads.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes extended attribute `name` of `path`; not having it is no error.
pub fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cstr(path.as_os_str().as_bytes())?, cstr(name.as_bytes())?);
    // SAFETY: both are NUL-terminated strings that outlive the call.
    let r = unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENODATA) {
        return Ok(());
    }
    Err(e)
}

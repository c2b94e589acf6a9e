//! Deterministic data patterns for crash tests and benchmarks: the bytes an operation writes
//! are a pure function of (operation id, 512-byte sector), so a verifier needs only the log of
//! which operations were issued and acknowledged.

use cfs_nvme::rng::SimRng;

/// Sector size of the patterns.
pub const SECTOR: usize = 512;

/// Fills `out` (one sector) with operation `op`'s bytes for sector `sector`.
pub fn fill_sector(op: u64, sector: u64, out: &mut [u8]) {
    let mut r = SimRng::new(op.wrapping_mul(0x1000_0000_01b3) ^ sector.rotate_left(29));
    r.fill(out);
}

/// Fills `out` (whole sectors) with operation `op`'s bytes starting at sector `first_sector`.
pub fn fill_range(op: u64, first_sector: u64, out: &mut [u8]) {
    for (i, s) in out.chunks_mut(SECTOR).enumerate() {
        fill_sector(op, first_sector + i as u64, s);
    }
}

/// Whether `bytes` (one sector) is operation `op`'s content for `sector`.
pub fn sector_is(op: u64, sector: u64, bytes: &[u8]) -> bool {
    let mut buf = [0u8; SECTOR];
    fill_sector(op, sector, &mut buf[..bytes.len()]);
    buf[..bytes.len()] == *bytes
}

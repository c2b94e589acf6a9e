//! Registered regions for one-sided reads.
//!
//! A region is registered once and handed out as a [`RegionKey`]; the key is what a client
//! presents to read from it. Over TCP the server copies the bytes out of the region; over RDMA
//! the key will be the memory-registration key and the NIC serves the read. Keys carry a
//! generation, so a revoked key is never honoured again, even if its slot is reused.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Memory the server exposes for one-sided reads.
pub trait Region: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Whether the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `len` bytes at `offset` (the caller has checked the range).
    fn read(&self, offset: u64, len: u32) -> Bytes;
}

impl Region for Vec<u8> {
    fn len(&self) -> u64 {
        self.len() as u64
    }
    fn read(&self, offset: u64, len: u32) -> Bytes {
        Bytes::copy_from_slice(&self[offset as usize..offset as usize + len as usize])
    }
}

/// Identifies a registered region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionKey(pub u64);

/// The server's table of registered regions.
#[derive(Default)]
pub struct RegionTable {
    regions: RwLock<HashMap<u64, Arc<dyn Region>>>,
    next: AtomicU64,
}

/// Why a region read is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// Unknown or revoked key.
    BadKey,
    /// Past the region's end.
    OutOfRange,
}

impl RegionTable {
    /// An empty table.
    pub fn new() -> Arc<RegionTable> {
        Arc::new(RegionTable {
            regions: RwLock::default(),
            next: AtomicU64::new(1),
        })
    }

    /// Registers a region and returns its key.
    pub fn register(&self, region: Arc<dyn Region>) -> RegionKey {
        // Keys are never reused: a revoked key stays invalid forever.
        let key = self
            .next
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            | 1;
        self.regions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, region);
        RegionKey(key)
    }

    /// Revokes a key; later reads with it fail.
    pub fn revoke(&self, key: RegionKey) -> bool {
        self.regions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key.0)
            .is_some()
    }

    /// Reads `len` bytes at `offset` of the region `key`.
    pub fn read(&self, key: RegionKey, offset: u64, len: u32) -> Result<Bytes, RegionError> {
        let region = self
            .regions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.0)
            .cloned()
            .ok_or(RegionError::BadKey)?;
        let end = offset
            .checked_add(u64::from(len))
            .ok_or(RegionError::OutOfRange)?;
        if end > region.len() {
            return Err(RegionError::OutOfRange);
        }
        Ok(region.read(offset, len))
    }
}

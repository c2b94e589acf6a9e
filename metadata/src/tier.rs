//! The object tier's index, as replicated state (so losing a node loses no index): which
//! chunk's bytes are in which blob on the object store, whether the flash copy was evicted,
//! and how much of each blob is still live. Pure, deterministic, applied in log order.
//!
//! Versions make flushing safe against concurrent writes: every change to a chunk's data
//! bumps its version ([`TierIndex::changed`]); a flush records the version it copied, and an
//! extent whose chunk changed since is dead on arrival. A live extent's blob bytes are the
//! chunk's current data, so its flash copy may be evicted; a change to an evicted chunk needs
//! its bytes back on flash first ([`TierError::Evicted`]).
//!
//! Uploads are recorded before they start ([`TierIndex::upload_started`]): a blob PUT whose
//! `flushed` never committed (the leader crashed or lost its lead in between) is found there
//! by the next leader, DELETEd and forgotten ([`TierIndex::upload_abandoned`]), so the store
//! never keeps a blob nothing knows about (there is no LIST to find one).
//!
//! Blobs are deleted in a crash-safe order: a blob with no live extent is first marked
//! `deleting` (committed), then DELETEd on the store, then forgotten
//! ([`TierIndex::blob_deleted`]); after a crash the marked ones are DELETEd again (a DELETE
//! of a missing object is no error). No index entry ever points into a blob marked
//! `deleting`, since only blobs without live extents are marked and extents only ever move
//! to newer blobs.

use crate::codec::{Reader, Writer};
use crate::types::ChunkId;
use std::collections::BTreeMap;

/// The shard whose index records a blob: its id's low 16 bits (a flusher names its blobs so).
pub fn blob_shard(blob: u128) -> u16 {
    blob as u16
}

/// Where a chunk's bytes are on the object store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierExtent {
    /// The blob.
    pub blob: u128,
    /// Offset of the bytes in the blob.
    pub blob_offset: u64,
    /// Length.
    pub len: u32,
    /// CRC32C of the bytes.
    pub crc32c: u32,
    /// The chunk's data version the bytes are.
    pub version: u64,
    /// The flash copy was dropped: reads go to the store.
    pub evicted: bool,
}

/// A blob's bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Payload bytes.
    pub payload_bytes: u64,
    /// Bytes of extents the index still points at.
    pub live_bytes: u64,
    /// Marked for deletion (no live extent); DELETE may be in flight.
    pub deleting: bool,
}

/// A flushed extent as the flusher reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flushed {
    /// The chunk.
    pub chunk: ChunkId,
    /// The chunk's version the bytes were read at.
    pub version: u64,
    /// Offset in the blob.
    pub blob_offset: u64,
    /// Length.
    pub len: u32,
    /// CRC32C.
    pub crc32c: u32,
}

/// Why an index change is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    /// The chunk's flash copy was evicted: bring it back before changing it.
    #[error("chunk {0} is evicted to the object store")]
    Evicted(ChunkId),
    /// The blob id is already in the index.
    #[error("blob {0:032x} is already known")]
    BlobExists(u128),
    /// No such blob.
    #[error("no blob {0:032x}")]
    NoBlob(u128),
    /// The blob still has live extents (not deletable).
    #[error("blob {0:032x} still holds live data")]
    BlobLive(u128),
    /// Extents overlap or run past the blob's payload.
    #[error("a flush report does not fit its blob: {0}")]
    BadFlush(String),
}

/// The index (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierIndex {
    extents: BTreeMap<ChunkId, TierExtent>,
    blobs: BTreeMap<u128, BlobInfo>,
    versions: BTreeMap<ChunkId, u64>,
    /// Blobs being uploaded (recorded before the PUT, cleared by `flushed` or `upload_abandoned`).
    pending: std::collections::BTreeSet<u128>,
    /// Versions come from one counter that never repeats, so a flush report about a chunk
    /// that was freed (and a later chunk under the same id) can never pass as current.
    next_version: u64,
}

impl TierIndex {
    /// The chunk's data version (0: never changed since the index knew it).
    pub fn version(&self, chunk: ChunkId) -> u64 {
        self.versions.get(&chunk).copied().unwrap_or(0)
    }

    /// Where the chunk's bytes are on the store, if they are (and current).
    pub fn extent(&self, chunk: ChunkId) -> Option<&TierExtent> {
        self.extents.get(&chunk)
    }

    /// Blobs whose upload started and was neither recorded nor abandoned.
    pub fn pending(&self) -> impl Iterator<Item = u128> + '_ {
        self.pending.iter().copied()
    }

    /// An upload of `blob` is about to start.
    pub fn upload_started(&mut self, blob: u128) -> Result<(), TierError> {
        if self.blobs.contains_key(&blob) || !self.pending.insert(blob) {
            return Err(TierError::BlobExists(blob));
        }
        Ok(())
    }

    /// The upload of `blob` will never be recorded (its object, if any, was DELETEd).
    pub fn upload_abandoned(&mut self, blob: u128) {
        self.pending.remove(&blob);
    }

    /// A blob's bookkeeping.
    pub fn blob(&self, id: u128) -> Option<&BlobInfo> {
        self.blobs.get(&id)
    }

    /// Every blob.
    pub fn blobs(&self) -> impl Iterator<Item = (u128, &BlobInfo)> {
        self.blobs.iter().map(|(k, v)| (*k, v))
    }

    /// Bytes on the store the index points at, and bytes whose flash copy was evicted.
    pub fn usage(&self) -> (u64, u64) {
        self.extents.values().fold((0, 0), |(live, ev), e| {
            (
                live + u64::from(e.len),
                ev + if e.evicted { u64::from(e.len) } else { 0 },
            )
        })
    }

    fn unlink(&mut self, chunk: ChunkId) {
        if let Some(old) = self.extents.remove(&chunk) {
            let b = self
                .blobs
                .get_mut(&old.blob)
                .expect("an extent points at a known blob");
            assert!(
                b.live_bytes >= u64::from(old.len),
                "blob live bytes underflow"
            );
            b.live_bytes -= u64::from(old.len);
        }
    }

    /// The chunk's data is about to change (a write, truncate or punch): its stored copy is
    /// dead from now on. Refused while its flash copy is evicted.
    pub fn changed(&mut self, chunk: ChunkId) -> Result<(), TierError> {
        if self.extents.get(&chunk).is_some_and(|e| e.evicted) {
            return Err(TierError::Evicted(chunk));
        }
        self.unlink(chunk);
        self.next_version += 1;
        self.versions.insert(chunk, self.next_version);
        Ok(())
    }

    /// The chunk is gone (its file was truncated away or deleted).
    pub fn freed(&mut self, chunk: ChunkId) {
        self.unlink(chunk);
        self.versions.remove(&chunk);
    }

    /// A blob of `payload_bytes` is on the store with these extents; those whose chunk
    /// changed (or was freed and reused) since their bytes were read are dead on arrival.
    /// Returns how many became live.
    pub fn flushed(
        &mut self,
        blob: u128,
        payload_offset: u64,
        payload_bytes: u64,
        extents: &[Flushed],
    ) -> Result<usize, TierError> {
        if self.blobs.contains_key(&blob) {
            return Err(TierError::BlobExists(blob));
        }
        let end = payload_offset
            .checked_add(payload_bytes)
            .ok_or_else(|| TierError::BadFlush("payload end overflows".into()))?;
        let mut next = payload_offset;
        for f in extents {
            if f.blob_offset != next || f.blob_offset + u64::from(f.len) > end {
                return Err(TierError::BadFlush(format!(
                    "extent of {} at {} (expected {next}, payload ends at {end})",
                    f.chunk, f.blob_offset
                )));
            }
            next += u64::from(f.len);
        }
        self.pending.remove(&blob);
        self.blobs.insert(
            blob,
            BlobInfo {
                payload_bytes,
                live_bytes: 0,
                deleting: false,
            },
        );
        let mut live = 0;
        for f in extents {
            if self.version(f.chunk) != f.version {
                continue; // changed since the flusher read it
            }
            self.unlink(f.chunk);
            self.extents.insert(
                f.chunk,
                TierExtent {
                    blob,
                    blob_offset: f.blob_offset,
                    len: f.len,
                    crc32c: f.crc32c,
                    version: f.version,
                    evicted: false,
                },
            );
            let b = self.blobs.get_mut(&blob).expect("inserted above");
            b.live_bytes += u64::from(f.len);
            live += 1;
        }
        Ok(live)
    }

    /// The flash copy of `chunk` at `version` may be dropped (its bytes are in a blob): true
    /// if it now is evicted, false if the chunk changed or is not in a blob.
    pub fn evict(&mut self, chunk: ChunkId, version: u64) -> bool {
        match self.extents.get_mut(&chunk) {
            Some(e)
                if e.version == version
                    && self.versions.get(&chunk).copied().unwrap_or(0) == version =>
            {
                e.evicted = true;
                true
            }
            _ => false,
        }
    }

    /// The chunk's bytes are on flash again (read back from the store).
    pub fn restored(&mut self, chunk: ChunkId) {
        if let Some(e) = self.extents.get_mut(&chunk) {
            e.evicted = false;
        }
    }

    /// Blobs with nothing live that are not being deleted yet.
    pub fn deletable(&self) -> Vec<u128> {
        self.blobs
            .iter()
            .filter(|(_, b)| b.live_bytes == 0 && !b.deleting)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Marks a dead blob for deletion (the step before the DELETE).
    pub fn delete_started(&mut self, blob: u128) -> Result<(), TierError> {
        let b = self.blobs.get_mut(&blob).ok_or(TierError::NoBlob(blob))?;
        if b.live_bytes > 0 {
            return Err(TierError::BlobLive(blob));
        }
        b.deleting = true;
        Ok(())
    }

    /// The DELETE succeeded: forget the blob.
    pub fn blob_deleted(&mut self, blob: u128) -> Result<(), TierError> {
        match self.blobs.get(&blob) {
            None => Err(TierError::NoBlob(blob)),
            Some(b) if !b.deleting => Err(TierError::BlobLive(blob)),
            Some(_) => {
                self.blobs.remove(&blob);
                Ok(())
            }
        }
    }

    /// Appends the index to a namespace snapshot:
    /// `u64 next_version | u32 n | n x (u64 chunk | u64 version) | u32 n | n x (u64 blob lo |
    /// u64 blob hi | u64 payload bytes | u64 live bytes | u8 deleting) | u32 n | n x (u64 chunk
    /// | u64 blob lo | u64 blob hi | u64 blob offset | u32 len | u32 crc32c | u64 version | u8
    /// evicted) | u32 n | n x (u64 blob lo | u64 blob hi)` (the last list, uploads pending,
    /// is absent in namespace snapshots before version 8).
    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.next_version);
        w.u32(self.versions.len() as u32);
        for (c, v) in &self.versions {
            w.u64(c.0);
            w.u64(*v);
        }
        w.u32(self.blobs.len() as u32);
        for (id, b) in &self.blobs {
            w.u64(*id as u64);
            w.u64((*id >> 64) as u64);
            w.u64(b.payload_bytes);
            w.u64(b.live_bytes);
            w.u8(u8::from(b.deleting));
        }
        w.u32(self.extents.len() as u32);
        for (c, e) in &self.extents {
            w.u64(c.0);
            w.u64(e.blob as u64);
            w.u64((e.blob >> 64) as u64);
            w.u64(e.blob_offset);
            w.u32(e.len);
            w.u32(e.crc32c);
            w.u64(e.version);
            w.u8(u8::from(e.evicted));
        }
        w.u32(self.pending.len() as u32);
        for id in &self.pending {
            w.u64(*id as u64);
            w.u64((*id >> 64) as u64);
        }
    }

    /// Reads what [`TierIndex::encode`] wrote (`with_pending`: with the pending uploads'
    /// list, from snapshot version 8 on); `None` if malformed or inconsistent.
    pub fn decode(r: &mut Reader, with_pending: bool) -> Option<TierIndex> {
        let flag = |b: u8| match b {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        };
        let mut t = TierIndex {
            next_version: r.u64()?,
            ..TierIndex::default()
        };
        for _ in 0..r.u32()? {
            let (c, v) = (ChunkId(r.u64()?), r.u64()?);
            if v > t.next_version {
                return None;
            }
            t.versions.insert(c, v);
        }
        for _ in 0..r.u32()? {
            let id = u128::from(r.u64()?) | u128::from(r.u64()?) << 64;
            let b = BlobInfo {
                payload_bytes: r.u64()?,
                live_bytes: r.u64()?,
                deleting: flag(r.u8()?)?,
            };
            t.blobs.insert(id, b);
        }
        for _ in 0..r.u32()? {
            let c = ChunkId(r.u64()?);
            let e = TierExtent {
                blob: u128::from(r.u64()?) | u128::from(r.u64()?) << 64,
                blob_offset: r.u64()?,
                len: r.u32()?,
                crc32c: r.u32()?,
                version: r.u64()?,
                evicted: flag(r.u8()?)?,
            };
            t.extents.insert(c, e);
        }
        if with_pending {
            for _ in 0..r.u32()? {
                t.pending
                    .insert(u128::from(r.u64()?) | u128::from(r.u64()?) << 64);
            }
        }
        t.check().ok()?;
        Some(t)
    }

    /// Whether nothing is tiered (no blob, no version recorded).
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty() && self.versions.is_empty() && self.pending.is_empty()
    }

    /// Checks the index's invariants (tests and debug assertions): every extent's blob is
    /// known and not being deleted, extents fit their blobs, and live bytes add up.
    pub fn check(&self) -> Result<(), String> {
        let mut live: BTreeMap<u128, u64> = BTreeMap::new();
        for (c, e) in &self.extents {
            let b = self
                .blobs
                .get(&e.blob)
                .ok_or(format!("{c}: unknown blob"))?;
            if b.deleting {
                return Err(format!("{c} points into a blob being deleted"));
            }
            if e.version != self.version(*c) {
                return Err(format!(
                    "{c}: extent of version {} but the chunk is at {}",
                    e.version,
                    self.version(*c)
                ));
            }
            *live.entry(e.blob).or_default() += u64::from(e.len);
        }
        for (id, b) in &self.blobs {
            let want = live.get(id).copied().unwrap_or(0);
            if b.live_bytes != want {
                return Err(format!(
                    "blob {id:x}: {} live bytes recorded, {want} counted",
                    b.live_bytes
                ));
            }
            if b.live_bytes > b.payload_bytes {
                return Err(format!("blob {id:x}: more live than payload"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Step {
        Change(u64),
        Free(u64),
        /// Flush these chunks (at the versions they have now, or one behind: a stale read).
        Flush(Vec<(u64, bool)>),
        Evict(u64),
        Restore(u64),
        DeleteDead,
        /// An upload started and never recorded (its leader died), then cleaned up.
        Abandon,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..8).prop_map(Step::Change),
            (0u64..8).prop_map(Step::Free),
            proptest::collection::vec((0u64..8, any::<bool>()), 0..5).prop_map(Step::Flush),
            (0u64..8).prop_map(Step::Evict),
            (0u64..8).prop_map(Step::Restore),
            Just(Step::DeleteDead),
            Just(Step::Abandon),
        ]
    }

    proptest! {
        #[test]
        fn the_index_keeps_its_invariants_and_never_serves_stale_bytes(steps in proptest::collection::vec(step(), 1..80)) {
            let mut t = TierIndex::default();
            let mut next_blob = 1u128;
            // What a reader would get: the version of the bytes the index points at must be
            // the chunk's current version.
            for s in steps {
                match s {
                    Step::Change(c) => {
                        let evicted = t.extent(ChunkId(c)).is_some_and(|e| e.evicted);
                        let r = t.changed(ChunkId(c));
                        prop_assert_eq!(r.is_err(), evicted);
                    }
                    Step::Free(c) => t.freed(ChunkId(c)),
                    Step::Flush(cs) => {
                        let mut seen = std::collections::BTreeSet::new();
                        let mut off = 4096;
                        let mut fl = Vec::new();
                        for (c, stale) in cs {
                            if !seen.insert(c) { continue; }
                            let v = t.version(ChunkId(c));
                            let version = if stale && v > 0 { v - 1 } else { v };
                            fl.push(Flushed { chunk: ChunkId(c), version, blob_offset: off, len: 100 + c as u32, crc32c: 0 });
                            off += 100 + c;
                        }
                        t.upload_started(next_blob).unwrap();
                        prop_assert!(t.pending().any(|b| b == next_blob));
                        t.flushed(next_blob, 4096, off - 4096, &fl).unwrap();
                        prop_assert!(!t.pending().any(|b| b == next_blob));
                        prop_assert!(t.upload_started(next_blob).is_err());
                        next_blob += 1;
                    }
                    Step::Evict(c) => {
                        let v = t.version(ChunkId(c));
                        let _ = t.evict(ChunkId(c), v);
                    }
                    Step::Restore(c) => t.restored(ChunkId(c)),
                    Step::DeleteDead => {
                        for b in t.deletable() {
                            t.delete_started(b).unwrap();
                            t.blob_deleted(b).unwrap();
                        }
                    }
                    Step::Abandon => {
                        t.upload_started(next_blob).unwrap();
                        let mut w = Writer::default();
                        t.encode(&mut w);
                        let back = TierIndex::decode(&mut Reader::new(&w.0), true).unwrap();
                        prop_assert!(back.pending().any(|b| b == next_blob));
                        t.upload_abandoned(next_blob);
                        prop_assert!(t.blob(next_blob).is_none());
                        next_blob += 1;
                    }
                }
                prop_assert_eq!(t.check(), Ok(()));
                let mut w = Writer::default();
                t.encode(&mut w);
                let mut r = Reader::new(&w.0);
                let back = TierIndex::decode(&mut r, true);
                prop_assert_eq!(back.as_ref(), Some(&t));
                prop_assert!(r.end().is_some());
            }
        }

        #[test]
        fn decoding_is_total(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = TierIndex::decode(&mut Reader::new(&b), true);
        }
    }

    #[test]
    fn the_index_is_part_of_the_namespace_snapshot() {
        let mut ns = crate::Namespace::new(0, 0, 0o755, crate::Timespec::new(0, 0));
        let c = ChunkId(3);
        ns.tier.changed(c).unwrap();
        let f = Flushed {
            chunk: c,
            version: ns.tier.version(c),
            blob_offset: 4096,
            len: 7,
            crc32c: 9,
        };
        ns.tier.flushed(0xabc << 70 | 5, 4096, 7, &[f]).unwrap();
        assert!(ns.tier.evict(c, ns.tier.version(c)));
        let back = crate::Namespace::from_snapshot(&ns.snapshot()).unwrap();
        assert_eq!(back.tier(), &ns.tier);
        assert!(!back.tier().is_empty());
    }

    #[test]
    fn a_write_after_the_flusher_read_makes_the_extent_dead_on_arrival() {
        let mut t = TierIndex::default();
        let c = ChunkId(5);
        t.changed(c).unwrap();
        let v = t.version(c);
        t.changed(c).unwrap(); // written again while the blob was uploading
        let f = Flushed {
            chunk: c,
            version: v,
            blob_offset: 4096,
            len: 10,
            crc32c: 0,
        };
        assert_eq!(t.flushed(1, 4096, 10, &[f]), Ok(0));
        assert!(t.extent(c).is_none());
        assert!(
            !t.evict(c, v),
            "no eviction of bytes the store does not have"
        );
        assert_eq!(t.deletable(), vec![1]);
        // Live blobs cannot be deleted; the order is mark, DELETE, forget.
        let f2 = Flushed {
            chunk: c,
            version: t.version(c),
            blob_offset: 4096,
            len: 10,
            crc32c: 0,
        };
        assert_eq!(t.flushed(2, 4096, 10, &[f2]), Ok(1));
        assert_eq!(t.delete_started(2), Err(TierError::BlobLive(2)));
        assert_eq!(t.blob_deleted(1), Err(TierError::BlobLive(1)));
        t.delete_started(1).unwrap();
        t.blob_deleted(1).unwrap();
        assert!(t.evict(c, t.version(c)));
        assert_eq!(t.changed(c), Err(TierError::Evicted(c)));
        t.restored(c);
        t.changed(c).unwrap();
        assert_eq!(t.deletable(), vec![2]);
        assert_eq!(t.flushed(2, 4096, 10, &[]), Err(TierError::BlobExists(2)));
    }
}

//! Chunk data across the members of a cluster: every change the leader makes to a chunk (write,
//! truncate, punch) is applied on the chunk's current holders in parallel; a change counts once
//! a majority of its holders applied it, and the holders that did not are recorded as stale for
//! that chunk in the namespace (a Raft command committed before the client hears back), so they
//! never serve it. Reads use a current holder's copy. Deletes need no message: every member
//! deletes a chunk when it applies the command that unreferenced it.
//!
//! Node-to-node request (`CHUNK_METHOD`), fixed little-endian layout:
//! ```text
//! u8 op (1 write, 2 truncate, 3 punch, 4 read, 5 length) | u64 chunk | u64 term | u64 gen |
//! u64 offset | u64 len | u32 n | n bytes data
//! ```
//!
//! Fencing: every change carries a [`Fence`], the sender's Raft term and the chunk's
//! generation (bumped in the namespace whenever a holder is marked stale or added). A node
//! applies a change only if its fence is not older than the newest it has seen for that chunk
//! ([`Fences`]), checked and applied under a per-chunk lock. So a change delayed past its
//! holder's stale mark and repair (the repair's writes carry the newer generation), or sent by a
//! deposed leader (older term), is refused instead of overwriting newer data. Fences live in
//! memory: a restart also ends every change in flight to the node.
//! (truncate: offset is the new length; read: the reply is the data; length: u64 LE.)
//!
//! Repair: the leader copies each chunk a member is stale for from a current copy (its length,
//! then its bytes in 4 MiB pieces; holes are copied as zeros), under the chunk's lock so no
//! change slips past, and then commits `Repaired`.

use crate::reactor::Engine;
use crate::store::StoreError;
use cfs_meta::codec::{Reader, Writer};
use cfs_meta::ChunkId;

/// RPC method of a chunk operation between nodes.
pub const CHUNK_METHOD: u32 = 0x0100_0002;

/// One operation on a chunk's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkOp {
    /// Write `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// Set the chunk's length.
    Truncate { len: u64 },
    /// Make a range a hole.
    Punch { offset: u64, len: u64 },
    /// Read `len` bytes at `offset`.
    Read { offset: u64, len: u64 },
    /// The chunk's length (8 bytes, little-endian; 0 if it does not exist).
    Len,
}

/// The order of changes to a chunk (see the module documentation): compared by term, then
/// generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence {
    /// Raft term of the leader that sends the change.
    pub term: u64,
    /// The chunk's generation in the namespace when the change was sent.
    pub gen: u64,
}

/// Why a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The store failed (or the data failed its checksum).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The change is older than one already applied to this chunk.
    #[error("{chunk}: change fenced off ({got:?} is older than {seen:?})")]
    Fenced {
        /// The chunk.
        chunk: ChunkId,
        /// The change's fence.
        got: Fence,
        /// The newest fence seen for the chunk.
        seen: Fence,
    },
}

/// The newest fence seen per chunk on this node, with a lock per stripe of chunks under which
/// a change is checked and applied (so two changes to one chunk cannot pass each other between
/// the check and the write).
pub struct Fences {
    stripes: Vec<std::sync::Mutex<std::collections::HashMap<ChunkId, Fence>>>,
}

impl Default for Fences {
    fn default() -> Fences {
        Fences {
            stripes: (0..64).map(|_| Default::default()).collect(),
        }
    }
}

impl Fences {
    /// Applies `op` if `fence` admits it (reads and lengths are always admitted).
    pub fn apply(
        &self,
        engine: &Engine,
        chunk: ChunkId,
        op: ChunkOp,
        fence: Fence,
    ) -> Result<Vec<u8>, ApplyError> {
        if matches!(op, ChunkOp::Read { .. } | ChunkOp::Len) {
            return Ok(apply(engine, chunk, op)?);
        }
        self.run(chunk, fence, || apply(engine, chunk, op))
    }

    /// Runs the change `f` to `chunk` if `fence` admits it, under the chunk's stripe lock.
    pub fn run<T>(
        &self,
        chunk: ChunkId,
        fence: Fence,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, ApplyError> {
        let stripe = &self.stripes[(chunk.0 % self.stripes.len() as u64) as usize];
        let mut seen = stripe.lock().unwrap_or_else(|p| p.into_inner());
        let newest = seen.entry(chunk).or_default();
        if fence < *newest {
            return Err(ApplyError::Fenced {
                chunk,
                got: fence,
                seen: *newest,
            });
        }
        *newest = fence;
        Ok(f()?)
    }

    /// Forgets a deleted chunk's fence (ids are never reused).
    pub fn forget(&self, chunk: ChunkId) {
        let stripe = &self.stripes[(chunk.0 % self.stripes.len() as u64) as usize];
        stripe
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&chunk);
    }
}

/// Encodes a request.
pub fn encode(chunk: ChunkId, op: &ChunkOp, fence: Fence) -> Vec<u8> {
    let mut w = Writer::default();
    let (code, offset, len, data): (u8, u64, u64, &[u8]) = match op {
        ChunkOp::Write { offset, data } => (1, *offset, data.len() as u64, data),
        ChunkOp::Truncate { len } => (2, *len, 0, &[]),
        ChunkOp::Punch { offset, len } => (3, *offset, *len, &[]),
        ChunkOp::Read { offset, len } => (4, *offset, *len, &[]),
        ChunkOp::Len => (5, 0, 0, &[]),
    };
    w.u8(code);
    w.u64(chunk.0);
    w.u64(fence.term);
    w.u64(fence.gen);
    w.u64(offset);
    w.u64(len);
    w.bytes(data);
    w.0
}

/// Decodes a request; `None` if malformed.
pub fn decode(b: &[u8]) -> Option<(ChunkId, ChunkOp, Fence)> {
    let mut r = Reader::new(b);
    let code = r.u8()?;
    let chunk = ChunkId(r.u64()?);
    let fence = Fence {
        term: r.u64()?,
        gen: r.u64()?,
    };
    let (offset, len) = (r.u64()?, r.u64()?);
    let data = r.bytes()?;
    r.end()?;
    let op = match code {
        1 if data.len() as u64 == len => ChunkOp::Write { offset, data },
        2 => ChunkOp::Truncate { len: offset },
        3 => ChunkOp::Punch { offset, len },
        4 => ChunkOp::Read { offset, len },
        5 => ChunkOp::Len,
        _ => return None,
    };
    Some((chunk, op, fence))
}

/// Applies an operation to this node's store; a read returns its data (zeros where the chunk
/// has none; a missing chunk reads as all zeros).
pub fn apply(engine: &Engine, chunk: ChunkId, op: ChunkOp) -> Result<Vec<u8>, StoreError> {
    match op {
        ChunkOp::Write { offset, data } => engine.write(chunk.0, offset, data).map(|()| Vec::new()),
        ChunkOp::Truncate { len } => match engine.truncate(chunk.0, len) {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        },
        ChunkOp::Punch { offset, len } => match engine.punch(chunk.0, offset, len) {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(e),
        },
        ChunkOp::Len => Ok(engine
            .stat(chunk.0)?
            .map(|i| i.len)
            .unwrap_or(0)
            .to_le_bytes()
            .to_vec()),
        ChunkOp::Read { offset, len } => {
            let n =
                usize::try_from(len).map_err(|_| StoreError::Layout("read too large".into()))?;
            match engine.read(chunk.0, offset, n) {
                Ok(d) => Ok(d),
                Err(StoreError::NotFound { .. }) => Ok(vec![0; n]),
                Err(e) => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn older_changes_are_fenced_off() {
        let f = Fences::default();
        let c = ChunkId(9);
        let at = |term, gen| Fence { term, gen };
        assert!(f.run(c, at(1, 0), || Ok(())).is_ok());
        assert!(
            f.run(c, at(1, 2), || Ok(())).is_ok(),
            "a repair's newer generation"
        );
        assert!(
            matches!(
                f.run(c, at(1, 1), || Ok(())),
                Err(ApplyError::Fenced { .. })
            ),
            "a change sent before the stale mark arrives after the repair"
        );
        assert!(
            f.run(c, at(1, 2), || Ok(())).is_ok(),
            "same fence again is fine"
        );
        assert!(
            f.run(c, at(2, 0), || Ok(())).is_ok(),
            "a new leader's term wins"
        );
        assert!(
            matches!(
                f.run(c, at(1, 5), || Ok(())),
                Err(ApplyError::Fenced { .. })
            ),
            "a deposed leader's change"
        );
        assert!(
            f.run(ChunkId(10), at(0, 0), || Ok(())).is_ok(),
            "other chunks unaffected"
        );
        f.forget(c);
        assert!(f.run(c, at(0, 0), || Ok(())).is_ok());
    }

    proptest! {
        #[test]
        fn requests_round_trip(chunk in any::<u64>(), offset in any::<u64>(), len in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..64), k in 0u8..5) {
            let op = match k {
                0 => ChunkOp::Write { offset, data },
                1 => ChunkOp::Truncate { len },
                2 => ChunkOp::Punch { offset, len },
                3 => ChunkOp::Read { offset, len },
                _ => ChunkOp::Len,
            };
            let fence = Fence { term: offset ^ 3, gen: len ^ 5 };
            let b = encode(ChunkId(chunk), &op, fence);
            prop_assert_eq!(decode(&b), Some((ChunkId(chunk), op, fence)));
            prop_assert_eq!(decode(&b[..b.len() - 1]), None);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&b);
        }
    }
}

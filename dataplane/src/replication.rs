//! Chunk data across the members of a cluster: every change the leader makes to a chunk (write,
//! truncate, punch) is applied on every member in parallel; a change counts once a majority of
//! members applied it, and the members that did not are recorded as stale for that chunk in
//! the namespace (a Raft command committed before the client hears back), so they never serve
//! it. Reads use this node's copy unless it is stale, else another member's. Deletes need no
//! message: every member deletes a chunk when it applies the command that unreferenced it.
//!
//! Node-to-node request (`CHUNK_METHOD`), fixed little-endian layout:
//! ```text
//! u8 op (1 write, 2 truncate, 3 punch, 4 read, 5 length) | u64 chunk | u64 offset | u64 len | u32 n | n bytes data
//! ```
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

/// Encodes a request.
pub fn encode(chunk: ChunkId, op: &ChunkOp) -> Vec<u8> {
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
    w.u64(offset);
    w.u64(len);
    w.bytes(data);
    w.0
}

/// Decodes a request; `None` if malformed.
pub fn decode(b: &[u8]) -> Option<(ChunkId, ChunkOp)> {
    let mut r = Reader::new(b);
    let code = r.u8()?;
    let chunk = ChunkId(r.u64()?);
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
    Some((chunk, op))
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
            let b = encode(ChunkId(chunk), &op);
            prop_assert_eq!(decode(&b), Some((ChunkId(chunk), op)));
            prop_assert_eq!(decode(&b[..b.len() - 1]), None);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&b);
        }
    }
}

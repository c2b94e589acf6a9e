//! Chunk data across the members of a cluster: every change the leader makes to a chunk (write,
//! truncate, punch) is applied on the chunk's current holders in parallel; a change counts once
//! a majority of its holders applied it, and the holders that did not are recorded as stale for
//! that chunk in the namespace (a Raft command committed before the client hears back), so they
//! never serve it. Reads use a current holder's copy. Deletes need no message: every member
//! deletes a chunk when it applies the command that unreferenced it.
//!
//! Node-to-node request (`CHUNK_METHOD`), fixed little-endian layout:
//! ```text
//! u8 op | u64 chunk | u64 term | u64 gen | u64 offset | u64 len | u32 n | n bytes data
//!
//! op  name         chunk   term        gen    offset        len         data
//!  1  write        chunk   fence       fence  offset        n           bytes
//!  2  truncate     chunk   fence       fence  new length    0           -
//!  3  punch        chunk   fence       fence  offset        len         -
//!  4  read         chunk   reader's    -      offset        len         -   (reply: the data)
//!  5  length       chunk   -           -      -             -           -   (reply: u64 LE)
//!  6  map digest   chunk   -           -      -             -           -   (reply: Digest)
//!  7  data digest  chunk   -           -      -             -           -   (reply: Digest)
//!  8  unsettled    shard   leader's    mark   settle_below  max         -   (reply: u64 ids)
//!  9  settle       shard   leader's    -      -             count       count x u64 ids
//! 10  orphans      shard   node        -      -             count       count x u64 ids
//!                                                                        (reply: u64 ids)
//! ```
//! (Digest: u64 LE length | 32-byte BLAKE3. Reconciliation of copies a leader changed
//! half-way, ops 6 to 9: docs/architecture.md, "Reconciling copies a leader changed half-way".)
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
    /// Length and digest of block checksums (see [`Digest`]): cheap, no data read.
    MapDigest,
    /// Length and digest of the data itself, holes read as zeros: the whole chunk is read.
    DataDigest,
    /// Chunks of metadata shard `shard` this node changed under a Raft term below
    /// `below_term` (or found changed last at its restart) and not yet reconciled: at most
    /// `max` ids, u64 LE each.
    /// The question also marks epoch `mark` of the asking leader's term (changes it starts
    /// from then on are noted after the mark) and settles this term's changes noted before
    /// the mark of epoch `settle_below` (the leader has none of them in flight any more); see
    /// [`Epochs`].
    Unsettled {
        shard: u16,
        below_term: u64,
        max: u64,
        mark: u64,
        settle_below: u64,
    },
    /// The leader of `shard`'s group (term `below_term`) compared these chunks' copies:
    /// forget them.
    Settle {
        shard: u16,
        below_term: u64,
        chunks: Vec<ChunkId>,
    },
    /// Asked of `shard`'s leader: which of `chunks` are not `node`'s any more (no holder
    /// record naming it, or no record and no file mapping them)? Reply: those ids, u64 LE.
    Orphans {
        shard: u16,
        node: u64,
        chunks: Vec<ChunkId>,
    },
}

/// A copy's length and digest, as `MapDigest` and `DataDigest` answer (40 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest {
    /// Length in bytes (0 if the chunk does not exist).
    pub len: u64,
    /// BLAKE3 of the map or of the data (all zeros for a chunk that does not exist).
    pub hash: [u8; 32],
}

impl Digest {
    /// The 40-byte wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.len.to_le_bytes().to_vec();
        v.extend_from_slice(&self.hash);
        v
    }

    /// Parses the wire form; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<Digest> {
        if b.len() != 40 {
            return None;
        }
        Some(Digest {
            len: u64::from_le_bytes(b[..8].try_into().ok()?),
            hash: b[8..].try_into().ok()?,
        })
    }
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
    /// A newer leader may not read this copy before it compared it with the others.
    #[error("{chunk}: copy changed under an older term, not yet reconciled by the leader of term {term}")]
    Unsettled {
        /// The chunk.
        chunk: ChunkId,
        /// The reader's term.
        term: u64,
    },
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
    unsettled: std::sync::Mutex<Unsettled>,
    /// Per metadata shard: the term below which changes are refused (raised when a leader
    /// asks for the unsettled chunks, so none of an older leader's changes lands after its
    /// copies were compared).
    floors: std::sync::Mutex<std::collections::HashMap<u16, u64>>,
}

impl Default for Fences {
    fn default() -> Fences {
        Fences {
            stripes: (0..64).map(|_| Default::default()).collect(),
            unsettled: Default::default(),
            floors: Default::default(),
        }
    }
}

/// Most chunks [`Unsettled`] remembers; beyond it the least recently changed are forgotten
/// (long finished in practice: a change is in flight for a replica timeout at most).
pub const UNSETTLED_MAX: usize = 1 << 20;

/// The chunks this node changed and no leader has compared since (see
/// [`crate::replication`]'s reconciliation): chunk -> (oldest term a change came under, order
/// of the last change), and the order index for forgetting the least recent.
#[derive(Default)]
struct Unsettled {
    by_chunk: std::collections::HashMap<ChunkId, (u64, u64)>,
    by_order: std::collections::BTreeMap<u64, ChunkId>,
    next: u64,
    forgotten: u64,
    /// Per shard: the asking leader's term and where its epochs began (epoch -> order).
    marks: std::collections::HashMap<u16, (u64, std::collections::BTreeMap<u64, u64>)>,
}

impl Unsettled {
    fn note(&mut self, chunk: ChunkId, term: u64) {
        let order = self.next;
        self.next += 1;
        let term = match self.by_chunk.get(&chunk) {
            Some(&(t, o)) => {
                self.by_order.remove(&o);
                t.min(term)
            }
            None => term,
        };
        self.by_chunk.insert(chunk, (term, order));
        self.by_order.insert(order, chunk);
        while self.by_chunk.len() > UNSETTLED_MAX {
            let Some((_, old)) = self.by_order.pop_first() else {
                break;
            };
            self.by_chunk.remove(&old);
            self.forgotten += 1;
            if self.forgotten.is_power_of_two() {
                tracing::warn!(
                    "{} changed chunks forgotten unreconciled (over {UNSETTLED_MAX} since the last leader change)",
                    self.forgotten
                );
            }
        }
    }

    fn forget(&mut self, chunk: ChunkId) {
        if let Some((_, o)) = self.by_chunk.remove(&chunk) {
            self.by_order.remove(&o);
        }
    }

    /// Marks where epoch `mark` of `shard`'s leader of `term` begins, and forgets that term's
    /// changes (to chunks `in_shard` picks) noted before epoch `settle_below` began.
    fn mark(
        &mut self,
        shard: u16,
        term: u64,
        mark: u64,
        settle_below: u64,
        in_shard: impl Fn(ChunkId) -> bool,
    ) {
        let next = self.next;
        self.next += 1;
        let (t, marks) = self.marks.entry(shard).or_default();
        if *t != term {
            *t = term;
            marks.clear();
        }
        marks.insert(mark, next);
        let Some(&below) = marks.get(&settle_below) else {
            return;
        };
        marks.retain(|e, _| *e >= settle_below);
        let done: Vec<ChunkId> = self
            .by_order
            .range(..below)
            .map(|(_, c)| *c)
            .filter(|c| self.by_chunk.get(c).is_some_and(|(t, _)| *t == term) && in_shard(*c))
            .collect();
        for c in done {
            self.forget(c);
        }
    }
}

/// A leader's side of settling its own term's changes (see [`ChunkOp::Unsettled`]): every
/// change it starts belongs to the current epoch of its shard; a new epoch begins once every
/// member has marked it, and the changes of a member noted before epoch `e` began are
/// settled once no change of an epoch below `e` is in flight.
#[derive(Default)]
pub struct Epochs {
    shards: std::sync::Mutex<std::collections::HashMap<u16, EpochState>>,
}

#[derive(Default)]
struct EpochState {
    term: u64,
    current: u64,
    in_flight: std::collections::BTreeMap<u64, usize>,
}

impl EpochState {
    fn for_term(&mut self, term: u64) -> &mut EpochState {
        if self.term != term {
            *self = EpochState {
                term,
                current: 1,
                in_flight: Default::default(),
            };
        }
        self
    }
}

/// A change in flight, counted in its epoch until dropped.
pub struct InFlight<'a> {
    epochs: &'a Epochs,
    shard: u16,
    term: u64,
    epoch: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut g = self.epochs.shards.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = g.get_mut(&self.shard).filter(|st| st.term == self.term) else {
            return;
        };
        if let Some(n) = st.in_flight.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                st.in_flight.remove(&self.epoch);
            }
        }
    }
}

impl Epochs {
    /// Counts a change of `shard`'s leader of `term` starting now.
    pub fn start(&self, shard: u16, term: u64) -> InFlight<'_> {
        let mut g = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let st = g.entry(shard).or_default().for_term(term);
        let epoch = st.current;
        *st.in_flight.entry(epoch).or_default() += 1;
        InFlight {
            epochs: self,
            shard,
            term,
            epoch,
        }
    }

    /// The next round's (mark, settle_below): the epoch to mark and the oldest epoch with a
    /// change in flight (the current one if none is).
    pub fn round(&self, shard: u16, term: u64) -> (u64, u64) {
        let mut g = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let st = g.entry(shard).or_default().for_term(term);
        let oldest = st.in_flight.keys().next().copied().unwrap_or(st.current);
        (st.current + 1, oldest)
    }

    /// Every member marked `mark`: changes started from now on belong to it.
    pub fn marked(&self, shard: u16, term: u64, mark: u64) {
        let mut g = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let st = g.entry(shard).or_default().for_term(term);
        st.current = st.current.max(mark);
    }
}

impl Fences {
    /// Applies `op` to `chunk` (of metadata shard `shard`) if `fence` admits it; reads by a
    /// leader (`fence.term > 0`) are refused while the copy is unsettled below its term.
    pub fn apply(
        &self,
        engine: &Engine,
        chunk: ChunkId,
        shard: u16,
        op: ChunkOp,
        fence: Fence,
    ) -> Result<Vec<u8>, ApplyError> {
        match op {
            ChunkOp::Read { .. } if fence.term > 0 && self.unsettled_below(chunk, fence.term) => {
                Err(ApplyError::Unsettled {
                    chunk,
                    term: fence.term,
                })
            }
            ChunkOp::Read { .. } | ChunkOp::Len => Ok(apply(engine, chunk, op)?),
            // Under the chunk's stripe lock: no admitted change is half-applied meanwhile.
            ChunkOp::MapDigest | ChunkOp::DataDigest => {
                let _stripe = self.stripe(chunk).lock().unwrap_or_else(|p| p.into_inner());
                Ok(apply(engine, chunk, op)?)
            }
            ChunkOp::Unsettled { .. } | ChunkOp::Settle { .. } | ChunkOp::Orphans { .. } => Err(
                ApplyError::Store(StoreError::Layout("not an operation on a chunk".into())),
            ),
            ChunkOp::Write { .. } | ChunkOp::Truncate { .. } | ChunkOp::Punch { .. } => {
                let floor = self.floor(shard);
                if fence.term < floor {
                    return Err(ApplyError::Fenced {
                        chunk,
                        got: fence,
                        seen: Fence {
                            term: floor,
                            gen: 0,
                        },
                    });
                }
                self.run(chunk, fence, || apply(engine, chunk, op))
            }
        }
    }

    fn stripe(
        &self,
        chunk: ChunkId,
    ) -> &std::sync::Mutex<std::collections::HashMap<ChunkId, Fence>> {
        &self.stripes[(chunk.0 % self.stripes.len() as u64) as usize]
    }

    fn floor(&self, shard: u16) -> u64 {
        let f = self.floors.lock().unwrap_or_else(|p| p.into_inner());
        f.get(&shard).copied().unwrap_or(0)
    }

    /// Refuses changes to `shard`'s chunks under terms below `term` from now on, and waits
    /// for those admitted before to finish (each holds its stripe lock until applied).
    pub fn raise_floor(&self, shard: u16, term: u64) {
        {
            let mut f = self.floors.lock().unwrap_or_else(|p| p.into_inner());
            let e = f.entry(shard).or_default();
            *e = (*e).max(term);
        }
        for s in &self.stripes {
            drop(s.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// Whether `chunk` was changed under a term below `term` (or found changed at restart)
    /// and no leader has compared its copies since: a leader of `term` must not read it yet.
    pub fn unsettled_below(&self, chunk: ChunkId, term: u64) -> bool {
        let u = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
        u.by_chunk.get(&chunk).is_some_and(|(t, _)| *t < term)
    }

    /// Records chunks found changed last at restart: unsettled under any term.
    pub fn note_restart(&self, chunks: &[ChunkId]) {
        let mut u = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
        for c in chunks {
            u.note(*c, 0);
        }
    }

    /// Up to `max` unsettled chunks that `pick` selects with a term below `below_term`, after
    /// marking epoch `mark` of shard `shard`'s leader of `below_term` and settling its changes
    /// from before epoch `settle_below` (see [`Epochs`]).
    pub fn unsettled(
        &self,
        shard: u16,
        below_term: u64,
        (mark, settle_below): (u64, u64),
        max: usize,
        pick: impl Fn(ChunkId) -> bool,
    ) -> Vec<ChunkId> {
        let mut u = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
        u.mark(shard, below_term, mark, settle_below, &pick);
        u.by_order
            .values()
            .filter(|c| u.by_chunk.get(c).is_some_and(|(t, _)| *t < below_term) && pick(**c))
            .take(max)
            .copied()
            .collect()
    }

    /// Forgets `chunks` whose oldest unsettled change came under a term below `below_term`
    /// (a leader of that term compared their copies).
    pub fn settle(&self, below_term: u64, chunks: &[ChunkId]) {
        let mut u = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
        for c in chunks {
            if u.by_chunk.get(c).is_some_and(|(t, _)| *t < below_term) {
                u.forget(*c);
            }
        }
    }

    /// Runs the change `f` to `chunk` if `fence` admits it, under the chunk's stripe lock.
    pub fn run<T>(
        &self,
        chunk: ChunkId,
        fence: Fence,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, ApplyError> {
        let mut seen = self.stripe(chunk).lock().unwrap_or_else(|p| p.into_inner());
        let newest = seen.entry(chunk).or_default();
        if fence < *newest {
            return Err(ApplyError::Fenced {
                chunk,
                got: fence,
                seen: *newest,
            });
        }
        *newest = fence;
        // Noted before the change: a change that fails half-way may have changed the copy.
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(chunk, fence.term);
        Ok(f()?)
    }

    /// The newest fence seen for `chunk` (`None`: no change since this node started).
    pub fn newest(&self, chunk: ChunkId) -> Option<Fence> {
        let seen = self.stripe(chunk).lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&chunk).copied()
    }

    /// Deletes this node's copy of `chunk` if no change to it was admitted since its newest
    /// fence was `seen` (checked and deleted under the chunk's stripe lock, so none slips in
    /// between); returns whether it did.
    pub fn delete_if_unchanged(
        &self,
        engine: &Engine,
        chunk: ChunkId,
        seen: Option<Fence>,
    ) -> Result<bool, StoreError> {
        let mut fences = self.stripe(chunk).lock().unwrap_or_else(|p| p.into_inner());
        if fences.get(&chunk).copied() != seen {
            return Ok(false);
        }
        match engine.delete(chunk.0) {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        fences.remove(&chunk);
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(chunk);
        Ok(true)
    }

    /// Forgets a deleted chunk's fence (ids are never reused).
    pub fn forget(&self, chunk: ChunkId) {
        self.stripe(chunk)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&chunk);
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(chunk);
    }
}

/// Encodes a request.
pub fn encode(chunk: ChunkId, op: &ChunkOp, fence: Fence) -> Vec<u8> {
    let mut w = Writer::default();
    let ids: Vec<u8>;
    let (code, chunk, fence, offset, len, data): (u8, ChunkId, Fence, u64, u64, &[u8]) = match op {
        ChunkOp::Write { offset, data } => (1, chunk, fence, *offset, data.len() as u64, data),
        ChunkOp::Truncate { len } => (2, chunk, fence, *len, 0, &[]),
        ChunkOp::Punch { offset, len } => (3, chunk, fence, *offset, *len, &[]),
        ChunkOp::Read { offset, len } => (4, chunk, fence, *offset, *len, &[]),
        ChunkOp::Len => (5, chunk, fence, 0, 0, &[]),
        ChunkOp::MapDigest => (6, chunk, fence, 0, 0, &[]),
        ChunkOp::DataDigest => (7, chunk, fence, 0, 0, &[]),
        ChunkOp::Unsettled {
            shard,
            below_term,
            max,
            mark,
            settle_below,
        } => (
            8,
            ChunkId(u64::from(*shard)),
            Fence {
                term: *below_term,
                gen: *mark,
            },
            *settle_below,
            *max,
            &[],
        ),
        ChunkOp::Settle {
            shard,
            below_term,
            chunks,
        } => {
            ids = chunks.iter().flat_map(|c| c.0.to_le_bytes()).collect();
            let n = chunks.len() as u64;
            (
                9,
                ChunkId(u64::from(*shard)),
                Fence {
                    term: *below_term,
                    gen: 0,
                },
                0,
                n,
                &ids,
            )
        }
        ChunkOp::Orphans {
            shard,
            node,
            chunks,
        } => {
            ids = chunks.iter().flat_map(|c| c.0.to_le_bytes()).collect();
            let n = chunks.len() as u64;
            (
                10,
                ChunkId(u64::from(*shard)),
                Fence {
                    term: *node,
                    gen: 0,
                },
                0,
                n,
                &ids,
            )
        }
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
        6 => ChunkOp::MapDigest,
        7 => ChunkOp::DataDigest,
        8 => ChunkOp::Unsettled {
            shard: u16::try_from(chunk.0).ok()?,
            below_term: fence.term,
            max: len,
            mark: fence.gen,
            settle_below: offset,
        },
        9 if data.len() as u64 == len.checked_mul(8)? => ChunkOp::Settle {
            shard: u16::try_from(chunk.0).ok()?,
            below_term: fence.term,
            chunks: chunk_ids(&data)?,
        },
        10 if data.len() as u64 == len.checked_mul(8)? => ChunkOp::Orphans {
            shard: u16::try_from(chunk.0).ok()?,
            node: fence.term,
            chunks: chunk_ids(&data)?,
        },
        _ => return None,
    };
    Some((chunk, op, fence))
}

/// Chunk ids, u64 LE each.
pub fn chunk_ids(b: &[u8]) -> Option<Vec<ChunkId>> {
    if !b.len().is_multiple_of(8) {
        return None;
    }
    b.chunks_exact(8)
        .map(|x| x.try_into().ok().map(|a| ChunkId(u64::from_le_bytes(a))))
        .collect()
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
        ChunkOp::MapDigest => Ok(match engine.map_digest(chunk.0)? {
            Some((len, hash)) => Digest { len, hash },
            None => Digest {
                len: 0,
                hash: [0; 32],
            },
        }
        .encode()),
        ChunkOp::DataDigest => data_digest(engine, chunk).map(|d| d.encode()),
        ChunkOp::Unsettled { .. } | ChunkOp::Settle { .. } | ChunkOp::Orphans { .. } => {
            Err(StoreError::Layout("not an operation on a chunk".into()))
        }
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

/// The pieces (offset, length) a whole chunk of `len` bytes is copied or compared in: 4 MiB
/// each, so no single request or reply is large.
pub fn copy_pieces(len: u64) -> impl Iterator<Item = (u64, u64)> {
    const PIECE: u64 = 4 << 20;
    (0..len.div_ceil(PIECE)).map(move |i| (i * PIECE, PIECE.min(len - i * PIECE)))
}

/// Length and BLAKE3 of a chunk's data (holes as zeros), read in 4 MiB pieces.
fn data_digest(engine: &Engine, chunk: ChunkId) -> Result<Digest, StoreError> {
    let len = engine.stat(chunk.0)?.map(|i| i.len).unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&len.to_le_bytes());
    for (offset, len) in copy_pieces(len) {
        h.update(&apply(engine, chunk, ChunkOp::Read { offset, len })?);
    }
    Ok(Digest {
        len,
        hash: *h.finalize().as_bytes(),
    })
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

    #[test]
    fn copies_changed_under_an_older_term_stay_unsettled_until_a_leader_settles_them() {
        let f = Fences::default();
        let (a, b) = (ChunkId(1), ChunkId(2));
        let at = |term| Fence { term, gen: 0 };
        let all = |_| true;
        assert!(f.run(a, at(3), || Ok(())).is_ok());
        assert!(
            !f.unsettled_below(a, 3),
            "the same leader reads its own changes"
        );
        assert!(f.unsettled_below(a, 4), "a newer leader must compare first");
        assert!(!f.unsettled_below(b, 4), "an unchanged chunk is settled");
        f.note_restart(&[b]);
        assert!(
            f.unsettled_below(b, 1),
            "found changed at restart: unsettled for any term"
        );
        assert_eq!(f.unsettled(0, 4, (2, 1), 10, all), vec![a, b]);
        assert_eq!(f.unsettled(0, 4, (2, 1), 1, all), vec![a], "at most max");
        assert_eq!(f.unsettled(0, 3, (2, 1), 10, all), vec![b]);
        assert!(f.unsettled(0, 4, (2, 1), 10, |c| c != a).eq(&[b]));
        // A change under the new term does not hide the older one.
        assert!(f.run(a, at(4), || Ok(())).is_ok());
        assert!(f.unsettled_below(a, 4));
        f.settle(4, &[a, b]);
        assert!(!f.unsettled_below(a, 4) && !f.unsettled_below(b, 4));
        assert!(f.unsettled(0, 9, (2, 1), 10, all).is_empty());
    }

    #[test]
    fn a_raised_floor_refuses_older_leaders_changes() {
        let f = Fences::default();
        f.raise_floor(0, 7);
        assert_eq!(f.floor(0), 7);
        assert_eq!(f.floor(1), 0, "per shard");
        f.raise_floor(0, 5);
        assert_eq!(f.floor(0), 7, "never lowered");
    }

    #[test]
    fn a_leaders_own_changes_settle_once_no_older_epoch_is_in_flight() {
        let (leader, member) = (Epochs::default(), Fences::default());
        let all = |_| true;
        let term = 5;
        let held = leader.start(0, term);
        assert!(member
            .run(ChunkId(1), Fence { term, gen: 0 }, || Ok(()))
            .is_ok());
        let round = leader.round(0, term);
        assert_eq!(round, (2, 1));
        assert!(member.unsettled(0, term, round, 10, all).is_empty());
        leader.marked(0, term, round.0);
        assert!(
            member.unsettled_below(ChunkId(1), term + 1),
            "epoch 1 still in flight"
        );
        let round = leader.round(0, term);
        assert_eq!(round, (3, 1), "the change of epoch 1 is in flight");
        member.unsettled(0, term, round, 10, all);
        assert!(member.unsettled_below(ChunkId(1), term + 1));
        let later = leader.start(0, term);
        assert!(member
            .run(ChunkId(2), Fence { term, gen: 0 }, || Ok(()))
            .is_ok());
        drop(held);
        leader.marked(0, term, round.0);
        let round = leader.round(0, term);
        assert_eq!(round, (4, 2), "epoch 2's change is still in flight");
        member.unsettled(0, term, round, 10, all);
        assert!(!member.unsettled_below(ChunkId(1), term + 1), "settled");
        assert!(
            member.unsettled_below(ChunkId(2), term + 1),
            "still in flight"
        );
        drop(later);
        leader.marked(0, term, round.0);
        let round = leader.round(0, term);
        assert_eq!(round, (5, 4), "nothing in flight");
        member.unsettled(0, term, round, 10, all);
        assert!(!member.unsettled_below(ChunkId(2), term + 1));
        // A new term starts over; older-term entries are left to reconciliation.
        assert!(member
            .run(ChunkId(3), Fence { term, gen: 0 }, || Ok(()))
            .is_ok());
        assert_eq!(leader.round(0, term + 1), (2, 1));
        assert_eq!(
            member.unsettled(0, term + 1, (2, 1), 10, all),
            vec![ChunkId(3)]
        );
    }

    #[test]
    fn copy_pieces_cover_a_chunk_once() {
        assert_eq!(copy_pieces(0).count(), 0);
        assert_eq!(copy_pieces(5).collect::<Vec<_>>(), vec![(0, 5)]);
        let m = 4u64 << 20;
        assert_eq!(
            copy_pieces(2 * m + 1).collect::<Vec<_>>(),
            vec![(0, m), (m, m), (2 * m, 1)]
        );
        assert_eq!(copy_pieces(2 * m).count(), 2);
    }

    #[test]
    fn digests_round_trip() {
        let d = Digest {
            len: 77,
            hash: [9; 32],
        };
        assert_eq!(Digest::decode(&d.encode()), Some(d));
        assert_eq!(Digest::decode(&d.encode()[1..]), None);
    }

    proptest! {
        #[test]
        fn requests_round_trip(chunk in any::<u64>(), offset in any::<u64>(), len in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..64), k in 0u8..10, shard in any::<u16>()) {
            let op = match k {
                0 => ChunkOp::Write { offset, data },
                1 => ChunkOp::Truncate { len },
                2 => ChunkOp::Punch { offset, len },
                3 => ChunkOp::Read { offset, len },
                4 => ChunkOp::MapDigest,
                5 => ChunkOp::DataDigest,
                6 => ChunkOp::Unsettled { shard, below_term: offset, max: len, mark: chunk, settle_below: offset ^ len },
                7 => ChunkOp::Settle { shard, below_term: len, chunks: data.iter().map(|b| ChunkId(u64::from(*b).wrapping_mul(chunk))).collect() },
                8 => ChunkOp::Orphans { shard, node: len, chunks: data.iter().map(|b| ChunkId(u64::from(*b) ^ chunk)).collect() },
                _ => ChunkOp::Len,
            };
            let fence = Fence { term: offset ^ 3, gen: len ^ 5 };
            let b = encode(ChunkId(chunk), &op, fence);
            let back = decode(&b);
            match &op {
                // Bookkeeping questions carry the shard (and their own terms) instead.
                ChunkOp::Unsettled { .. } | ChunkOp::Settle { .. } | ChunkOp::Orphans { .. } => {
                    prop_assert_eq!(back.map(|(_, o, _)| o), Some(op));
                }
                _ => prop_assert_eq!(back, Some((ChunkId(chunk), op, fence))),
            }
            prop_assert_eq!(decode(&b[..b.len() - 1]), None);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = decode(&b);
        }
    }
}

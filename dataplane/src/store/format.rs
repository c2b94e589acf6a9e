//! On-disk structures of the chunk store, each a fixed little-endian layout with a CRC32C.
//! Byte diagrams are in `docs/architecture.md`; every decoder checks magic, version, bounds and
//! checksum, and returns `None` rather than trusting a damaged block.

/// Store block size in bytes: the unit of allocation, checksumming and metadata I/O.
pub const BLOCK: usize = 4096;
/// On-disk format version written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Superblock magic.
pub const SUPER_MAGIC: [u8; 8] = *b"CFSSTOR1";
/// Checkpoint header magic.
pub const CKPT_MAGIC: [u8; 8] = *b"CFSCKPT1";
/// Journal block magic.
pub const JOURNAL_MAGIC: u32 = u32::from_le_bytes(*b"CFSJ");
/// Bytes of a journal block before its payload.
pub const JOURNAL_HEADER: usize = 40;
/// Payload bytes per journal block.
pub const JOURNAL_PAYLOAD: usize = BLOCK - JOURNAL_HEADER;
/// Most blocks in one journal batch (bounds the torn-tail scan at recovery).
pub const MAX_BATCH_BLOCKS: u32 = 256;

/// CRC32C of `data`.
pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut r = [0u8; 8];
    r.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(r)
}
fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Where one shard lives on its device, in store blocks from the device start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    /// First block of checkpoint slot 0; slot 1 follows it.
    pub ckpt_start: u64,
    /// Blocks per checkpoint slot (header block + body).
    pub ckpt_blocks: u32,
    /// First journal block.
    pub journal_start: u64,
    /// Journal blocks.
    pub journal_blocks: u32,
    /// First data block.
    pub data_start: u64,
    /// Data blocks.
    pub data_blocks: u32,
}

impl ShardLayout {
    /// First block of checkpoint slot `slot` (0 or 1).
    pub fn ckpt_slot(&self, slot: usize) -> u64 {
        self.ckpt_start + slot as u64 * u64::from(self.ckpt_blocks)
    }
}

/// Per-device superblock, stored twice (blocks 0 and 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Format version.
    pub version: u32,
    /// Store identity shared by all its devices.
    pub uuid: [u8; 16],
    /// This device's index within the store.
    pub device_index: u16,
    /// Devices in the store.
    pub device_count: u16,
    /// Shards on this device.
    pub shards: u32,
    /// Global index of this device's first shard.
    pub first_shard: u32,
    /// Shards in the whole store.
    pub total_shards: u32,
    /// Device size in store blocks.
    pub device_blocks: u64,
    /// Blocks per shard (all shards of a device are equal).
    pub shard_blocks: u64,
    /// Blocks per checkpoint slot.
    pub ckpt_blocks: u32,
    /// Journal blocks per shard.
    pub journal_blocks: u32,
    /// Data blocks per shard.
    pub data_blocks: u32,
    /// Largest chunk, in blocks.
    pub max_chunk_blocks: u32,
    /// Creation time (seconds since the Unix epoch), informational.
    pub created_unix_secs: u64,
}

impl Superblock {
    /// Layout of local shard `i`.
    pub fn shard_layout(&self, i: u32) -> ShardLayout {
        assert!(i < self.shards);
        let start = 2 + u64::from(i) * self.shard_blocks;
        let ckpt = u64::from(self.ckpt_blocks);
        ShardLayout {
            ckpt_start: start,
            ckpt_blocks: self.ckpt_blocks,
            journal_start: start + 2 * ckpt,
            journal_blocks: self.journal_blocks,
            data_start: start + 2 * ckpt + u64::from(self.journal_blocks),
            data_blocks: self.data_blocks,
        }
    }

    /// Journal-block tag binding journal blocks to this store and shard.
    pub fn store_tag(&self, global_shard: u32) -> u64 {
        let mut r = [0u8; 8];
        r.copy_from_slice(&self.uuid[..8]);
        u64::from_le_bytes(r) ^ (u64::from(global_shard) << 32 | 0x5eed)
    }

    /// Encodes into one block.
    pub fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[0..8].copy_from_slice(&SUPER_MAGIC);
        put_u32(&mut b, 8, self.version);
        b[16..32].copy_from_slice(&self.uuid);
        put_u16(&mut b, 32, self.device_index);
        put_u16(&mut b, 34, self.device_count);
        put_u32(&mut b, 36, self.shards);
        put_u32(&mut b, 40, BLOCK as u32);
        put_u32(&mut b, 44, self.first_shard);
        put_u32(&mut b, 48, self.total_shards);
        put_u64(&mut b, 56, self.device_blocks);
        put_u64(&mut b, 64, self.shard_blocks);
        put_u32(&mut b, 72, self.ckpt_blocks);
        put_u32(&mut b, 76, self.journal_blocks);
        put_u32(&mut b, 80, self.data_blocks);
        put_u32(&mut b, 84, self.max_chunk_blocks);
        put_u64(&mut b, 88, self.created_unix_secs);
        let c = crc(&b[..BLOCK - 4]);
        put_u32(&mut b, BLOCK - 4, c);
        b
    }

    /// Decodes and validates a block.
    pub fn decode(b: &[u8]) -> Result<Superblock, &'static str> {
        if b.len() < BLOCK {
            return Err("short superblock");
        }
        if b[0..8] != SUPER_MAGIC {
            return Err("no ClaudeFS superblock (bad magic)");
        }
        if crc(&b[..BLOCK - 4]) != get_u32(b, BLOCK - 4) {
            return Err("superblock checksum mismatch");
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err("unsupported format version");
        }
        if get_u32(b, 40) != BLOCK as u32 {
            return Err("unsupported block size");
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let sb = Superblock {
            version,
            uuid,
            device_index: get_u16(b, 32),
            device_count: get_u16(b, 34),
            shards: get_u32(b, 36),
            first_shard: get_u32(b, 44),
            total_shards: get_u32(b, 48),
            device_blocks: get_u64(b, 56),
            shard_blocks: get_u64(b, 64),
            ckpt_blocks: get_u32(b, 72),
            journal_blocks: get_u32(b, 76),
            data_blocks: get_u32(b, 80),
            max_chunk_blocks: get_u32(b, 84),
            created_unix_secs: get_u64(b, 88),
        };
        let per_shard = 2 * u64::from(sb.ckpt_blocks)
            + u64::from(sb.journal_blocks)
            + u64::from(sb.data_blocks);
        if sb.shards == 0
            || sb.device_count == 0
            || sb.device_index >= sb.device_count
            || sb
                .first_shard
                .checked_add(sb.shards)
                .is_none_or(|e| e > sb.total_shards)
            || per_shard > sb.shard_blocks
            || 2 + u64::from(sb.shards) * sb.shard_blocks > sb.device_blocks
            || sb.journal_blocks < 2 * MAX_BATCH_BLOCKS
            || sb.ckpt_blocks < 2
            || sb.max_chunk_blocks == 0
        {
            return Err("inconsistent superblock geometry");
        }
        Ok(sb)
    }
}

/// Most chunk ids a checkpoint header carries in its recently-changed list.
pub const CKPT_RECENT_MAX: usize = 500;

/// Header block of a checkpoint slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CkptHeader {
    /// Increases with every checkpoint of the shard; the highest valid one wins.
    pub generation: u64,
    /// Sequence number of the first journal block that follows this checkpoint.
    pub journal_start_seq: u64,
    /// Body length in bytes.
    pub body_len: u64,
    /// CRC32C of the body.
    pub body_crc: u32,
    /// Chunks in the body.
    pub chunk_count: u32,
    /// Live data blocks in the body.
    pub live_blocks: u64,
    /// Store tag (binds the checkpoint to its store and shard).
    pub store_tag: u64,
    /// The chunks changed last before this checkpoint, oldest first (at most
    /// [`CKPT_RECENT_MAX`]): with the journal replayed after it, what a restarted node reports
    /// as possibly changed by a write its cluster never acknowledged. Zero-filled (empty) in
    /// headers written before the list existed, so those still decode.
    pub recent: Vec<ChunkId>,
}

impl CkptHeader {
    /// Encodes into one block.
    pub fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[0..8].copy_from_slice(&CKPT_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u64(&mut b, 16, self.generation);
        put_u64(&mut b, 24, self.journal_start_seq);
        put_u64(&mut b, 32, self.body_len);
        put_u32(&mut b, 40, self.body_crc);
        put_u32(&mut b, 44, self.chunk_count);
        put_u64(&mut b, 48, self.live_blocks);
        put_u64(&mut b, 56, self.store_tag);
        assert!(self.recent.len() <= CKPT_RECENT_MAX);
        put_u32(&mut b, 64, self.recent.len() as u32);
        for (i, c) in self.recent.iter().enumerate() {
            put_u64(&mut b, 72 + 8 * i, *c);
        }
        let c = crc(&b[..BLOCK - 4]);
        put_u32(&mut b, BLOCK - 4, c);
        b
    }

    /// Decodes and validates a block.
    pub fn decode(b: &[u8]) -> Option<CkptHeader> {
        if b.len() < BLOCK || b[0..8] != CKPT_MAGIC || get_u32(b, 8) != FORMAT_VERSION {
            return None;
        }
        if crc(&b[..BLOCK - 4]) != get_u32(b, BLOCK - 4) {
            return None;
        }
        let recent_count = get_u32(b, 64) as usize;
        if recent_count > CKPT_RECENT_MAX {
            return None;
        }
        Some(CkptHeader {
            recent: (0..recent_count).map(|i| get_u64(b, 72 + 8 * i)).collect(),
            generation: get_u64(b, 16),
            journal_start_seq: get_u64(b, 24),
            body_len: get_u64(b, 32),
            body_crc: get_u32(b, 40),
            chunk_count: get_u32(b, 44),
            live_blocks: get_u64(b, 48),
            store_tag: get_u64(b, 56),
        })
    }
}

/// Header of a journal block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    /// Store tag (a block from another store or shard never matches).
    pub store_tag: u64,
    /// Block sequence number, +1 per journal block.
    pub seq: u64,
    /// Sequence number of the batch's first block.
    pub batch_seq: u64,
    /// Blocks in the batch.
    pub batch_blocks: u16,
    /// This block's index in the batch.
    pub index: u16,
    /// Payload bytes used in this block.
    pub used: u32,
}

/// Encodes a journal block: header plus `payload` (at most [`JOURNAL_PAYLOAD`] bytes).
pub fn encode_journal_block(h: &JournalHeader, payload: &[u8], out: &mut [u8]) {
    assert!(payload.len() <= JOURNAL_PAYLOAD && out.len() >= BLOCK);
    assert_eq!(h.used as usize, payload.len());
    let out = &mut out[..BLOCK];
    out.fill(0);
    put_u32(out, 0, JOURNAL_MAGIC);
    put_u64(out, 8, h.store_tag);
    put_u64(out, 16, h.seq);
    put_u64(out, 24, h.batch_seq);
    put_u16(out, 32, h.batch_blocks);
    put_u16(out, 34, h.index);
    put_u32(out, 36, h.used);
    out[JOURNAL_HEADER..JOURNAL_HEADER + payload.len()].copy_from_slice(payload);
    let c = crc(&out[8..]);
    put_u32(out, 4, c);
}

/// Decodes a journal block; `None` if it is not a valid block (torn, stale garbage, other store).
pub fn decode_journal_block(b: &[u8]) -> Option<(JournalHeader, &[u8])> {
    if b.len() < BLOCK || get_u32(b, 0) != JOURNAL_MAGIC || crc(&b[8..BLOCK]) != get_u32(b, 4) {
        return None;
    }
    let h = JournalHeader {
        store_tag: get_u64(b, 8),
        seq: get_u64(b, 16),
        batch_seq: get_u64(b, 24),
        batch_blocks: get_u16(b, 32),
        index: get_u16(b, 34),
        used: get_u32(b, 36),
    };
    if h.used as usize > JOURNAL_PAYLOAD
        || h.batch_blocks == 0
        || u32::from(h.batch_blocks) > MAX_BATCH_BLOCKS
        || h.index >= h.batch_blocks
        || h.batch_seq.checked_add(u64::from(h.index)) != Some(h.seq)
    {
        return None;
    }
    Some((h, &b[JOURNAL_HEADER..JOURNAL_HEADER + h.used as usize]))
}

/// Identifies a chunk: the unit of data placement, up to `max_chunk_blocks` blocks long.
pub type ChunkId = u64;

/// Where one logical block of a chunk lives and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// Data block within the shard's data area.
    pub phys: u32,
    /// CRC32C of the block's 4 KiB.
    pub crc: u32,
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Blocks `first..first+blocks.len()` of `chunk` now live at `blocks`; chunk length becomes
    /// `len_after`.
    Write {
        /// Chunk written.
        chunk: ChunkId,
        /// First logical block.
        first: u32,
        /// Chunk length in bytes after the write.
        len_after: u64,
        /// New location and checksum of each block.
        blocks: Vec<BlockRef>,
    },
    /// The chunk and all its blocks are gone.
    Delete {
        /// Chunk deleted.
        chunk: ChunkId,
    },
    /// The chunk is cut (or extended with a hole) to `len` bytes.
    Truncate {
        /// Chunk truncated.
        chunk: ChunkId,
        /// New length in bytes.
        len: u64,
    },
    /// Blocks `first..first+count` of `chunk` become a hole (read as zeros, no space used);
    /// the chunk's length is unchanged.
    Punch {
        /// Chunk punched.
        chunk: ChunkId,
        /// First logical block.
        first: u32,
        /// Number of blocks.
        count: u32,
    },
}

const REC_WRITE: u8 = 1;
const REC_DELETE: u8 = 2;
const REC_TRUNCATE: u8 = 3;
const REC_PUNCH: u8 = 4;

impl Record {
    /// The chunk the record changes.
    pub fn chunk(&self) -> ChunkId {
        match self {
            Record::Write { chunk, .. }
            | Record::Delete { chunk }
            | Record::Truncate { chunk, .. }
            | Record::Punch { chunk, .. } => *chunk,
        }
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Write {
                chunk,
                first,
                len_after,
                blocks,
            } => {
                out.push(REC_WRITE);
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
                out.extend_from_slice(&len_after.to_le_bytes());
                for b in blocks {
                    out.extend_from_slice(&b.phys.to_le_bytes());
                    out.extend_from_slice(&b.crc.to_le_bytes());
                }
            }
            Record::Delete { chunk } => {
                out.push(REC_DELETE);
                out.extend_from_slice(&chunk.to_le_bytes());
            }
            Record::Truncate { chunk, len } => {
                out.push(REC_TRUNCATE);
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Record::Punch {
                chunk,
                first,
                count,
            } => {
                out.push(REC_PUNCH);
                out.extend_from_slice(&chunk.to_le_bytes());
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
        }
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::Write { blocks, .. } => 25 + 8 * blocks.len(),
            Record::Delete { .. } => 9,
            Record::Truncate { .. } | Record::Punch { .. } => 17,
        }
    }

    /// Decodes every record of a batch payload; `None` on any malformed byte.
    pub fn decode_all(mut b: &[u8]) -> Option<Vec<Record>> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let tag = b[0];
            match tag {
                REC_WRITE if b.len() >= 25 => {
                    let chunk = get_u64(b, 1);
                    let first = get_u32(b, 9);
                    let n = get_u32(b, 13) as usize;
                    let len_after = get_u64(b, 17);
                    let need = 25usize.checked_add(n.checked_mul(8)?)?;
                    if b.len() < need || n == 0 {
                        return None;
                    }
                    let blocks = (0..n)
                        .map(|i| BlockRef {
                            phys: get_u32(b, 25 + 8 * i),
                            crc: get_u32(b, 29 + 8 * i),
                        })
                        .collect();
                    out.push(Record::Write {
                        chunk,
                        first,
                        len_after,
                        blocks,
                    });
                    b = &b[need..];
                }
                REC_DELETE if b.len() >= 9 => {
                    out.push(Record::Delete {
                        chunk: get_u64(b, 1),
                    });
                    b = &b[9..];
                }
                REC_TRUNCATE if b.len() >= 17 => {
                    out.push(Record::Truncate {
                        chunk: get_u64(b, 1),
                        len: get_u64(b, 9),
                    });
                    b = &b[17..];
                }
                REC_PUNCH if b.len() >= 17 => {
                    out.push(Record::Punch {
                        chunk: get_u64(b, 1),
                        first: get_u32(b, 9),
                        count: get_u32(b, 13),
                    });
                    b = &b[17..];
                }
                _ => return None,
            }
        }
        Some(out)
    }
}

/// One chunk as stored in a checkpoint body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CkptChunk {
    /// Chunk id.
    pub chunk: ChunkId,
    /// Length in bytes.
    pub len: u64,
    /// (logical block, location) for every mapped block, ascending.
    pub blocks: Vec<(u32, BlockRef)>,
}

/// Encodes a checkpoint body: the allocator bitmap, then every chunk.
pub fn encode_ckpt_body(bitmap: &[u8], chunks: &[CkptChunk]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        8 + bitmap.len()
            + chunks
                .iter()
                .map(|c| 20 + 12 * c.blocks.len())
                .sum::<usize>(),
    );
    out.extend_from_slice(&(bitmap.len() as u64).to_le_bytes());
    out.extend_from_slice(bitmap);
    for c in chunks {
        out.extend_from_slice(&c.chunk.to_le_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
        out.extend_from_slice(&(c.blocks.len() as u32).to_le_bytes());
        for (l, r) in &c.blocks {
            out.extend_from_slice(&l.to_le_bytes());
            out.extend_from_slice(&r.phys.to_le_bytes());
            out.extend_from_slice(&r.crc.to_le_bytes());
        }
    }
    out
}

/// Decodes a checkpoint body holding `chunk_count` chunks; `None` on any malformed byte.
pub fn decode_ckpt_body(b: &[u8], chunk_count: u32) -> Option<(Vec<u8>, Vec<CkptChunk>)> {
    if b.len() < 8 {
        return None;
    }
    let blen = usize::try_from(get_u64(b, 0)).ok()?;
    let mut at = 8usize.checked_add(blen)?;
    if at > b.len() {
        return None;
    }
    let bitmap = b[8..at].to_vec();
    let mut chunks = Vec::with_capacity(chunk_count.min(1 << 20) as usize);
    for _ in 0..chunk_count {
        if b.len() < at + 20 {
            return None;
        }
        let chunk = get_u64(b, at);
        let len = get_u64(b, at + 8);
        let n = get_u32(b, at + 16) as usize;
        at += 20;
        let need = n.checked_mul(12)?;
        if b.len() < at.checked_add(need)? {
            return None;
        }
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let p = at + 12 * i;
            blocks.push((
                get_u32(b, p),
                BlockRef {
                    phys: get_u32(b, p + 4),
                    crc: get_u32(b, p + 8),
                },
            ));
        }
        at += need;
        chunks.push(CkptChunk { chunk, len, blocks });
    }
    if at != b.len() {
        return None;
    }
    Some((bitmap, chunks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sb() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            uuid: [7; 16],
            device_index: 0,
            device_count: 1,
            shards: 4,
            first_shard: 0,
            total_shards: 4,
            device_blocks: 100_000,
            shard_blocks: 20_000,
            ckpt_blocks: 100,
            journal_blocks: 1024,
            data_blocks: 18_000,
            max_chunk_blocks: 16384,
            created_unix_secs: 1,
        }
    }

    fn record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec((any::<u32>(), any::<u32>()), 1..40)
            )
                .prop_map(|(chunk, first, len_after, v)| Record::Write {
                    chunk,
                    first,
                    len_after,
                    blocks: v
                        .into_iter()
                        .map(|(phys, crc)| BlockRef { phys, crc })
                        .collect()
                }),
            any::<u64>().prop_map(|chunk| Record::Delete { chunk }),
            (any::<u64>(), any::<u64>()).prop_map(|(chunk, len)| Record::Truncate { chunk, len }),
            (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(chunk, first, count)| {
                Record::Punch {
                    chunk,
                    first,
                    count,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn superblock_round_trip_and_any_corrupt_byte_detected(at in 0usize..BLOCK, flip in 1u8..=255) {
            let s = sb();
            let mut b = s.encode();
            prop_assert_eq!(Superblock::decode(&b).unwrap(), s);
            b[at] ^= flip;
            prop_assert!(Superblock::decode(&b).is_err());
        }

        #[test]
        fn ckpt_header_round_trip_and_corruption(gen in any::<u64>(), seq in any::<u64>(), at in 0usize..BLOCK, flip in 1u8..=255) {
            let h = CkptHeader { generation: gen, journal_start_seq: seq, body_len: 99, body_crc: 5, chunk_count: 3, live_blocks: 10, store_tag: 77, recent: (0..gen % 7).map(|i| i.wrapping_mul(seq)).collect() };
            let mut b = h.encode();
            prop_assert_eq!(CkptHeader::decode(&b), Some(h));
            b[at] ^= flip;
            prop_assert_eq!(CkptHeader::decode(&b), None);
        }

        #[test]
        fn journal_block_round_trip_and_corruption(payload in proptest::collection::vec(any::<u8>(), 0..JOURNAL_PAYLOAD), seq in 0u64..1<<60, idx in 0u16..8, at in 0usize..BLOCK, flip in 1u8..=255) {
            let h = JournalHeader { store_tag: 9, seq: seq + u64::from(idx), batch_seq: seq, batch_blocks: 8, index: idx, used: payload.len() as u32 };
            let mut b = vec![0u8; BLOCK];
            encode_journal_block(&h, &payload, &mut b);
            let (h2, p2) = decode_journal_block(&b).unwrap();
            prop_assert_eq!(h2, h);
            prop_assert_eq!(p2, &payload[..]);
            b[at] ^= flip;
            prop_assert!(decode_journal_block(&b).is_none());
        }

        #[test]
        fn records_round_trip(recs in proptest::collection::vec(record(), 0..20)) {
            let mut buf = Vec::new();
            for r in &recs { r.encode(&mut buf); }
            prop_assert_eq!(buf.len(), recs.iter().map(Record::encoded_len).sum::<usize>());
            prop_assert_eq!(Record::decode_all(&buf).unwrap(), recs);
        }

        #[test]
        fn records_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Record::decode_all(&bytes);
        }

        #[test]
        fn ckpt_body_round_trip(bitmap in proptest::collection::vec(any::<u8>(), 0..64),
                                chunks in proptest::collection::vec((any::<u64>(), any::<u64>(), proptest::collection::vec((any::<u32>(), any::<u32>(), any::<u32>()), 0..10)), 0..10),
                                cut in any::<usize>()) {
            let chunks: Vec<CkptChunk> = chunks.into_iter().map(|(chunk, len, v)| CkptChunk {
                chunk, len, blocks: v.into_iter().map(|(l, phys, crc)| (l, BlockRef { phys, crc })).collect() }).collect();
            let body = encode_ckpt_body(&bitmap, &chunks);
            let (bm, ch) = decode_ckpt_body(&body, chunks.len() as u32).unwrap();
            prop_assert_eq!(bm, bitmap);
            prop_assert_eq!(&ch, &chunks);
            // Truncated bodies never decode (the header's body CRC is the corruption check).
            let cut = cut % body.len();
            prop_assert!(decode_ckpt_body(&body[..cut], chunks.len() as u32).is_none());
        }
    }
}

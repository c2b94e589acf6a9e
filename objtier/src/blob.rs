//! The blob format: cold extents packed into one object (64 MiB by default), self-describing
//! so a blob found on the store can be checked and read without the metadata, and every
//! extent checksummed so a truncated or corrupted GET is caught. Pure: no I/O.
//!
//! ```text
//! header (64 bytes, little-endian)
//!   0  8  magic "CFSBLOB1"
//!   8  2  u16 format version (2; 1 is still read)
//!  10  2  u16 block shift b: block CRCs cover 2^b bytes each (v2; 0 in v1)
//!  12  4  u32 extent count n
//!  16 16  u128 blob id
//!  32  8  u64 payload offset (64 + 48 n + 4 m, rounded up to 4096)
//!  40  8  u64 payload bytes
//!  48  4  u32 CRC32C of the extent table and the block CRC list
//!  52  8  u64 created (seconds since the epoch; diagnostics only)
//!  60  4  u32 CRC32C of bytes 0..60
//! extent table (n x 48 bytes, from byte 64)
//!   0  8  u64 chunk id
//!   8  8  u64 offset of the extent in its chunk
//!  16  8  u64 generation of the chunk the bytes were taken from
//!  24  8  u64 offset of the bytes in the blob
//!  32  4  u32 length
//!  36  4  u32 CRC32C of the bytes
//!  40  4  u32 index of the extent's first block CRC in the list (v2; 0 in v1)
//!  44  4  reserved (0)
//! block CRC list (v2 only; m x 4 bytes, from byte 64 + 48 n)
//!   u32 CRC32C of each 2^b-byte block of each extent, in table order (the last block of an
//!   extent may be short; an extent of len bytes has ceil(len / 2^b) of them)
//! zeros up to the payload offset, then the extents' bytes back to back
//! ```
//!
//! The block CRCs let a reader fetch and check a piece of an extent (a few blocks) instead of
//! the whole extent. They are bound to the extent's own CRC32C, which the replicated index
//! keeps: the block CRCs combined (CRC32C of a concatenation, from its parts' CRCs and
//! lengths) must give it, so a table read from the store is checked against the metadata.

/// Bytes of the fixed header.
pub const HEADER_BYTES: usize = 64;
/// Bytes of one extent table entry.
pub const ENTRY_BYTES: usize = 48;
/// The payload starts on this boundary (so ranged GETs of extents are page aligned at start).
pub const PAYLOAD_ALIGN: u64 = 4096;
/// Bytes of one block CRC in the list.
pub const BLOCK_CRC_BYTES: usize = 4;
/// The block size blobs are written with: 1 MiB (a read of an evicted extent fetches whole
/// blocks; smaller means less read amplification and a longer list: 256 bytes per 64 MiB).
pub const BLOCK_SHIFT: u8 = 20;
/// Largest block shift a blob may name (4 GiB blocks: one block per extent).
const MAX_BLOCK_SHIFT: u16 = 32;
const MAGIC: &[u8; 8] = b"CFSBLOB1";
/// The format written.
pub const VERSION: u16 = 2;
/// The format before block CRCs, still read (and written by [`BlobBuilder::v1`]).
pub const VERSION_1: u16 = 1;

/// A blob's identity (its key on the store is derived from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub u128);

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl BlobId {
    /// The object key under `prefix` ("" or ending without a slash): `prefix/blobs/<hex id>`.
    pub fn key(&self, prefix: &str) -> String {
        if prefix.is_empty() {
            format!("blobs/{self}")
        } else {
            format!("{}/blobs/{self}", prefix.trim_end_matches('/'))
        }
    }
}

/// Where an extent's bytes are in a blob (what the replicated blob index records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The chunk the bytes belong to.
    pub chunk: u64,
    /// Offset of the extent within the chunk.
    pub chunk_offset: u64,
    /// The chunk's generation when the bytes were taken (a later write makes them dead).
    pub generation: u64,
    /// The blob holding them.
    pub blob: BlobId,
    /// Offset of the bytes in the blob.
    pub blob_offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// CRC32C of the bytes.
    pub crc32c: u32,
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Extents in the table.
    pub extents: u32,
    /// The blob's id.
    pub id: BlobId,
    /// Where the payload starts.
    pub payload_offset: u64,
    /// Payload length.
    pub payload_bytes: u64,
    /// CRC32C of the table.
    pub table_crc32c: u32,
    /// When the blob was made (seconds since the epoch).
    pub created_s: u64,
    /// Format version.
    pub version: u16,
    /// Block CRCs cover `1 << block_shift` bytes (v2); 0: no block CRCs (v1).
    pub block_shift: u8,
}

impl Header {
    /// Bytes of header, table and block CRC list: what to GET to learn the extents (in v2
    /// the list's length is known only from the table, so up to the payload).
    pub fn table_end(&self) -> u64 {
        if self.version == VERSION_1 {
            (HEADER_BYTES + ENTRY_BYTES * self.extents as usize) as u64
        } else {
            self.payload_offset
        }
    }

    /// Total length of the blob.
    pub fn blob_bytes(&self) -> u64 {
        self.payload_offset + self.payload_bytes
    }
}

/// What is wrong with a blob or an extent read from it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Not a blob of ours (or its first bytes are damaged).
    #[error("not a ClaudeFS blob (bad magic)")]
    Magic,
    /// A format this code does not read.
    #[error("blob format version {0} is not supported")]
    Version(u16),
    /// Fewer bytes than the structure needs: a truncated GET.
    #[error("truncated: {what} needs {need} bytes, got {got}")]
    Truncated {
        /// Which part.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes there.
        got: u64,
    },
    /// The header's own checksum does not match.
    #[error("blob header checksum mismatch")]
    HeaderChecksum,
    /// The extent table's checksum does not match.
    #[error("blob extent table checksum mismatch")]
    TableChecksum,
    /// The header or table describe an impossible layout.
    #[error("inconsistent blob layout: {0}")]
    Layout(String),
    /// An extent's bytes do not match their checksum (corrupted or truncated GET).
    #[error("extent of chunk {chunk:#x} at {chunk_offset}: checksum mismatch")]
    ExtentChecksum {
        /// The extent's chunk.
        chunk: u64,
        /// Its offset in the chunk.
        chunk_offset: u64,
    },
    /// An extent longer than a blob may hold.
    #[error("an extent of {0} bytes does not fit a blob")]
    TooLarge(u64),
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn payload_offset(extents: usize, block_crcs: usize) -> u64 {
    ((HEADER_BYTES + ENTRY_BYTES * extents + BLOCK_CRC_BYTES * block_crcs) as u64)
        .next_multiple_of(PAYLOAD_ALIGN)
}

/// Blocks of `1 << shift` bytes an extent of `len` bytes has (the last one may be short).
pub fn block_count(len: u32, shift: u8) -> usize {
    u64::from(len).div_ceil(1u64 << shift) as usize
}

/// The block CRCs of one extent (from a v2 blob's table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentBlocks {
    /// Blocks are `1 << shift` bytes.
    pub shift: u8,
    /// CRC32C of each block.
    pub crcs: Vec<u32>,
}

impl ExtentBlocks {
    /// Computes them for `data`.
    pub fn of(data: &[u8], shift: u8) -> ExtentBlocks {
        ExtentBlocks {
            shift,
            crcs: data.chunks(1 << shift).map(crc32c::crc32c).collect(),
        }
    }

    /// Checks that these block CRCs belong to extent `p`: as many as its length needs, and
    /// combined they give its CRC32C (which the replicated index holds).
    pub fn check(&self, p: &Placed) -> Result<(), BlobError> {
        let bad =
            |why: String| BlobError::Layout(format!("block CRCs of chunk {:#x}: {why}", p.chunk));
        if self.shift == 0 || u16::from(self.shift) > MAX_BLOCK_SHIFT {
            return Err(bad(format!("block shift {}", self.shift)));
        }
        if self.crcs.len() != block_count(p.len, self.shift) {
            return Err(bad(format!("{} for {} bytes", self.crcs.len(), p.len)));
        }
        let block = 1u64 << self.shift;
        let mut left = u64::from(p.len);
        let mut acc = 0u32;
        for (i, c) in self.crcs.iter().enumerate() {
            let n = left.min(block);
            acc = if i == 0 {
                *c
            } else {
                crc32c::crc32c_combine(acc, *c, n as usize)
            };
            left -= n;
        }
        if acc != p.crc32c {
            return Err(bad("they do not combine to the extent's CRC32C".into()));
        }
        Ok(())
    }

    /// The whole blocks covering `[offset, offset + len)` of extent `p` (clipped to it): the
    /// first block's index and the range of blob bytes to GET.
    pub fn cover(&self, p: &Placed, offset: u64, len: u64) -> (usize, std::ops::Range<u64>) {
        let block = 1u64 << self.shift;
        let end = offset.saturating_add(len).min(u64::from(p.len));
        if offset >= end {
            return (0, p.blob_offset..p.blob_offset);
        }
        let first = offset / block;
        let last_end = end.next_multiple_of(block).min(u64::from(p.len));
        (
            first as usize,
            p.blob_offset + first * block..p.blob_offset + last_end,
        )
    }

    /// Checks bytes fetched for the blocks [`ExtentBlocks::cover`] gave (`first`, `range`):
    /// their length, then each block's CRC32C.
    pub fn verify(
        &self,
        p: &Placed,
        first: usize,
        range: &std::ops::Range<u64>,
        bytes: &[u8],
    ) -> Result<(), BlobError> {
        let block = 1u64 << self.shift;
        let want = range.end.saturating_sub(range.start);
        if bytes.len() as u64 != want {
            return Err(BlobError::Truncated {
                what: "extent blocks",
                need: want,
                got: bytes.len() as u64,
            });
        }
        for (i, b) in bytes.chunks(block as usize).enumerate() {
            if self.crcs.get(first + i) != Some(&crc32c::crc32c(b)) {
                return Err(BlobError::ExtentChecksum {
                    chunk: p.chunk,
                    chunk_offset: p.chunk_offset + (first + i) as u64 * block,
                });
            }
        }
        Ok(())
    }
}

/// Whole blocks of one extent, fetched and checked ([`ExtentBlocks::cover`] then
/// [`ExtentBlocks::verify`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedBlocks {
    /// Index of the first of them in the extent.
    pub first: usize,
    /// The blob bytes they are.
    pub range: std::ops::Range<u64>,
    /// Their bytes.
    pub bytes: Vec<u8>,
}

impl FetchedBlocks {
    /// `[offset, offset + len)` of extent `p`, clipped to the extent and to these blocks.
    pub fn piece(&self, p: &Placed, offset: u64, len: u64) -> &[u8] {
        let end = offset.saturating_add(len).min(u64::from(p.len));
        let start = p.blob_offset.saturating_add(offset).max(self.range.start);
        let end = (p.blob_offset + end).min(self.range.end);
        if start >= end {
            return &[];
        }
        &self.bytes[(start - self.range.start) as usize..(end - self.range.start) as usize]
    }
}

/// A parsed extent table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// The blob's header.
    pub header: Header,
    /// Its extents, in blob order.
    pub extents: Vec<Placed>,
    /// Each extent's block CRCs (v2; `None` for a v1 blob).
    pub blocks: Vec<Option<ExtentBlocks>>,
}

impl Table {
    /// The extent `want` (as the index records it), and its block CRCs. Empty extents share
    /// their blob offset with the next extent, so the offset alone does not name one: among
    /// those at `want.blob_offset` this is the one with `want`'s chunk, offset and length, or
    /// else any of them (the caller compares and reports the mismatch).
    pub fn at(&self, want: &Placed) -> Option<(&Placed, Option<&ExtentBlocks>)> {
        let first = self
            .extents
            .partition_point(|p| p.blob_offset < want.blob_offset);
        let same = self.extents[first..]
            .iter()
            .take_while(|p| p.blob_offset == want.blob_offset)
            .count();
        if same == 0 {
            return None;
        }
        let i = (first..first + same)
            .find(|&i| {
                let p = &self.extents[i];
                (p.chunk, p.chunk_offset, p.generation, p.len)
                    == (want.chunk, want.chunk_offset, want.generation, want.len)
            })
            .unwrap_or(first);
        Some((&self.extents[i], self.blocks[i].as_ref()))
    }
}

/// Packs extents into one blob, up to a target size.
pub struct BlobBuilder {
    id: BlobId,
    target_bytes: u64,
    entries: Vec<Placed>,
    blocks: Vec<u32>,
    /// Index of each extent's first block CRC.
    first_block: Vec<u32>,
    payload: Vec<u8>,
    /// 0: write format 1 (no block CRCs).
    block_shift: u8,
}

impl BlobBuilder {
    /// A builder for blob `id` of about `target_bytes` (a single extent may exceed it; more
    /// are refused once it is reached), in the current format with 1 MiB block CRCs.
    pub fn new(id: BlobId, target_bytes: u64) -> BlobBuilder {
        Self::with_block_shift(id, target_bytes, BLOCK_SHIFT)
    }

    /// As [`BlobBuilder::new`] with blocks of `1 << shift` bytes (1 <= shift <= 32).
    pub fn with_block_shift(id: BlobId, target_bytes: u64, shift: u8) -> BlobBuilder {
        assert!(
            shift >= 1 && u16::from(shift) <= MAX_BLOCK_SHIFT,
            "block shift {shift} out of range"
        );
        BlobBuilder {
            id,
            target_bytes: target_bytes.max(1),
            entries: Vec::new(),
            blocks: Vec::new(),
            first_block: Vec::new(),
            payload: Vec::new(),
            block_shift: shift,
        }
    }

    /// A builder writing format 1 (no block CRCs): blobs written before them must stay
    /// readable, and tests make such blobs with it.
    pub fn v1(id: BlobId, target_bytes: u64) -> BlobBuilder {
        BlobBuilder {
            block_shift: 0,
            ..Self::new(id, target_bytes)
        }
    }

    /// Extents added so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Payload bytes added so far.
    pub fn payload_bytes(&self) -> u64 {
        self.payload.len() as u64
    }

    /// Adds an extent; `Ok(false)` (nothing added) when the blob is full.
    pub fn add(
        &mut self,
        chunk: u64,
        chunk_offset: u64,
        generation: u64,
        data: &[u8],
    ) -> Result<bool, BlobError> {
        let len = u32::try_from(data.len()).map_err(|_| BlobError::TooLarge(data.len() as u64))?;
        if !self.entries.is_empty()
            && self.payload.len() as u64 + u64::from(len) > self.target_bytes
        {
            return Ok(false);
        }
        self.entries.push(Placed {
            chunk,
            chunk_offset,
            generation,
            blob: self.id,
            // Relative to the payload until `finish` knows the table's size.
            blob_offset: self.payload.len() as u64,
            len,
            crc32c: crc32c::crc32c(data),
        });
        if self.block_shift > 0 {
            let first = u32::try_from(self.blocks.len())
                .map_err(|_| BlobError::TooLarge(self.payload.len() as u64))?;
            self.first_block.push(first);
            self.blocks
                .extend(ExtentBlocks::of(data, self.block_shift).crcs);
        } else {
            self.first_block.push(0);
        }
        self.payload.extend_from_slice(data);
        Ok(true)
    }

    /// The blob's bytes and where each extent landed.
    pub fn finish(mut self, created_s: u64) -> (Vec<u8>, Vec<Placed>) {
        let n = self.entries.len();
        let start = payload_offset(n, self.blocks.len());
        let mut table = Vec::with_capacity(ENTRY_BYTES * n + BLOCK_CRC_BYTES * self.blocks.len());
        for (e, first) in self.entries.iter_mut().zip(&self.first_block) {
            e.blob_offset += start;
            table.extend_from_slice(&e.chunk.to_le_bytes());
            table.extend_from_slice(&e.chunk_offset.to_le_bytes());
            table.extend_from_slice(&e.generation.to_le_bytes());
            table.extend_from_slice(&e.blob_offset.to_le_bytes());
            table.extend_from_slice(&e.len.to_le_bytes());
            table.extend_from_slice(&e.crc32c.to_le_bytes());
            table.extend_from_slice(&first.to_le_bytes());
            table.extend_from_slice(&[0u8; 4]);
        }
        for c in &self.blocks {
            table.extend_from_slice(&c.to_le_bytes());
        }
        let version = if self.block_shift == 0 {
            VERSION_1
        } else {
            VERSION
        };
        let mut out = Vec::with_capacity(start as usize + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&u16::from(self.block_shift).to_le_bytes());
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&self.id.0.to_le_bytes());
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&table).to_le_bytes());
        out.extend_from_slice(&created_s.to_le_bytes());
        let hcrc = crc32c::crc32c(&out);
        out.extend_from_slice(&hcrc.to_le_bytes());
        assert_eq!(out.len(), HEADER_BYTES, "header layout");
        out.extend_from_slice(&table);
        out.resize(start as usize, 0);
        out.extend_from_slice(&self.payload);
        assert_eq!(out.len() as u64, start + self.payload.len() as u64);
        (out, self.entries)
    }
}

/// Parses and checks a blob's header (its first [`HEADER_BYTES`]).
pub fn parse_header(b: &[u8]) -> Result<Header, BlobError> {
    if b.len() < HEADER_BYTES {
        return Err(BlobError::Truncated {
            what: "header",
            need: HEADER_BYTES as u64,
            got: b.len() as u64,
        });
    }
    if &b[..8] != MAGIC {
        return Err(BlobError::Magic);
    }
    if crc32c::crc32c(&b[..60]) != le_u32(b, 60) {
        return Err(BlobError::HeaderChecksum);
    }
    let version = le_u16(b, 8);
    if version != VERSION && version != VERSION_1 {
        return Err(BlobError::Version(version));
    }
    let shift = le_u16(b, 10);
    if (version == VERSION_1 && shift != 0)
        || (version == VERSION && (shift == 0 || shift > MAX_BLOCK_SHIFT))
    {
        return Err(BlobError::Layout(format!(
            "block shift {shift} in a version {version} blob"
        )));
    }
    let h = Header {
        version,
        block_shift: shift as u8,
        extents: le_u32(b, 12),
        id: BlobId(u128::from_le_bytes(b[16..32].try_into().expect("16 bytes"))),
        payload_offset: le_u64(b, 32),
        payload_bytes: le_u64(b, 40),
        table_crc32c: le_u32(b, 48),
        created_s: le_u64(b, 52),
    };
    // v2: the block CRC list's length is checked with the table.
    let table_fits = h.payload_offset.is_multiple_of(PAYLOAD_ALIGN)
        && h.payload_offset >= payload_offset(h.extents as usize, 0);
    if (version == VERSION_1 && h.payload_offset != payload_offset(h.extents as usize, 0))
        || !table_fits
    {
        return Err(BlobError::Layout(format!(
            "payload at {} for {} extents",
            h.payload_offset, h.extents
        )));
    }
    Ok(h)
}

/// Parses and checks the extent table: `b` holds at least the blob's first
/// [`Header::table_end`] bytes.
pub fn parse_table(h: &Header, b: &[u8]) -> Result<Vec<Placed>, BlobError> {
    parse_full_table(h, b).map(|t| t.extents)
}

/// [`parse_table`] with each extent's block CRCs (v2).
pub fn parse_full_table(h: &Header, b: &[u8]) -> Result<Table, BlobError> {
    let end = h.table_end();
    if (b.len() as u64) < end {
        return Err(BlobError::Truncated {
            what: "extent table",
            need: end,
            got: b.len() as u64,
        });
    }
    let entries_end = HEADER_BYTES as u64 + ENTRY_BYTES as u64 * u64::from(h.extents);
    let table = &b[HEADER_BYTES..entries_end as usize];
    let mut first_blocks = Vec::with_capacity(h.extents as usize);
    let mut out = Vec::with_capacity(h.extents as usize);
    let mut next = h.payload_offset;
    for e in table.chunks_exact(ENTRY_BYTES) {
        first_blocks.push(le_u32(e, 40));
        let p = Placed {
            chunk: le_u64(e, 0),
            chunk_offset: le_u64(e, 8),
            generation: le_u64(e, 16),
            blob: h.id,
            blob_offset: le_u64(e, 24),
            len: le_u32(e, 32),
            crc32c: le_u32(e, 36),
        };
        // Extents are back to back, in table order, inside the payload.
        if p.blob_offset != next {
            return Err(BlobError::Layout(format!(
                "extent at {} where {} was expected",
                p.blob_offset, next
            )));
        }
        next += u64::from(p.len);
        out.push(p);
    }
    if next != h.blob_bytes() {
        return Err(BlobError::Layout(format!(
            "extents end at {next}, the payload at {}",
            h.blob_bytes()
        )));
    }
    if h.version == VERSION_1 {
        if crc32c::crc32c(table) != h.table_crc32c {
            return Err(BlobError::TableChecksum);
        }
        let blocks = vec![None; out.len()];
        return Ok(Table {
            header: *h,
            extents: out,
            blocks,
        });
    }
    // v2: the block CRC list follows the entries, one run per extent in table order.
    let m: usize = out.iter().map(|p| block_count(p.len, h.block_shift)).sum();
    if h.payload_offset != payload_offset(out.len(), m) {
        return Err(BlobError::Layout(format!(
            "payload at {} for {} extents and {m} block CRCs",
            h.payload_offset,
            out.len()
        )));
    }
    let list_end = entries_end as usize + BLOCK_CRC_BYTES * m;
    if crc32c::crc32c(&b[HEADER_BYTES..list_end]) != h.table_crc32c {
        return Err(BlobError::TableChecksum);
    }
    // The padding is zeros (so every byte before the payload is checked).
    if b[list_end..h.payload_offset as usize]
        .iter()
        .any(|x| *x != 0)
    {
        return Err(BlobError::Layout(
            "non-zero bytes before the payload".into(),
        ));
    }
    let list = &b[entries_end as usize..list_end];
    let mut blocks = Vec::with_capacity(out.len());
    let mut at = 0usize;
    for (p, first) in out.iter().zip(first_blocks) {
        let k = block_count(p.len, h.block_shift);
        if first as usize != at {
            return Err(BlobError::Layout(format!(
                "block CRCs of chunk {:#x} at {first}, {at} expected",
                p.chunk
            )));
        }
        let crcs = (at..at + k)
            .map(|i| le_u32(list, i * BLOCK_CRC_BYTES))
            .collect();
        blocks.push(Some(ExtentBlocks {
            shift: h.block_shift,
            crcs,
        }));
        at += k;
    }
    Ok(Table {
        header: *h,
        extents: out,
        blocks,
    })
}

/// Checks bytes fetched for an extent (a ranged GET) against its length and checksum.
pub fn verify_extent(p: &Placed, bytes: &[u8]) -> Result<(), BlobError> {
    if bytes.len() != p.len as usize {
        return Err(BlobError::Truncated {
            what: "extent",
            need: u64::from(p.len),
            got: bytes.len() as u64,
        });
    }
    if crc32c::crc32c(bytes) != p.crc32c {
        return Err(BlobError::ExtentChecksum {
            chunk: p.chunk,
            chunk_offset: p.chunk_offset,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn extents() -> impl Strategy<Value = Vec<(u64, u64, u64, Vec<u8>)>> {
        proptest::collection::vec(
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..3000),
            ),
            0..20,
        )
    }

    proptest! {
        #[test]
        fn blobs_round_trip(id in any::<u128>(), es in extents(), target in 1u64..40_000, v1 in any::<bool>(), shift in 1u8..14) {
            let mut b = if v1 {
                BlobBuilder::v1(BlobId(id), target)
            } else {
                BlobBuilder::with_block_shift(BlobId(id), target, shift)
            };
            let mut added = Vec::new();
            for (c, o, g, d) in &es {
                if b.add(*c, *o, *g, d).unwrap() {
                    added.push(d.clone());
                } else {
                    break;
                }
            }
            let (blob, placed) = b.finish(1_700_000_000);
            let h = parse_header(&blob).unwrap();
            prop_assert_eq!(h.id, BlobId(id));
            prop_assert_eq!(h.version, if v1 { VERSION_1 } else { VERSION });
            prop_assert_eq!(h.blob_bytes(), blob.len() as u64);
            prop_assert_eq!(parse_table(&h, &blob).unwrap(), placed.clone());
            let t = parse_full_table(&h, &blob).unwrap();
            for (p, d) in placed.iter().zip(&added) {
                let at = p.blob_offset as usize;
                let got = &blob[at..at + p.len as usize];
                prop_assert_eq!(got, d.as_slice());
                prop_assert!(verify_extent(p, got).is_ok());
                let (q, blocks) = t.at(p).unwrap();
                prop_assert_eq!(q, p);
                match blocks {
                    None => prop_assert!(v1),
                    Some(bl) => {
                        prop_assert!(!v1);
                        prop_assert_eq!(bl, &ExtentBlocks::of(d, shift));
                        prop_assert!(bl.check(p).is_ok());
                    }
                }
            }
        }

        /// Any piece of an extent is fetched as the whole blocks around it, checked block by
        /// block; a damaged byte or a short answer is caught; block CRCs that are not the
        /// extent's (per the index's CRC32C) are refused.
        #[test]
        fn pieces_of_extents_read_by_blocks(data in proptest::collection::vec(any::<u8>(), 1..5000), shift in 1u8..11, off in 0u64..6000, len in 0u64..6000, flip in any::<prop::sample::Index>()) {
            let mut b = BlobBuilder::with_block_shift(BlobId(3), 1 << 20, shift);
            b.add(9, 0, 1, &[7; 100]).unwrap();
            b.add(10, 0, 2, &data).unwrap();
            let (mut blob, placed) = b.finish(0);
            let h = parse_header(&blob).unwrap();
            let t = parse_full_table(&h, &blob).unwrap();
            let p = placed[1];
            let bl = t.at(&p).unwrap().1.unwrap().clone();
            prop_assert!(bl.check(&p).is_ok());
            let (first, range) = bl.cover(&p, off, len);
            let block = 1u64 << shift;
            prop_assert!(range.start >= p.blob_offset && range.end <= p.blob_offset + u64::from(p.len));
            prop_assert_eq!((range.start - p.blob_offset) % block, 0);
            prop_assert_eq!(first as u64, (range.start - p.blob_offset) / block);
            let end = (off + len).min(data.len() as u64);
            if off < end {
                // The piece asked for lies inside what is fetched.
                prop_assert!(range.start - p.blob_offset <= off && range.end - p.blob_offset >= end);
            }
            let got = blob[range.start as usize..range.end as usize].to_vec();
            prop_assert!(bl.verify(&p, first, &range, &got).is_ok());
            let fetched = FetchedBlocks { first, range: range.clone(), bytes: got.clone() };
            let want: &[u8] = if off < end { &data[off as usize..end as usize] } else { &[] };
            prop_assert_eq!(fetched.piece(&p, off, len), want);
            if !got.is_empty() {
                prop_assert!(bl.verify(&p, first, &range, &got[..got.len() - 1]).is_err());
                let i = range.start as usize + flip.index(got.len());
                blob[i] ^= 0x10;
                let bad = &blob[range.start as usize..range.end as usize];
                prop_assert!(bl.verify(&p, first, &range, bad).is_err());
            }
            let mut wrong = bl.clone();
            wrong.crcs[0] ^= 1;
            prop_assert!(wrong.check(&p).is_err());
            let mut short = bl.clone();
            short.crcs.push(0);
            prop_assert!(short.check(&p).is_err());
        }

        #[test]
        fn any_flipped_byte_of_header_or_table_is_caught(es in extents(), at in any::<prop::sample::Index>(), v1 in any::<bool>()) {
            let mut b = if v1 {
                BlobBuilder::v1(BlobId(7), 1 << 20)
            } else {
                BlobBuilder::with_block_shift(BlobId(7), 1 << 20, 8)
            };
            for (c, o, g, d) in &es {
                b.add(*c, *o, *g, d).unwrap();
            }
            let (mut blob, placed) = b.finish(0);
            let h = parse_header(&blob).unwrap();
            let i = at.index(h.table_end() as usize);
            blob[i] ^= 0x40;
            let r = parse_header(&blob).and_then(|h| parse_table(&h, &blob));
            prop_assert!(r.is_err(), "flip at {} not caught", i);
            // ...and of an extent's bytes, by its checksum.
            if let Some(p) = placed.iter().find(|p| p.len > 0) {
                let (at, len) = (p.blob_offset as usize, p.len as usize);
                blob[at + len / 2] ^= 1;
                prop_assert!(verify_extent(p, &blob[at..at + len]).is_err());
                prop_assert!(verify_extent(p, &blob[at..at + len - 1]).is_err());
            }
        }

        #[test]
        fn parsers_are_total(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(h) = parse_header(&b) {
                let _ = parse_full_table(&h, &b);
            }
        }
    }

    #[test]
    fn empty_extents_do_not_hide_the_extent_at_their_offset() {
        let mut b = BlobBuilder::with_block_shift(BlobId(5), 1 << 20, 4);
        assert!(b.add(1, 0, 1, &[]).unwrap());
        assert!(b.add(2, 0, 1, &[]).unwrap());
        assert!(b.add(3, 0, 1, &[9; 40]).unwrap());
        let (blob, placed) = b.finish(0);
        assert_eq!(placed[0].blob_offset, placed[2].blob_offset);
        let t = parse_full_table(&parse_header(&blob).unwrap(), &blob).unwrap();
        for p in &placed {
            let (q, blocks) = t.at(p).unwrap();
            assert_eq!(q, p);
            assert!(blocks.unwrap().check(p).is_ok());
        }
        let elsewhere = Placed {
            blob_offset: placed[2].blob_offset + 1,
            ..placed[2]
        };
        assert!(t.at(&elsewhere).is_none());
    }

    #[test]
    fn a_full_blob_refuses_more_and_keys_are_stable() {
        let mut b = BlobBuilder::new(BlobId(1), 10);
        assert!(b.add(1, 0, 1, &[0; 8]).unwrap());
        assert!(!b.add(2, 0, 1, &[0; 8]).unwrap());
        // One extent larger than the target still goes into an empty blob.
        let mut big = BlobBuilder::new(BlobId(2), 10);
        assert!(big.add(1, 0, 1, &[0; 100]).unwrap());
        assert_eq!(
            BlobId(0xab).key("t/"),
            "t/blobs/000000000000000000000000000000ab"
        );
        assert_eq!(
            BlobId(0xab).key(""),
            "blobs/000000000000000000000000000000ab"
        );
        assert_eq!(
            parse_header(b"short"),
            Err(BlobError::Truncated {
                what: "header",
                need: 64,
                got: 5
            })
        );
    }
}

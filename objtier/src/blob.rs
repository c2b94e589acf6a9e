//! The blob format: cold extents packed into one object (64 MiB by default), self-describing
//! so a blob found on the store can be checked and read without the metadata, and every
//! extent checksummed so a truncated or corrupted GET is caught. Pure: no I/O.
//!
//! ```text
//! header (64 bytes, little-endian)
//!   0  8  magic "CFSBLOB1"
//!   8  2  u16 format version (1)
//!  10  2  u16 reserved (0)
//!  12  4  u32 extent count n
//!  16 16  u128 blob id
//!  32  8  u64 payload offset (64 + 48 n, rounded up to 4096)
//!  40  8  u64 payload bytes
//!  48  4  u32 CRC32C of the extent table
//!  52  8  u64 created (seconds since the epoch; diagnostics only)
//!  60  4  u32 CRC32C of bytes 0..60
//! extent table (n x 48 bytes, from byte 64)
//!   0  8  u64 chunk id
//!   8  8  u64 offset of the extent in its chunk
//!  16  8  u64 generation of the chunk the bytes were taken from
//!  24  8  u64 offset of the bytes in the blob
//!  32  4  u32 length
//!  36  4  u32 CRC32C of the bytes
//!  40  8  reserved (0)
//! zeros up to the payload offset, then the extents' bytes back to back
//! ```

/// Bytes of the fixed header.
pub const HEADER_BYTES: usize = 64;
/// Bytes of one extent table entry.
pub const ENTRY_BYTES: usize = 48;
/// The payload starts on this boundary (so ranged GETs of extents are page aligned at start).
pub const PAYLOAD_ALIGN: u64 = 4096;
const MAGIC: &[u8; 8] = b"CFSBLOB1";
const VERSION: u16 = 1;

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
}

impl Header {
    /// Bytes of header plus table: what to GET to learn the extents.
    pub fn table_end(&self) -> u64 {
        (HEADER_BYTES + ENTRY_BYTES * self.extents as usize) as u64
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

fn payload_offset(extents: usize) -> u64 {
    ((HEADER_BYTES + ENTRY_BYTES * extents) as u64).next_multiple_of(PAYLOAD_ALIGN)
}

/// Packs extents into one blob, up to a target size.
pub struct BlobBuilder {
    id: BlobId,
    target_bytes: u64,
    entries: Vec<Placed>,
    payload: Vec<u8>,
}

impl BlobBuilder {
    /// A builder for blob `id` of about `target_bytes` (a single extent may exceed it; more
    /// are refused once it is reached).
    pub fn new(id: BlobId, target_bytes: u64) -> BlobBuilder {
        BlobBuilder {
            id,
            target_bytes: target_bytes.max(1),
            entries: Vec::new(),
            payload: Vec::new(),
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
        self.payload.extend_from_slice(data);
        Ok(true)
    }

    /// The blob's bytes and where each extent landed.
    pub fn finish(mut self, created_s: u64) -> (Vec<u8>, Vec<Placed>) {
        let n = self.entries.len();
        let start = payload_offset(n);
        let mut table = Vec::with_capacity(ENTRY_BYTES * n);
        for e in &mut self.entries {
            e.blob_offset += start;
            table.extend_from_slice(&e.chunk.to_le_bytes());
            table.extend_from_slice(&e.chunk_offset.to_le_bytes());
            table.extend_from_slice(&e.generation.to_le_bytes());
            table.extend_from_slice(&e.blob_offset.to_le_bytes());
            table.extend_from_slice(&e.len.to_le_bytes());
            table.extend_from_slice(&e.crc32c.to_le_bytes());
            table.extend_from_slice(&[0u8; 8]);
        }
        let mut out = Vec::with_capacity(start as usize + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
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
    if version != VERSION {
        return Err(BlobError::Version(version));
    }
    let h = Header {
        extents: le_u32(b, 12),
        id: BlobId(u128::from_le_bytes(b[16..32].try_into().expect("16 bytes"))),
        payload_offset: le_u64(b, 32),
        payload_bytes: le_u64(b, 40),
        table_crc32c: le_u32(b, 48),
        created_s: le_u64(b, 52),
    };
    if h.payload_offset != payload_offset(h.extents as usize) {
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
    let end = h.table_end();
    if (b.len() as u64) < end {
        return Err(BlobError::Truncated {
            what: "extent table",
            need: end,
            got: b.len() as u64,
        });
    }
    let table = &b[HEADER_BYTES..end as usize];
    if crc32c::crc32c(table) != h.table_crc32c {
        return Err(BlobError::TableChecksum);
    }
    let mut out = Vec::with_capacity(h.extents as usize);
    let mut next = h.payload_offset;
    for e in table.chunks_exact(ENTRY_BYTES) {
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
    Ok(out)
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
        fn blobs_round_trip(id in any::<u128>(), es in extents(), target in 1u64..40_000) {
            let mut b = BlobBuilder::new(BlobId(id), target);
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
            prop_assert_eq!(h.blob_bytes(), blob.len() as u64);
            prop_assert_eq!(parse_table(&h, &blob).unwrap(), placed.clone());
            for (p, d) in placed.iter().zip(&added) {
                let at = p.blob_offset as usize;
                let got = &blob[at..at + p.len as usize];
                prop_assert_eq!(got, d.as_slice());
                prop_assert!(verify_extent(p, got).is_ok());
            }
        }

        #[test]
        fn any_flipped_byte_of_header_or_table_is_caught(es in extents(), at in any::<prop::sample::Index>()) {
            let mut b = BlobBuilder::new(BlobId(7), 1 << 20);
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
                let _ = parse_table(&h, &b);
            }
        }
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

//! The wire frame: a fixed 32-byte header and a payload, both checksummed.
//!
//! ```text
//! offset size field
//!      0    2 magic 0xCF 0x5A
//!      2    1 version (1)
//!      3    1 kind (1 request, 2 response, 3 error, 4 region read, 5 ping, 6 pong)
//!      4    4 method (requests and responses) or error code (errors)
//!      8    8 request id (chosen by the caller, echoed in the reply)
//!     16    4 payload length (bytes; at most the receiver's cap)
//!     20    4 crc32c of the payload
//!     24    4 flags (0)
//!     28    4 crc32c of bytes 0..28
//!     32    - payload
//! ```
//! A damaged header means the stream can no longer be framed: the connection is closed. A
//! damaged payload under an intact header is answered with an error for that request only.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame header length.
pub const HEADER_LEN: usize = 32;
/// Magic bytes.
pub const MAGIC: [u8; 2] = [0xCF, 0x5A];
/// Wire version written and accepted.
pub const VERSION: u8 = 1;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A two-sided call.
    Request = 1,
    /// The successful reply to a request or region read.
    Response = 2,
    /// A failed reply; `method` carries the error code, the payload a UTF-8 message.
    Error = 3,
    /// One-sided read of a registered region: payload = key u64, offset u64, len u32.
    RegionRead = 4,
    /// Liveness probe.
    Ping = 5,
    /// Reply to a ping.
    Pong = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Request,
            2 => Kind::Response,
            3 => Kind::Error,
            4 => Kind::RegionRead,
            5 => Kind::Ping,
            6 => Kind::Pong,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Kind.
    pub kind: Kind,
    /// Method or error code.
    pub method: u32,
    /// Request id.
    pub id: u64,
    /// Payload.
    pub payload: Bytes,
}

/// Why bytes are not a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Bad magic, version, kind or header checksum: the stream is out of step.
    #[error("malformed frame header: {0}")]
    BadHeader(&'static str),
    /// The declared payload exceeds the receiver's cap (nothing is allocated for it).
    #[error("frame {id} declares {len} payload bytes, more than the {max}-byte cap")]
    TooLarge {
        /// Request id from the header.
        id: u64,
        /// Declared length.
        len: u32,
        /// The cap.
        max: u32,
    },
    /// The payload does not match its checksum (the header was intact).
    #[error("frame {id}: payload checksum mismatch")]
    PayloadChecksum {
        /// Request id.
        id: u64,
        /// Kind of the damaged frame.
        kind: Kind,
    },
}

/// Encodes a frame into `out`.
pub fn encode(kind: Kind, method: u32, id: u64, payload: &[u8], out: &mut BytesMut) {
    assert!(
        payload.len() <= u32::MAX as usize,
        "payload larger than the wire allows"
    );
    out.reserve(HEADER_LEN + payload.len());
    let start = out.len();
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(kind as u8);
    out.put_u32_le(method);
    out.put_u64_le(id);
    out.put_u32_le(payload.len() as u32);
    out.put_u32_le(crc32c::crc32c(payload));
    out.put_u32_le(0);
    let hcrc = crc32c::crc32c(&out[start..start + 28]);
    out.put_u32_le(hcrc);
    out.put_slice(payload);
}

/// Encodes a frame into a new buffer.
pub fn encode_to_bytes(kind: Kind, method: u32, id: u64, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + payload.len());
    encode(kind, method, id, payload, &mut b);
    b.freeze()
}

/// Incremental decoder with a payload cap.
#[derive(Clone, Copy, Debug)]
pub struct Decoder {
    /// Largest payload accepted.
    pub max_payload: u32,
}

impl Decoder {
    /// Takes one frame off the front of `buf` if a whole one is there. Never allocates more
    /// than the cap for a payload, whatever the header says.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let h = &buf[..HEADER_LEN];
        if h[0..2] != MAGIC {
            return Err(FrameError::BadHeader("bad magic"));
        }
        let stored = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
        if crc32c::crc32c(&h[..28]) != stored {
            return Err(FrameError::BadHeader("header checksum mismatch"));
        }
        if h[2] != VERSION {
            return Err(FrameError::BadHeader("unsupported protocol version"));
        }
        let kind = Kind::from_u8(h[3]).ok_or(FrameError::BadHeader("unknown frame kind"))?;
        let mut r = &h[4..28];
        let method = r.get_u32_le();
        let id = r.get_u64_le();
        let len = r.get_u32_le();
        let pcrc = r.get_u32_le();
        if len > self.max_payload {
            return Err(FrameError::TooLarge {
                id,
                len,
                max: self.max_payload,
            });
        }
        let total = HEADER_LEN + len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        let payload = frame.split_off(HEADER_LEN).freeze();
        if crc32c::crc32c(&payload) != pcrc {
            return Err(FrameError::PayloadChecksum { id, kind });
        }
        Ok(Some(Frame {
            kind,
            method,
            id,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(kind in 1u8..=6, method in any::<u32>(), id in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..2000), split in any::<usize>()) {
            let kind = Kind::from_u8(kind).unwrap();
            let bytes = encode_to_bytes(kind, method, id, &payload);
            let d = Decoder { max_payload: 1 << 20 };
            // Delivered in two pieces: the first gives nothing, the whole gives the frame.
            let cut = split % bytes.len();
            let mut buf = BytesMut::from(&bytes[..cut]);
            prop_assert_eq!(d.decode(&mut buf).unwrap(), None);
            buf.extend_from_slice(&bytes[cut..]);
            let f = d.decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(f, Frame { kind, method, id, payload: Bytes::from(payload) });
            prop_assert!(buf.is_empty());
        }

        /// Random bytes never panic, never yield a frame with a bad checksum, and never make
        /// the decoder reserve more than the cap.
        #[test]
        fn random_bytes_are_rejected_safely(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let d = Decoder { max_payload: 4096 };
            let mut buf = BytesMut::from(&bytes[..]);
            let before = buf.capacity();
            if let Ok(Some(f)) = d.decode(&mut buf) {
                prop_assert!(f.payload.len() <= 4096);
            }
            prop_assert!(buf.capacity() <= before.max(HEADER_LEN + 4096));
        }

        /// Any single flipped byte in a frame is detected.
        #[test]
        fn any_corrupted_byte_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..300), at in any::<usize>(), flip in 1u8..=255) {
            let bytes = encode_to_bytes(Kind::Request, 7, 42, &payload);
            let mut raw = bytes.to_vec();
            let at = at % raw.len();
            raw[at] ^= flip;
            let d = Decoder { max_payload: 1 << 20 };
            let mut buf = BytesMut::from(&raw[..]);
            // The header checksum covers the length, so nothing is left waiting either.
            prop_assert!(d.decode(&mut buf).is_err(), "corrupted byte {} accepted", at);
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut hdr = encode_to_bytes(Kind::Request, 1, 9, &[]).to_vec();
        hdr[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let c = crc32c::crc32c(&hdr[..28]);
        hdr[28..32].copy_from_slice(&c.to_le_bytes());
        let d = Decoder {
            max_payload: 1 << 20,
        };
        let mut buf = BytesMut::from(&hdr[..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(FrameError::TooLarge {
                id: 9,
                len: u32::MAX,
                max: 1 << 20
            })
        );
        assert!(buf.capacity() < 1 << 20);
    }
}

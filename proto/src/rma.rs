//! The one-sided read path's messages (RMA over libfabric; see `docs/architecture.md`, "Reads
//! over RMA"). A client first says hello to a server with its provider and endpoint address;
//! the server answers with its own when it has an endpoint of that provider, or says why the
//! client must use the two-sided path. Reads then go as [`ReadRequest`]s: the server runs the
//! ordinary read and answers either the data itself ([`ReadReply::Inline`]) or where it staged
//! the data in its registered memory ([`ReadReply::Layout`]), which the client pulls with one
//! one-sided read and checks against the CRC32C before the lease runs out.
//!
//! ```text
//! Hello:      u8 version (1) | bytes provider | bytes endpoint address
//! HelloReply: u8 0 (use TCP) | bytes reason
//!           | u8 1 (use RMA) | bytes provider | bytes endpoint address | u32 lease_ms
//!             | u64 client (0: no fabric messages; else the id the client's messages carry)
//! ReadRequest: u16 n | n x u64 released lease | u32 method | payload (a file-system request)
//! ReadReply:  u8 0 (inline) | the file-system reply
//!           | u8 1 (layout) | u64 lease | u64 addr | u64 key | u32 len | u32 crc32c
//! ```
//!
//! With a client id, read requests and their replies travel as two-sided fabric messages
//! instead of TCP calls (at most [`MAX_MESSAGE`] bytes):
//!
//! ```text
//! request: u64 client | u64 request id | ReadRequest
//! reply:   u64 request id | u8 0 | ReadReply
//!                         | u8 1 | bytes reason (read this one over TCP)
//! ```

use cfs_meta::codec::{Reader, Writer};

/// RPC method of a hello (outside the file-system method range).
pub const RMA_HELLO_METHOD: u32 = 0x0100_0010;
/// RPC method of a read that may be answered with a layout.
pub const RMA_READ_METHOD: u32 = 0x0100_0011;
/// Most lease ids a read request hands back.
pub const MAX_RELEASED: usize = 256;
/// Largest fabric message (a request with every lease it may hand back, or an inline reply of
/// a short read).
pub const MAX_MESSAGE: usize = 128 << 10;

const VERSION: u8 = 1;

/// A client's hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The client's libfabric provider (e.g. "verbs", "tcp;ofi_rxm").
    pub provider: String,
    /// The client endpoint's address (provider format).
    pub address: Vec<u8>,
}

/// The server's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelloReply {
    /// No common RDMA-capable provider: use the two-sided path, for this reason.
    Tcp(String),
    /// Reads may be answered with layouts.
    Rma {
        /// The server's provider (the client's).
        provider: String,
        /// The server endpoint's address.
        address: Vec<u8>,
        /// How long a staged read stays in place after the server answers.
        lease_ms: u32,
        /// The id this client's fabric messages carry (0: send requests over TCP).
        client: u64,
    },
}

/// A read request as a fabric message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsgRequest {
    /// The id the server gave the client in its hello reply.
    pub client: u64,
    /// Matches the reply to the request.
    pub id: u64,
    /// The read.
    pub read: ReadRequest,
}

/// A reply as a fabric message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsgReply {
    /// The request's id.
    pub id: u64,
    /// The answer, or why to ask over TCP instead.
    pub reply: Result<ReadReply, String>,
}

impl MsgRequest {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.client);
        w.u64(self.id);
        let mut b = w.0;
        b.extend_from_slice(&self.read.encode());
        b
    }

    /// Parses the wire form.
    pub fn decode(b: &[u8]) -> Option<MsgRequest> {
        let mut r = Reader::new(b);
        let (client, id) = (r.u64()?, r.u64()?);
        Some(MsgRequest {
            client,
            id,
            read: ReadRequest::decode(b.get(16..)?)?,
        })
    }
}

impl MsgReply {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.id);
        match &self.reply {
            Ok(r) => {
                w.u8(0);
                let mut b = w.0;
                b.extend_from_slice(&r.encode());
                b
            }
            Err(why) => {
                w.u8(1);
                w.bytes(why.as_bytes());
                w.0
            }
        }
    }

    /// Parses the wire form.
    pub fn decode(b: &[u8]) -> Option<MsgReply> {
        let mut r = Reader::new(b);
        let id = r.u64()?;
        let reply = match r.u8()? {
            0 => Ok(ReadReply::decode(b.get(9..)?)?),
            1 => {
                let why = String::from_utf8(r.bytes()?).ok()?;
                r.end()?;
                Err(why)
            }
            _ => return None,
        };
        Some(MsgReply { id, reply })
    }
}

/// A read over the RMA path: leases the client is done with, then the file-system request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// Leases whose data the client has read (the server reuses their buffers).
    pub released: Vec<u64>,
    /// The file-system request's method.
    pub method: u32,
    /// The file-system request's payload.
    pub payload: Vec<u8>,
}

/// Where a server staged a read's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Lease id (hand it back in a later [`ReadRequest`]).
    pub lease: u64,
    /// Address to read at (provider addressing).
    pub addr: u64,
    /// Memory-registration key of the server's staging memory.
    pub key: u64,
    /// Bytes staged.
    pub len: u32,
    /// CRC32C of the staged bytes.
    pub crc32c: u32,
}

/// The server's answer to a [`ReadRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadReply {
    /// The file-system reply itself (small reads, errors, no staging buffer free).
    Inline(Vec<u8>),
    /// The data is staged: read it one-sided.
    Layout(Layout),
}

impl Hello {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(VERSION);
        w.bytes(self.provider.as_bytes());
        w.bytes(&self.address);
        w.0
    }

    /// Parses the wire form.
    pub fn decode(b: &[u8]) -> Option<Hello> {
        let mut r = Reader::new(b);
        if r.u8()? != VERSION {
            return None;
        }
        let provider = String::from_utf8(r.bytes()?).ok()?;
        let address = r.bytes()?;
        r.end()?;
        Some(Hello { provider, address })
    }
}

impl HelloReply {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            HelloReply::Tcp(why) => {
                w.u8(0);
                w.bytes(why.as_bytes());
            }
            HelloReply::Rma {
                provider,
                address,
                lease_ms,
                client,
            } => {
                w.u8(1);
                w.bytes(provider.as_bytes());
                w.bytes(address);
                w.u32(*lease_ms);
                w.u64(*client);
            }
        }
        w.0
    }

    /// Parses the wire form.
    pub fn decode(b: &[u8]) -> Option<HelloReply> {
        let mut r = Reader::new(b);
        let v = match r.u8()? {
            0 => HelloReply::Tcp(String::from_utf8(r.bytes()?).ok()?),
            1 => HelloReply::Rma {
                provider: String::from_utf8(r.bytes()?).ok()?,
                address: r.bytes()?,
                lease_ms: r.u32()?,
                client: r.u64()?,
            },
            _ => return None,
        };
        r.end()?;
        Some(v)
    }
}

impl ReadRequest {
    /// Wire form (at most [`MAX_RELEASED`] leases: the caller keeps the rest for later).
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.released.len() <= MAX_RELEASED,
            "too many released leases"
        );
        let mut w = Writer::default();
        w.u16(self.released.len() as u16);
        for l in &self.released {
            w.u64(*l);
        }
        w.u32(self.method);
        let mut b = w.0;
        b.extend_from_slice(&self.payload);
        b
    }

    /// Parses the wire form.
    pub fn decode(b: &[u8]) -> Option<ReadRequest> {
        let mut r = Reader::new(b);
        let n = usize::from(r.u16()?);
        if n > MAX_RELEASED {
            return None;
        }
        let released = (0..n).map(|_| r.u64()).collect::<Option<Vec<_>>>()?;
        let method = r.u32()?;
        let used = 2 + 8 * n + 4;
        Some(ReadRequest {
            released,
            method,
            payload: b.get(used..)?.to_vec(),
        })
    }
}

impl ReadReply {
    /// Wire form.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ReadReply::Inline(reply) => {
                let mut b = Vec::with_capacity(1 + reply.len());
                b.push(0);
                b.extend_from_slice(reply);
                b
            }
            ReadReply::Layout(l) => {
                let mut w = Writer::default();
                w.u8(1);
                w.u64(l.lease);
                w.u64(l.addr);
                w.u64(l.key);
                w.u32(l.len);
                w.u32(l.crc32c);
                w.0
            }
        }
    }

    /// Parses the wire form.
    pub fn decode(b: &[u8]) -> Option<ReadReply> {
        match *b.first()? {
            0 => Some(ReadReply::Inline(b[1..].to_vec())),
            1 => {
                let mut r = Reader::new(&b[1..]);
                let l = Layout {
                    lease: r.u64()?,
                    addr: r.u64()?,
                    key: r.u64()?,
                    len: r.u32()?,
                    crc32c: r.u32()?,
                };
                r.end()?;
                Some(ReadReply::Layout(l))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hellos_round_trip(provider in ".{0,20}", address in proptest::collection::vec(any::<u8>(), 0..64), lease_ms in any::<u32>()) {
            let h = Hello { provider: provider.clone(), address: address.clone() };
            prop_assert_eq!(Hello::decode(&h.encode()), Some(h));
            for r in [HelloReply::Tcp(provider.clone()), HelloReply::Rma { provider, address, lease_ms, client: u64::from(lease_ms) * 3 }] {
                let b = r.encode();
                prop_assert_eq!(HelloReply::decode(&b), Some(r));
                prop_assert_eq!(HelloReply::decode(&b[..b.len() - 1]), None);
            }
        }

        #[test]
        fn reads_round_trip(released in proptest::collection::vec(any::<u64>(), 0..MAX_RELEASED), method in any::<u32>(),
                            payload in proptest::collection::vec(any::<u8>(), 0..100),
                            lease in any::<u64>(), addr in any::<u64>(), key in any::<u64>(), len in any::<u32>(), crc32c in any::<u32>()) {
            let q = ReadRequest { released, method, payload: payload.clone() };
            prop_assert_eq!(ReadRequest::decode(&q.encode()), Some(q.clone()));
            let m = MsgRequest { client: addr, id: key, read: q };
            prop_assert_eq!(MsgRequest::decode(&m.encode()), Some(m));
            prop_assert_eq!(MsgReply::decode(&MsgReply { id: lease, reply: Err("busy".into()) }.encode()),
                Some(MsgReply { id: lease, reply: Err("busy".into()) }));
            for r in [ReadReply::Inline(payload), ReadReply::Layout(Layout { lease, addr, key, len, crc32c })] {
                prop_assert_eq!(ReadReply::decode(&r.encode()), Some(r.clone()));
                let m = MsgReply { id: lease, reply: Ok(r) };
                prop_assert_eq!(MsgReply::decode(&m.encode()), Some(m));
            }
        }

        #[test]
        fn decoders_are_total(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = (Hello::decode(&b), HelloReply::decode(&b), ReadRequest::decode(&b), ReadReply::decode(&b));
            let _ = (MsgRequest::decode(&b), MsgReply::decode(&b));
        }
    }

    #[test]
    fn short_and_unknown_forms_are_refused() {
        assert_eq!(ReadReply::decode(&[]), None);
        assert_eq!(ReadReply::decode(&[2]), None);
        assert_eq!(ReadReply::decode(&[1, 0, 0]), None);
        let mut h = Hello {
            provider: "verbs".into(),
            address: vec![1, 2],
        }
        .encode();
        h[0] = 9;
        assert_eq!(Hello::decode(&h), None);
        assert_eq!(ReadRequest::decode(&[0xff, 0xff]), None);
    }
}

//! The connection handshake: before any frame, a client proves it knows the cluster secret
//! (from the join token) without sending it. Every connection does the handshake; a server
//! without a secret accepts any client, a server with one refuses a client that cannot prove
//! it (with a verdict the client turns into a clear error, not a dropped connection).
//!
//! ```text
//! server -> client: 8 bytes "CFSHELO1" | u8 flags (bit 0: a token is required) | 32 bytes nonce
//! client -> server: 32 bytes proof = blake3 keyed hash (key = secret) of
//!                   "cfs-auth-v1" | nonce    (all zeros when the client has no secret)
//! server -> client: u8 verdict (0 accepted, 1 refused)
//! ```
//!
//! The nonce is fresh per connection, so a recorded proof is useless on another connection.
//! This authenticates; it does not encrypt (traffic stays readable on the wire).

use std::io::{Read, Write};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A cluster secret (32 bytes, shared by every node and client holding the join token).
pub type Secret = [u8; 32];

const MAGIC: &[u8; 8] = b"CFSHELO1";
const HELLO_LEN: usize = 8 + 1 + 32;
const DOMAIN: &[u8] = b"cfs-auth-v1";

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The server requires a token and the client has none.
    #[error(
        "the server requires a cluster token (use the join token printed by `cfs-dataplane init`)"
    )]
    TokenRequired,
    /// The server refused the proof: wrong token (another cluster, or a rotated secret).
    #[error("the server refused this cluster token (wrong token, or another cluster)")]
    Refused,
    /// The peer does not speak this protocol (or is too old).
    #[error("not a ClaudeFS server or client: {0}")]
    Protocol(String),
    /// I/O failed or timed out during the handshake.
    #[error("handshake failed: {0}")]
    Io(String),
}

/// The proof for `nonce` under `secret`.
pub fn proof(secret: &Secret, nonce: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(secret);
    h.update(DOMAIN);
    h.update(nonce);
    *h.finalize().as_bytes()
}

/// 32 unpredictable bytes from the kernel.
pub fn random32() -> std::io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

fn hello(required: bool, nonce: &[u8; 32]) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8] = u8::from(required);
    h[9..].copy_from_slice(nonce);
    h
}

fn parse_hello(h: &[u8; HELLO_LEN]) -> Result<(bool, [u8; 32]), AuthError> {
    if &h[..8] != MAGIC {
        return Err(AuthError::Protocol("bad greeting".into()));
    }
    let mut nonce = [0u8; 32];
    nonce.copy_from_slice(&h[9..]);
    Ok((h[8] & 1 != 0, nonce))
}

fn answer(
    secret: Option<&Secret>,
    required: bool,
    nonce: &[u8; 32],
) -> Result<[u8; 32], AuthError> {
    match secret {
        Some(s) => Ok(proof(s, nonce)),
        None if required => Err(AuthError::TokenRequired),
        None => Ok([0u8; 32]),
    }
}

fn verdict(v: u8) -> Result<(), AuthError> {
    match v {
        0 => Ok(()),
        _ => Err(AuthError::Refused),
    }
}

/// Server side: greets, checks the proof, answers the verdict. `Err` means the connection
/// must be closed (the client was told when it was refused).
pub async fn server<S>(
    sock: &mut S,
    secret: Option<&Secret>,
    timeout: Duration,
) -> Result<(), AuthError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let io = |e: std::io::Error| AuthError::Io(e.to_string());
    let nonce = random32().map_err(io)?;
    let run = async {
        sock.write_all(&hello(secret.is_some(), &nonce))
            .await
            .map_err(io)?;
        let mut p = [0u8; 32];
        sock.read_exact(&mut p).await.map_err(io)?;
        // Constant-time comparison (blake3::Hash's equality).
        let ok =
            secret.is_none_or(|s| blake3::Hash::from(p) == blake3::Hash::from(proof(s, &nonce)));
        sock.write_all(&[u8::from(!ok)]).await.map_err(io)?;
        if ok {
            Ok(())
        } else {
            Err(AuthError::Refused)
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| AuthError::Io("timed out".into()))?
}

/// Client side (async).
pub async fn client<S>(
    sock: &mut S,
    secret: Option<&Secret>,
    timeout: Duration,
) -> Result<(), AuthError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let io = |e: std::io::Error| AuthError::Io(e.to_string());
    let run = async {
        let mut h = [0u8; HELLO_LEN];
        sock.read_exact(&mut h).await.map_err(io)?;
        let (required, nonce) = parse_hello(&h)?;
        let a = answer(secret, required, &nonce)?;
        sock.write_all(&a).await.map_err(io)?;
        let mut v = [0u8; 1];
        sock.read_exact(&mut v).await.map_err(io)?;
        verdict(v[0])
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| AuthError::Io("timed out".into()))?
}

/// Client side (blocking socket; the caller sets its timeouts).
pub fn client_blocking(
    sock: &mut std::net::TcpStream,
    secret: Option<&Secret>,
) -> Result<(), AuthError> {
    let io = |e: std::io::Error| AuthError::Io(e.to_string());
    let mut h = [0u8; HELLO_LEN];
    sock.read_exact(&mut h).map_err(io)?;
    let (required, nonce) = parse_hello(&h)?;
    let a = answer(secret, required, &nonce)?;
    sock.write_all(&a).map_err(io)?;
    let mut v = [0u8; 1];
    sock.read_exact(&mut v).map_err(io)?;
    verdict(v[0])
}

/// Lowercase hex of a secret (tokens, files).
pub fn to_hex(s: &Secret) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits.
pub fn from_hex(h: &str) -> Option<Secret> {
    if h.len() != 64 || !h.is_ascii() {
        return None;
    }
    let mut s = [0u8; 32];
    for (i, out) in s.iter_mut().enumerate() {
        *out = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(s)
}

/// A join token: the cluster secret and where to reach the cluster,
/// `cfs1:<64 hex digits>@host:port[,host:port...]`. Anyone holding it may join nodes and mount.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The cluster secret.
    pub secret: Secret,
    /// RPC addresses of members (any of them will do).
    pub addrs: Vec<String>,
}

impl JoinToken {
    /// Parses a token; `None` if it is not one.
    pub fn parse(s: &str) -> Option<JoinToken> {
        let rest = s.trim().strip_prefix("cfs1:")?;
        let (hex, addrs) = rest.split_once('@')?;
        let addrs: Vec<String> = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        if addrs.is_empty() {
            return None;
        }
        Some(JoinToken {
            secret: from_hex(hex)?,
            addrs,
        })
    }

    /// Whether `s` looks like a token (rather than a list of addresses).
    pub fn looks_like(s: &str) -> bool {
        s.trim().starts_with("cfs1:")
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cfs1:{}@{}", to_hex(&self.secret), self.addrs.join(","))
    }
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret by accident.
        write!(f, "JoinToken(cfs1:<secret>@{})", self.addrs.join(","))
    }
}

/// Splits a server argument: a join token (addresses and secret) or comma-separated
/// addresses (no secret). `Err` for something that starts like a token but is malformed.
pub fn servers_arg(arg: &str) -> Result<(Vec<String>, Option<Secret>), String> {
    if JoinToken::looks_like(arg) {
        let t = JoinToken::parse(arg)
            .ok_or("malformed join token (expected cfs1:<64 hex digits>@host:port[,...])")?;
        return Ok((t.addrs, Some(t.secret)));
    }
    let addrs: Vec<String> = arg
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if addrs.is_empty() {
        return Err("no server address given".into());
    }
    Ok((addrs, None))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_round_trip() {
        let t = JoinToken {
            secret: [3u8; 32],
            addrs: vec!["10.0.0.1:7411".into(), "10.0.0.2:7411".into()],
        };
        assert_eq!(JoinToken::parse(&t.to_string()), Some(t.clone()));
        assert!(!format!("{t:?}").contains("0303"));
        assert_eq!(JoinToken::parse("cfs1:abc@x"), None);
        assert!(servers_arg("cfs1:zz@a").is_err());
        assert_eq!(
            servers_arg("a:1, b:2").unwrap(),
            (vec!["a:1".into(), "b:2".into()], None)
        );
    }

    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let s = [0xa5u8; 32];
        assert_eq!(from_hex(&to_hex(&s)), Some(s));
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn proofs_depend_on_secret_and_nonce() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let n = [7u8; 32];
        assert_ne!(proof(&a, &n), proof(&b, &n));
        assert_ne!(proof(&a, &n), proof(&a, &[8u8; 32]));
        assert_eq!(proof(&a, &n), proof(&a, &n));
    }
}

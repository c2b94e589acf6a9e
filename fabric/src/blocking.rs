//! A blocking client for callers that are threads, not tasks (the FUSE workers): each call
//! takes an idle connection from a small pool (or opens one, with back-off), writes the
//! request and reads the reply on the calling thread. No runtime and no thread hand-off, so a
//! round trip costs two wake-ups instead of about six (measured: they dominated `stat`).

use crate::frame::{self, Decoder, Kind};
use crate::{ClientConfig, RpcError};
use bytes::{Bytes, BytesMut};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Blocking client for one server; share it between threads.
pub struct BlockingClient {
    addr: String,
    cfg: ClientConfig,
    idle: Mutex<Vec<TcpStream>>,
    next_id: AtomicU64,
}

/// Connects to the first address `addr` resolves to that answers within `timeout`.
fn connect_within(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolves to nothing");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Whether the peer has not closed an idle pooled connection (a cheap non-blocking peek).
fn still_open(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let open = match s.peek(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    };
    open && s.set_nonblocking(false).is_ok()
}

impl BlockingClient {
    /// A client for `addr` ("host:port"); connects on demand.
    pub fn new(addr: impl Into<String>, cfg: ClientConfig) -> BlockingClient {
        BlockingClient {
            addr: addr.into(),
            cfg,
            idle: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn checkout(&self) -> Result<TcpStream, RpcError> {
        loop {
            let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(s) = pooled else { break };
            if still_open(&s) {
                return Ok(s);
            }
            // The server closed it (restart, idle timeout): try the next one or reconnect.
        }
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let mut backoff = self.cfg.initial_backoff;
        loop {
            // A bounded connect: a plain connect() to a host cut off by a partition waits for
            // the kernel's SYN retries (minutes), not for our deadline.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10));
            match connect_within(&self.addr, left) {
                Ok(mut s) => {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(self.cfg.connect_timeout));
                    let _ = s.set_write_timeout(Some(self.cfg.connect_timeout));
                    crate::auth::client_blocking(&mut s, self.cfg.secret.as_ref())
                        .map_err(|e| crate::handshake_error(&self.addr, e))?;
                    return Ok(s);
                }
                Err(e) if Instant::now() + backoff < deadline => {
                    tracing::debug!(addr = %self.addr, "connect failed ({e}); retrying in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.cfg.max_backoff);
                }
                Err(e) => {
                    return Err(RpcError::Connect {
                        addr: self.addr.clone(),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    /// Two-sided call with the configured request timeout.
    pub fn call(&self, method: u32, payload: &[u8]) -> Result<Bytes, RpcError> {
        if payload.len() > self.cfg.max_payload as usize {
            return Err(RpcError::TooLarge {
                len: payload.len(),
                max: self.cfg.max_payload,
            });
        }
        let mut sock = self.checkout()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout = self.cfg.request_timeout;
        let addr = &self.addr;
        let lost = |e: std::io::Error| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                RpcError::Timeout {
                    addr: addr.clone(),
                    method,
                    timeout,
                }
            } else {
                RpcError::ConnectionLost {
                    addr: addr.clone(),
                    reason: e.to_string(),
                }
            }
        };
        // A broken connection from the pool fails here; the caller's retry gets a fresh one.
        sock.set_write_timeout(Some(timeout)).map_err(lost)?;
        sock.set_read_timeout(Some(timeout)).map_err(lost)?;
        sock.write_all(&frame::encode_to_bytes(Kind::Request, method, id, payload))
            .map_err(lost)?;
        let decoder = Decoder {
            max_payload: self.cfg.max_payload,
        };
        let mut buf = BytesMut::with_capacity(4096);
        let started = Instant::now();
        let reply = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) if f.id == id => break f,
                Ok(Some(_)) => continue, // a late reply to a request that timed out earlier
                Ok(None) => {}
                Err(e) => {
                    return Err(RpcError::Protocol {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    })
                }
            }
            if started.elapsed() > timeout {
                return Err(RpcError::Timeout {
                    addr: addr.clone(),
                    method,
                    timeout,
                });
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = sock.read(&mut chunk).map_err(lost)?;
            if n == 0 {
                return Err(RpcError::ConnectionLost {
                    addr: addr.clone(),
                    reason: "server closed the connection".into(),
                });
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        if buf.is_empty() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sock);
        }
        crate::reply_result(reply, addr)
    }

    /// Calls, retrying once on a fresh connection if a pooled one turned out to be dead
    /// before anything was sent (only for idempotent requests).
    pub fn call_idempotent(&self, method: u32, payload: &[u8]) -> Result<Bytes, RpcError> {
        match self.call(method, payload) {
            Err(RpcError::ConnectionLost { .. }) => self.call(method, payload),
            r => r,
        }
    }

    /// Round trip with no work on the server.
    pub fn ping(&self) -> Result<(), RpcError> {
        let mut sock = self.checkout()?;
        let t = Duration::from_secs(5).min(self.cfg.request_timeout);
        let io = |e: std::io::Error| RpcError::ConnectionLost {
            addr: self.addr.clone(),
            reason: e.to_string(),
        };
        sock.set_read_timeout(Some(t)).map_err(io)?;
        sock.write_all(&frame::encode_to_bytes(Kind::Ping, 0, 0, &[]))
            .map_err(io)?;
        let mut hdr = [0u8; frame::HEADER_LEN];
        sock.read_exact(&mut hdr).map_err(io)?;
        let mut buf = BytesMut::from(&hdr[..]);
        match (Decoder { max_payload: 0 }).decode(&mut buf) {
            Ok(Some(f)) if f.kind == Kind::Pong => {
                self.idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(sock);
                Ok(())
            }
            _ => Err(RpcError::Protocol {
                addr: self.addr.clone(),
                reason: "bad ping reply".into(),
            }),
        }
    }
}

/// Blocking calls to any of several servers (the members of a cluster): a call goes to the
/// server that answered last; if it cannot be reached at all (nothing was sent), or answers
/// Busy (it did not run the request), the next one is tried, until every server has been tried
/// for `total_timeout`. A request that was sent
/// and then lost or timed out is not retried elsewhere (it may have run): the caller sees the
/// error, and the next call starts with the next server.
pub struct FailoverClient {
    clients: Vec<BlockingClient>,
    current: std::sync::atomic::AtomicUsize,
    total_timeout: Duration,
}

impl FailoverClient {
    /// Clients for `addrs` (at least one); each connection attempt is bounded by
    /// `cfg.connect_timeout`, the whole search for a reachable server by `total_timeout`.
    pub fn new(addrs: &[String], cfg: ClientConfig, total_timeout: Duration) -> FailoverClient {
        assert!(!addrs.is_empty(), "a failover client needs an address");
        FailoverClient {
            clients: addrs
                .iter()
                .map(|a| BlockingClient::new(a.clone(), cfg.clone()))
                .collect(),
            current: std::sync::atomic::AtomicUsize::new(0),
            total_timeout,
        }
    }

    fn each<T>(
        &self,
        first: Option<usize>,
        f: impl Fn(&BlockingClient) -> Result<T, RpcError>,
    ) -> Result<T, RpcError> {
        let n = self.clients.len();
        let start = Instant::now();
        let mut i = first.unwrap_or_else(|| self.current.load(Ordering::Relaxed)) % n;
        let mut tried = 0;
        loop {
            match f(&self.clients[i]) {
                // Unreachable, or the server says it did not run the request and cannot now
                // (e.g. a cluster member cut off from its leader): try the next server.
                Err(
                    e @ (RpcError::Connect { .. }
                    | RpcError::Remote {
                        code: crate::ErrorCode::Busy,
                        ..
                    }),
                ) => {
                    tried += 1;
                    if tried >= n && start.elapsed() >= self.total_timeout {
                        return Err(e);
                    }
                    if tried % n == 0 {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    i = (i + 1) % n;
                }
                Err(e @ (RpcError::Timeout { .. } | RpcError::ConnectionLost { .. })) => {
                    // It may have run, so it is not retried; but the next call goes elsewhere
                    // (a server cut off by a partition times out rather than refusing).
                    self.current.store((i + 1) % n, Ordering::Relaxed);
                    return Err(e);
                }
                other => {
                    self.current.store(i, Ordering::Relaxed);
                    return other;
                }
            }
        }
    }

    /// A two-sided call (see the type's documentation for failover).
    pub fn call(&self, method: u32, payload: &[u8]) -> Result<Bytes, RpcError> {
        self.each(None, |c| c.call(method, payload))
    }

    /// [`FailoverClient::call`] starting with server `first` (an index into the addresses, e.g.
    /// the server known to lead what the request is about) instead of the last one that
    /// answered; failover goes on from there.
    pub fn call_at(&self, first: usize, method: u32, payload: &[u8]) -> Result<Bytes, RpcError> {
        self.each(Some(first), |c| c.call(method, payload))
    }

    /// [`FailoverClient::call`] (from `first` when given) that also says which server
    /// answered (an index into the addresses): for replies that name that server's memory.
    pub fn call_where(
        &self,
        first: Option<usize>,
        method: u32,
        payload: &[u8],
    ) -> Result<(usize, Bytes), RpcError> {
        let n = self.clients.len();
        self.each(first, |c| {
            let r = c.call(method, payload)?;
            let i = self
                .clients
                .iter()
                .position(|x| std::ptr::eq(x, c))
                .unwrap_or(n);
            Ok((i, r))
        })
    }

    /// One call to server `i` only (no failover).
    pub fn call_one(&self, i: usize, method: u32, payload: &[u8]) -> Result<Bytes, RpcError> {
        match self.clients.get(i) {
            Some(c) => c.call(method, payload),
            None => Err(RpcError::Connect {
                addr: format!("server #{i}"),
                reason: "no such server".into(),
            }),
        }
    }

    /// The server the next call without a preference goes to.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.clients.len()
    }

    /// How many servers this client knows.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Always false: a failover client has at least one server.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The address of server `i`.
    pub fn addr(&self, i: usize) -> Option<&str> {
        self.clients.get(i).map(|c| c.addr.as_str())
    }

    /// The index of the server at `addr`, if it is one of this client's.
    pub fn index_of(&self, addr: &str) -> Option<usize> {
        self.clients.iter().position(|c| c.addr == addr)
    }

    /// A round trip to whichever server answers.
    pub fn ping(&self) -> Result<(), RpcError> {
        self.each(None, BlockingClient::ping)
    }
}

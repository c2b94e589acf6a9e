//! TCP client: one connection per server, many requests in flight on it (matched by id),
//! per-request timeouts, and reconnection with exponential back-off when the connection is
//! gone. A request whose connection drops fails with `ConnectionLost` (it may have run); the
//! caller decides whether it is safe to retry.

use crate::frame::{self, Decoder, Frame, FrameError, Kind};
use crate::{RegionKey, RpcError};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Largest reply payload accepted.
    pub max_payload: u32,
    /// Default timeout of a request.
    pub request_timeout: Duration,
    /// How long to keep trying to (re)connect before a call fails.
    pub connect_timeout: Duration,
    /// First back-off between connection attempts (doubles up to `max_backoff`).
    pub initial_backoff: Duration,
    /// Longest back-off between attempts.
    pub max_backoff: Duration,
    /// Frames queued for the socket before callers wait.
    pub send_queue: usize,
    /// Cluster secret for the connection handshake (see [`crate::auth`]).
    pub secret: Option<crate::Secret>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_payload: 64 << 20,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            send_queue: 256,
            secret: None,
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Frame, RpcError>>>>>;

struct Conn {
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    alive: Arc<AtomicBool>,
}

/// A connection to one server, shared by any number of tasks (clone it freely).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    cfg: ClientConfig,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    next_id: AtomicU64,
}

fn lock(
    p: &Pending,
) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Result<Frame, RpcError>>>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// A client for `addr` ("host:port"); connects lazily on the first call.
    pub fn new(addr: impl Into<String>, cfg: ClientConfig) -> Client {
        Client {
            inner: Arc::new(Inner {
                addr: addr.into(),
                cfg,
                conn: tokio::sync::Mutex::new(None),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The server address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    async fn connection(&self) -> Result<Arc<Conn>, RpcError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if c.alive.load(Ordering::Acquire) {
                return Ok(Arc::clone(c));
            }
        }
        let cfg = &self.inner.cfg;
        let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
        let mut backoff = cfg.initial_backoff;
        let sock = loop {
            let attempt =
                tokio::time::timeout_at(deadline, TcpStream::connect(&self.inner.addr)).await;
            match attempt {
                Ok(Ok(s)) => break s,
                Ok(Err(e)) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!(addr = %self.inner.addr, "connect failed ({e}); retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cfg.max_backoff);
                }
                Ok(Err(e)) => {
                    return Err(RpcError::Connect {
                        addr: self.inner.addr.clone(),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(RpcError::Connect {
                        addr: self.inner.addr.clone(),
                        reason: format!("no connection within {:?}", cfg.connect_timeout),
                    })
                }
            }
        };
        let _ = sock.set_nodelay(true);
        let mut sock = sock;
        crate::auth::client(&mut sock, cfg.secret.as_ref(), cfg.connect_timeout)
            .await
            .map_err(|e| crate::handshake_error(&self.inner.addr, e))?;
        let conn = Arc::new(start_conn(sock, self.inner.addr.clone(), cfg));
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    async fn roundtrip(
        &self,
        kind: Kind,
        method: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        if payload.len() > self.inner.cfg.max_payload as usize {
            return Err(RpcError::TooLarge {
                len: payload.len(),
                max: self.inner.cfg.max_payload,
            });
        }
        let conn = self.connection().await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&conn.pending).insert(id, tx);
        // The reader marks the connection dead before failing what is pending: a request
        // registered after that sees it here instead of waiting for its timeout.
        if !conn.alive.load(Ordering::Acquire) {
            lock(&conn.pending).remove(&id);
            return Err(RpcError::ConnectionLost {
                addr: self.inner.addr.clone(),
                reason: "connection closed".into(),
            });
        }
        let bytes = frame::encode_to_bytes(kind, method, id, payload);
        let addr = &self.inner.addr;
        let lost = |reason: &str| RpcError::ConnectionLost {
            addr: addr.clone(),
            reason: reason.into(),
        };
        let sent = tokio::time::timeout(timeout, conn.tx.send(bytes)).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                lock(&conn.pending).remove(&id);
                return Err(lost("connection closed while sending"));
            }
            Err(_) => {
                lock(&conn.pending).remove(&id);
                return Err(RpcError::Timeout {
                    addr: addr.clone(),
                    method,
                    timeout,
                });
            }
        }
        let reply = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(lost("connection closed")),
            Err(_) => {
                lock(&conn.pending).remove(&id);
                return Err(RpcError::Timeout {
                    addr: addr.clone(),
                    method,
                    timeout,
                });
            }
        };
        crate::reply_result(reply, addr)
    }

    /// Two-sided call with the default timeout.
    pub async fn call(&self, method: u32, payload: &[u8]) -> Result<Bytes, RpcError> {
        self.call_timeout(method, payload, self.inner.cfg.request_timeout)
            .await
    }

    /// Two-sided call with an explicit timeout.
    pub async fn call_timeout(
        &self,
        method: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        self.roundtrip(Kind::Request, method, payload, timeout)
            .await
    }

    /// One-sided read of `len` bytes at `offset` of the server's region `key`.
    pub async fn read_region(
        &self,
        key: RegionKey,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, RpcError> {
        let mut p = BytesMut::with_capacity(20);
        p.put_u64_le(key.0);
        p.put_u64_le(offset);
        p.put_u32_le(len);
        let data = self
            .roundtrip(Kind::RegionRead, 0, &p, self.inner.cfg.request_timeout)
            .await?;
        if data.len() != len as usize {
            return Err(RpcError::Protocol {
                addr: self.inner.addr.clone(),
                reason: format!("region read returned {} bytes, asked for {len}", data.len()),
            });
        }
        Ok(data)
    }

    /// Round trip with no work on the server.
    pub async fn ping(&self) -> Result<(), RpcError> {
        self.roundtrip(Kind::Ping, 0, &[], self.inner.cfg.request_timeout)
            .await
            .map(|_| ())
    }
}

fn start_conn(sock: TcpStream, addr: String, cfg: &ClientConfig) -> Conn {
    let (mut rd, mut wr) = sock.into_split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(cfg.send_queue);
    let pending: Pending = Arc::default();
    let alive = Arc::new(AtomicBool::new(true));
    let (p2, a2, a3) = (Arc::clone(&pending), Arc::clone(&alive), Arc::clone(&alive));
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                a3.store(false, Ordering::Release);
                break;
            }
        }
    });
    let decoder = Decoder {
        max_payload: cfg.max_payload,
    };
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 << 10);
        let reason = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => {
                    if let Some(w) = lock(&p2).remove(&f.id) {
                        let _ = w.send(Ok(f));
                    }
                    continue;
                }
                Ok(None) => {}
                Err(FrameError::PayloadChecksum { id, .. }) => {
                    if let Some(w) = lock(&p2).remove(&id) {
                        let _ = w.send(Err(RpcError::Protocol {
                            addr: addr.clone(),
                            reason: "reply payload checksum mismatch".into(),
                        }));
                    }
                    continue;
                }
                Err(e) => break format!("{e}"),
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => break "server closed the connection".to_string(),
                Ok(_) => {}
                Err(e) => break e.to_string(),
            }
        };
        a2.store(false, Ordering::Release);
        for (_, w) in lock(&p2).drain() {
            let _ = w.send(Err(RpcError::ConnectionLost {
                addr: addr.clone(),
                reason: reason.clone(),
            }));
        }
    });
    Conn { tx, pending, alive }
}

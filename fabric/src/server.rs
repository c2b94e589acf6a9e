//! TCP server: accepts connections, decodes frames, runs requests concurrently (bounded per
//! connection), answers region reads from the region table, and writes replies in completion
//! order through one writer task per connection.

use crate::frame::{self, Decoder, Frame, FrameError, Kind};
use crate::region::{RegionError, RegionKey, RegionTable};
use crate::{ErrorCode, ServiceError};
use bytes::{Buf, Bytes, BytesMut};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

/// What a service method returns.
pub type ServiceFuture = Pin<Box<dyn Future<Output = Result<Bytes, ServiceError>> + Send>>;

/// The request handler behind a server.
pub trait Service: Send + Sync + 'static {
    /// Handles one request.
    fn call(&self, method: u32, payload: Bytes) -> ServiceFuture;
}

/// Server limits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest request payload accepted.
    pub max_payload: u32,
    /// Requests running at once per connection; more wait (TCP back-pressure).
    pub max_in_flight: usize,
    /// Connections at once; more are refused.
    pub max_connections: usize,
    /// Replies queued per connection before requests stop being read.
    pub reply_queue: usize,
    /// Cluster secret clients must prove they know (see [`crate::auth`]); `None` accepts any.
    pub secret: Option<crate::Secret>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 64 << 20,
            max_in_flight: 256,
            max_connections: 1024,
            reply_queue: 256,
            secret: None,
        }
    }
}

/// A running server.
pub struct Server {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` and serves `service` and the `regions` table until dropped or stopped.
    pub async fn bind(
        addr: &str,
        service: Arc<dyn Service>,
        regions: Arc<RegionTable>,
        cfg: ServerConfig,
    ) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, service, regions, cfg, stop_rx));
        Ok(Server {
            local_addr,
            stop,
            task: Some(task),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes every connection.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<dyn Service>,
    regions: Arc<RegionTable>,
    cfg: ServerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let conns = Arc::new(Semaphore::new(cfg.max_connections));
    let mut handles = Vec::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let (sock, peer) = match accepted {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&conns).try_acquire_owned() else {
                    tracing::warn!(%peer, "connection refused: {} connections open", cfg.max_connections);
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let (svc, reg, c, st) = (Arc::clone(&service), Arc::clone(&regions), cfg.clone(), stop.clone());
                handles.retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
                handles.push(tokio::spawn(async move {
                    let mut sock = sock;
                    let greeted = crate::auth::server(
                        &mut sock,
                        c.secret.as_ref(),
                        std::time::Duration::from_secs(10),
                    )
                    .await;
                    if let Err(e) = greeted {
                        tracing::warn!(%peer, "connection refused: {e}");
                        drop(permit);
                        return;
                    }
                    if let Err(e) = serve_conn(sock, svc, reg, c, st).await {
                        tracing::debug!(%peer, "connection closed: {e}");
                    }
                    drop(permit);
                }));
            }
        }
    }
    // Connections see the stop signal and close; wait for them briefly, then cut them.
    for mut h in handles {
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut h)
            .await
            .is_err()
        {
            h.abort();
        }
    }
}

fn error_frame(id: u64, code: ErrorCode, msg: &str) -> Bytes {
    frame::encode_to_bytes(Kind::Error, code.to_u32(), id, msg.as_bytes())
}

async fn serve_conn(
    sock: TcpStream,
    service: Arc<dyn Service>,
    regions: Arc<RegionTable>,
    cfg: ServerConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let (mut rd, mut wr) = sock.into_split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(cfg.reply_queue);
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight));
    let decoder = Decoder {
        max_payload: cfg.max_payload,
    };
    let mut buf = BytesMut::with_capacity(64 << 10);
    let result = loop {
        let frame = match decoder.decode(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) => {
                tokio::select! {
                    _ = stop.changed() => break Ok(()),
                    n = rd.read_buf(&mut buf) => match n {
                        Ok(0) => break Ok(()),
                        Ok(_) => continue,
                        Err(e) => break Err(e.to_string()),
                    },
                }
            }
            Err(FrameError::TooLarge { id, len, max }) => {
                // The stream cannot be resynchronised without reading the payload: say why, close.
                let _ = tx
                    .send(error_frame(
                        id,
                        ErrorCode::TooLarge,
                        &format!("{len}-byte payload exceeds the {max}-byte cap"),
                    ))
                    .await;
                break Err(format!("oversized frame ({len} bytes)"));
            }
            Err(FrameError::PayloadChecksum { id, .. }) => {
                let _ = tx
                    .send(error_frame(
                        id,
                        ErrorCode::Checksum,
                        "payload checksum mismatch",
                    ))
                    .await;
                continue;
            }
            Err(e @ FrameError::BadHeader(_)) => break Err(e.to_string()),
        };
        dispatch(frame, &service, &regions, &tx, &in_flight, cfg.max_payload).await;
    };
    drop(tx);
    // Replies already queued (such as the error for an oversized frame) get a moment to go out;
    // then the socket closes even if requests are still running. On stop it closes at once.
    let mut writer = writer;
    if !*stop.borrow() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), &mut writer).await;
    }
    writer.abort();
    result
}

async fn dispatch(
    f: Frame,
    service: &Arc<dyn Service>,
    regions: &Arc<RegionTable>,
    tx: &mpsc::Sender<Bytes>,
    in_flight: &Arc<Semaphore>,
    max_payload: u32,
) {
    match f.kind {
        Kind::Request => {
            // Waits when the connection has its maximum running: the client sees back-pressure.
            let Ok(permit) = Arc::clone(in_flight).acquire_owned().await else {
                return;
            };
            let (svc, tx) = (Arc::clone(service), tx.clone());
            tokio::spawn(async move {
                let reply = match svc.call(f.method, f.payload).await {
                    Ok(p) => frame::encode_to_bytes(Kind::Response, f.method, f.id, &p),
                    Err(e) => error_frame(f.id, e.code, &e.message),
                };
                let _ = tx.send(reply).await;
                drop(permit);
            });
        }
        Kind::RegionRead => {
            let mut p = f.payload.clone();
            let reply = if p.len() != 20 {
                error_frame(
                    f.id,
                    ErrorCode::BadRequest,
                    "region read payload must be 20 bytes",
                )
            } else {
                let key = RegionKey(p.get_u64_le());
                let offset = p.get_u64_le();
                let len = p.get_u32_le();
                match if len > max_payload {
                    Err(None)
                } else {
                    regions.read(key, offset, len).map_err(Some)
                } {
                    Err(None) => error_frame(
                        f.id,
                        ErrorCode::TooLarge,
                        &format!("region read of {len} bytes exceeds the {max_payload}-byte cap"),
                    ),
                    Ok(data) => frame::encode_to_bytes(Kind::Response, 0, f.id, &data),
                    Err(Some(RegionError::BadKey)) => error_frame(
                        f.id,
                        ErrorCode::BadRegionKey,
                        "unknown or revoked region key",
                    ),
                    Err(Some(RegionError::OutOfRange)) => error_frame(
                        f.id,
                        ErrorCode::OutOfRange,
                        &format!("{offset}+{len} is past the region's end"),
                    ),
                }
            };
            let _ = tx.send(reply).await;
        }
        Kind::Ping => {
            let _ = tx
                .send(frame::encode_to_bytes(Kind::Pong, 0, f.id, &[]))
                .await;
        }
        Kind::Response | Kind::Error | Kind::Pong => {
            let _ = tx
                .send(error_frame(
                    f.id,
                    ErrorCode::BadRequest,
                    "servers take requests, not replies",
                ))
                .await;
        }
    }
}

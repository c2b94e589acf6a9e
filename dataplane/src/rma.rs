//! The server's side of one-sided reads (RMA over libfabric; wire format in
//! `cfs_proto::rma`, design in `docs/architecture.md`, "Reads over RMA").
//!
//! At start the server opens a libfabric endpoint of the configured provider and registers one
//! staging pool (pinned hugepages when reserved) once, for remote reads. A read that a client
//! asked over the RMA path runs as usual; its data is copied into a free staging buffer, whose
//! address, the pool's key, the length and the CRC32C go back instead of the data, under a
//! lease. The buffer is not reused before the lease ends (the client hands the lease back in a
//! later request, or it expires), and the client only trusts bytes whose read completed before
//! its own, earlier-starting copy of the lease ran out, and whose CRC32C matches: a buffer
//! reused under a slow client can never pass as its data. Software providers serve a peer's
//! read from the target's progress engine: [`RmaServer::poll`] runs on a reactor core.

use cfs_fabric::ofi::{self, Endpoint, OfiError, Peer, Registration, RmaMemory};
use cfs_hugepages::{DmaBuf, PoolConfig, PoolCore, PoolMapping};
use cfs_proto::rma::{HelloReply, Layout, MsgReply, MsgRequest, MAX_MESSAGE};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Receive buffers posted for clients' request messages.
const RECV_SLOTS: usize = 64;
/// Clients with a fabric address on record; the oldest is forgotten beyond this (it greets
/// again when its messages go unanswered).
const MAX_CLIENTS: usize = 1024;
/// How long the reactor keeps polling after a request message (instead of sleeping).
const STAY_AWAKE_MS: u64 = 20;
/// How long sending a reply may take.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// How often polling looks for expired leases (allocation always does).
const EXPIRE_SCAN_EVERY: Duration = Duration::from_millis(10);

/// Why the RMA path could not start.
#[derive(Debug, thiserror::Error)]
pub enum RmaError {
    /// libfabric or the provider is missing here.
    #[error("{0}")]
    Unavailable(String),
    /// Opening, mapping or registering failed.
    #[error("{0}")]
    Failed(String),
}

struct Lease {
    /// Held (not reused) while the lease lives.
    _buf: DmaBuf,
    expires: Instant,
}

struct Leases {
    pool: PoolCore,
    live: HashMap<u64, Lease>,
    last_scan: Instant,
}

/// Counters shown by `cfs status`.
#[derive(Default)]
struct Counters {
    hellos: AtomicU64,
    staged: AtomicU64,
    staged_bytes: AtomicU64,
    inline: AtomicU64,
    no_buffer: AtomicU64,
    expired: AtomicU64,
}

/// The RMA path of one server (see the module documentation).
pub struct RmaServer {
    ep: Endpoint,
    /// Whole-pool registration; dropped (deregistered) before `mapping`.
    reg: Registration,
    mapping: PoolMapping,
    leases: Mutex<Leases>,
    next_lease: AtomicU64,
    lease: Duration,
    min_bytes: usize,
    buf_bytes: usize,
    counters: Counters,
    /// Clients that may send request messages: id -> their address on this endpoint.
    clients: Mutex<BTreeMap<u64, Peer>>,
    next_client: AtomicU64,
    /// Whether request messages are received (the endpoint took the receive buffers).
    messages: bool,
    /// When the last request message came (ms since `origin`).
    last_request_ms: AtomicU64,
    origin: Instant,
    /// Test fault (`CFS_TEST_RMA_FAULT`): layouts lie about the key ("key"), the length
    /// ("range") or the checksum ("crc"); the client must notice and read through TCP.
    fault: Option<String>,
}

impl RmaServer {
    /// Opens the endpoint of `cfg.provider` on `host` and registers a staging pool of
    /// `cfg.staging_mib`.
    pub fn open(cfg: &crate::config::RmaSection, host: &str) -> Result<RmaServer, RmaError> {
        let ep = Endpoint::open(Some(&cfg.provider), host).map_err(|e| match e {
            OfiError::Unavailable(m) => RmaError::Unavailable(m),
            e => RmaError::Failed(e.to_string()),
        })?;
        let buf_bytes = cfg.staging_buf_kib << 10;
        let mut pool = cfs_hugepages::BufferPool::new(&PoolConfig {
            total_bytes: cfg.staging_mib << 20,
            buf_bytes,
            cores: 1,
            page_size: cfs_hugepages::PageSize::Huge2M,
            require_hugepages: false,
        })
        .map_err(|e| RmaError::Failed(format!("staging pool: {e}")))?;
        let mapping = pool.mapping();
        let core = pool
            .take_core(0)
            .ok_or_else(|| RmaError::Failed("staging pool has no share".into()))?;
        let mem: Arc<dyn RmaMemory> = Arc::new(mapping.clone());
        let reg = ep
            .register(mem, true)
            .map_err(|e| RmaError::Failed(format!("registering the staging pool: {e}")))?;
        let messages = match ep.enable_messages(RECV_SLOTS, MAX_MESSAGE) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("no request messages over the fabric (requests use TCP): {e}");
                false
            }
        };
        Ok(RmaServer {
            ep,
            reg,
            mapping,
            leases: Mutex::new(Leases {
                pool: core,
                live: HashMap::new(),
                last_scan: Instant::now(),
            }),
            next_lease: AtomicU64::new(1),
            lease: Duration::from_millis(u64::from(cfg.lease_ms)),
            min_bytes: cfg.min_bytes,
            buf_bytes,
            counters: Counters::default(),
            clients: Mutex::new(BTreeMap::new()),
            next_client: AtomicU64::new(1),
            messages,
            last_request_ms: AtomicU64::new(0),
            origin: Instant::now(),
            fault: std::env::var("CFS_TEST_RMA_FAULT").ok(),
        })
    }

    /// Whether libfabric can be loaded here at all.
    pub fn available() -> Result<(), String> {
        ofi::available().map_err(|e| e.to_string())
    }

    /// The provider in use.
    pub fn provider(&self) -> &str {
        self.ep.provider()
    }

    fn leases(&self) -> MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers a client's hello: RMA when it speaks this server's provider.
    pub fn hello(&self, h: &cfs_proto::rma::Hello) -> HelloReply {
        self.counters.hellos.fetch_add(1, Ordering::Relaxed);
        if h.provider != self.ep.provider() {
            return HelloReply::Tcp(format!(
                "the server's RMA provider is {:?}, the client's {:?}",
                self.ep.provider(),
                h.provider
            ));
        }
        match self.ep.address() {
            Ok(address) => HelloReply::Rma {
                provider: self.ep.provider().to_string(),
                address,
                lease_ms: self.lease.as_millis() as u32,
                client: self.add_client(&h.address),
            },
            Err(e) => HelloReply::Tcp(format!("the server's endpoint has no address: {e}")),
        }
    }

    /// Records a client's address for replies; its id (0: no request messages).
    fn add_client(&self, address: &[u8]) -> u64 {
        if !self.messages {
            return 0;
        }
        let peer = match self.ep.insert_peer(address) {
            Ok(p) => p,
            Err(e) => {
                tracing::info!("a client's fabric address is unusable ({e}): its requests use TCP");
                return 0;
            }
        };
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        c.insert(id, peer);
        while c.len() > MAX_CLIENTS {
            if let Some((_, old)) = c.pop_first() {
                self.ep.remove_peer(old);
            }
        }
        id
    }

    /// The next request message from a known client (others are dropped: their sender times
    /// out and greets again).
    pub fn next_request(&self) -> Option<(Peer, MsgRequest)> {
        loop {
            let m = self.ep.recv()?;
            self.last_request_ms
                .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
            let Some(req) = MsgRequest::decode(&m) else {
                tracing::debug!("a malformed request message ({} bytes)", m.len());
                continue;
            };
            let peer = self
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&req.client)
                .copied();
            match peer {
                Some(p) => return Some((p, req)),
                None => tracing::debug!("a request message from unknown client {}", req.client),
            }
        }
    }

    /// Sends a reply message (blocking until the provider is done with it); a reply too
    /// large for a message tells the client to ask over TCP.
    pub fn reply(&self, peer: Peer, mut reply: MsgReply) {
        let mut b = reply.encode();
        if b.len() > MAX_MESSAGE {
            reply.reply = Err(format!("a {}-byte reply does not fit a message", b.len()));
            b = reply.encode();
        }
        if let Err(e) = self.ep.send(peer, &b, REPLY_TIMEOUT) {
            tracing::debug!("a reply message was not sent: {e}");
        }
    }

    /// Frees the buffers of leases the client is done with (unknown ones: already expired).
    pub fn release(&self, leases: &[u64]) {
        if leases.is_empty() {
            return;
        }
        let mut l = self.leases();
        for id in leases {
            l.live.remove(id);
        }
    }

    /// Stages `data` for a one-sided read: `None` when it is short enough to go inline, too
    /// long for a buffer, or no buffer is free (the caller answers inline).
    pub fn stage(&self, data: &[u8]) -> Option<Layout> {
        if data.len() < self.min_bytes.max(1) || data.len() > self.buf_bytes {
            self.counters.inline.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let buf = {
            let mut l = self.leases();
            self.expire(&mut l, true);
            l.pool.alloc()
        };
        let Some(buf) = buf else {
            self.counters.no_buffer.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // The copy and checksum run outside the lock reactor 0 takes on every poll; the buffer
        // is this call's alone until its lease is recorded.
        let region = self.mapping.region();
        let offset = buf.addr() - region.base;
        assert!(
            offset + data.len() <= region.len,
            "staging buffer outside its pool"
        );
        self.mapping.copy_in(offset, data);
        let crc = crc32c::crc32c(data);
        let lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let remote = self.reg.remote();
        // The provider addresses the registration either by virtual address or by offset.
        let addr = remote.addr + offset as u64;
        let mut l = self.leases();
        l.live.insert(
            lease,
            Lease {
                _buf: buf,
                expires: Instant::now() + self.lease,
            },
        );
        drop(l);
        self.counters.staged.fetch_add(1, Ordering::Relaxed);
        self.counters
            .staged_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut layout = Layout {
            lease,
            addr,
            key: remote.key,
            len: data.len() as u32,
            crc32c: crc,
        };
        match self.fault.as_deref() {
            Some("key") => layout.key ^= 0x5a5a,
            // Past the registered region: the provider must refuse it.
            Some("range") => layout.addr = remote.addr + region.len as u64,
            Some("crc") => layout.crc32c ^= 1,
            _ => {}
        }
        Some(layout)
    }

    fn expire(&self, l: &mut Leases, force: bool) {
        let now = Instant::now();
        if !force && now.duration_since(l.last_scan) < EXPIRE_SCAN_EVERY {
            return;
        }
        l.last_scan = now;
        let before = l.live.len();
        l.live.retain(|_, lease| lease.expires > now);
        let gone = before - l.live.len();
        if gone > 0 {
            self.counters
                .expired
                .fetch_add(gone as u64, Ordering::Relaxed);
        }
        // The dropped leases' buffers went back to the pool (DmaBuf's drop).
    }

    /// Drives the provider (software providers serve peers' reads here) and ends expired
    /// leases; returns how many leases are live (a reactor keeps polling while any are).
    pub fn poll(&self) -> usize {
        if let Err(e) = self.ep.progress() {
            tracing::warn!("RMA progress: {e}");
        }
        let mut l = self.leases();
        self.expire(&mut l, false);
        let live = l.live.len();
        drop(l);
        // Keep polling for a moment after the last request: a reactor that went to sleep
        // would leave the next request message in the queue until it wakes (measured: p99 of
        // a 4 KiB read 2.9 ms instead of 0.2 ms).
        let busy = self.origin.elapsed().as_millis() as u64
            <= self.last_request_ms.load(Ordering::Relaxed) + STAY_AWAKE_MS;
        live + usize::from(busy)
    }

    /// What `cfs status` shows.
    pub fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let live = self.leases().live.len();
        serde_json::json!({
            "provider": self.ep.provider(),
            "domain": self.ep.domain(),
            "staging_bytes": self.mapping.region().len,
            "staging_backing": self.mapping.region().backing.to_string(),
            "lease_ms": self.lease.as_millis() as u64,
            "min_bytes": self.min_bytes,
            "hellos": c.hellos.load(Ordering::Relaxed),
            "request_messages": self.messages,
            "clients": self.clients.lock().unwrap_or_else(|p| p.into_inner()).len(),
            "reads_staged": c.staged.load(Ordering::Relaxed),
            "bytes_staged": c.staged_bytes.load(Ordering::Relaxed),
            "reads_inline": c.inline.load(Ordering::Relaxed),
            "no_free_buffer": c.no_buffer.load(Ordering::Relaxed),
            "leases_expired": c.expired.load(Ordering::Relaxed),
            "leases_live": live,
        })
    }
}

impl Drop for RmaServer {
    fn drop(&mut self) {
        // Leases first (their buffers go back to the pool), then the registration (a field
        // dropped before `mapping`, so the memory is deregistered before it can be unmapped).
        self.leases().live.clear();
    }
}

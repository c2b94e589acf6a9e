//! The mount's side of one-sided reads (wire format in `cfs_proto::rma`). The mount opens one
//! libfabric endpoint and registers a few read buffers once; each server is greeted on first
//! use and answers whether it speaks the same provider. Reads to a server that does go as
//! RMA reads: the server stages the data and answers where; this side pulls it with one
//! one-sided read into a registered buffer, and trusts it only if the read completed before
//! the lease (counted from before the request was sent, so never later than the server's)
//! ran out and its CRC32C matches. Anything else (no provider, a server on TCP only, no free
//! buffer, a failed or late read, a bad checksum) answers `None` and the caller reads through
//! the two-sided path; a failed read also replaces the endpoint (the tcp provider does not
//! reconnect to a peer after a refused read).

use cfs_fabric::ofi::{Endpoint, HeapMemory, OfiError, Peer, Registration, RemoteRegion};
use cfs_fabric::FailoverClient;
use cfs_proto::rma::{Hello, HelloReply, MsgReply, MsgRequest, ReadReply, ReadRequest};
use cfs_proto::rma::{MAX_MESSAGE, MAX_RELEASED};
use cfs_proto::rma::{RMA_HELLO_METHOD, RMA_READ_METHOD};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Registered read buffers at most (each takes one read at a time; one per FUSE thread).
const MAX_BUFFERS: usize = 64;
/// Bytes per read buffer: a server's staging buffer is at most one 2 MiB hugepage.
const BUF_BYTES: usize = 2 << 20;
/// How long a request message may take to be sent and answered before the read is asked
/// over TCP instead.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Replies held for other threads; beyond this, ones nobody waits for are dropped.
const MAILBOX_MAX: usize = 256;
/// Most replaced endpoints kept open for reads still posted on them.
const MAX_RETIRED: usize = 4;
/// A staged read is not even posted with less of its lease left than this.
const MIN_LEASE_LEFT: Duration = Duration::from_millis(1);
/// A server that answered "TCP" is asked again after this long (it may have been restarted
/// with RMA).
const RETRY_HELLO: Duration = Duration::from_secs(30);

/// How a read on the RMA path ended.
pub enum RmaRead {
    /// The server answered with the file-system reply itself.
    Reply(Vec<u8>),
    /// The data, read one-sided and checked.
    Data(Vec<u8>),
}

/// A server's RMA route (see [`RmaClient::route`]).
#[derive(Clone, Copy)]
struct Route {
    peer: Peer,
    lease: Duration,
    client: u64,
    generation: u64,
}

enum PeerState {
    Rma {
        peer: Peer,
        lease: Duration,
        /// The id our request messages carry (0: requests go over TCP).
        client: u64,
        /// Endpoint generation the peer was inserted in.
        generation: u64,
    },
    Tcp {
        since: Instant,
    },
}

struct Conn {
    ep: Endpoint,
    free: Vec<Registration>,
    /// Buffers of reads that timed out and may still be written: out of use until the
    /// endpoint is replaced.
    stuck: Vec<Registration>,
    generation: u64,
}

/// Counters for the log line at unmount and for tests.
#[derive(Default)]
pub struct RmaCounters {
    /// Reads served one-sided.
    pub rma_reads: AtomicU64,
    /// Bytes read one-sided.
    pub rma_bytes: AtomicU64,
    /// Reads the server answered inline.
    pub inline: AtomicU64,
    /// Requests sent as fabric messages (the others went over TCP).
    pub messages: AtomicU64,
    /// RMA reads that failed, were late or had a bad checksum (then read two-sided).
    pub failed: AtomicU64,
}

/// The mount's RMA path (see the module documentation).
pub struct RmaClient {
    provider: String,
    local_ip: String,
    buffers: usize,
    conn: Mutex<Conn>,
    /// Replaced endpoints that still have reads posted: closing one (or freeing its buffers)
    /// under a read the provider may still complete is not safe, so they wait here.
    retired: Mutex<Vec<Conn>>,
    peers: Mutex<HashMap<usize, PeerState>>,
    released: Mutex<Vec<u64>>,
    /// Reply messages that arrived for another thread's request: id -> (when, reply).
    mailbox: Mutex<HashMap<u64, (Instant, MsgReply)>>,
    next_request: AtomicU64,
    /// Shared counters.
    pub counters: Arc<RmaCounters>,
}

fn open_conn(
    provider: &str,
    local_ip: &str,
    buffers: usize,
    generation: u64,
) -> Result<Conn, OfiError> {
    let ep = Endpoint::open(Some(provider), local_ip)?;
    // Replies to request messages land here (a few: each FUSE thread waits for one).
    ep.enable_messages(32, MAX_MESSAGE)?;
    let mut free = Vec::with_capacity(buffers);
    for _ in 0..buffers {
        free.push(ep.register(Arc::new(HeapMemory::new(BUF_BYTES)), false)?);
    }
    Ok(Conn {
        ep,
        free,
        stuck: Vec::new(),
        generation,
    })
}

impl RmaClient {
    /// Opens an endpoint of `provider` on the local address that reaches `server`, with one
    /// registered read buffer per thread that reads (`threads`).
    pub fn open(provider: &str, server: &str, threads: usize) -> Result<RmaClient, String> {
        let local_ip = local_ip_towards(server)?;
        let buffers = threads.clamp(1, MAX_BUFFERS);
        let conn = open_conn(provider, &local_ip, buffers, 1).map_err(|e| e.to_string())?;
        Ok(RmaClient {
            provider: provider.to_string(),
            local_ip,
            buffers,
            conn: Mutex::new(conn),
            retired: Mutex::new(Vec::new()),
            peers: Mutex::new(HashMap::new()),
            released: Mutex::new(Vec::new()),
            mailbox: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            counters: Arc::default(),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<usize, PeerState>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Greets server `i`: `Ok(provider)` when it reads over RMA, `Err(why)` when over TCP.
    pub fn hello(&self, client: &FailoverClient, i: usize) -> Result<String, String> {
        let (address, generation) = {
            let c = self.conn();
            (c.ep.address().map_err(|e| e.to_string())?, c.generation)
        };
        let h = Hello {
            provider: self.provider.clone(),
            address,
        };
        let b = client
            .call_one(i, RMA_HELLO_METHOD, &h.encode())
            .map_err(|e| format!("hello: {e}"))?;
        let state = match HelloReply::decode(&b) {
            Some(HelloReply::Rma {
                address,
                lease_ms,
                client,
                ..
            }) => {
                let c = self.conn();
                if c.generation != generation {
                    return Err("the endpoint was replaced meanwhile".into());
                }
                let peer = c.ep.insert_peer(&address).map_err(|e| e.to_string())?;
                PeerState::Rma {
                    peer,
                    lease: Duration::from_millis(u64::from(lease_ms)),
                    client,
                    generation,
                }
            }
            Some(HelloReply::Tcp(why)) => {
                self.peers().insert(
                    i,
                    PeerState::Tcp {
                        since: Instant::now(),
                    },
                );
                return Err(why);
            }
            None => return Err("malformed hello reply".into()),
        };
        self.peers().insert(i, state);
        Ok(self.provider.clone())
    }

    /// Where reads to server `i` go over RMA: the peer, the lease, our client id there, and
    /// the endpoint generation the peer belongs to.
    fn route(&self, client: &FailoverClient, i: usize) -> Option<Route> {
        let generation = self.conn().generation;
        match self.peers().get(&i) {
            Some(PeerState::Rma {
                peer,
                lease,
                client,
                generation: g,
            }) if *g == generation => {
                return Some(Route {
                    peer: *peer,
                    lease: *lease,
                    client: *client,
                    generation,
                })
            }
            Some(PeerState::Tcp { since }) if since.elapsed() < RETRY_HELLO => return None,
            _ => {}
        }
        match self.hello(client, i) {
            Ok(p) => {
                tracing::info!(
                    "reads from {} go over RMA ({p})",
                    client.addr(i).unwrap_or("?")
                );
                self.route(client, i)
            }
            Err(why) => {
                tracing::info!(
                    "reads from {} go over TCP: {why}",
                    client.addr(i).unwrap_or("?")
                );
                None
            }
        }
    }

    /// Replaces the endpoint after a failed read (peers are greeted again). The old one is
    /// closed once no read of it is posted any more.
    fn reset(&self, generation: u64) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|old| old.ep.pending() > 0);
        let mut c = self.conn();
        if c.generation != generation {
            return; // another thread did it
        }
        if retired.len() >= MAX_RETIRED {
            // Too many endpoints with reads that never finish: keep this one (its peers are
            // greeted again; reads that find no buffer go through TCP).
            c.generation += 1;
        } else {
            match open_conn(&self.provider, &self.local_ip, self.buffers, generation + 1) {
                Ok(fresh) => retired.push(std::mem::replace(&mut *c, fresh)),
                Err(e) => {
                    // Keep the old one; reads fall back until a later reset works.
                    tracing::warn!("cannot reopen the RMA endpoint: {e}");
                    c.generation += 1;
                }
            }
        }
        drop(c);
        drop(retired);
        self.peers().clear();
    }

    /// A read request (`method`, `payload`: an encoded file-system read) to server `first`
    /// (or whichever the failover client would use) over the RMA path; `None`: read it
    /// through the two-sided path instead.
    pub fn read(
        &self,
        client: &FailoverClient,
        first: Option<usize>,
        method: u32,
        payload: &[u8],
    ) -> Option<RmaRead> {
        let i = first.unwrap_or_else(|| client.current());
        let route = self.route(client, i)?;
        let released = {
            let mut r = self.released.lock().unwrap_or_else(|p| p.into_inner());
            let n = r.len().min(MAX_RELEASED);
            r.drain(..n).collect()
        };
        let q = ReadRequest {
            released,
            method,
            payload: payload.to_vec(),
        };
        // The lease is counted from before the request leaves: never later than the server's.
        let sent = Instant::now();
        let answer = match self.ask_by_message(&route, &q) {
            Some(a) => a,
            None => ReadReply::decode(&client.call_one(i, RMA_READ_METHOD, &q.encode()).ok()?)?,
        };
        let layout = match answer {
            ReadReply::Inline(reply) => {
                self.counters.inline.fetch_add(1, Ordering::Relaxed);
                return Some(RmaRead::Reply(reply));
            }
            ReadReply::Layout(l) => l,
        };
        let data = self.pull(&route, sent, &layout);
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(layout.lease);
        match data {
            Ok(d) => {
                self.counters.rma_reads.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .rma_bytes
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                Some(RmaRead::Data(d))
            }
            Err(why) => {
                let n = self.counters.failed.fetch_add(1, Ordering::Relaxed);
                if n < 10 || n.is_power_of_two() {
                    tracing::warn!("RMA read failed ({why}); read through TCP instead");
                }
                None
            }
        }
    }

    /// Sends a read request as a fabric message and waits for its reply; `None`: ask over
    /// TCP (no client id, too large, a failed send, no reply in time, or the server said so).
    fn ask_by_message(&self, route: &Route, q: &ReadRequest) -> Option<ReadReply> {
        let (peer, client) = (route.peer, route.client);
        if client == 0 {
            return None;
        }
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let m = MsgRequest {
            client,
            id,
            read: q.clone(),
        }
        .encode();
        if m.len() > MAX_MESSAGE {
            return None;
        }
        let ep = {
            let c = self.conn();
            // The peer belongs to the endpoint it was added to: not to a replacement.
            if c.generation != route.generation {
                return None;
            }
            c.ep.clone()
        };
        if let Err(e) = ep.send(peer, &m, MESSAGE_TIMEOUT) {
            tracing::debug!("request message not sent: {e}");
            return None;
        }
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + MESSAGE_TIMEOUT;
        let mut backoff = cfs_fabric::ofi::Backoff::default();
        loop {
            if let Some((_, r)) = self.mailbox().remove(&id) {
                return r.reply.ok();
            }
            match ep.recv().and_then(|b| MsgReply::decode(&b)) {
                Some(r) if r.id == id => return r.reply.ok(),
                Some(r) => {
                    let mut mb = self.mailbox();
                    // Replies nobody waits for any more (their request timed out) go.
                    if mb.len() >= MAILBOX_MAX {
                        mb.retain(|_, (at, _)| at.elapsed() < MESSAGE_TIMEOUT);
                    }
                    mb.insert(r.id, (Instant::now(), r));
                }
                None if Instant::now() >= deadline => {
                    tracing::debug!("no reply message within {MESSAGE_TIMEOUT:?}: asking over TCP");
                    return None;
                }
                None => backoff.wait(),
            }
        }
    }

    fn mailbox(&self) -> MutexGuard<'_, HashMap<u64, (Instant, MsgReply)>> {
        self.mailbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pulls a staged read and checks it.
    fn pull(
        &self,
        route: &Route,
        sent: Instant,
        l: &cfs_proto::rma::Layout,
    ) -> Result<Vec<u8>, String> {
        let (peer, lease) = (route.peer, route.lease);
        let len = l.len as usize;
        if len > BUF_BYTES {
            return Err(format!("{len} bytes staged, buffers hold {BUF_BYTES}"));
        }
        // A quarter of the lease is left as margin for clock-rate differences.
        let deadline = sent + lease * 3 / 4;
        if deadline.saturating_duration_since(Instant::now()) < MIN_LEASE_LEFT {
            return Err("the lease ran out before the read could start".into());
        }
        let (ep, buf, generation) = {
            let mut c = self.conn();
            if c.generation != route.generation {
                return Err("the endpoint was replaced meanwhile".into());
            }
            let Some(buf) = c.free.pop() else {
                return Err("no free read buffer".into());
            };
            (c.ep.clone(), buf, c.generation)
        };
        let remote = RemoteRegion {
            addr: l.addr,
            key: l.key,
            len: u64::from(l.len),
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        let r = ep.read(peer, &remote, 0, &buf, 0, len, timeout);
        let result = match &r {
            Ok(()) if Instant::now() >= deadline => Err("the read finished after its lease".into()),
            Ok(()) => {
                let mut out = vec![0u8; len];
                buf.memory().copy_out(0, &mut out);
                if crc32c::crc32c(&out) == l.crc32c {
                    Ok(out)
                } else {
                    Err("checksum mismatch".into())
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match &r {
            // The endpoint is suspect after a failed read: a fresh one (and fresh buffers).
            Err(OfiError::ReadFailed { .. } | OfiError::Failed(_)) => self.reset(generation),
            // A read still posted keeps its buffer (and the memory it writes) to itself.
            Err(OfiError::Timeout { .. }) => {
                let mut c = self.conn();
                if c.generation == generation {
                    c.stuck.push(buf);
                    if c.stuck.len() >= self.buffers.div_ceil(2) {
                        // Half the buffers are held by reads that may never finish: start
                        // over with a fresh endpoint.
                        drop(c);
                        self.reset(generation);
                    }
                }
            }
            _ => {
                let mut c = self.conn();
                if c.generation == generation {
                    c.free.push(buf);
                }
            }
        }
        result
    }
}

/// The local address the kernel would use to reach `server` ("host:port"): where the
/// endpoint listens (no packet is sent).
fn local_ip_towards(server: &str) -> Result<String, String> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    s.connect(server)
        .map_err(|e| format!("no route to {server}: {e}"))?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.ip().to_string())
}

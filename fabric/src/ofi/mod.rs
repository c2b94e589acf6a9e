//! The libfabric provider: one-sided reads (`fi_read`) from memory a peer registered, over
//! whatever fabric libfabric offers (verbs on InfiniBand/RoCE; `tcp;ofi_rxm` or `sockets` over
//! plain TCP, which is how it is tested here, on loopback).
//!
//! An [`Endpoint`] is a reliable-datagram endpoint with its own completion queue; peers are
//! added by the address they hand out ([`Endpoint::address`], exchanged over the RPC
//! connection). Memory is registered once ([`Endpoint::register`]) and stays registered until
//! the [`Registration`] is dropped, which deregisters it before its memory can be freed (the
//! registration keeps the memory alive). A peer reads a [`RemoteRegion`] (address, key,
//! length) with [`Endpoint::read`], which polls the completion queue itself: no progress
//! thread. libfabric is loaded at run time; without it, [`Endpoint::open`] says so and the
//! caller uses TCP.

mod sys;

pub use sys::{HeapMemory, RmaMemory};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why an RMA operation failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OfiError {
    /// libfabric, or a provider with what is needed, is not available here.
    #[error("RMA unavailable: {0}")]
    Unavailable(String),
    /// A libfabric call failed.
    #[error("{0}")]
    Failed(String),
    /// The read completed with an error (revoked key, out of range, peer gone, ...).
    #[error("remote read failed: {message} (libfabric error {code})")]
    ReadFailed {
        /// Negative libfabric error code.
        code: i32,
        /// The provider's text.
        message: String,
    },
    /// The read did not complete in time (it stays posted; its memory stays alive).
    #[error("remote read of {len} bytes did not complete within {timeout_ms} ms")]
    Timeout {
        /// Bytes asked for.
        len: usize,
        /// The limit.
        timeout_ms: u64,
    },
    /// The range is outside the local or the remote region.
    #[error("range {offset}+{len} outside a {size}-byte region")]
    OutOfRange {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The region's size.
        size: u64,
    },
}

impl OfiError {
    fn timed_out(len: usize, timeout: Duration) -> OfiError {
        OfiError::Timeout {
            len,
            timeout_ms: timeout.as_millis() as u64,
        }
    }
}

impl From<sys::SysError> for OfiError {
    fn from(e: sys::SysError) -> OfiError {
        OfiError::Failed(e.message)
    }
}

/// Memory a peer registered, as it hands it out: where it is (the address to read at, in the
/// provider's addressing), the key, and its length. 24 bytes on the wire:
/// `u64 addr | u64 key | u64 len`, little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    /// Address of the region's first byte as the peer must give it to `fi_read`.
    pub addr: u64,
    /// Memory-registration key.
    pub key: u64,
    /// Length in bytes.
    pub len: u64,
}

impl RemoteRegion {
    /// Wire form.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.key.to_le_bytes());
        b[16..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Parses the wire form; `None` if malformed.
    pub fn decode(b: &[u8]) -> Option<RemoteRegion> {
        if b.len() != 24 {
            return None;
        }
        let u = |i: usize| b[i..i + 8].try_into().ok().map(u64::from_le_bytes);
        Some(RemoteRegion {
            addr: u(0)?,
            key: u(8)?,
            len: u(16)?,
        })
    }
}

/// A peer added to an endpoint: valid on that endpoint only, until removed. (libfabric's
/// address is a provider pointer under `FI_AV_MAP`: one from another endpoint or one removed
/// would crash the provider, so every use is checked against the endpoint's own table.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    endpoint: u64,
    fi_addr: u64,
}

/// Serial numbers of endpoints (a peer names the endpoint it belongs to).
static NEXT_ENDPOINT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Most reads in flight per [`Endpoint::read`] call (a large read is split).
const MAX_PIECES_IN_FLIGHT: usize = 16;
/// Largest single read posted (providers cap a message; 1 MiB keeps them all happy).
const MAX_PIECE: usize = 1 << 20;

/// `FI_MR_VIRT_ADDR`: peers address registered memory by its virtual address.
const FI_MR_VIRT_ADDR: u64 = 1 << 4;

/// Waiting for a completion: spin (yielding) briefly, since most complete within
/// microseconds, then sleep in growing steps, so threads waiting on a slow peer do not take
/// the cores the provider and the server need (measured: 16 spinning FUSE threads on two
/// cores made RMA reads' p99 ten times TCP's).
#[derive(Default)]
pub struct Backoff {
    spins: u32,
    sleep_us: u64,
}

impl Backoff {
    /// Spins before the first sleep.
    const SPINS: u32 = 64;
    /// Longest sleep.
    const MAX_SLEEP_US: u64 = 500;

    /// Waits a little, longer each time.
    pub fn wait(&mut self) {
        if self.spins < Self::SPINS {
            self.spins += 1;
            std::thread::yield_now();
        } else {
            self.sleep_us = (self.sleep_us * 2).clamp(10, Self::MAX_SLEEP_US);
            std::thread::sleep(Duration::from_micros(self.sleep_us));
        }
    }
}

/// Send slots of the message region (a send waits for a free one).
const SEND_SLOTS: usize = 16;
/// Messages received and not taken yet; more are dropped (the sender's request times out,
/// as on a lossy link).
const MAX_INBOX: usize = 4096;

struct Op {
    id: u64,
    _ctx: Box<[u8; sys::CONTEXT_BYTES]>,
    /// Keeps the destination memory alive while the read may still write it.
    _mem: Arc<dyn RmaMemory>,
    /// A send's slot in the message region (free again once the send completes).
    send_slot: Option<usize>,
}

/// Two-sided messages (see [`Endpoint::enable_messages`]): one registered region of
/// `recv_slots + SEND_SLOTS` slots of `slot_bytes`; every receive slot is always posted.
struct Messages {
    mem: Arc<dyn RmaMemory>,
    mr: Option<sys::RawMr>,
    slot_bytes: usize,
    /// One context per receive slot (index = slot); a boxed slice never moves, so each stays
    /// at its address while posted.
    recv_ctx: Box<[[u8; sys::CONTEXT_BYTES]]>,
    /// Receive context address -> slot.
    by_ctx: HashMap<usize, usize>,
    free_send: Vec<usize>,
    inbox: std::collections::VecDeque<Vec<u8>>,
    dropped: u64,
}

struct State {
    raw: sys::RawEndpoint,
    /// Posted reads and sends by context address.
    pending: HashMap<usize, Op>,
    /// Finished reads and sends nobody has collected yet: id -> result.
    done: HashMap<u64, Result<(), OfiError>>,
    next_id: u64,
    msgs: Option<Messages>,
    /// This endpoint's serial number and the peers in its address vector.
    serial: u64,
    peers: std::collections::HashSet<u64>,
}

impl State {
    /// The provider address of `peer`, if it is one of this endpoint's live peers.
    fn fi_addr(&self, peer: Peer) -> Result<u64, OfiError> {
        if peer.endpoint == self.serial && self.peers.contains(&peer.fi_addr) {
            Ok(peer.fi_addr)
        } else {
            Err(OfiError::Failed(
                "a peer of another endpoint, or one removed".into(),
            ))
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // The message region's registration goes before the endpoint (and its domain).
        if let Some(mr) = self.msgs.as_mut().and_then(|m| m.mr.take()) {
            self.raw.deregister(mr);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    provider: String,
    domain: String,
    virt_addr: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An RDM endpoint with its completion queue (see the module documentation).
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
}

/// Memory registered with an endpoint; deregistered when dropped.
pub struct Registration {
    shared: Arc<Shared>,
    mem: Arc<dyn RmaMemory>,
    mr: Option<sys::RawMr>,
    remote: bool,
}

/// Whether libfabric can be loaded here (`Err`: why not).
pub fn available() -> Result<(), OfiError> {
    sys::load().map_err(|e| OfiError::Unavailable(e.message))
}

impl Endpoint {
    /// Opens an endpoint of `provider` (e.g. "verbs", "tcp;ofi_rxm", "sockets"; `None`: the
    /// first libfabric offers with RMA) on the local address `node` ("127.0.0.1" in tests:
    /// otherwise providers pick the machine's first interface).
    pub fn open(provider: Option<&str>, node: &str) -> Result<Endpoint, OfiError> {
        let raw = sys::open(provider, node).map_err(|e| {
            if e.code == -38 || e.code == -61 {
                // ENOSYS (no libfabric) or ENODATA (no such provider here)
                OfiError::Unavailable(e.message)
            } else {
                OfiError::Failed(e.message)
            }
        })?;
        let (provider, domain, mr_mode, _max_msg) = raw.describe();
        Ok(Endpoint {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    raw,
                    pending: HashMap::new(),
                    done: HashMap::new(),
                    next_id: 1,
                    msgs: None,
                    serial: NEXT_ENDPOINT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                    peers: std::collections::HashSet::new(),
                }),
                provider,
                domain,
                virt_addr: mr_mode & FI_MR_VIRT_ADDR != 0,
            }),
        })
    }

    /// The provider in use.
    pub fn provider(&self) -> &str {
        &self.shared.provider
    }

    /// The provider's domain (e.g. the interface).
    pub fn domain(&self) -> &str {
        &self.shared.domain
    }

    /// This endpoint's address, for peers to [`Endpoint::insert_peer`].
    pub fn address(&self) -> Result<Vec<u8>, OfiError> {
        Ok(self.shared.lock().raw.name()?)
    }

    /// Adds a peer by its address.
    pub fn insert_peer(&self, addr: &[u8]) -> Result<Peer, OfiError> {
        let mut st = self.shared.lock();
        let fi_addr = st.raw.insert_peer(addr)?;
        st.peers.insert(fi_addr);
        Ok(Peer {
            endpoint: st.serial,
            fi_addr,
        })
    }

    /// Removes a peer.
    pub fn remove_peer(&self, peer: Peer) {
        let mut st = self.shared.lock();
        if st.fi_addr(peer).is_ok() {
            st.peers.remove(&peer.fi_addr);
            st.raw.remove_peer(peer.fi_addr);
        }
    }

    /// Registers `mem`: as the destination of this endpoint's reads, and (`remote`) for peers
    /// to read.
    pub fn register(
        &self,
        mem: Arc<dyn RmaMemory>,
        remote: bool,
    ) -> Result<Registration, OfiError> {
        let mr = self.shared.lock().raw.register(mem.as_ref(), remote)?;
        Ok(Registration {
            shared: Arc::clone(&self.shared),
            mem,
            mr: Some(mr),
            remote,
        })
    }

    /// Drives the provider and collects completions (a software provider serving peers' reads
    /// of this endpoint's memory needs it called now and then).
    pub fn progress(&self) -> Result<(), OfiError> {
        let mut st = self.shared.lock();
        Self::collect(&mut st)
    }

    /// Reads posted and not completed yet (after collecting what completed): an endpoint
    /// must not be closed, nor its read buffers freed, while any are.
    pub fn pending(&self) -> usize {
        let mut st = self.shared.lock();
        if let Err(e) = Self::collect(&mut st) {
            tracing::debug!("collecting completions: {e}");
        }
        st.pending.len()
    }

    fn collect(st: &mut State) -> Result<(), OfiError> {
        let mut out = Vec::new();
        let failed = st.raw.poll(&mut out)?;
        for (ctx, code, len) in out {
            let Some(op) = st.pending.remove(&ctx) else {
                if let Some(m) = st.msgs.as_mut() {
                    if let Some(&slot) = m.by_ctx.get(&ctx) {
                        Self::received(&mut st.raw, m, slot, code, len);
                        continue;
                    }
                }
                // Not ours: a provider bug; nothing to free.
                tracing::error!("completion for an unknown context {ctx:#x}");
                continue;
            };
            if let (Some(slot), Some(m)) = (op.send_slot, st.msgs.as_mut()) {
                m.free_send.push(slot);
            }
            let r = if code == 0 {
                Ok(())
            } else {
                Err(OfiError::ReadFailed {
                    code,
                    message: failed.clone().unwrap_or_else(|| sys::strerror(code)),
                })
            };
            st.done.insert(op.id, r);
        }
        Ok(())
    }

    /// A receive slot completed: keep the message, post the slot again.
    fn received(raw: &mut sys::RawEndpoint, m: &mut Messages, slot: usize, code: i32, len: usize) {
        let at = slot * m.slot_bytes;
        if code == 0 {
            assert!(
                len <= m.slot_bytes,
                "provider reported {len} bytes in a {}-byte slot",
                m.slot_bytes
            );
            if m.inbox.len() < MAX_INBOX {
                let mut b = vec![0u8; len];
                m.mem.copy_out(at, &mut b);
                m.inbox.push_back(b);
            } else {
                m.dropped += 1;
            }
        } else if code != -125 {
            // (-ECANCELED: the endpoint is closing.) A truncated or failed receive is dropped.
            tracing::debug!("a receive failed ({code})");
        }
        let mr = m.mr.as_ref().expect("live message region");
        let ctx = m.recv_ctx[slot].as_mut_ptr();
        if let Err(e) = raw.post_recv(m.mem.as_ref(), mr, (at, m.slot_bytes), ctx) {
            tracing::error!("cannot post receive slot {slot} again: {}", e.message);
        }
    }

    /// Turns on two-sided messages: `recv_slots` receive buffers of `slot_bytes` each (the
    /// largest message), posted now and again after each message; a no-op the second time.
    pub fn enable_messages(&self, recv_slots: usize, slot_bytes: usize) -> Result<(), OfiError> {
        assert!(recv_slots > 0 && slot_bytes > 0);
        let mut st = self.shared.lock();
        if st.msgs.is_some() {
            return Ok(());
        }
        let total = (recv_slots + SEND_SLOTS)
            .checked_mul(slot_bytes)
            .ok_or_else(|| OfiError::Failed("message region too large".into()))?;
        let mem: Arc<dyn RmaMemory> = Arc::new(HeapMemory::new(total));
        let mr = st.raw.register(mem.as_ref(), false)?;
        let mut m = Messages {
            mem,
            mr: Some(mr),
            slot_bytes,
            recv_ctx: vec![[0u8; sys::CONTEXT_BYTES]; recv_slots].into_boxed_slice(),
            by_ctx: HashMap::new(),
            free_send: (recv_slots..recv_slots + SEND_SLOTS).collect(),
            inbox: std::collections::VecDeque::new(),
            dropped: 0,
        };
        for slot in 0..recv_slots {
            let ctx = m.recv_ctx[slot].as_mut_ptr();
            m.by_ctx.insert(ctx as usize, slot);
            let mr = m.mr.as_ref().expect("just registered");
            if let Err(e) =
                st.raw
                    .post_recv(m.mem.as_ref(), mr, (slot * slot_bytes, slot_bytes), ctx)
            {
                // The slots posted so far are cancelled when the endpoint closes.
                st.msgs = Some(m);
                return Err(OfiError::Failed(e.message));
            }
        }
        st.msgs = Some(m);
        Ok(())
    }

    /// Sends `msg` to `peer` and waits (up to `timeout`) until the provider is done with it
    /// (reliable endpoints: delivered or failed). Needs [`Endpoint::enable_messages`].
    pub fn send(&self, peer: Peer, msg: &[u8], timeout: Duration) -> Result<(), OfiError> {
        let start = Instant::now();
        let mut backoff = Backoff::default();
        let (slot, at, id) = loop {
            let mut st = self.shared.lock();
            let Some(m) = st.msgs.as_mut() else {
                return Err(OfiError::Failed(
                    "messages are not enabled on this endpoint".into(),
                ));
            };
            if msg.len() > m.slot_bytes {
                return Err(OfiError::OutOfRange {
                    offset: 0,
                    len: msg.len() as u64,
                    size: m.slot_bytes as u64,
                });
            }
            if let Some(slot) = m.free_send.pop() {
                let at = slot * m.slot_bytes;
                m.mem.copy_in(at, msg);
                let id = st.next_id;
                st.next_id += 1;
                break (slot, at, id);
            }
            Self::collect(&mut st)?;
            drop(st);
            if start.elapsed() >= timeout {
                return Err(OfiError::timed_out(msg.len(), timeout));
            }
            backoff.wait();
        };
        let mut ctx = Box::new([0u8; sys::CONTEXT_BYTES]);
        let ctx_ptr = ctx.as_mut_ptr();
        loop {
            let mut st = self.shared.lock();
            let fi_addr = match st.fi_addr(peer) {
                Ok(a) => a,
                Err(e) => {
                    if let Some(m) = st.msgs.as_mut() {
                        m.free_send.push(slot);
                    }
                    return Err(e);
                }
            };
            let State { raw, msgs, .. } = &mut *st;
            let m = msgs.as_mut().expect("messages enabled above");
            let mr = m.mr.as_ref().expect("live message region");
            match raw.post_send(m.mem.as_ref(), mr, (at, msg.len()), fi_addr, ctx_ptr) {
                Ok(()) => {
                    let mem = Arc::clone(&m.mem);
                    st.pending.insert(
                        ctx_ptr as usize,
                        Op {
                            id,
                            _ctx: ctx,
                            _mem: mem,
                            send_slot: Some(slot),
                        },
                    );
                    break;
                }
                Err(e) if e.code == -11 && start.elapsed() < timeout => {
                    Self::collect(&mut st)?; // EAGAIN: queue full, poll first
                }
                Err(e) => {
                    m.free_send.push(slot);
                    return Err(OfiError::Failed(e.message));
                }
            }
        }
        loop {
            let mut st = self.shared.lock();
            Self::collect(&mut st)?;
            if let Some(r) = st.done.remove(&id) {
                return r;
            }
            drop(st);
            if start.elapsed() >= timeout {
                // Still posted: its slot comes back when it completes.
                return Err(OfiError::timed_out(msg.len(), timeout));
            }
            backoff.wait();
        }
    }

    /// The next message received, if any (drives the provider first).
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut st = self.shared.lock();
        if let Err(e) = Self::collect(&mut st) {
            tracing::debug!("collecting completions: {e}");
        }
        st.msgs.as_mut()?.inbox.pop_front()
    }

    /// Messages dropped because nobody took the ones before them.
    pub fn messages_dropped(&self) -> u64 {
        self.shared.lock().msgs.as_ref().map_or(0, |m| m.dropped)
    }

    /// Reads `len` bytes at `remote_offset` of the peer's `remote` region into
    /// `local[local_offset..]`, waiting up to `timeout`. A read that times out stays posted
    /// (its memory stays alive until it completes); its bytes must not be trusted.
    #[allow(clippy::too_many_arguments)]
    pub fn read(
        &self,
        peer: Peer,
        remote: &RemoteRegion,
        remote_offset: u64,
        local: &Registration,
        local_offset: usize,
        len: usize,
        timeout: Duration,
    ) -> Result<(), OfiError> {
        assert!(
            Arc::ptr_eq(&self.shared, &local.shared),
            "a registration of another endpoint"
        );
        let range = |offset: u64, size: u64| OfiError::OutOfRange {
            offset,
            len: len as u64,
            size,
        };
        if local_offset
            .checked_add(len)
            .is_none_or(|e| e > local.mem.len())
        {
            return Err(range(local_offset as u64, local.mem.len() as u64));
        }
        if remote_offset
            .checked_add(len as u64)
            .is_none_or(|e| e > remote.len)
        {
            return Err(range(remote_offset, remote.len));
        }
        let mr = local
            .mr
            .as_ref()
            .expect("a live registration has its region");
        let fi_addr = self.shared.lock().fi_addr(peer)?;
        let start = Instant::now();
        let mut backoff = Backoff::default();
        let mut ids = Vec::new();
        let mut next_piece = 0usize;
        let mut result = Ok(());
        loop {
            let mut st = self.shared.lock();
            // Post pieces while fewer than MAX_PIECES_IN_FLIGHT of ours are out.
            while next_piece < len && ids.len() < MAX_PIECES_IN_FLIGHT && result.is_ok() {
                let n = MAX_PIECE.min(len - next_piece);
                let id = st.next_id;
                st.next_id += 1;
                let mut ctx = Box::new([0u8; sys::CONTEXT_BYTES]);
                let ctx_ptr = ctx.as_mut_ptr();
                let addr = remote.addr.wrapping_add(remote_offset + next_piece as u64);
                match st.raw.post_read(
                    local.mem.as_ref(),
                    mr,
                    local_offset + next_piece,
                    n,
                    fi_addr,
                    (addr, remote.key),
                    ctx_ptr,
                ) {
                    Ok(()) => {
                        st.pending.insert(
                            ctx_ptr as usize,
                            Op {
                                id,
                                _ctx: ctx,
                                _mem: Arc::clone(&local.mem),
                                send_slot: None,
                            },
                        );
                        ids.push(id);
                        next_piece += n;
                    }
                    Err(e) if e.code == -11 => break, // EAGAIN: queue full, poll first
                    Err(e) => result = Err(OfiError::Failed(e.message)),
                }
            }
            Self::collect(&mut st)?;
            ids.retain(|id| match st.done.remove(id) {
                Some(r) => {
                    if result.is_ok() {
                        result = r;
                    }
                    false
                }
                None => true,
            });
            drop(st);
            if ids.is_empty() && (next_piece >= len || result.is_err()) {
                return result;
            }
            if start.elapsed() >= timeout {
                // Still posted: when they complete, `collect` drops their results.
                let mut st = self.shared.lock();
                for id in &ids {
                    st.done.remove(id);
                }
                return Err(OfiError::timed_out(len, timeout));
            }
            backoff.wait();
        }
    }
}

impl Registration {
    /// The region as peers read it.
    pub fn remote(&self) -> RemoteRegion {
        let mr = self
            .mr
            .as_ref()
            .expect("a live registration has its region");
        RemoteRegion {
            addr: if self.shared.virt_addr {
                self.mem.base() as u64
            } else {
                0
            },
            key: mr.key,
            len: self.mem.len() as u64,
        }
    }

    /// Whether peers may read it.
    pub fn is_remote(&self) -> bool {
        self.remote
    }

    /// The registered memory.
    pub fn memory(&self) -> &Arc<dyn RmaMemory> {
        &self.mem
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(mr) = self.mr.take() {
            self.shared.lock().raw.deregister(mr);
        }
        // `mem` is dropped after this: the region was deregistered before its memory goes.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn remote_regions_round_trip(addr in any::<u64>(), key in any::<u64>(), len in any::<u64>()) {
            let r = RemoteRegion { addr, key, len };
            prop_assert_eq!(RemoteRegion::decode(&r.encode()), Some(r));
            prop_assert_eq!(RemoteRegion::decode(&r.encode()[1..]), None);
        }
    }

    #[test]
    fn heap_memory_copies_in_and_out() {
        let m = HeapMemory::new(10_000);
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.base() as usize % 4096, 0);
        m.copy_in(9_990, &[7; 10]);
        let mut out = [0u8; 12];
        m.copy_out(9_988, &mut out);
        assert_eq!(out, [0, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
    }
}

//! Client sessions: exactly-once mutations when clients resend (the Raft dissertation's
//! client sessions, section 6.3). A client that resends a mutation after a lost reply or a
//! timeout uses the same (client, sequence) pair; the namespace keeps each client's recent
//! results, so a command that already applied returns its first result again instead of
//! applying twice (a second `create` would otherwise fail with EEXIST, a second `release`
//! would drop a handle that is still open). Part of the replicated state: every replica makes
//! the same decision. Pure: times come from the commands.
//!
//! Bounds: [`MAX_RESULTS`] results per client (a client has far fewer requests in flight; an
//! older one resent after that many newer ones would apply again), [`MAX_CLIENTS`] clients
//! (the least recently active is forgotten first), and clients silent for [`EXPIRE_SECS`] are
//! forgotten (when a new client arrives).

use crate::codec::{Reader, Writer};
use crate::command::Outcome;
use crate::types::{Errno, Timespec};
use std::collections::BTreeMap;

/// Results kept per client.
pub const MAX_RESULTS: usize = 256;
/// Clients kept.
pub const MAX_CLIENTS: usize = 1024;
/// Seconds of silence after which a client's results are forgotten.
pub const EXPIRE_SECS: i64 = 3600;

/// Who sent a command and which of its requests (and step within the request) it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Session {
    /// The client's random id (one per mount).
    pub client: u64,
    /// Sequence number, unique per client (request number and step within it).
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ClientState {
    last_active: Timespec,
    results: BTreeMap<u64, Result<Outcome, Errno>>,
}

/// Every client's recent results (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sessions {
    clients: BTreeMap<u64, ClientState>,
}

impl Sessions {
    /// The result of a command already applied under `s`, if it is remembered.
    pub fn lookup(&self, s: Session) -> Option<&Result<Outcome, Errno>> {
        self.clients.get(&s.client)?.results.get(&s.seq)
    }

    /// Remembers the result of the command applied under `s` at time `now`.
    pub fn record(&mut self, s: Session, now: Timespec, result: Result<Outcome, Errno>) {
        // Silent clients are swept when a new one arrives (the only time the table grows), not
        // on every command.
        if !self.clients.contains_key(&s.client) {
            let horizon = now.sec.saturating_sub(EXPIRE_SECS);
            self.clients.retain(|_, c| c.last_active.sec >= horizon);
        }
        if !self.clients.contains_key(&s.client) && self.clients.len() >= MAX_CLIENTS {
            let oldest = self
                .clients
                .iter()
                .min_by_key(|(id, c)| (c.last_active, **id))
                .map(|(id, _)| *id);
            if let Some(id) = oldest {
                self.clients.remove(&id);
            }
        }
        let c = self.clients.entry(s.client).or_insert(ClientState {
            last_active: now,
            results: BTreeMap::new(),
        });
        c.last_active = c.last_active.max(now);
        c.results.insert(s.seq, result);
        while c.results.len() > MAX_RESULTS {
            c.results.pop_first();
        }
    }

    /// Clients remembered.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is remembered.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Encodes: `u32 n x (u64 client | i64 sec | u32 nsec | u32 m x (u64 seq | u8 ok |
    /// ok: bytes outcome, else: u32 errno))`.
    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.clients.len() as u32);
        for (id, c) in &self.clients {
            w.u64(*id);
            w.time(c.last_active);
            w.u32(c.results.len() as u32);
            for (seq, r) in &c.results {
                w.u64(*seq);
                match r {
                    Ok(o) => {
                        w.u8(1);
                        w.bytes(&o.encode());
                    }
                    Err(e) => {
                        w.u8(0);
                        w.u32(e.errno() as u32);
                    }
                }
            }
        }
    }

    /// Decodes what [`Sessions::encode`] wrote.
    pub fn decode(r: &mut Reader) -> Option<Sessions> {
        let n = r.u32()? as usize;
        let mut clients = BTreeMap::new();
        for _ in 0..n {
            let id = r.u64()?;
            let last_active = r.time()?;
            let m = r.u32()? as usize;
            let mut results = BTreeMap::new();
            for _ in 0..m {
                let seq = r.u64()?;
                let res = match r.u8()? {
                    1 => Ok(Outcome::decode(&r.bytes()?)?),
                    0 => Err(Errno::from_errno(r.u32()? as i32)?),
                    _ => return None,
                };
                results.insert(seq, res);
            }
            clients.insert(
                id,
                ClientState {
                    last_active,
                    results,
                },
            );
        }
        Some(Sessions { clients })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_remembered_bounded_and_expire() {
        let mut s = Sessions::default();
        let t = |sec| Timespec::new(sec, 0);
        let a = Session { client: 1, seq: 7 };
        s.record(a, t(10), Ok(Outcome::Unit));
        s.record(Session { client: 1, seq: 8 }, t(11), Err(Errno::Exist));
        assert_eq!(s.lookup(a), Some(&Ok(Outcome::Unit)));
        assert_eq!(
            s.lookup(Session { client: 1, seq: 8 }),
            Some(&Err(Errno::Exist))
        );
        assert_eq!(s.lookup(Session { client: 2, seq: 7 }), None);
        for i in 0..(MAX_RESULTS as u64 + 5) {
            s.record(
                Session {
                    client: 1,
                    seq: 100 + i,
                },
                t(12),
                Ok(Outcome::Unit),
            );
        }
        assert_eq!(s.lookup(a), None, "the oldest results go first");
        let mut w = Writer::default();
        s.encode(&mut w);
        let mut r = Reader::new(&w.0);
        assert_eq!(Sessions::decode(&mut r).as_ref(), Some(&s));
        // A client silent for longer than EXPIRE_SECS is forgotten at the next record.
        s.record(
            Session { client: 3, seq: 1 },
            t(12 + EXPIRE_SECS + 1),
            Ok(Outcome::Unit),
        );
        assert_eq!(s.len(), 1);
        for c in 0..(MAX_CLIENTS as u64 + 3) {
            s.record(
                Session {
                    client: 10 + c,
                    seq: 1,
                },
                t(5000 + c as i64),
                Ok(Outcome::Unit),
            );
        }
        assert_eq!(s.len(), MAX_CLIENTS);
    }
}

//! The durable copy of a metadata replica's Raft log: one redb database per replica with the
//! hard state, the latest snapshot (with the namespace it holds) and the entries after it.
//! Every persist job is one transaction committed with immediate durability before the
//! replica is told it is persisted, so a crash loses at most jobs it was never told about.
//!
//! ```text
//! table raft_entries: u64 index -> protobuf Entry
//! table raft_meta:    "hard_state" -> protobuf HardState
//!                     "snapshot"   -> protobuf Snapshot (metadata + namespace bytes)
//! ```

use cfs_meta_replica::{LogStore, PersistJob};
use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

/// Errors of the Raft log database.
#[derive(Debug, thiserror::Error)]
pub enum RaftStoreError {
    /// redb failed (I/O, a full disk, corruption it detected).
    #[error("raft log {path}: {source}")]
    Db {
        /// Database file.
        path: String,
        /// What redb said.
        source: redb::Error,
    },
    /// A record does not decode or the log has a gap.
    #[error("raft log {path} is damaged: {what}")]
    Corrupt {
        /// Database file.
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// The Raft log database of one replica.
pub struct RaftStore {
    db: Database,
    path: String,
}

impl RaftStore {
    fn err(&self, e: impl Into<redb::Error>) -> RaftStoreError {
        RaftStoreError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> RaftStoreError {
        RaftStoreError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    /// Opens (or creates) the database and loads the log: a new one starts as an empty group
    /// of `voters` and `learners`.
    pub fn open(
        path: &Path,
        voters: &[u64],
        learners: &[u64],
    ) -> Result<(RaftStore, LogStore), RaftStoreError> {
        let p = path.display().to_string();
        let db = Database::create(path).map_err(|e| RaftStoreError::Db {
            path: p.clone(),
            source: e.into(),
        })?;
        let store = RaftStore { db, path: p };
        let log = store.load(voters, learners)?;
        Ok((store, log))
    }

    fn load(&self, voters: &[u64], learners: &[u64]) -> Result<LogStore, RaftStoreError> {
        let mut log = LogStore::new(voters, learners);
        let rtx = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = match rtx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(log),
            Err(e) => return Err(self.err(e)),
        };
        if let Some(v) = meta.get("snapshot").map_err(|e| self.err(e))? {
            let snap = Snapshot::parse_from_bytes(v.value())
                .map_err(|e| self.corrupt(format!("snapshot: {e}")))?;
            log.apply_snapshot(snap);
        }
        let entries = rtx.open_table(ENTRIES).map_err(|e| self.err(e))?;
        let mut batch = Vec::new();
        for item in entries.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let e = Entry::parse_from_bytes(v.value())
                .map_err(|err| self.corrupt(format!("entry {}: {err}", k.value())))?;
            if e.index != k.value() {
                return Err(self.corrupt(format!("entry under {} says {}", k.value(), e.index)));
            }
            if let Some(prev) = batch.last().map(|p: &Entry| p.index) {
                if e.index != prev + 1 {
                    return Err(self.corrupt(format!("gap in the log after {prev}")));
                }
            }
            batch.push(e);
        }
        let first = raft::Storage::first_index(&log).unwrap_or(1);
        batch.retain(|e| e.index >= first);
        if let Some(e0) = batch.first() {
            if e0.index != first {
                return Err(self.corrupt(format!(
                    "log starts at {} but the snapshot ends at {}",
                    e0.index,
                    first - 1
                )));
            }
        }
        log.append(&batch);
        if let Some(v) = meta.get("hard_state").map_err(|e| self.err(e))? {
            let hs = HardState::parse_from_bytes(v.value())
                .map_err(|e| self.corrupt(format!("hard state: {e}")))?;
            log.set_hard_state(hs);
        }
        Ok(log)
    }

    /// Makes a persist job durable (one transaction, immediate durability): snapshot, entries
    /// (replacing a conflicting suffix), hard state, compaction.
    pub fn persist(&self, job: &PersistJob) -> Result<(), RaftStoreError> {
        self.persist_all(std::slice::from_ref(job))
    }

    /// Makes several jobs durable, in order, in one transaction (one sync for all: group
    /// commit of whatever queued up while the previous sync ran).
    pub fn persist_all(&self, jobs: &[PersistJob]) -> Result<(), RaftStoreError> {
        let wtx = self.db.begin_write().map_err(|e| self.err(e))?;
        for job in jobs {
            let mut meta = wtx.open_table(META).map_err(|e| self.err(e))?;
            let mut entries = wtx.open_table(ENTRIES).map_err(|e| self.err(e))?;
            let enc = |m: &dyn protobuf::Message| {
                m.write_to_bytes()
                    .map_err(|e| self.corrupt(format!("encoding: {e}")))
            };
            if let Some(s) = &job.snapshot {
                meta.insert("snapshot", enc(s)?.as_slice())
                    .map_err(|e| self.err(e))?;
                // The log restarts after the snapshot.
                let upto = s.get_metadata().index;
                entries
                    .retain_in(..=upto, |_, _| false)
                    .map_err(|e| self.err(e))?;
            }
            if let Some(e0) = job.entries.first() {
                // Entries from e0 on are replaced.
                entries
                    .retain_in(e0.index.., |_, _| false)
                    .map_err(|e| self.err(e))?;
                for e in &job.entries {
                    entries
                        .insert(e.index, enc(e)?.as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            if let Some(hs) = &job.hard_state {
                meta.insert("hard_state", enc(hs)?.as_slice())
                    .map_err(|e| self.err(e))?;
            }
            if let Some(snap) = &job.compact {
                meta.insert("snapshot", enc(snap)?.as_slice())
                    .map_err(|e| self.err(e))?;
                let upto = snap.get_metadata().index;
                entries
                    .retain_in(..=upto, |_, _| false)
                    .map_err(|e| self.err(e))?;
            }
        }
        wtx.commit().map_err(|e| self.err(e))
    }
}

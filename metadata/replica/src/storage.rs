//! The Raft log of one replica: the latest snapshot (with the namespace it captured), the
//! entries after it, and the hard state. It holds exactly what the replica has persisted: the
//! driver appends a persist job's contents only once they are durable, so a crash may rebuild
//! the replica from this and nothing more. The simulator keeps it as the node's disk; the server
//! mirrors it in its embedded store.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{Error, GetEntriesContext, RaftState, Storage, StorageError};

/// In-memory Raft log storage (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    conf_state: ConfState,
    /// Latest snapshot; its metadata index is the last compacted entry (0 = none).
    snapshot: Snapshot,
    /// Entries after the snapshot, contiguous.
    entries: Vec<Entry>,
    /// Set when a peer asked for a snapshot the latest one cannot serve (it predates the
    /// peer's membership): the replica compacts at its applied index soon.
    fresh_snapshot_wanted: std::cell::Cell<bool>,
}

impl LogStore {
    /// A new group's log: empty, with `voters` and `learners` as the configuration.
    pub fn new(voters: &[u64], learners: &[u64]) -> LogStore {
        let mut s = LogStore::default();
        s.conf_state.voters = voters.to_vec();
        s.conf_state.learners = learners.to_vec();
        s.snapshot
            .mut_metadata()
            .set_conf_state(s.conf_state.clone());
        s
    }

    fn snap_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snap_index() + 1
    }

    fn last(&self) -> u64 {
        self.snap_index() + self.entries.len() as u64
    }

    /// The snapshot the replica restarts from (its data is the namespace, empty = initial).
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Entries persisted after the snapshot (for tests and tools).
    pub fn entries_after_snapshot(&self) -> &[Entry] {
        &self.entries
    }

    /// Applies a persist job: snapshot, entries, hard state, compaction, in that order. The
    /// replica applies each job to its in-memory log at once; the driver applies it to the
    /// durable copy when its write completes.
    pub fn apply_job(&mut self, job: &crate::PersistJob) {
        if let Some(s) = &job.snapshot {
            self.apply_snapshot(s.clone());
        }
        self.append(&job.entries);
        if let Some(hs) = &job.hard_state {
            self.set_hard_state(hs.clone());
        }
        if let Some(snap) = &job.compact {
            self.install_compaction(snap.clone());
        }
    }

    /// Appends entries, replacing any conflicting suffix.
    pub fn append(&mut self, ents: &[Entry]) {
        let Some(e0) = ents.first() else {
            return;
        };
        assert!(
            e0.index >= self.first(),
            "append of compacted index {} (first {})",
            e0.index,
            self.first()
        );
        assert!(
            e0.index <= self.last() + 1,
            "gap in the log: last {}, appending {}",
            self.last(),
            e0.index
        );
        self.entries.truncate((e0.index - self.first()) as usize);
        self.entries.extend_from_slice(ents);
        for w in self.entries.windows(2) {
            assert_eq!(w[0].index + 1, w[1].index, "log entries not contiguous");
        }
    }

    /// Records the configuration after an applied membership change (compaction snapshots
    /// carry it; after a restart the log replays the changes after the snapshot).
    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// Records a persisted hard state.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Installs a snapshot received from the leader (persisted): the log restarts after it.
    pub fn apply_snapshot(&mut self, snap: Snapshot) {
        let meta = snap.get_metadata();
        if meta.index <= self.snap_index() {
            return;
        }
        // Keep entries past the snapshot only if they continue it (same term at its index).
        let keep_from = meta.index + 1;
        let consistent = self.term(meta.index).ok() == Some(meta.term);
        if consistent && keep_from <= self.last() + 1 {
            self.entries.drain(..(keep_from - self.first()) as usize);
        } else {
            self.entries.clear();
        }
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.snapshot = snap;
    }

    /// Installs a compaction snapshot made by [`LogStore::compact`] (on the durable copy).
    pub fn install_compaction(&mut self, snap: Snapshot) {
        let index = snap.get_metadata().index;
        if index <= self.snap_index() {
            return;
        }
        assert!(index <= self.last(), "compaction past the log");
        self.entries.drain(..(index + 1 - self.first()) as usize);
        // A durable copy learns configuration changes only through its snapshots.
        self.conf_state = snap.get_metadata().get_conf_state().clone();
        self.snapshot = snap;
    }

    /// Whether a peer asked for a snapshot newer than the latest (see `snapshot`); clears it.
    pub fn take_fresh_snapshot_wanted(&self) -> bool {
        self.fresh_snapshot_wanted.replace(false)
    }

    /// Replaces the log up to `index` (applied) by a snapshot whose data is `data` (the
    /// namespace after applying `index`); returns that snapshot.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Snapshot {
        assert!(index <= self.last(), "compaction past the log");
        if index <= self.snap_index() {
            return self.snapshot.clone();
        }
        let term = self.term(index).unwrap_or_else(|e| {
            panic!("term of persisted index {index} unavailable: {e}");
        });
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.entries.drain(..(index + 1 - self.first()) as usize);
        self.snapshot = snap.clone();
        snap
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last() + 1,
            "entries up to {high} asked, last is {}",
            self.last()
        );
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        // At least one entry, then as many as fit in max_size bytes.
        if let Some(max) = max_size.into() {
            let mut size = 0u64;
            let keep = out
                .iter()
                .take_while(|e| {
                    size += (e.data.len() + e.context.len() + 24) as u64;
                    size <= max
                })
                .count()
                .max(1);
            out.truncate(keep);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < self.first() {
            return Err(Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        if self.snap_index() < request_index {
            // The driver compacts as it applies; a newer snapshot comes later.
            return Err(Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        // raft-rs refuses a snapshot whose configuration does not list the recipient (a
        // member added after the compaction): ask the replica for a fresh one instead.
        let cs = self.snapshot.get_metadata().get_conf_state();
        let listed = [
            &cs.voters,
            &cs.learners,
            &cs.voters_outgoing,
            &cs.learners_next,
        ]
        .iter()
        .any(|ids| ids.contains(&to));
        if !listed {
            self.fresh_snapshot_wanted.set(true);
            return Err(Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

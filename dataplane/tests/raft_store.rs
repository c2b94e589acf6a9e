//! A single-replica group over the redb Raft log: commands commit, the log compacts into
//! snapshots, and after a crash (jobs not yet persisted are lost) the replica comes back with
//! exactly what was persisted, applied to the same namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::raft_store::RaftStore;
use cfs_meta::command::{Command, Op};
use cfs_meta::{Creds, InodeId, Timespec};
use cfs_meta_replica::{Replica, ReplicaConfig};

fn cfg() -> ReplicaConfig {
    ReplicaConfig {
        id: 1,
        voters: vec![1],
        learners: Vec::new(),
        initial: cfs_meta::placement::Placement::default(),
        shard: cfs_meta::shard::ShardSlot::SINGLE,
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_every: 7,
        seed: 3,
    }
}

fn mkdir(i: u32) -> Command {
    Command {
        creds: Creds::root(),
        now: Timespec::new(i64::from(i), 0),
        op: Op::Mkdir {
            parent: InodeId::ROOT,
            name: format!("d{i}").into_bytes(),
            perm: 0o755,
        },
        session: None,
    }
}

/// Drives the replica until it has nothing ready, persisting every job unless `lose_after`
/// jobs were already persisted (a crash: later jobs never reach the disk).
fn drive(r: &mut Replica, db: &RaftStore, persisted: &mut usize, lose_after: Option<usize>) {
    loop {
        let out = r.ready();
        let Some(job) = out.persist else { return };
        assert!(out.messages.is_empty(), "one replica sends nothing");
        if lose_after.is_some_and(|n| *persisted >= n) {
            continue;
        }
        db.persist(&job).unwrap();
        *persisted += 1;
        assert!(r.persisted(job.number).is_empty());
    }
}

#[test]
fn the_raft_log_survives_a_crash_with_what_was_persisted() {
    let dir = std::env::temp_dir().join(format!("cfs-raft-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("raft.redb");
    let (db, log) = RaftStore::open(&path, &[1], &[]).unwrap();
    let mut r = Replica::open(cfg(), log).unwrap();
    let mut persisted = 0;
    // Elect itself.
    for _ in 0..30 {
        r.tick();
        drive(&mut r, &db, &mut persisted, None);
    }
    assert!(r.is_leader());
    for i in 0..25 {
        r.propose(vec![], &mkdir(i)).unwrap();
        drive(&mut r, &db, &mut persisted, None);
    }
    let applied = r.applied();
    let snapshot_before = r.namespace().snapshot();
    assert!(
        r.store().latest_snapshot().get_metadata().index > 0,
        "the log was compacted"
    );
    // Five more commands, but the disk never sees their jobs.
    let crash_at = persisted;
    for i in 25..30 {
        r.propose(vec![], &mkdir(i)).unwrap();
        drive(&mut r, &db, &mut persisted, Some(crash_at));
    }
    assert_eq!(
        r.applied(),
        applied,
        "nothing unpersisted was applied (or acknowledged)"
    );
    drop(r);
    drop(db);
    let (db, log) = RaftStore::open(&path, &[1], &[]).unwrap();
    let mut r = Replica::open(cfg(), log).unwrap();
    for _ in 0..30 {
        r.tick();
        drive(&mut r, &db, &mut persisted, None);
    }
    assert!(r.is_leader());
    assert!(r.applied() >= applied);
    // Everything that was persisted is back; the lost commands are not half there.
    let ns = r.namespace();
    for i in 0..25 {
        let name = format!("d{i}");
        assert!(
            ns.lookup(&Creds::root(), InodeId::ROOT, name.as_bytes())
                .is_ok(),
            "{name} lost"
        );
    }
    ns.check_invariants().unwrap();
    assert_eq!(
        ns.snapshot(),
        snapshot_before,
        "the same namespace as before the crash"
    );
    // And it keeps working.
    r.propose(vec![], &mkdir(99)).unwrap();
    drive(&mut r, &db, &mut persisted, None);
    assert!(r
        .namespace()
        .lookup(&Creds::root(), InodeId::ROOT, b"d99")
        .is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

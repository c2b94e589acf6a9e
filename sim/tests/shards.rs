//! Seeded simulations of a namespace split over several metadata shards: cross-shard
//! transactions under message loss, duplication and reordering, coordinator crashes at any step,
//! shard restarts from snapshots, and recovery by the shards alone. `CFS_SIM_SEED=N` replays one
//! seed, `CFS_SIM_SEEDS=K` runs K seeds, `CFS_SIM_TRACE=1` prints every command.

use cfs_sim::shards::{run_shards, ShardReport, ShardSimConfig};

fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("CFS_SIM_SEED") {
        return vec![s.parse().expect("CFS_SIM_SEED is a number")];
    }
    let n = std::env::var("CFS_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    (1..=n).collect()
}

fn run_all(label: &str, default_seeds: u64, make: impl Fn(u64) -> ShardSimConfig) -> ShardReport {
    let mut t = ShardReport::default();
    for seed in seeds(default_seeds) {
        let r = run_shards(&make(seed)).unwrap_or_else(|e| panic!("{label}: {e}"));
        t.finished += r.finished;
        t.succeeded += r.succeeded;
        t.txns += r.txns;
        t.retries += r.retries;
        t.crashes += r.crashes;
        t.abandoned += r.abandoned;
        t.recovered_commits += r.recovered_commits;
        t.recovered_aborts += r.recovered_aborts;
        t.dropped += r.dropped;
        t.duplicated += r.duplicated;
        t.restarts += r.restarts;
    }
    eprintln!("{label}: {t:?}");
    t
}

fn real_faults(t: &ShardReport) -> bool {
    std::env::var_os("CFS_SIM_SEED").is_some()
        || (t.txns > 0
            && t.crashes > 0
            && t.dropped > 0
            && t.duplicated > 0
            && t.restarts > 0
            && t.recovered_aborts > 0
            && t.recovered_commits > 0
            && t.succeeded > 0)
}

#[test]
fn sequential_operations_match_one_shard() {
    for shards in [2u16, 3, 5] {
        let t = run_all(&format!("sequential, {shards} shards"), 60, |seed| {
            ShardSimConfig::new(seed, shards, true)
        });
        assert!(
            real_faults(&t),
            "{shards} shards: faults not exercised: {t:?}"
        );
    }
}

#[test]
fn concurrent_operations_keep_the_namespace_whole() {
    for shards in [2u16, 4] {
        let t = run_all(&format!("concurrent, {shards} shards"), 60, |seed| {
            ShardSimConfig::new(seed, shards, false)
        });
        assert!(
            real_faults(&t),
            "{shards} shards: faults not exercised: {t:?}"
        );
        assert!(
            t.retries > 0,
            "no lock conflict between transactions: {t:?}"
        );
    }
}

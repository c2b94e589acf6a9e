//! Seeded simulations of a metadata shard's Raft group under network and disk faults. A failing
//! seed is printed; `CFS_SIM_SEED=N` replays just that seed, `CFS_SIM_SEEDS=K` runs K seeds.

use cfs_sim::{run, SimConfig};

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

fn run_all(nodes: usize, default_seeds: u64) {
    let mut total = cfs_sim::Report::default();
    for seed in seeds(default_seeds) {
        let cfg = SimConfig {
            nodes,
            ..SimConfig::standard(seed)
        };
        match run(&cfg) {
            Ok(r) => {
                total.committed += r.committed;
                total.acked += r.acked;
                total.crashes += r.crashes;
                total.partitions += r.partitions;
                total.dropped += r.dropped;
                total.snapshots_installed += r.snapshots_installed;
                total.terms_with_leader += r.terms_with_leader;
            }
            Err(f) => panic!("{f}"),
        }
    }
    eprintln!("{nodes} nodes: {total:?}");
    // The faults really happened (a run without them would prove nothing).
    assert!(total.crashes > 0 && total.partitions > 0 && total.dropped > 0);
    assert!(total.acked > 0 && total.terms_with_leader > 1);
}

#[test]
fn three_replicas_under_faults() {
    run_all(3, 200);
}

#[test]
fn five_replicas_under_faults() {
    run_all(5, 100);
}

#[test]
fn one_seed_replays_exactly() {
    let cfg = SimConfig::standard(4242);
    let a = run(&cfg).map_err(|f| f.to_string());
    let b = run(&cfg).map_err(|f| f.to_string());
    assert_eq!(a, b);
}

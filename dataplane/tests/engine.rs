//! The engine's routing on the real reactors (memory device): requests for chunks of every shard
//! reach the reactor that owns it, with one or two reactors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::config::Config;
use cfs_dataplane::reactor::{self, Engine};
use cfs_nvme::mem::MemDevice;
use cfs_nvme::BlockDevice;
use std::path::Path;
use std::sync::Arc;

fn engine(cores: &str) -> Engine {
    let text = format!(
        "data_dir = \"/nonexistent\"\n[reactors]\ncores = {cores}\n[hugepages]\npool_mib = 8\nbuf_kib = 64\n[format]\nshards_per_device = 4\n"
    );
    let cfg = Config::parse(&text, Path::new("t.toml")).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem0", 4096, 16384, 1));
    reactor::format(&cfg, std::slice::from_ref(&dev), [1; 16], 0).unwrap();
    Engine::start(&cfg, vec![dev]).unwrap()
}

#[test]
fn every_shard_is_reachable_with_two_reactors() {
    let e = engine("[0, 1]");
    assert_eq!(e.reactors(), 2);
    for chunk in 0..64u64 {
        e.write(chunk, chunk * 100, chunk.to_le_bytes().to_vec())
            .unwrap();
    }
    for chunk in 0..64u64 {
        assert_eq!(e.read(chunk, chunk * 100, 8).unwrap(), chunk.to_le_bytes());
        assert_eq!(e.stat(chunk).unwrap().unwrap().len, chunk * 100 + 8);
    }
    let stats = e.stats().unwrap();
    assert_eq!(stats.len(), 4);
    assert_eq!(stats.iter().map(|(_, s)| s.chunks).sum::<u64>(), 64);
    assert!(
        stats.iter().all(|(_, s)| s.chunks > 0),
        "chunks spread over all shards"
    );
    e.delete(5).unwrap();
    assert!(matches!(
        e.read(5, 0, 1),
        Err(cfs_dataplane::store::StoreError::NotFound { .. })
    ));
    e.truncate(6, 100).unwrap();
    assert_eq!(e.stat(6).unwrap().unwrap().len, 100);
    e.shutdown().unwrap();
}

#[test]
fn a_store_spans_several_devices_and_checks_they_belong_together() {
    let text = "data_dir = \"/nonexistent\"\n[reactors]\ncores = [0, 1]\n[hugepages]\npool_mib = 8\nbuf_kib = 64\n[format]\nshards_per_device = 3\n";
    let cfg = Config::parse(text, Path::new("t.toml")).unwrap();
    let d0: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem0", 4096, 8192, 1));
    let d1: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem1", 512, 8 * 12000, 2));
    let layout = reactor::format(&cfg, &[Arc::clone(&d0), Arc::clone(&d1)], [5; 16], 0).unwrap();
    assert_eq!(layout.total_shards(), 6);
    assert_eq!(layout.devices[1].first_shard, 3);
    // Devices may be given in any order: the superblocks say which is which.
    let e = Engine::start(&cfg, vec![Arc::clone(&d1), Arc::clone(&d0)]).unwrap();
    for chunk in 0..120u64 {
        e.write(chunk, 4096 * chunk, vec![chunk as u8; 6000])
            .unwrap();
    }
    let stats = e.stats().unwrap();
    assert_eq!(stats.len(), 6);
    assert!(
        stats.iter().all(|(_, s)| s.chunks > 0),
        "every shard on both devices holds chunks"
    );
    let on_dev1 = (0..120u64)
        .filter(|&c| e.locate(c, 4096 * c).unwrap().unwrap().0 == "mem1")
        .count();
    assert!(
        on_dev1 > 20 && on_dev1 < 100,
        "{on_dev1} of 120 chunks on the second device"
    );
    e.shutdown().unwrap();
    let e = Engine::start(&cfg, vec![Arc::clone(&d0), Arc::clone(&d1)]).unwrap();
    for chunk in 0..120u64 {
        assert_eq!(
            e.read(chunk, 4096 * chunk, 6000).unwrap(),
            vec![chunk as u8; 6000]
        );
    }
    e.shutdown().unwrap();
    // A missing device, or one of another store, is refused with a clear message.
    let err = Engine::start(&cfg, vec![Arc::clone(&d0)])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("has 2 devices but 1 were configured"), "{err}");
    let other: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("other", 4096, 8192, 3));
    reactor::format(&cfg, std::slice::from_ref(&other), [6; 16], 0).unwrap();
    let err = Engine::start(&cfg, vec![d0, other])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("different stores"), "{err}");
    let blank: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("blank", 4096, 8192, 4));
    let err = Engine::start(&cfg, vec![blank]).err().unwrap().to_string();
    assert!(
        err.contains("holds no ClaudeFS store") && err.contains("blank"),
        "{err}"
    );
}

#[test]
fn punched_ranges_read_as_zeros_free_space_and_survive_a_restart() {
    let text = "data_dir = \"/nonexistent\"\n[reactors]\ncores = [0]\n[hugepages]\npool_mib = 8\nbuf_kib = 64\n[format]\nshards_per_device = 2\n";
    let cfg = Config::parse(text, Path::new("t.toml")).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem0", 4096, 16384, 1));
    reactor::format(&cfg, std::slice::from_ref(&dev), [2; 16], 0).unwrap();
    let e = Engine::start(&cfg, vec![Arc::clone(&dev)]).unwrap();
    let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8 + 1).collect();
    e.write(9, 0, data.clone()).unwrap();
    assert_eq!(e.data_ranges(9).unwrap(), vec![(0, 65536)]);
    let used = |e: &Engine| {
        e.stats()
            .unwrap()
            .iter()
            .map(|(_, s)| s.live_blocks)
            .sum::<u64>()
    };
    let before = used(&e);
    // Unaligned: partial edge blocks are zeroed in place, whole blocks unmapped.
    e.punch(9, 1000, 20_000).unwrap();
    let mut want = data.clone();
    want[1000..21_000].fill(0);
    assert_eq!(e.read(9, 0, 65536).unwrap(), want);
    assert_eq!(e.data_ranges(9).unwrap(), vec![(0, 4096), (20480, 65536)]);
    assert_eq!(used(&e), before - 4, "four whole blocks freed");
    assert_eq!(e.stat(9).unwrap().unwrap().len, 65536, "length unchanged");
    // Punching a missing chunk or past the data is a no-op.
    e.punch(10, 0, 4096).unwrap();
    e.punch(9, 65536, 8192).unwrap();
    e.shutdown().unwrap();
    let e = Engine::start(&cfg, vec![dev]).unwrap();
    assert_eq!(e.read(9, 0, 65536).unwrap(), want);
    assert_eq!(e.data_ranges(9).unwrap(), vec![(0, 4096), (20480, 65536)]);
    e.shutdown().unwrap();
}

#[test]
fn a_restart_reports_the_chunks_changed_last_and_digests_compare_copies() {
    let text = "data_dir = \"/nonexistent\"\n[reactors]\ncores = [0]\n[hugepages]\npool_mib = 8\nbuf_kib = 64\n[format]\nshards_per_device = 1\n";
    let cfg = Config::parse(text, Path::new("t.toml")).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem0", 4096, 16384, 1));
    reactor::format(&cfg, std::slice::from_ref(&dev), [3; 16], 0).unwrap();
    let e = Engine::start(&cfg, vec![Arc::clone(&dev)]).unwrap();
    assert!(e.boot_suspects().unwrap().is_empty(), "a fresh store");
    let max = cfs_dataplane::store::format::CKPT_RECENT_MAX as u64;
    for chunk in 1..=max + 100 {
        e.write(chunk, 0, vec![1; 100]).unwrap();
    }
    e.write(5, 0, vec![2; 100]).unwrap(); // changed again: among the last
                                          // Same bytes written the same way, or with a zero block instead of a hole: same digest.
    let mut zeros_inside = vec![7; 9000];
    zeros_inside[4096..8192].fill(0);
    e.write(1000, 0, zeros_inside).unwrap();
    e.write(1001, 0, vec![7; 4096]).unwrap();
    e.write(1001, 8192, vec![7; 808]).unwrap();
    e.write(1002, 0, vec![7; 9000]).unwrap();
    e.write(1003, 0, vec![7; 9000]).unwrap();
    let d = |c| e.map_digest(c).unwrap().unwrap();
    assert_eq!(d(1000), d(1001), "a zero block counts as a hole");
    assert_eq!(d(1002), d(1003));
    assert_ne!(d(1000), d(1002));
    assert_eq!(d(1000).0, 9000);
    assert!(e.map_digest(4242).unwrap().is_none());
    e.shutdown().unwrap();
    // The checkpoint written at shutdown carries the last CKPT_RECENT_MAX distinct chunks.
    let e = Engine::start(&cfg, vec![dev]).unwrap();
    let suspects = e.boot_suspects().unwrap();
    assert_eq!(suspects.len() as u64, max);
    assert!(suspects.contains(&5) && suspects.contains(&1003) && suspects.contains(&(max + 100)));
    assert!(!suspects.contains(&6), "changed long before");
    e.shutdown().unwrap();
}

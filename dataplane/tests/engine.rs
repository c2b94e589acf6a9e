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

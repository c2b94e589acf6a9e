//! Regression: a ring that registered hugepage buffers must give them back when it is dropped,
//! so the next pool of the same process gets hugepages again (the kernel otherwise releases a
//! closed ring's pages later, from a worker). Needs root; skips otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_hugepages::{Backing, BufferPool, PageSize, PoolConfig};
use cfs_nvme::uring::UringDevice;
use cfs_nvme::{BlockDevice, QueuePairConfig};

const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

struct Restore(String);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(NR, &self.0);
    }
}

#[test]
fn hugepages_come_back_after_a_ring_registered_them() {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        eprintln!("SKIP: needs root");
        return;
    }
    let before = std::fs::read_to_string(NR).unwrap().trim().to_string();
    let _restore = Restore(before.clone());
    let want = before.parse::<u64>().unwrap() + 6;
    std::fs::write(NR, want.to_string()).unwrap();
    if std::fs::read_to_string(NR)
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        < want
    {
        eprintln!("SKIP: could not reserve hugepages");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cfs-hp-ring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("d.img");
    UringDevice::create_file(&path, 1 << 20).unwrap();
    let dev = UringDevice::open(&path).unwrap();
    let cfg = PoolConfig {
        total_bytes: 8 << 20,
        buf_bytes: 64 << 10,
        cores: 1,
        page_size: PageSize::Huge2M,
        require_hugepages: true,
    };
    for round in 0..3 {
        let pool = BufferPool::new(&cfg).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(pool.region().backing, Backing::Hugepages(PageSize::Huge2M));
        let qp = dev
            .create_queue_pair(QueuePairConfig {
                depth: 8,
                region: Some(pool.region()),
                sqpoll: false,
                worker_cpus: Vec::new(),
            })
            .unwrap();
        drop(qp);
        drop(pool);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

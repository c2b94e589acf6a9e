//! On the real kernel: reserve a few 2 MiB hugepages (as root), build a pool that requires
//! them, check what it reports, and give the pages back. Skips (with a message) when not root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_hugepages::{Backing, BufferPool, PageSize, PoolConfig, PoolError};

const NR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

struct Restore(String);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(NR, &self.0);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn pool_on_real_hugepages() {
    if !is_root() || std::fs::metadata(NR).is_err() {
        eprintln!("SKIP: needs root and 2 MiB hugepage support");
        return;
    }
    let before = std::fs::read_to_string(NR).unwrap().trim().to_string();
    let _restore = Restore(before.clone());
    let want = before.parse::<u64>().unwrap() + 4;
    std::fs::write(NR, want.to_string()).unwrap();
    if std::fs::read_to_string(NR)
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
        < want
    {
        eprintln!("SKIP: the kernel could not reserve 4 more hugepages");
        return;
    }
    let cfg = PoolConfig {
        total_bytes: 8 << 20,
        buf_bytes: 1 << 20,
        cores: 2,
        page_size: PageSize::Huge2M,
        require_hugepages: true,
    };
    let mut pool = BufferPool::new(&cfg).unwrap();
    let r = pool.region();
    assert_eq!(r.backing, Backing::Hugepages(PageSize::Huge2M));
    assert_eq!(r.base % (2 << 20), 0, "hugepage region is 2 MiB aligned");
    assert_eq!(r.len, 8 << 20);
    assert!(
        pool.has_phys_addrs(),
        "root sees physical addresses in /proc/self/pagemap"
    );
    let mut c0 = pool.take_core(0).unwrap();
    let a = c0.alloc().unwrap();
    let b = c0.alloc().unwrap();
    let (pa, pb) = (a.phys_addr().unwrap(), b.phys_addr().unwrap());
    assert_eq!(pa % 4096, 0);
    // Two 1 MiB buffers of the same 2 MiB page are physically adjacent.
    if a.addr() / (2 << 20) == b.addr() / (2 << 20) {
        assert_eq!(pa.abs_diff(pb), 1 << 20);
    }
    // Hugepages in use show up in the kernel's accounting.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let free: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("HugePages_Free:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(free <= want - 4);
    drop((a, b, c0, pool));
    // With none left to give, `require_hugepages` fails with a message naming the script.
    std::fs::write(NR, &before).unwrap();
    if before == "0" {
        let e = BufferPool::new(&cfg).err().expect("no hugepages reserved");
        assert!(matches!(e, PoolError::NoHugepages { .. }));
        assert!(e.to_string().contains("scripts/hugepages setup"), "{e}");
    }
}

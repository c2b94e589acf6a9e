//! The same conformance checks on every backend: the memory model and io_uring on a real file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_hugepages::{BufferPool, PageSize, PoolConfig, PoolCore};
use cfs_nvme::mem::MemDevice;
use cfs_nvme::uring::UringDevice;
use cfs_nvme::{
    BlockDevice, Command, Completion, IoStatus, QueuePair, QueuePairConfig, SubmitError,
};

fn pool() -> (BufferPool, PoolCore) {
    let mut p = BufferPool::new(&PoolConfig {
        total_bytes: 4 << 20,
        buf_bytes: 128 << 10,
        cores: 1,
        page_size: PageSize::Huge2M,
        require_hugepages: false,
    })
    .unwrap();
    let c = p.take_core(0).unwrap();
    (p, c)
}

fn wait(qp: &mut dyn QueuePair, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    for _ in 0..1_000_000 {
        qp.poll(&mut out, 64);
        if out.len() >= n {
            return out;
        }
        std::thread::yield_now();
    }
    panic!("completions did not arrive");
}

fn conformance(dev: &dyn BlockDevice, pool: &mut PoolCore) {
    let ns = dev.namespace();
    assert_eq!(ns.lba_size, 4096);
    let mut qp = dev
        .create_queue_pair(QueuePairConfig {
            depth: 8,
            region: Some(pool.region()),
            sqpoll: false,
            worker_cpus: Vec::new(),
        })
        .unwrap();
    // Write 8 distinct blocks, 2 at a time with different patterns, then read them back.
    for i in 0..4u64 {
        let mut b = pool.alloc().unwrap();
        b.as_mut_slice()[..8192].fill(i as u8 + 1);
        qp.submit(Command::write(i * 2, 2, b, i)).unwrap();
    }
    let done = wait(qp.as_mut(), 4);
    let mut tags: Vec<_> = done.iter().map(|c| c.tag).collect();
    tags.sort();
    assert_eq!(tags, vec![0, 1, 2, 3]);
    for c in done {
        c.result.unwrap();
        pool.free(c.buf.unwrap());
    }
    qp.submit(Command::flush(99)).unwrap();
    for c in wait(qp.as_mut(), 1) {
        assert_eq!(c.tag, 99);
        c.result.unwrap();
    }
    let b = pool.alloc().unwrap();
    qp.submit(Command::read(0, 8, b, 7)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    c.result.unwrap();
    let b = c.buf.unwrap();
    for i in 0..8usize {
        assert!(b.as_slice()[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&x| x == (i / 2) as u8 + 1));
    }
    pool.free(b);
    // Write zeroes and deallocate both read back as zero.
    qp.submit(Command::write_zeroes(0, 2, 1)).unwrap();
    qp.submit(Command::deallocate(2, 2, 2)).unwrap();
    for c in wait(qp.as_mut(), 2) {
        c.result.unwrap();
    }
    let b = pool.alloc().unwrap();
    qp.submit(Command::read(0, 6, b, 3)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    let b = c.buf.unwrap();
    assert!(b.as_slice()[..4 * 4096].iter().all(|&x| x == 0));
    assert!(b.as_slice()[4 * 4096..6 * 4096].iter().all(|&x| x == 3));
    pool.free(b);
    // Out of range: a completion with an error naming the device, the LBA and the status.
    let b = pool.alloc().unwrap();
    qp.submit(Command::read(ns.lba_count - 1, 2, b, 5)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    let e = c.result.unwrap_err();
    assert_eq!(e.status, IoStatus::LbaOutOfRange);
    let msg = e.to_string();
    assert!(
        msg.contains(dev.name()) && msg.contains(&format!("lba {}", ns.lba_count - 1)),
        "{msg}"
    );
    pool.free(c.buf.unwrap());
    // A buffer too small for the transfer is refused.
    let b = pool.alloc().unwrap();
    qp.submit(Command::read(0, 64, b, 6)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    assert_eq!(c.result.unwrap_err().status, IoStatus::InvalidBuffer);
    pool.free(c.buf.unwrap());
    // A full queue hands the command back.
    let depth = qp.depth();
    let mut accepted = 0;
    let mut bounced = None;
    for i in 0..depth + 1 {
        let b = pool.alloc().unwrap();
        match qp.submit(Command::read(u64::from(i), 1, b, 100 + u64::from(i))) {
            Ok(()) => accepted += 1,
            Err(SubmitError::QueueFull(cmd)) => bounced = Some(cmd),
        }
    }
    assert_eq!(accepted, depth);
    pool.free(bounced.expect("one command bounced").buf.unwrap());
    for c in wait(qp.as_mut(), depth as usize) {
        c.result.unwrap();
        pool.free(c.buf.unwrap());
    }
    assert_eq!(qp.in_flight(), 0);
}

#[test]
fn memory_backend_conformance() {
    let (_p, mut core) = pool();
    let dev = MemDevice::new("mem0", 4096, 256, 1);
    conformance(&dev, &mut core);
}

#[test]
fn uring_file_backend_conformance() {
    let (_p, mut core) = pool();
    let dir = std::env::temp_dir().join(format!("cfs-nvme-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dev.img");
    UringDevice::create_file(&path, 1 << 20).unwrap();
    let dev = UringDevice::open(&path).unwrap();
    assert_eq!(dev.namespace().lba_count, 256);
    conformance(&dev, &mut core);
    drop(dev);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn uring_sqpoll_round_trip() {
    let (_p, mut pool) = pool();
    let dir = std::env::temp_dir().join(format!("cfs-nvme-sqpoll-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dev.img");
    UringDevice::create_file(&path, 1 << 20).unwrap();
    let dev = UringDevice::open(&path).unwrap();
    let mut qp = dev
        .create_queue_pair(QueuePairConfig {
            depth: 4,
            region: Some(pool.region()),
            sqpoll: true,
            worker_cpus: Vec::new(),
        })
        .unwrap();
    let mut b = pool.alloc().unwrap();
    b.as_mut_slice()[..4096].fill(0xab);
    qp.submit(Command::write(5, 1, b, 1)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    c.result.unwrap();
    qp.submit(Command::read(5, 1, c.buf.unwrap(), 2)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    assert!(c.buf.as_ref().unwrap().as_slice()[..4096]
        .iter()
        .all(|&x| x == 0xab));
    drop(qp);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_power_loss_keeps_flushed_and_may_tear_unflushed() {
    let (_p, mut pool) = pool();
    let dev = MemDevice::new("mem1", 4096, 64, 42);
    let mut qp = dev
        .create_queue_pair(QueuePairConfig {
            depth: 8,
            region: None,
            sqpoll: false,
            worker_cpus: Vec::new(),
        })
        .unwrap();
    let mut b = pool.alloc().unwrap();
    b.as_mut_slice()[..4096].fill(1);
    qp.submit(Command::write(0, 1, b, 0)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    qp.submit(Command::flush(1)).unwrap();
    wait(qp.as_mut(), 1).pop().unwrap().result.unwrap();
    let mut b = c.buf.unwrap();
    b.as_mut_slice()[..32 * 4096].fill(2);
    qp.submit(Command::write(0, 32, b, 2)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    c.result.unwrap();
    dev.cut_power_after(0);
    qp.submit(Command::flush(3)).unwrap();
    assert_eq!(
        wait(qp.as_mut(), 1)
            .pop()
            .unwrap()
            .result
            .unwrap_err()
            .status,
        IoStatus::PowerLost
    );
    dev.power_cycle();
    // The old queue pair is dead; a new one sees block 0 as 1 or 2 and nothing else.
    qp.submit(Command::read(0, 1, c.buf.unwrap(), 4)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    assert_eq!(c.result.unwrap_err().status, IoStatus::PowerLost);
    let mut qp = dev
        .create_queue_pair(QueuePairConfig {
            depth: 8,
            region: None,
            sqpoll: false,
            worker_cpus: Vec::new(),
        })
        .unwrap();
    qp.submit(Command::read(0, 32, c.buf.unwrap(), 5)).unwrap();
    let c = wait(qp.as_mut(), 1).pop().unwrap();
    c.result.unwrap();
    let b = c.buf.unwrap();
    let first = b.as_slice()[0];
    assert!(first == 1 || first == 2);
    for blk in b.as_slice()[..32 * 4096].chunks(4096) {
        assert!(
            blk.iter().all(|&x| x == blk[0]),
            "a block is never torn inside"
        );
    }
}

//! `cfs-nvme-check [PCI_ADDR]`: drives a real NVMe controller bound to vfio-pci through our
//! userspace driver and checks it: identify, read/write round trips at many sizes and offsets
//! (one page, two pages, PRP lists, the largest transfer), write zeroes, deallocate, flush,
//! two threads on their own queue pairs at once, and random operations checked against an
//! in-memory model. Without an address it takes the first NVMe controller bound to vfio-pci.
//! Prints `ok`/`FAIL` lines and `N passed, M failed`; exits non-zero on a failure.
//!
//! `cfs-nvme-check bench vfio PCI_ADDR | bench uring /dev/nvmeXnY [SECONDS]`: 4 KiB random
//! reads, 32 in flight, from one thread that submits and polls without sleeping, through the
//! same `QueuePair` loop on either backend; prints IOPS and CPU time per I/O (the thread's own,
//! and the whole machine's from /proc/stat, which includes interrupts and kernel helpers).
//!
//! Destroys the data on the device. Run by `scripts/test-vfio.sh` inside a QEMU guest.

use cfs_hugepages::{BufferPool, DmaBuf, PageSize, PoolConfig, PoolCore};
use cfs_nvme::vfio::VfioNvme;
use cfs_nvme::{
    BlockDevice, Command, Completion, IoStatus, QueuePair, QueuePairConfig, SubmitError,
};
use std::time::Instant;

struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, what: &str, r: Result<String, String>) {
        match r {
            Ok(detail) => {
                self.passed += 1;
                println!(
                    "ok   - {what}{}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                );
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL - {what}: {e}");
            }
        }
    }
}

/// The first PCI function bound to vfio-pci whose class is NVMe (0x010802).
fn find_controller() -> Option<String> {
    let mut found: Vec<String> = std::fs::read_dir("/sys/bus/pci/drivers/vfio-pci")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(':'))
        .filter(|n| {
            std::fs::read_to_string(format!("/sys/bus/pci/devices/{n}/class"))
                .is_ok_and(|c| c.trim() == "0x010802")
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Runs one command to completion on `qp`.
fn run(qp: &mut dyn QueuePair, cmd: Command) -> Completion {
    let mut cmd = Some(cmd);
    let mut out = Vec::new();
    let start = Instant::now();
    loop {
        if let Some(c) = cmd.take() {
            if let Err(SubmitError::QueueFull(c)) = qp.submit(c) {
                cmd = Some(c);
            }
        }
        qp.poll(&mut out, 1);
        if let Some(c) = out.pop() {
            return c;
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "a command took over a minute"
        );
    }
}

/// [`run`], sending the command again if a controller reset failed it (a read, or a write of
/// the same data: doing it twice is harmless).
fn run_retry(qp: &mut dyn QueuePair, cmd: Command) -> Completion {
    let (op, lba, nlb, tag) = (cmd.opcode, cmd.lba, cmd.nlb, cmd.tag);
    let mut c = run(qp, cmd);
    for _ in 0..3 {
        match &c.result {
            Err(e) if e.status == IoStatus::Reset => {
                let again = Command {
                    opcode: op,
                    lba,
                    nlb,
                    buf: c.buf.take(),
                    tag,
                };
                c = run(qp, again);
            }
            _ => break,
        }
    }
    c
}

fn fill(buf: &mut DmaBuf, len: usize, seed: u64) {
    let mut x = seed | 1;
    for b in buf.as_mut_slice()[..len].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// Writes `nlb` blocks at `lba` with a pattern and reads them back.
fn round_trip(
    qp: &mut dyn QueuePair,
    pool: &mut PoolCore,
    lba_bytes: usize,
    lba: u64,
    nlb: u32,
    seed: u64,
) -> Result<(), String> {
    let len = nlb as usize * lba_bytes;
    let mut w = pool.alloc().ok_or("pool empty")?;
    fill(&mut w, len, seed);
    let c = run(qp, Command::write(lba, nlb, w, seed));
    c.result.map_err(|e| e.to_string())?;
    let w = c.buf.ok_or("write lost its buffer")?;
    let mut r = pool.alloc().ok_or("pool empty")?;
    r.as_mut_slice()[..len].fill(0xEE);
    let c = run(qp, Command::read(lba, nlb, r, seed + 1));
    c.result.map_err(|e| e.to_string())?;
    let r = c.buf.ok_or("read lost its buffer")?;
    let same = w.as_slice()[..len] == r.as_slice()[..len];
    pool.free(w);
    pool.free(r);
    if same {
        Ok(())
    } else {
        Err(format!("{nlb} blocks at {lba} read back different"))
    }
}

/// CPU time this thread has run, in nanoseconds (/proc/thread-self/schedstat).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Busy and total CPU time of the machine, in clock ticks (/proc/stat's `cpu` line).
fn machine_cpu_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// 4 KiB random reads at queue depth 32 for `seconds` on `dev`, one thread, no sleeping.
fn bench(dev: &dyn BlockDevice, seconds: u64) -> Result<String, String> {
    let ns = dev.namespace();
    let mut pool = BufferPool::new(&PoolConfig {
        total_bytes: 64 * 4096,
        buf_bytes: 4096,
        cores: 1,
        page_size: PageSize::Huge2M,
        require_hugepages: false,
    })
    .map_err(|e| e.to_string())?;
    let mut core = pool.take_core(0).ok_or("pool share")?;
    let mut qp = dev
        .create_queue_pair(QueuePairConfig {
            depth: 32,
            region: Some(pool.region()),
            ..QueuePairConfig::default()
        })
        .map_err(|e| e.to_string())?;
    let nlb = (4096 / ns.lba_size).max(1);
    let slots = ns.lba_count / u64::from(nlb);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut out = Vec::new();
    let (mut done, mut in_flight) = (0u64, 0u32);
    let (busy0, total0) = machine_cpu_ticks();
    let cpu0 = thread_cpu_ns();
    let start = Instant::now();
    let end = start + std::time::Duration::from_secs(seconds);
    while Instant::now() < end || in_flight > 0 {
        while in_flight < 32 && Instant::now() < end {
            let Some(buf) = core.alloc() else { break };
            let lba = (next() % slots) * u64::from(nlb);
            match qp.submit(Command::read(lba, nlb, buf, 0)) {
                Ok(()) => in_flight += 1,
                Err(SubmitError::QueueFull(c)) => {
                    if let Some(b) = c.buf {
                        core.free(b);
                    }
                    break;
                }
            }
        }
        out.clear();
        qp.poll(&mut out, 64);
        for c in out.drain(..) {
            in_flight -= 1;
            c.result.map_err(|e| e.to_string())?;
            if let Some(b) = c.buf {
                core.free(b);
            }
            done += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_ns = thread_cpu_ns().saturating_sub(cpu0);
    let (busy1, total1) = machine_cpu_ticks();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // The machine's busy share of all its CPUs over the run, as CPU-seconds.
    let machine_cpu_s = if total1 > total0 {
        (busy1 - busy0) as f64 / (total1 - total0) as f64 * cpus * secs
    } else {
        0.0
    };
    Ok(format!(
        "BENCH {} iops={:.0} thread_cpu_us_per_io={:.2} machine_cpu_us_per_io={:.2} ios={done} seconds={secs:.1}",
        dev.name(),
        done as f64 / secs,
        cpu_ns as f64 / 1000.0 / done.max(1) as f64,
        machine_cpu_s * 1e6 / done.max(1) as f64,
    ))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("bench") {
        let seconds = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5);
        let r = match (args.get(2).map(String::as_str), args.get(3)) {
            (Some("vfio"), Some(pci)) => VfioNvme::open(pci)
                .map_err(|e| e.to_string())
                .and_then(|d| bench(&d, seconds)),
            (Some("uring"), Some(path)) => {
                cfs_nvme::uring::UringDevice::open(std::path::Path::new(path))
                    .map_err(|e| e.to_string())
                    .and_then(|d| bench(&d, seconds))
            }
            _ => Err(
                "usage: cfs-nvme-check bench vfio PCI_ADDR | bench uring DEVICE [SECONDS]".into(),
            ),
        };
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => {
                println!("BENCH failed: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let pci = match std::env::args().nth(1).or_else(find_controller) {
        Some(p) => p,
        None => {
            println!("FAIL - no NVMe controller bound to vfio-pci");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let mut rep = Report {
        passed: 0,
        failed: 0,
    };
    // A short command timeout: no command here takes long, so any reset the checks did not
    // ask for is a false timeout (see the idle check below).
    let opts = cfs_nvme::vfio::VfioOptions {
        command_timeout_ms: 2_000,
        ..Default::default()
    };
    let dev = match VfioNvme::open_with(&pci, &opts) {
        Ok(d) => d,
        Err(e) => {
            println!("FAIL - open {pci}: {e}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let info = dev.info();
    let ns = dev.namespace();
    rep.check(
        "identify",
        Ok(format!(
            "{pci}: model '{}', serial '{}', NVMe {}.{}, {} blocks of {} bytes, MDTS {} KiB, {} I/O queues",
            info.id.model,
            info.id.serial,
            info.version >> 16,
            (info.version >> 8) & 0xFF,
            ns.lba_count,
            ns.lba_size,
            info.max_transfer_bytes >> 10,
            info.io_queues
        )),
    );
    let buf_bytes = info
        .max_transfer_bytes
        .next_power_of_two()
        .clamp(4096, 2 << 20);
    let mut pool = match BufferPool::new(&PoolConfig {
        total_bytes: buf_bytes * 32,
        buf_bytes,
        cores: 2,
        page_size: PageSize::Huge2M,
        require_hugepages: false,
    }) {
        Ok(p) => p,
        Err(e) => {
            rep.check("buffer pool", Err(e.to_string()));
            println!("{} passed, {} failed", rep.passed, rep.failed);
            std::process::exit(1);
        }
    };
    let region = pool.region();
    let qcfg = QueuePairConfig {
        depth: 64,
        region: Some(region),
        ..QueuePairConfig::default()
    };
    let mut core0 = pool.take_core(0).expect("core 0");
    let mut core1 = pool.take_core(1).expect("core 1");
    // The first queue pair describes data with PRPs.
    dev.set_sgls(false);
    let mut qp = match dev.create_queue_pair(qcfg.clone()) {
        Ok(q) => q,
        Err(e) => {
            rep.check("create an I/O queue pair", Err(e.to_string()));
            println!("{} passed, {} failed", rep.passed, rep.failed);
            std::process::exit(1);
        }
    };
    let lba_bytes = ns.lba_size as usize;
    let max_nlb = (info.max_transfer_bytes.min(buf_bytes) / lba_bytes) as u32;

    // Sizes: a block, a page, two pages, PRP lists of several pages, the largest transfer;
    // at block offsets that make the transfer start inside a page too.
    let mut sizes: Vec<u32> = vec![
        1,
        2,
        7,
        8,
        9,
        16,
        17,
        33,
        64,
        100,
        255,
        256,
        max_nlb - 1,
        max_nlb,
    ];
    sizes.retain(|n| *n >= 1 && *n <= max_nlb);
    let trips = |qp: &mut dyn QueuePair, core: &mut PoolCore| -> Result<String, String> {
        let mut bad = Vec::new();
        let mut n = 0;
        for (i, nlb) in sizes.iter().enumerate() {
            for lba in [0u64, 1, 3, 8, 4095, ns.lba_count - u64::from(*nlb)] {
                n += 1;
                if let Err(e) = round_trip(qp, core, lba_bytes, lba, *nlb, (i as u64) << 32 | lba) {
                    bad.push(e);
                }
            }
        }
        if bad.is_empty() {
            Ok(format!(
                "{n} round trips, largest {} KiB",
                (u64::from(max_nlb) * lba_bytes as u64) >> 10
            ))
        } else {
            Err(bad.join("; "))
        }
    };
    rep.check(
        "read/write round trips with PRPs (1 block to the largest transfer, PRP lists, at offsets incl. the last block)",
        trips(qp.as_mut(), &mut core0),
    );
    // The same with one SGL data block descriptor per command, on a queue pair of its own; the
    // queue pairs made from here on use SGLs.
    if dev.set_sgls(true) {
        let r = match dev.create_queue_pair(qcfg.clone()) {
            Ok(mut qs) => trips(qs.as_mut(), &mut core0),
            Err(e) => Err(e.to_string()),
        };
        rep.check("read/write round trips with SGLs", r);
    } else {
        rep.check(
            "read/write round trips with SGLs",
            Err(format!(
                "the controller offers no SGLs (SGLS {:#x})",
                info.id.sgls
            )),
        );
    }

    // Bad requests fail cleanly: past the end, too large.
    let past = run(
        qp.as_mut(),
        Command::read(ns.lba_count, 1, core0.alloc().expect("buf"), 1),
    );
    let big = if max_nlb as usize * lba_bytes < buf_bytes {
        Some(run(
            qp.as_mut(),
            Command::read(0, max_nlb + 1, core0.alloc().expect("buf"), 2),
        ))
    } else {
        None
    };
    let zeros = run(qp.as_mut(), Command::write_zeroes(0, (1 << 16) + 1, 3));
    let clean = past.result.is_err()
        && big.as_ref().is_none_or(|c| c.result.is_err())
        && zeros.result.is_err();
    rep.check(
        "out-of-range and oversized commands (read, write zeroes) fail without I/O",
        if clean {
            Ok(past
                .result
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default())
        } else {
            Err("accepted".into())
        },
    );
    for c in [Some(past), big].into_iter().flatten() {
        if let Some(b) = c.buf {
            core0.free(b);
        }
    }

    // Write zeroes and deallocate read back as zeros (QEMU's controller supports both).
    let zeroes = (|| -> Result<String, String> {
        round_trip(qp.as_mut(), &mut core0, lba_bytes, 100, 8, 77)?;
        run(qp.as_mut(), Command::write_zeroes(100, 4, 5))
            .result
            .map_err(|e| e.to_string())?;
        let c = run(
            qp.as_mut(),
            Command::read(100, 8, core0.alloc().ok_or("pool")?, 6),
        );
        c.result.map_err(|e| e.to_string())?;
        let b = c.buf.ok_or("lost buffer")?;
        let zero = b.as_slice()[..4 * lba_bytes].iter().all(|x| *x == 0);
        let kept = b.as_slice()[4 * lba_bytes..8 * lba_bytes]
            .iter()
            .any(|x| *x != 0);
        core0.free(b);
        if !(zero && kept) {
            return Err("write zeroes did not zero exactly its range".into());
        }
        if info.id.dataset_management() {
            run(qp.as_mut(), Command::deallocate(104, 4, 7))
                .result
                .map_err(|e| e.to_string())?;
        }
        run(qp.as_mut(), Command::flush(8))
            .result
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "deallocate {}",
            if info.id.dataset_management() {
                "too"
            } else {
                "not offered"
            }
        ))
    })();
    rep.check("write zeroes, deallocate, flush", zeroes);

    // Two threads, each on its own queue pair, write and verify disjoint ranges at once.
    let mut qp1 = dev.create_queue_pair(qcfg.clone());
    let two = match qp1.as_mut() {
        Err(e) => Err(e.to_string()),
        Ok(q1) => std::thread::scope(|s| {
            let q1 = q1.as_mut();
            let c1 = &mut core1;
            let t = s.spawn(move || -> Result<u32, String> {
                for k in 0..200u64 {
                    round_trip(q1, c1, lba_bytes, 10_000 + k * 16, 16, k)?;
                }
                Ok(200)
            });
            let mut mine = Ok(200);
            for k in 0..200u64 {
                if let Err(e) = round_trip(
                    qp.as_mut(),
                    &mut core0,
                    lba_bytes,
                    20_000 + k * 16,
                    16,
                    k + 1000,
                ) {
                    mine = Err(e);
                    break;
                }
            }
            let theirs = t
                .join()
                .map_err(|_| "thread panicked".to_string())
                .and_then(|r| r);
            match (mine, theirs) {
                (Ok(a), Ok(b)) => Ok(format!("{} + {} round trips on queues of their own", a, b)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        }),
    };
    rep.check("two polling threads on their own queue pairs", two);

    // A queue pair left idle longer than the command timeout, then busy again: the first new
    // command must not look as old as the last poll (no reset).
    let before = dev.resets();
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let mut idle = Ok(String::new());
    for k in 0..300u64 {
        if let Err(e) = round_trip(qp.as_mut(), &mut core0, lba_bytes, 30_000 + k, 1, k) {
            idle = Err(e);
            break;
        }
    }
    if idle.is_ok() && dev.resets() != before {
        idle = Err("the controller was reset: a false command timeout".into());
    }
    rep.check(
        "an idle queue pair busy again causes no false timeout (2 s command timeout)",
        idle.map(|_| "300 round trips after 2.5 s idle, no reset".into()),
    );
    drop(qp1);

    // Random operations against a model: 10 000 commands, up to 32 in flight, over 512
    // blocks; each write gets a fresh pattern; reads are checked against the model when no
    // write to an overlapping range is in flight.
    let model = random_ops(qp.as_mut(), &mut core0, lba_bytes, 10_000, 0xC0FFEE, 40_000);
    rep.check(
        "10 000 random operations checked against an in-memory model",
        match model {
            Ok((s, 0)) => Ok(s),
            Ok((_, n)) => Err(format!("{n} commands failed by a reset nobody asked for")),
            Err(e) => Err(e),
        },
    );

    // A controller reset in the middle of I/O: a thread keeps 32 commands in flight on its
    // own queue pair while the main thread resets the controller (twice). Commands in flight
    // fail with `Reset` (their writes may or may not have landed), the queue pairs re-create
    // their queues, I/O goes on, and every block reads back as something the model allows.
    let mut qp2 = dev.create_queue_pair(qcfg.clone());
    let resets = match qp2.as_mut() {
        Err(e) => Err(e.to_string()),
        Ok(q2) => std::thread::scope(|s| {
            let q2 = q2.as_mut();
            let c1 = &mut core1;
            let worker = s.spawn(move || random_ops(q2, c1, lba_bytes, 20_000, 0xBADC0DE, 60_000));
            let mut r = Ok(());
            for _ in 0..2 {
                std::thread::sleep(std::time::Duration::from_millis(300));
                if let Err(e) = dev.reset() {
                    r = Err(e.to_string());
                }
            }
            let w = worker
                .join()
                .map_err(|_| "worker panicked".to_string())
                .and_then(|x| x);
            // The main thread's own queue pair recovers too.
            let after = round_trip(qp.as_mut(), &mut core0, lba_bytes, 7_000, 8, 99);
            match (r, w, after) {
                (Ok(()), Ok((s, failed)), Ok(())) => Ok(format!(
                    "{} resets, {failed} commands failed by them; {s}; the other queue pair works after",
                    dev.resets()
                )),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
            }
        }),
    };
    rep.check("controller reset in the middle of I/O", resets);
    drop(qp2);

    drop(qp);
    drop(dev);
    rep.check(
        "controller shut down (CC.SHN) and released",
        Ok(String::new()),
    );
    println!("{} passed, {} failed", rep.passed, rep.failed);
    if rep.failed > 0 {
        std::process::exit(1);
    }
}

/// Random reads and writes over `BLOCKS` blocks at `base`, up to 32 in flight (never two on
/// overlapping blocks), checked against a model. A command failed by a controller reset may or
/// may not have happened: the blocks of such a write may hold the old or the new data until
/// they are written again. Returns a summary, and the number of commands failed by resets.
fn random_ops(
    qp: &mut dyn QueuePair,
    pool: &mut PoolCore,
    lba_bytes: usize,
    count: u32,
    seed: u64,
    base: u64,
) -> Result<(String, u32), String> {
    const BLOCKS: u64 = 512;
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // What each block may hold: seeds of the writes that may have written it last (0: zeros).
    let mut model = vec![vec![0u64]; BLOCKS as usize];
    run_retry(qp, Command::write_zeroes(base, BLOCKS as u32, 0))
        .result
        .map_err(|e| e.to_string())?;
    // In flight: tag -> (is_write, lba, nlb, seed).
    let mut flight: std::collections::HashMap<u64, (bool, u64, u32, u64)> = Default::default();
    let (mut issued, mut reads_checked, mut writes, mut reset_failed) = (0u32, 0u32, 0u32, 0u32);
    let mut out = Vec::new();
    let mut tag = 1u64;
    let busy =
        |flight: &std::collections::HashMap<u64, (bool, u64, u32, u64)>, lba: u64, nlb: u32| {
            flight
                .values()
                .any(|(_, l, n, _)| *l < lba + u64::from(nlb) && lba < l + u64::from(*n))
        };
    let check = |got: &[u8], may: &[u64]| {
        may.iter().any(|want| {
            if *want == 0 {
                got.iter().all(|x| *x == 0)
            } else {
                got.chunks(8).all(|c| c == &want.to_le_bytes()[..c.len()])
            }
        })
    };
    let start = Instant::now();
    while issued < count || !flight.is_empty() {
        if start.elapsed().as_secs() > 240 {
            return Err(format!("not done after 240 s ({issued} issued)"));
        }
        if issued < count && flight.len() < 32 {
            let nlb = 1 + (next() % 16) as u32;
            let lba = next() % (BLOCKS - u64::from(nlb) + 1);
            let write = next() % 2 == 0;
            if !busy(&flight, lba, nlb) {
                if let Some(mut buf) = pool.alloc() {
                    let s = next() | 1;
                    if write {
                        for b in 0..nlb as usize {
                            let one = s.wrapping_add(b as u64).to_le_bytes();
                            for chunk in
                                buf.as_mut_slice()[b * lba_bytes..(b + 1) * lba_bytes].chunks_mut(8)
                            {
                                chunk.copy_from_slice(&one[..chunk.len()]);
                            }
                        }
                    }
                    let cmd = if write {
                        Command::write(base + lba, nlb, buf, tag)
                    } else {
                        Command::read(base + lba, nlb, buf, tag)
                    };
                    match qp.submit(cmd) {
                        Ok(()) => {
                            flight.insert(tag, (write, lba, nlb, s));
                            tag += 1;
                            issued += 1;
                        }
                        Err(SubmitError::QueueFull(c)) => {
                            if let Some(b) = c.buf {
                                pool.free(b);
                            }
                        }
                    }
                }
            }
        }
        out.clear();
        qp.poll(&mut out, 8);
        for c in out.drain(..) {
            let (write, lba, nlb, s) = flight
                .remove(&c.tag)
                .ok_or("completion for an unknown tag")?;
            let buf = c.buf.ok_or("lost buffer")?;
            match c.result {
                Err(e) if e.status == IoStatus::Reset => {
                    reset_failed += 1;
                    if write {
                        for b in 0..nlb as u64 {
                            model[(lba + b) as usize].push(s.wrapping_add(b));
                        }
                    }
                }
                Err(e) => {
                    pool.free(buf);
                    return Err(e.to_string());
                }
                Ok(()) if write => {
                    for b in 0..nlb as u64 {
                        model[(lba + b) as usize] = vec![s.wrapping_add(b)];
                    }
                    writes += 1;
                }
                Ok(()) => {
                    for b in 0..nlb as usize {
                        let got = &buf.as_slice()[b * lba_bytes..(b + 1) * lba_bytes];
                        if !check(got, &model[lba as usize + b]) {
                            pool.free(buf);
                            return Err(format!("block {} read back wrong", lba as usize + b));
                        }
                    }
                    reads_checked += 1;
                }
            }
            pool.free(buf);
        }
    }
    // Finally every block reads back as one of what the model allows.
    for lba in (0..BLOCKS).step_by(16) {
        let c = run_retry(
            qp,
            Command::read(base + lba, 16, pool.alloc().ok_or("pool empty")?, 0),
        );
        c.result.map_err(|e| e.to_string())?;
        let buf = c.buf.ok_or("lost buffer")?;
        for b in 0..16usize {
            if !check(
                &buf.as_slice()[b * lba_bytes..(b + 1) * lba_bytes],
                &model[lba as usize + b],
            ) {
                pool.free(buf);
                return Err(format!(
                    "block {} wrong in the final read",
                    lba as usize + b
                ));
            }
        }
        pool.free(buf);
    }
    Ok((
        format!("{writes} writes, {reads_checked} reads verified, up to 32 in flight, final read of all {BLOCKS} blocks verified"),
        reset_failed,
    ))
}

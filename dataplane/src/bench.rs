//! `cfs-dataplane bench`: the chunk store against fio on the same file, same run.
//!
//! The store's workloads run as tasks on the reactor itself (one pinned, busy-polling core),
//! so they measure the storage engine, not a client transport. CPU time is the process's
//! (the reactor, io_uring's helpers; the main thread only waits). fio runs the same patterns
//! with its io_uring engine and O_DIRECT on the same file afterwards.

use anyhow::{bail, Context, Result};
use cfs_dataplane::config::Config;
use cfs_dataplane::reactor::{self, Engine, ReactorCtx};
use cfs_nvme::rng::SimRng;
use cfs_nvme::uring::UringDevice;
use cfs_nvme::BlockDevice;
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `cfs-dataplane bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Scratch directory (its file system is what is measured); the file is deleted afterwards.
    #[arg(long, default_value = "/var/tmp/cfs-bench")]
    dir: PathBuf,
    /// Data set size in MiB (written, then read and overwritten at random).
    #[arg(long, default_value_t = 1024)]
    data_mib: u64,
    /// Seconds per workload.
    #[arg(long, default_value_t = 8)]
    secs: u64,
    /// Core the reactor is pinned to.
    #[arg(long, default_value_t = 1)]
    core: usize,
    /// Use io_uring SQPOLL for the store.
    #[arg(long)]
    sqpoll: bool,
    /// Skip fio.
    #[arg(long)]
    no_fio: bool,
    /// Run only the workloads whose name contains this (e.g. "rand write"); the data set is
    /// still written first.
    #[arg(long)]
    only: Option<String>,
    /// Append the markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug)]
enum Pattern {
    SeqWrite,
    SeqRead,
    RandRead,
    RandWrite,
}

impl Pattern {
    fn fio_rw(self) -> &'static str {
        match self {
            Pattern::SeqWrite => "write",
            Pattern::SeqRead => "read",
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
        }
    }
}

struct Figure {
    name: String,
    ops_per_sec: f64,
    mib_per_sec: f64,
    cpu_frac: f64,
    /// Fraction of the reactor's time spent in loop iterations that did work (store only).
    busy_frac: f64,
    p50_us: f64,
    p99_us: f64,
}

const CHUNK_BYTES: u64 = 64 << 20;

/// CPU seconds used by this process so far (/proc/self/stat utime + stime, in USER_HZ=100).
fn process_cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command: state is index 0, utime is field 14 overall -> index 11.
    (ticks(11) + ticks(12)) / 100.0
}

fn run_store(
    engine: &Engine,
    pattern: Pattern,
    bs: usize,
    qd: usize,
    secs: u64,
    data_bytes: u64,
) -> Result<Figure> {
    let chunks = data_bytes.div_ceil(CHUNK_BYTES);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(u64, Histogram<u64>), String>>(qd);
    let (busy_tx, busy_rx) = std::sync::mpsc::sync_channel::<u64>(2);
    let busy_tx2 = busy_tx.clone();
    let cpu0 = process_cpu_secs();
    let t0 = Instant::now();
    engine.run_on(0, move |ctx: &Rc<ReactorCtx>| {
        let _ = busy_tx.send(ctx.busy_ns.get());
        let deadline = Instant::now() + Duration::from_secs(secs);
        // Sequential patterns: tasks take consecutive blocks of the data set in turn.
        let cursor = Rc::new(RefCell::new(0u64));
        for t in 0..qd {
            let ctx2 = Rc::clone(ctx);
            let tx = tx.clone();
            let cursor = Rc::clone(&cursor);
            ctx.ex.spawn(async move {
                let mut rng = SimRng::new(t as u64 * 7919 + 1);
                let mut hist =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let mut n = 0u64;
                let data = vec![0x5au8; bs];
                loop {
                    let pos = match pattern {
                        Pattern::SeqWrite | Pattern::SeqRead => {
                            let mut c = cursor.borrow_mut();
                            if *c + bs as u64 > data_bytes {
                                if matches!(pattern, Pattern::SeqWrite) {
                                    break; // the data set is written exactly once
                                }
                                *c = 0;
                            }
                            let p = *c;
                            *c += bs as u64;
                            p
                        }
                        Pattern::RandRead | Pattern::RandWrite => {
                            rng.below(data_bytes / bs as u64) * bs as u64
                        }
                    };
                    if Instant::now() >= deadline && !matches!(pattern, Pattern::SeqWrite) {
                        break;
                    }
                    let (chunk, off) = (pos / CHUNK_BYTES, pos % CHUNK_BYTES);
                    let Some(shard) = ctx2.shard_for(chunk) else {
                        let _ = tx.send(Err("chunk not on reactor 0".into()));
                        return;
                    };
                    let start = Instant::now();
                    let r = match pattern {
                        Pattern::SeqWrite | Pattern::RandWrite => {
                            shard.write(chunk, off, &data).await
                        }
                        Pattern::SeqRead | Pattern::RandRead => {
                            shard.read(chunk, off, bs).await.map(|_| ())
                        }
                    };
                    if let Err(e) = r {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                    let _ = hist.record(start.elapsed().as_micros().max(1) as u64);
                    n += 1;
                }
                let _ = tx.send(Ok((n, hist)));
            });
        }
    })?;
    let mut total = 0;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..qd {
        let (n, h) = rx
            .recv()
            .context("reactor went away")?
            .map_err(anyhow::Error::msg)?;
        total += n;
        hist.add(h)?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = process_cpu_secs() - cpu0;
    engine.run_on(0, move |ctx: &Rc<ReactorCtx>| {
        let _ = busy_tx2.send(ctx.busy_ns.get());
    })?;
    let busy0 = busy_rx.recv()?;
    let busy1 = busy_rx.recv()?;
    let busy_frac = (busy1 - busy0) as f64 / 1e9 / wall;
    let ops = total as f64 / wall;
    let _ = chunks;
    Ok(Figure {
        name: String::new(),
        ops_per_sec: ops,
        mib_per_sec: ops * bs as f64 / (1 << 20) as f64,
        cpu_frac: cpu / wall,
        busy_frac,
        p50_us: hist.value_at_quantile(0.5) as f64,
        p99_us: hist.value_at_quantile(0.99) as f64,
    })
}

fn run_fio(
    file: &Path,
    pattern: Pattern,
    bs: usize,
    qd: usize,
    secs: u64,
    data_bytes: u64,
    extra: &[&str],
) -> Result<Figure> {
    let mut cmd = Command::new("fio");
    cmd.args(extra);
    cmd.args([
        "--name=cfs",
        "--ioengine=io_uring",
        "--direct=1",
        "--thread",
        "--output-format=json",
    ])
    .arg(format!("--filename={}", file.display()))
    .arg(format!("--rw={}", pattern.fio_rw()))
    .arg(format!("--bs={bs}"))
    .arg(format!("--iodepth={qd}"))
    .arg(format!("--size={data_bytes}"))
    .arg("--randrepeat=0")
    .arg("--norandommap");
    if !matches!(pattern, Pattern::SeqWrite) {
        cmd.arg(format!("--runtime={secs}")).arg("--time_based");
    }
    let out = cmd
        .output()
        .context("cannot run fio (install it: scripts/deps bench)")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON output")?;
    let job = &v["jobs"][0];
    let side = if matches!(pattern, Pattern::SeqWrite | Pattern::RandWrite) {
        &job["write"]
    } else {
        &job["read"]
    };
    let iops = side["iops"].as_f64().unwrap_or(0.0);
    let cpu =
        (job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0)) / 100.0;
    let pct = |q: &str| side["clat_ns"]["percentile"][q].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Figure {
        name: String::new(),
        ops_per_sec: iops,
        mib_per_sec: iops * bs as f64 / (1 << 20) as f64,
        cpu_frac: cpu,
        busy_frac: cpu,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.data_mib < 64 {
        bail!("--data-mib must be at least 64");
    }
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    let file = a.dir.join("bench.img");
    let _ = std::fs::remove_file(&file);
    let data_bytes = a.data_mib << 20;
    // Room for the data set plus journals, checkpoints and copy-on-write headroom.
    let dev_bytes = data_bytes * 2 + (512 << 20);
    let text = format!(
        "data_dir = \"{}\"\n[[devices]]\npath = \"bench.img\"\nsize = \"{}\"\n[reactors]\ncores = [{}]\nbusy_poll = true\nqueue_depth = 256\nsqpoll = {}\n[hugepages]\npool_mib = 64\nbuf_kib = 128\n[format]\nshards_per_device = 4\n",
        a.dir.display(),
        dev_bytes,
        a.core,
        a.sqpoll
    );
    let cfg = Config::parse(&text, Path::new("bench.toml"))?;
    // Write the whole file once so neither the store nor fio pays for file-system block
    // allocation (on a raw NVMe device there is none).
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file)?;
        let zeros = vec![0u8; 8 << 20];
        for _ in 0..dev_bytes / zeros.len() as u64 {
            f.write_all(&zeros)?;
        }
        f.sync_all()?;
    }
    UringDevice::create_file(&file, dev_bytes)?;
    let devs = || -> Result<Vec<Arc<dyn BlockDevice>>> {
        Ok(vec![
            Arc::new(UringDevice::open(&file)?) as Arc<dyn BlockDevice>
        ])
    };
    reactor::format(&cfg, &devs()?, [9; 16], 0)?;
    let engine = Engine::start(&cfg, devs()?)?;
    let (region, _) = engine.pool_region();
    let fs = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&a.dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "# cfs-dataplane bench: {} MiB data set on {} ({}), {} s per workload, reactor on core {} (busy-poll{}), buffers on {}",
        a.data_mib,
        file.display(),
        fs,
        a.secs,
        a.core,
        if a.sqpoll { ", SQPOLL" } else { "" },
        region.backing
    );
    // Store writes are acknowledged only when durable (journal + flush); plain fio writes are
    // not, so each write workload also runs fio with an fdatasync every `qd` writes.
    let workloads: Vec<(&str, Pattern, usize, usize)> = vec![
        ("seq write 128k qd16", Pattern::SeqWrite, 128 << 10, 16),
        ("seq read 128k qd16", Pattern::SeqRead, 128 << 10, 16),
        ("rand read 4k qd1", Pattern::RandRead, 4096, 1),
        ("rand read 4k qd16", Pattern::RandRead, 4096, 16),
        ("rand read 4k qd64", Pattern::RandRead, 4096, 64),
        ("rand write 4k qd1", Pattern::RandWrite, 4096, 1),
        ("rand write 4k qd16", Pattern::RandWrite, 4096, 16),
        ("rand write 4k qd64", Pattern::RandWrite, 4096, 64),
    ];
    let workloads: Vec<(&str, Pattern, usize, usize)> = workloads
        .into_iter()
        .enumerate()
        .filter(|(i, (name, ..))| *i == 0 || a.only.as_deref().is_none_or(|o| name.contains(o)))
        .map(|(_, w)| w)
        .collect();
    let fio_runs: Vec<(String, usize, Vec<String>)> = workloads
        .iter()
        .enumerate()
        .flat_map(|(i, (name, p, _, qd))| {
            let mut v = vec![(name.to_string(), i, Vec::new())];
            if matches!(p, Pattern::SeqWrite | Pattern::RandWrite) {
                v.push((
                    format!("{name} +fdatasync/{qd}"),
                    i,
                    vec![format!("--fdatasync={qd}")],
                ));
            }
            v
        })
        .collect();
    let mut store = Vec::new();
    for (name, p, bs, qd) in &workloads {
        let mut f = run_store(&engine, *p, *bs, *qd, a.secs, data_bytes)?;
        f.name = name.to_string();
        eprintln!(
            "store {name}: {:.0} ops/s {:.1} MiB/s cpu {:.2}",
            f.ops_per_sec, f.mib_per_sec, f.cpu_frac
        );
        store.push(f);
    }
    engine.shutdown()?;
    let mut fio = Vec::new();
    if !a.no_fio {
        for (name, i, extra) in &fio_runs {
            let (_, p, bs, qd) = workloads[*i];
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let mut f = run_fio(&file, p, bs, qd, a.secs, data_bytes, &extra)?;
            f.name = name.clone();
            eprintln!(
                "fio   {name}: {:.0} ops/s {:.1} MiB/s cpu {:.2}",
                f.ops_per_sec, f.mib_per_sec, f.cpu_frac
            );
            fio.push((*i, f));
        }
    }
    let _ = std::fs::remove_file(&file);
    // Store per core: ops per busy reactor core (loop iterations that did work, as SPDK counts
    // it: a polling core's idle spins are not work). fio per core: ops per CPU second it used.
    let mut table = String::new();
    table.push_str("| workload | store ops/s | store MiB/s | store p50/p99 us | store CPU / busy | store ops per busy core | fio run | fio ops/s | fio MiB/s | fio p50/p99 us | fio CPU | fio ops per CPU | ops ratio | per-core ratio |\n");
    table.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (i, s) in store.iter().enumerate() {
        let per_busy = s.ops_per_sec / s.busy_frac.max(1e-9);
        let left = format!(
            "| {} | {:.0} | {:.1} | {:.0}/{:.0} | {:.2} / {:.2} | {:.0} ",
            s.name,
            s.ops_per_sec,
            s.mib_per_sec,
            s.p50_us,
            s.p99_us,
            s.cpu_frac,
            s.busy_frac,
            per_busy
        );
        let mine: Vec<&Figure> = fio
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, f)| f)
            .collect();
        if mine.is_empty() {
            table.push_str(&format!("{left}| - | - | - | - | - | - | - | - |\n"));
        }
        for f in mine {
            let per = f.ops_per_sec / f.cpu_frac.max(1e-9);
            table.push_str(&format!(
                "{left}| {} | {:.0} | {:.1} | {:.0}/{:.0} | {:.2} | {:.0} | {:.2}x | {:.2}x |\n",
                f.name
                    .strip_prefix(&s.name)
                    .map(str::trim)
                    .filter(|x| !x.is_empty())
                    .unwrap_or("plain"),
                f.ops_per_sec,
                f.mib_per_sec,
                f.p50_us,
                f.p99_us,
                f.cpu_frac,
                per,
                s.ops_per_sec / f.ops_per_sec.max(1e-9),
                per_busy / per.max(1e-9)
            ));
        }
    }
    println!("{table}");
    if let Some(out) = a.out {
        let mut prev = std::fs::read_to_string(&out).unwrap_or_default();
        prev.push_str(&table);
        std::fs::write(&out, prev).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

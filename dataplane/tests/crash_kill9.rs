//! kill -9 a real `cfs-dataplane` process under a durable write load, many times, and verify
//! after every restart that each acknowledged write is intact and each unacknowledged one is
//! wholly present or wholly absent. The seed is printed; `CFS_CRASH_SEED=<n>` reproduces the
//! workload and kill times (the kernel's scheduling still varies).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::config::Config;
use cfs_dataplane::reactor::Engine;
use cfs_dataplane::store::StoreError;
use cfs_dataplane::workload::{sector_is, SECTOR};
use cfs_nvme::rng::SimRng;
use cfs_nvme::uring::UringDevice;
use cfs_nvme::BlockDevice;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cfs-dataplane");
const CHUNKS: u64 = 8;
const SPAN: u64 = 1 << 20;
const SECTORS: usize = (SPAN / SECTOR as u64) as usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Zero,
    Op(u64),
}

struct Op {
    chunk: u64,
    start: usize,
    len: usize,
}

fn config_text(dir: &Path, cores: &str) -> String {
    format!(
        "data_dir = \"{}\"\n[[devices]]\npath = \"data0.img\"\nsize = \"256M\"\n[reactors]\ncores = {cores}\n[hugepages]\npool_mib = 16\nbuf_kib = 128\n[format]\nshards_per_device = 4\n",
        dir.display()
    )
}

fn verify(
    cfg: &Config,
    acked: &mut HashMap<u64, Vec<Content>>,
    unacked: &[(u64, Op)],
    round: u32,
    seed: u64,
) {
    let devs: Vec<Arc<dyn BlockDevice>> = cfg
        .resolved_devices()
        .into_iter()
        .map(|(p, _)| Arc::new(UringDevice::open(&p).unwrap()) as Arc<dyn BlockDevice>)
        .collect();
    let engine = Engine::start(cfg, devs)
        .unwrap_or_else(|e| panic!("seed {seed} round {round}: restart failed: {e}"));
    for chunk in 1..=CHUNKS {
        let data = match engine.read(chunk, 0, SPAN as usize) {
            Ok(d) => d,
            Err(StoreError::NotFound { .. }) => vec![0u8; SPAN as usize],
            Err(e) => panic!("seed {seed} round {round}: read chunk {chunk} after restart: {e}"),
        };
        let a = acked
            .entry(chunk)
            .or_insert_with(|| vec![Content::Zero; SECTORS]);
        let mut got = vec![Content::Zero; SECTORS];
        for (i, s) in data.chunks(SECTOR).enumerate() {
            let matches = |c: Content| match c {
                Content::Zero => s.iter().all(|&b| b == 0),
                Content::Op(id) => sector_is(id, i as u64, s),
            };
            let cands = std::iter::once(a[i]).chain(
                unacked
                    .iter()
                    .filter(|(_, o)| o.chunk == chunk && (o.start..o.start + o.len).contains(&i))
                    .map(|(id, _)| Content::Op(*id)),
            );
            let mut found = None;
            for c in cands {
                if matches(c) {
                    found = Some(c);
                    break;
                }
            }
            got[i] = found.unwrap_or_else(|| {
                panic!("seed {seed} round {round}: chunk {chunk} sector {i}: data of no acknowledged or in-flight write (acknowledged: {:?})", a[i])
            });
        }
        for (id, o) in unacked.iter().filter(|(_, o)| o.chunk == chunk) {
            let present = (o.start..o.start + o.len)
                .filter(|&i| got[i] == Content::Op(*id))
                .count();
            assert!(
                present == 0 || present == o.len,
                "seed {seed} round {round}: write {id} torn: {present} of {} sectors",
                o.len
            );
        }
        *a = got;
    }
    engine.shutdown().unwrap();
}

#[test]
fn kill9_under_write_load_loses_no_acknowledged_write() {
    let seed: u64 = std::env::var("CFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds: u32 = std::env::var("CFS_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    eprintln!("crash_kill9: seed {seed} ({rounds} rounds); rerun with CFS_CRASH_SEED={seed}");
    let dir = std::env::temp_dir().join(format!("cfs-crash-{}-{seed}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("cfs.toml");
    let mut rng = SimRng::new(seed);
    let mut acked: HashMap<u64, Vec<Content>> = HashMap::new();
    let mut next_id = 1u64;
    let (mut total_acked, mut total_unacked) = (0usize, 0usize);
    for round in 0..rounds {
        // Alternate one and two reactors: the store is shared by however many run.
        let cores = if round % 2 == 0 { "[0]" } else { "[0, 1]" };
        std::fs::write(&cfg_path, config_text(&dir, cores)).unwrap();
        if round == 0 {
            let st = Command::new(BIN)
                .args(["format", "--config"])
                .arg(&cfg_path)
                .status()
                .unwrap();
            assert!(st.success(), "format failed");
        }
        let cfg = Config::load(&cfg_path).unwrap();
        let mut child = Command::new(BIN)
            .args(["load", "--config"])
            .arg(&cfg_path)
            .args([
                "--seed",
                &(seed ^ u64::from(round)).to_string(),
                "--ops",
                "10000000",
                "--depth",
                "16",
            ])
            .args([
                "--first-id",
                &next_id.to_string(),
                "--chunks",
                &CHUNKS.to_string(),
                "--span",
                &SPAN.to_string(),
            ])
            .env("CFS_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for READY, then let it write for a random while and kill it.
        let t0 = Instant::now();
        let mut lines = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) if l == "READY" => break,
                Ok(l) => lines.push(l),
                Err(_) => panic!("seed {seed} round {round}: load did not start"),
            }
        }
        let run_ms = 100 + rng.below(500);
        std::thread::sleep(Duration::from_millis(run_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        assert!(t0.elapsed() < Duration::from_secs(60));
        // Replay the log into the model.
        let mut issued: HashMap<u64, Op> = HashMap::new();
        let mut round_acked = 0;
        for l in &lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.first().copied() {
                Some("I") => {
                    let id: u64 = f[1].parse().unwrap();
                    let op = Op {
                        chunk: f[2].parse().unwrap(),
                        start: f[3].parse().unwrap(),
                        len: f[4].parse().unwrap(),
                    };
                    next_id = next_id.max(id + 1);
                    issued.insert(id, op);
                }
                Some("A") => {
                    let id: u64 = f[1].parse().unwrap();
                    let op = issued.remove(&id).expect("ack for an issued write");
                    let a = acked
                        .entry(op.chunk)
                        .or_insert_with(|| vec![Content::Zero; SECTORS]);
                    a[op.start..op.start + op.len].fill(Content::Op(id));
                    round_acked += 1;
                }
                Some("E") => panic!("seed {seed} round {round}: write failed before the kill: {l}"),
                _ => {}
            }
        }
        assert!(
            round_acked > 0,
            "seed {seed} round {round}: no write was acknowledged in {run_ms} ms"
        );
        let unacked: Vec<(u64, Op)> = issued.into_iter().collect();
        total_acked += round_acked;
        total_unacked += unacked.len();
        verify(&cfg, &mut acked, &unacked, round, seed);
        eprintln!("crash_kill9: round {round}: killed after {run_ms} ms, {round_acked} acknowledged writes, {} in flight: verified", unacked.len());
    }
    eprintln!("crash_kill9: {rounds} kills, {total_acked} acknowledged writes verified, {total_unacked} in-flight writes all-or-nothing");
    assert!(total_unacked > 0, "no kill ever caught a write in flight");
    std::fs::remove_dir_all(&dir).unwrap();
}

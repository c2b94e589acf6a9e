//! Benchmark (not a test): reading registered server memory over the two one-sided paths,
//! TCP (`Client::read_region`: the server copies the bytes into its socket) and libfabric
//! RMA (`fi_read`: the provider serves them), same machine, same run, loopback.
//!
//! `cargo run --release -p cfs-fabric --example rma_bench [-- PROVIDER]` (default
//! `tcp;ofi_rxm`). The server runs as a child process, so its CPU time (utime + stime from
//! /proc) is measured apart from the client's. Reads are sequential (one in flight): the
//! latencies are round trips. Prints one line per size and path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_fabric::ofi::{Endpoint, HeapMemory, RemoteRegion, RmaMemory};
use cfs_fabric::{
    Client, ClientConfig, RegionKey, RegionTable, Server, ServerConfig, Service, ServiceFuture,
};
use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

const REGION: usize = 64 << 20;

struct NoService;
impl Service for NoService {
    fn call(&self, _method: u32, _payload: bytes::Bytes) -> ServiceFuture {
        Box::pin(async { Ok(bytes::Bytes::new()) })
    }
}

fn pattern() -> Vec<u8> {
    (0..REGION as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u8)
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn server(provider: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let data = pattern();
    let regions = RegionTable::new();
    let key = regions.register(Arc::new(data.clone()));
    let srv = rt
        .block_on(Server::bind(
            "127.0.0.1:0",
            Arc::new(NoService),
            Arc::clone(&regions),
            ServerConfig::default(),
        ))
        .unwrap();
    let ep = Endpoint::open(Some(provider), "127.0.0.1").unwrap();
    let mem = Arc::new(HeapMemory::new(REGION));
    mem.copy_in(0, &data);
    let reg = ep.register(mem, true).unwrap();
    let r = reg.remote();
    println!(
        "READY {} {} {} {} {} {}",
        srv.local_addr(),
        key.0,
        hex(&ep.address().unwrap()),
        r.addr,
        r.key,
        r.len
    );
    std::io::stdout().flush().unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = Arc::clone(&done);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line); // EOF: the client is done
        d.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    // The software provider serves peers' reads from its progress engine: poll it, sleeping
    // briefly between polls (a polled-mode core would spin instead).
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        ep.progress().unwrap();
        std::thread::sleep(Duration::from_micros(10));
    }
    drop(reg);
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // utime and stime are fields 14 and 15 (1-based; index 11 and 12 after the name).
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn report(path: &str, size: usize, mut lat: Vec<Duration>, total: Duration, cpu_s: f64) {
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    let bytes = (size * lat.len()) as f64;
    println!(
        "{path:<5} {:>8} {:>6} reads  p50 {:>8.1} us  p99 {:>8.1} us  {:>8.1} MiB/s  server CPU {:>6.2} s/GiB",
        if size >= 1 << 20 { format!("{} MiB", size >> 20) } else { format!("{} KiB", size >> 10) },
        lat.len(),
        p(0.5),
        p(0.99),
        bytes / total.as_secs_f64() / (1u64 << 20) as f64,
        cpu_s / (bytes / (1u64 << 30) as f64),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("server") {
        server(&args[2]);
        return;
    }
    let provider = args.get(1).cloned().unwrap_or_else(|| "tcp;ofi_rxm".into());
    let mut child = std::process::Command::new(&args[0])
        .args(["server", &provider])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f[0], "READY", "server said {line}");
    let (addr, key) = (f[1].to_string(), RegionKey(f[2].parse().unwrap()));
    let remote = RemoteRegion {
        addr: f[4].parse().unwrap(),
        key: f[5].parse().unwrap(),
        len: f[6].parse().unwrap(),
    };
    let pid = child.id();
    let data = pattern();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tcp = Client::new(
        addr,
        ClientConfig {
            request_timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        },
    );
    let ep = Endpoint::open(Some(&provider), "127.0.0.1").unwrap();
    let peer = ep.insert_peer(&unhex(f[3])).unwrap();
    let local = ep
        .register(Arc::new(HeapMemory::new(1 << 20)), false)
        .unwrap();
    println!(
        "provider {} (domain {}), {REGION} B region, one read in flight",
        ep.provider(),
        ep.domain()
    );
    for (size, n) in [(4096usize, 5000usize), (1 << 20, 500)] {
        let at = |i: usize| ((i * 7919 * 4096) % (REGION - size)) as u64;
        // TCP
        let cpu0 = cpu_seconds(pid);
        let t0 = Instant::now();
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let s = Instant::now();
            let got = rt
                .block_on(tcp.read_region(key, at(i), size as u32))
                .unwrap();
            lat.push(s.elapsed());
            if i == 0 {
                assert!(got[..] == data[at(0) as usize..at(0) as usize + size]);
            }
        }
        report("tcp", size, lat, t0.elapsed(), cpu_seconds(pid) - cpu0);
        // RMA
        let cpu0 = cpu_seconds(pid);
        let t0 = Instant::now();
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let s = Instant::now();
            ep.read(
                peer,
                &remote,
                at(i),
                &local,
                0,
                size,
                Duration::from_secs(30),
            )
            .unwrap();
            lat.push(s.elapsed());
            if i == 0 {
                let mut got = vec![0u8; size];
                local.memory().copy_out(0, &mut got);
                assert!(got[..] == data[at(0) as usize..at(0) as usize + size]);
            }
        }
        report("rma", size, lat, t0.elapsed(), cpu_seconds(pid) - cpu0);
    }
    drop(child.stdin.take());
    let _ = child.wait();
}

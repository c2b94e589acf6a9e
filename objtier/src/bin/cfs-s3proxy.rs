//! `cfs-s3proxy`: a test proxy in front of an S3 server (HTTP/1.1 on loopback) that records
//! every request it forwards ("METHOD target range", one line each, to `--log`) and can make
//! the store slow and unreliable: `--delay-ms` before each request, a 503 for one request in
//! `--fail-every`, a response cut short (headers and part of the body, then the connection
//! ends) for one in `--cut-every`. Each request goes upstream on its own connection, so a
//! killed and restarted server is picked up at once. Used by `scripts/test-tier.sh`.
//!
//! Usage: cfs-s3proxy LISTEN_PORT UPSTREAM_PORT LOG [--delay-ms N] [--fail-every N]
//! [--cut-every N]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Proxy {
    upstream: u16,
    delay: Duration,
    fail_every: u64,
    cut_every: u64,
    requests: AtomicU64,
    cut_due: AtomicBool,
    log: Mutex<std::fs::File>,
}

/// One request: its head (with "Connection: close" for the upstream), body, and log line.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<(Vec<u8>, String)> {
    let mut head = Vec::new();
    let mut len = 0u64;
    let mut first = String::new();
    let mut range = String::from("-");
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if first.is_empty() {
            first = line
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = lower.strip_prefix("range:") {
            range = v.trim().to_string();
        }
        if lower.starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = Vec::new();
    r.take(len).read_to_end(&mut body).ok()?;
    head.extend_from_slice(&body);
    Some((head, format!("{first} {range}")))
}

fn serve(client: TcpStream, p: &Proxy) {
    let Ok(mut out) = client.try_clone() else {
        return;
    };
    let mut r = BufReader::new(client);
    while let Some((req, line)) = read_request(&mut r) {
        let n = p.requests.fetch_add(1, Ordering::Relaxed) + 1;
        std::thread::sleep(p.delay);
        if p.fail_every > 0 && n % p.fail_every == p.fail_every / 2 {
            let _ = writeln!(
                p.log.lock().unwrap_or_else(|e| e.into_inner()),
                "{line} FAILED"
            );
            let _ = out.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        let Ok(mut up) = TcpStream::connect(("127.0.0.1", p.upstream)) else {
            let _ = writeln!(
                p.log.lock().unwrap_or_else(|e| e.into_inner()),
                "{line} DOWN"
            );
            return; // the server is down: drop the client's connection
        };
        let _ = writeln!(p.log.lock().unwrap_or_else(|e| e.into_inner()), "{line}");
        if up.write_all(&req).is_err() {
            return;
        }
        let mut resp = Vec::new();
        let _ = up.read_to_end(&mut resp);
        if p.cut_every > 0 && n.is_multiple_of(p.cut_every) {
            p.cut_due.store(true, Ordering::Relaxed);
        }
        if resp.len() > 400 && p.cut_due.swap(false, Ordering::Relaxed) {
            let _ = writeln!(
                p.log.lock().unwrap_or_else(|e| e.into_inner()),
                "{line} CUT"
            );
            let _ = out.write_all(&resp[..resp.len() * 2 / 3]);
            return;
        }
        if out.write_all(&resp).is_err() {
            return;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: cfs-s3proxy LISTEN_PORT UPSTREAM_PORT LOG [--delay-ms N] [--fail-every N] [--cut-every N]";
    if args.len() < 3 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let num = |s: &str| -> u64 {
        s.parse().unwrap_or_else(|_| {
            eprintln!("{usage}: `{s}` is not a number");
            std::process::exit(2)
        })
    };
    let (mut delay, mut fail_every, mut cut_every) = (0, 0, 0);
    let mut i = 3;
    while i < args.len() {
        let v = args.get(i + 1).map(|s| num(s)).unwrap_or_else(|| {
            eprintln!("{usage}");
            std::process::exit(2)
        });
        match args[i].as_str() {
            "--delay-ms" => delay = v,
            "--fail-every" => fail_every = v,
            "--cut-every" => cut_every = v,
            other => {
                eprintln!("{usage}: unknown option {other}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args[2])
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cfs-s3proxy: cannot open {}: {e}", args[2]);
            std::process::exit(1);
        }
    };
    let l = match TcpListener::bind(("127.0.0.1", num(&args[0]) as u16)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cfs-s3proxy: cannot listen on {}: {e}", args[0]);
            std::process::exit(1);
        }
    };
    let p = Arc::new(Proxy {
        upstream: num(&args[1]) as u16,
        delay: Duration::from_millis(delay),
        fail_every,
        cut_every,
        requests: AtomicU64::new(0),
        cut_due: AtomicBool::new(false),
        log: Mutex::new(log),
    });
    for c in l.incoming() {
        let Ok(client) = c else { continue };
        let p = Arc::clone(&p);
        std::thread::spawn(move || serve(client, &p));
    }
}

//! The object tier on a bad store: a proxy in front of a real S3 server (s3s-fs) adds 200 ms to
//! every request and fails or truncates some responses; and the server is killed in the middle
//! of a flush and started again. Uploads must all land and every extent must read back
//! byte-identical. (Skipped without s3s-fs unless `CFS_REQUIRE_S3=1`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cfs_objtier::mover::{Mover, MoverConfig};
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the proxy did.
#[derive(Default)]
struct Faults {
    requests: AtomicU64,
    failed: AtomicU64,
    truncated: AtomicU64,
    /// A truncation is due on the next response with a body worth cutting.
    cut_due: std::sync::atomic::AtomicBool,
}

/// A proxy that forwards each request on its own upstream connection after `delay`, and
/// answers one request in `every` with a 503 and cuts one response in `every` short (the next
/// one with a body, once due).
fn fault_proxy(upstream: u16, delay: Duration, every: u64) -> (u16, Arc<Faults>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let faults = Arc::new(Faults::default());
    let f = Arc::clone(&faults);
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { return };
            let f = Arc::clone(&f);
            std::thread::spawn(move || serve(client, upstream, delay, every, &f));
        }
    });
    (port, faults)
}

/// One request (head and Content-Length body), with "Connection: close" for the upstream.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut len = 0u64;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
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
    Some(head)
}

fn serve(client: TcpStream, upstream: u16, delay: Duration, every: u64, f: &Faults) {
    let mut out = client.try_clone().unwrap();
    let mut r = BufReader::new(client);
    while let Some(req) = read_request(&mut r) {
        let n = f.requests.fetch_add(1, Ordering::Relaxed) + 1;
        std::thread::sleep(delay);
        if n % every == every / 2 {
            f.failed.fetch_add(1, Ordering::Relaxed);
            let _ = out.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
            return; // the server is down: drop the client's connection
        };
        if up.write_all(&req).is_err() {
            return;
        }
        let mut resp = Vec::new();
        let _ = up.read_to_end(&mut resp);
        if n.is_multiple_of(every) {
            f.cut_due.store(true, Ordering::Relaxed);
        }
        if resp.len() > 400 && f.cut_due.swap(false, Ordering::Relaxed) {
            // Headers and part of the body, then the connection ends.
            f.truncated.fetch_add(1, Ordering::Relaxed);
            let _ = out.write_all(&resp[..resp.len() * 2 / 3]);
            return;
        }
        if out.write_all(&resp).is_err() {
            return;
        }
    }
}

fn mover(port: u16) -> Mover {
    Mover::new(
        store(&format!("http://127.0.0.1:{port}"), SECRET),
        MoverConfig {
            backoff_base_ms: 50,
            backoff_cap_ms: 1000,
            breaker_threshold: 4,
            breaker_open_ms: 500,
            deadline_ms: 60_000,
        },
    )
}

#[test]
fn slow_and_flaky_store_tiering_completes_and_reads_back() {
    let Some(srv) = s3s_fs() else { return };
    // 200 ms on every request; 5% answered 503, 5% cut short.
    let (port, faults) = fault_proxy(srv.port, Duration::from_millis(200), 20);
    let m = mover(port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blobs: Vec<_> = (1..=10).map(|k| make_blob(100 + k, 3 << 20)).collect();
    rt.block_on(async {
        for (id, bytes, _, _) in &blobs {
            m.put_blob(*id, bytes.clone().into()).await.unwrap();
        }
        for (_, _, placed, datas) in &blobs {
            for (p, d) in placed.iter().zip(datas) {
                assert!(
                    m.get_extent(p).await.unwrap() == *d,
                    "extent of chunk {} differs",
                    p.chunk
                );
            }
        }
    });
    let st = m.status();
    let (failed, truncated) = (
        faults.failed.load(Ordering::Relaxed),
        faults.truncated.load(Ordering::Relaxed),
    );
    eprintln!(
        "{} requests, {failed} answered 503, {truncated} cut short; {} retries by the mover",
        faults.requests.load(Ordering::Relaxed),
        st.retries
    );
    assert!(failed > 0 && truncated > 0, "the proxy injected no fault");
    assert_eq!((st.puts, st.missing), (10, 0));
}

#[test]
fn a_store_killed_in_the_middle_of_a_flush_gets_every_blob_when_it_returns() {
    let Some(mut srv) = s3s_fs() else { return };
    let m = Arc::new(mover(srv.port));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blobs: Vec<_> = (1..=8).map(|k| make_blob(200 + k, 2 << 20)).collect();
    let uploads = {
        let (m, blobs) = (Arc::clone(&m), blobs.clone());
        rt.spawn(async move {
            for (id, bytes, _, _) in &blobs {
                m.put_blob(*id, bytes.clone().into()).await.unwrap();
            }
        })
    };
    // Kill the server once a blob or two are up, keep it down for 3 s, start it again on the
    // same port and directory.
    while m.status().puts < 2 {
        std::thread::sleep(Duration::from_millis(5));
    }
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let during = m.status();
    assert!(during.puts < 8, "the flush finished before the outage");
    srv.child = spawn_s3s_fs(srv.port, srv.root.as_ref().unwrap());
    rt.block_on(uploads).unwrap();
    rt.block_on(async {
        for (_, _, placed, datas) in &blobs {
            for (p, d) in placed.iter().zip(datas) {
                assert!(m.get_extent(p).await.unwrap() == *d);
            }
        }
    });
    let st = m.status();
    eprintln!("after the outage: {st:?}");
    assert!(st.retries > 0, "no request failed during the outage");
    assert_eq!(st.puts, 8);
}

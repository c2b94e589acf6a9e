//! Blobs on two independent S3 servers started here on loopback (TESTBED.md): s3s-fs (checks
//! SigV4 signatures, stores objects as files) and moto_server (in memory). Every request goes
//! through a recording proxy, so the tests can hold the tier to PUT, ranged GET and DELETE
//! only. Without the servers the tests say so and pass, unless `CFS_REQUIRE_S3=1` (set by
//! `make test`, whose set-up installs them) makes that a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use cfs_objtier::blob::{BlobBuilder, BlobId};
use cfs_objtier::s3::S3Error;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A TCP proxy in front of a server that records every request line ("METHOD target") it
/// forwards (HTTP/1.1 with Content-Length bodies, keep-alive connections).
struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn new(upstream: u16) -> Recorder {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut s2, mut c2) = (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
                let log = Arc::clone(&log);
                std::thread::spawn(move || forward_requests(client, server, &log));
            }
        });
        Recorder { port, seen }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn forward_requests(client: TcpStream, mut server: TcpStream, log: &Mutex<Vec<String>>) {
    let mut r = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = server.shutdown(std::net::Shutdown::Write);
                return;
            }
            if head.is_empty() {
                log.lock().unwrap().push(
                    line.split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" "),
                );
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                if let Some(last) = log.lock().unwrap().last_mut() {
                    last.push(' ');
                    last.push_str(v.trim());
                }
            }
            if let Some(v) = line
                .to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
            {
                len = v.parse().unwrap_or(0);
            }
            let end = line == "\r\n";
            head.extend_from_slice(line.as_bytes());
            if end {
                break;
            }
        }
        if server.write_all(&head).is_err() {
            return;
        }
        let mut body = (&mut r).take(len as u64);
        if std::io::copy(&mut body, &mut server).is_err() {
            return;
        }
    }
}

#[test]
fn blobs_go_up_and_come_back_with_only_put_ranged_get_and_delete() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for srv in servers() {
        let rec = Recorder::new(srv.port);
        let st = store(&rec.endpoint(), SECRET);
        let blobs: Vec<_> = (1..=3).map(|k| make_blob(k, 8 << 20)).collect();
        rt.block_on(async {
            for (id, bytes, _, _) in &blobs {
                st.put_blob(*id, bytes.clone().into()).await.unwrap();
            }
            for (id, _, placed, datas) in &blobs {
                let (_, table) = st.read_table(*id).await.unwrap();
                assert_eq!(&table, placed, "{}: table of {id}", srv.name);
                for (p, d) in placed.iter().zip(datas) {
                    assert!(
                        st.get_extent(p).await.unwrap() == *d,
                        "{}: extent differs",
                        srv.name
                    );
                }
            }
            st.delete_blob(blobs[0].0).await.unwrap();
            match st.get_extent(&blobs[0].2[0]).await {
                Err(S3Error::Missing { key }) => assert!(key.ends_with(&blobs[0].0.to_string())),
                other => panic!("{}: a deleted blob read as {other:?}", srv.name),
            }
        });
        let seen = rec.take();
        let count = |m: &str| seen.iter().filter(|l| l.starts_with(m)).count();
        assert_eq!(count("PUT "), 3, "{}: {seen:?}", srv.name);
        assert_eq!(count("DELETE "), 1, "{}: {seen:?}", srv.name);
        assert_eq!(
            count("GET ") + count("PUT ") + count("DELETE "),
            seen.len(),
            "{}: {seen:?}",
            srv.name
        );
        for l in &seen {
            for banned in ["list-type", "uploads", "uploadId", "?delete", "prefix="] {
                assert!(!l.contains(banned), "{}: {l}", srv.name);
            }
            assert!(
                l.contains("/tier/cluster-a/blobs/"),
                "{}: outside the prefix: {l}",
                srv.name
            );
        }
    }
}

#[test]
fn a_64_mib_blob_is_one_put() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for srv in servers() {
        let rec = Recorder::new(srv.port);
        let st = store(&rec.endpoint(), SECRET);
        let (id, bytes, placed, datas) = make_blob(64, 64 << 20);
        assert!(bytes.len() > 60 << 20, "a blob of nearly 64 MiB");
        rt.block_on(async {
            st.put_blob(id, bytes.into()).await.unwrap();
            let last = placed.len() - 1;
            assert!(st.get_extent(&placed[last]).await.unwrap() == datas[last]);
        });
        let seen = rec.take();
        assert_eq!(
            seen.iter().filter(|l| l.starts_with("PUT ")).count(),
            1,
            "{}: {seen:?}",
            srv.name
        );
        assert_eq!(seen.len(), 2, "{}: {seen:?}", srv.name);
    }
}

#[test]
fn corrupted_bytes_and_bad_credentials_are_errors_not_data() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(srv) = s3s_fs() else { return };
    let st = store(&format!("http://127.0.0.1:{}", srv.port), SECRET);
    let (id, bytes, placed, _) = make_blob(9, 2 << 20);
    rt.block_on(st.put_blob(id, bytes.into())).unwrap();
    // s3s-fs keeps the object as a file: damage one extent's bytes on its disk.
    let root = srv.root.clone().unwrap();
    let file = root.join(BUCKET).join(id.key("cluster-a"));
    let mut raw = std::fs::read(&file).unwrap();
    let p = placed.iter().find(|p| p.len > 1000).unwrap();
    raw[p.blob_offset as usize + 500] ^= 0xff;
    std::fs::write(&file, raw).unwrap();
    match rt.block_on(st.get_extent(p)) {
        Err(S3Error::Corrupt { .. }) => {}
        other => panic!("a corrupted extent read as {:?}", other.map(|d| d.len())),
    }
    // The other extents still read.
    let q = placed
        .iter()
        .find(|q| q.blob_offset != p.blob_offset)
        .unwrap();
    rt.block_on(st.get_extent(q)).unwrap();
    // s3s-fs checks signatures: the wrong secret is refused.
    let bad = store(&format!("http://127.0.0.1:{}", srv.port), "not-the-secret");
    match rt.block_on(bad.get_extent(q)) {
        Err(S3Error::Request { op: "GET", .. }) => {}
        other => panic!("a wrong secret gave {:?}", other.map(|d| d.len())),
    }
}

/// A piece of an extent is read as the 1 MiB blocks around it (one ranged GET of exactly
/// those), checked block by block; a damaged block is `Corrupt` while its neighbours read;
/// blobs of format 1 (no block CRCs) still read whole.
#[test]
fn pieces_of_an_extent_are_read_by_their_blocks() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for srv in servers() {
        let rec = Recorder::new(srv.port);
        let st = store(&rec.endpoint(), SECRET);
        let (id, bytes, placed, datas) = make_blob(21, 8 << 20);
        rt.block_on(st.put_blob(id, bytes.into())).unwrap();
        let (i, p) = placed
            .iter()
            .enumerate()
            .find(|(_, p)| p.len == 3 << 20)
            .unwrap();
        rec.take();
        let table = rt.block_on(st.read_full_table(id)).unwrap();
        let (q, blocks) = table.at(p).unwrap();
        assert_eq!(q, p);
        let blocks = blocks.expect("format 2 has block CRCs").clone();
        blocks.check(p).unwrap();
        assert_eq!(blocks.crcs.len(), 3);
        // 4 KiB at 1.5 MiB: block 1 only.
        let off = (3 << 19) as u64;
        let got = rt.block_on(st.get_piece(p, &blocks, off, 4096)).unwrap();
        assert!(
            got == datas[i][off as usize..off as usize + 4096],
            "{}",
            srv.name
        );
        // Across blocks 1 and 2, and past the extent's end (clipped).
        let got = rt
            .block_on(st.get_piece(p, &blocks, (2 << 20) - 10, 5 << 20))
            .unwrap();
        assert!(got == datas[i][(2 << 20) - 10..], "{}", srv.name);
        let seen = rec.take();
        let gets: Vec<&String> = seen.iter().filter(|l| l.starts_with("GET ")).collect();
        let b1 = p.blob_offset + (1 << 20);
        let want = [
            format!("bytes={}-{}", b1, b1 + (1 << 20) - 1),
            format!("bytes={}-{}", b1, b1 + (2 << 20) - 1),
        ];
        assert_eq!(
            gets.len(),
            4,
            "{}: two table GETs, two pieces: {seen:?}",
            srv.name
        );
        for (g, w) in gets[2..].iter().zip(&want) {
            assert!(g.ends_with(w.as_str()), "{}: {g} should be {w}", srv.name);
        }
        // A blob of format 1: no block CRCs, read whole.
        let mut v1 = BlobBuilder::v1(BlobId(22), 1 << 20);
        v1.add(5, 0, 1, &datas[i][..100_000]).unwrap();
        let (raw, placed1) = v1.finish(1);
        rt.block_on(st.put_blob(BlobId(22), raw.into())).unwrap();
        let t1 = rt.block_on(st.read_full_table(BlobId(22))).unwrap();
        assert!(t1.at(&placed1[0]).unwrap().1.is_none());
        assert!(rt.block_on(st.get_extent(&placed1[0])).unwrap() == datas[i][..100_000]);
    }
    // On s3s-fs's disk, damage a byte of block 1: that block is Corrupt, block 0 still reads.
    let Some(srv) = s3s_fs() else { return };
    let st = store(&format!("http://127.0.0.1:{}", srv.port), SECRET);
    let (id, bytes, placed, datas) = make_blob(23, 8 << 20);
    rt.block_on(st.put_blob(id, bytes.into())).unwrap();
    let (i, p) = placed
        .iter()
        .enumerate()
        .find(|(_, p)| p.len == 3 << 20)
        .unwrap();
    let table = rt.block_on(st.read_full_table(id)).unwrap();
    let blocks = table.at(p).unwrap().1.unwrap().clone();
    let file = srv
        .root
        .clone()
        .unwrap()
        .join(BUCKET)
        .join(id.key("cluster-a"));
    let mut raw = std::fs::read(&file).unwrap();
    raw[p.blob_offset as usize + (1 << 20) + 77] ^= 0x01;
    std::fs::write(&file, raw).unwrap();
    match rt.block_on(st.get_piece(p, &blocks, (1 << 20) + 5, 10)) {
        Err(S3Error::Corrupt { .. }) => {}
        other => panic!("a damaged block read as {:?}", other.map(|d| d.len())),
    }
    let got = rt.block_on(st.get_piece(p, &blocks, 100, 1000)).unwrap();
    assert!(got == datas[i][100..1100]);
}

//! Shared by the object-tier tests: the two S3 servers (TESTBED.md) started on loopback,
//! blobs of varied extents, clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use cfs_objtier::blob::{BlobBuilder, BlobId, Placed};
use cfs_objtier::s3::{BlobStore, S3Config};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY: &str = "cfs-test-key";
pub const SECRET: &str = "cfs-test-secret-0123456789";
pub const BUCKET: &str = "tier";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A server process, killed when dropped.
pub struct Server {
    pub name: &'static str,
    pub child: Child,
    pub port: u16,
    pub root: Option<std::path::PathBuf>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = &self.root {
            let _ = std::fs::remove_dir_all(r);
        }
    }
}

pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CFS_REQUIRE_S3").is_none(),
            "CFS_REQUIRE_S3 is set but {tool} is not installed (make deps)"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// Starts s3s-fs on `port` over `root` and waits until it listens.
pub fn spawn_s3s_fs(port: u16, root: &std::path::Path) -> Child {
    let child = Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", KEY, "--secret-key", SECRET])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    child
}

pub fn s3s_fs() -> Option<Server> {
    if !have("s3s-fs") {
        return None;
    }
    let port = free_port();
    let root = std::env::temp_dir().join(format!("cfs-s3s-{}-{port}", std::process::id()));
    std::fs::create_dir_all(root.join(BUCKET)).unwrap();
    let child = spawn_s3s_fs(port, &root);
    Some(Server {
        name: "s3s-fs",
        child,
        port,
        root: Some(root),
    })
}

pub fn moto() -> Option<Server> {
    if !have("moto_server") {
        return None;
    }
    let port = free_port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(port);
    // moto takes any signature; the bucket is made with a plain PUT.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "moto bucket: {answer}");
    Some(Server {
        name: "moto",
        child,
        port,
        root: None,
    })
}

pub fn store(endpoint: &str, secret: &str) -> BlobStore {
    let mut cfg = S3Config::at(endpoint, BUCKET);
    cfg.prefix = "cluster-a".into();
    cfg.access_key = Some(KEY.into());
    cfg.secret_key = Some(secret.into());
    cfg.request_timeout_ms = 10_000;
    BlobStore::new(&cfg).unwrap()
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed) >> 29) as u8)
        .collect()
}

/// Packs `n` extents of varied sizes into a blob of about `target` bytes.
pub fn make_blob(id: u128, target: u64) -> (BlobId, Vec<u8>, Vec<Placed>, Vec<Vec<u8>>) {
    let mut b = BlobBuilder::new(BlobId(id), target);
    let mut datas = Vec::new();
    let mut i = 0u64;
    loop {
        let len = [1usize, 4096, 100_000, 1 << 20, 3 << 20][(i % 5) as usize];
        let d = pattern(len, id as u64 ^ i);
        if !b.add(i, i * 4096, 1, &d).unwrap() {
            break;
        }
        datas.push(d);
        i += 1;
    }
    let (bytes, placed) = b.finish(1);
    (BlobId(id), bytes, placed, datas)
}

pub fn servers() -> Vec<Server> {
    [s3s_fs(), moto()].into_iter().flatten().collect()
}

//! One-sided reads over libfabric on loopback, with the `tcp;ofi_rxm` and `sockets` providers
//! (real RMA over TCP; TESTBED.md). When libfabric is not installed the tests say so and pass,
//! unless `CFS_REQUIRE_OFI=1` (set by `make test-fabric`, which installs it) makes that a
//! failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_fabric::ofi::{self, Endpoint, HeapMemory, OfiError, RemoteRegion, RmaMemory};
use std::sync::Arc;
use std::time::Duration;

const PROVIDERS: [&str; 2] = ["tcp;ofi_rxm", "sockets"];
const TIMEOUT: Duration = Duration::from_secs(30);

fn have_ofi() -> bool {
    match ofi::available() {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CFS_REQUIRE_OFI").is_none(),
                "CFS_REQUIRE_OFI is set but {e}"
            );
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed) >> 37) as u8)
        .collect()
}

/// A server endpoint exposing `len` bytes of a pattern, and a client endpoint that knows it.
struct Pair {
    server: Endpoint,
    exposed: Option<ofi::Registration>,
    client: Endpoint,
    peer: ofi::Peer,
    data: Vec<u8>,
}

fn pair(provider: &str, len: usize) -> Pair {
    let server = Endpoint::open(Some(provider), "127.0.0.1").expect("server endpoint");
    let mem = Arc::new(HeapMemory::new(len));
    let data = pattern(len, 11);
    mem.copy_in(0, &data);
    let exposed = server.register(mem, true).expect("register exposed memory");
    let client = Endpoint::open(Some(provider), "127.0.0.1").expect("client endpoint");
    let peer = client
        .insert_peer(&server.address().unwrap())
        .expect("insert the server's address");
    Pair {
        server,
        exposed: Some(exposed),
        client,
        peer,
        data,
    }
}

/// Runs `f` while a thread drives the server endpoint's progress (software providers serve a
/// peer's read from the target's progress engine).
fn with_progress<T>(server: &Endpoint, f: impl FnOnce() -> T) -> T {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, st) = (server.clone(), Arc::clone(&stop));
    let t = std::thread::spawn(move || {
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            s.progress().unwrap();
            std::thread::sleep(Duration::from_micros(50));
        }
    });
    let r = f();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
    r
}

#[test]
fn both_providers_open_on_loopback() {
    if !have_ofi() {
        return;
    }
    for p in PROVIDERS {
        let e = Endpoint::open(Some(p), "127.0.0.1").unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(
            e.provider().contains(p.split(';').next().unwrap()),
            "{p}: got {}",
            e.provider()
        );
        assert!(!e.address().unwrap().is_empty());
    }
    assert!(matches!(
        Endpoint::open(Some("no-such-provider"), "127.0.0.1"),
        Err(OfiError::Unavailable(_))
    ));
}

#[test]
fn reads_from_one_byte_to_64_mib_round_trip() {
    if !have_ofi() {
        return;
    }
    const SIZE: usize = 64 << 20;
    for p in PROVIDERS {
        let t = pair(p, SIZE + 4096);
        let remote = t.exposed.as_ref().unwrap().remote();
        let local = t
            .client
            .register(Arc::new(HeapMemory::new(SIZE + 4096)), false)
            .unwrap();
        with_progress(&t.server, || {
            for (len, at) in [
                (1usize, 0u64),
                (1, 4095),
                (7, 12_345),
                (4096, 4096),
                (65_539, 777),
                (1 << 20, 3),
                (3 << 20, 1 << 20),
                (SIZE, 4096),
            ] {
                t.client
                    .read(t.peer, &remote, at, &local, 5, len, TIMEOUT)
                    .unwrap_or_else(|e| panic!("{p}: read of {len} at {at}: {e}"));
                let mut got = vec![0u8; len];
                local.memory().copy_out(5, &mut got);
                assert!(
                    got == t.data[at as usize..at as usize + len],
                    "{p}: {len} bytes at {at} differ"
                );
            }
        });
    }
}

#[test]
fn out_of_range_and_revoked_keys_fail_cleanly() {
    if !have_ofi() {
        return;
    }
    for p in PROVIDERS {
        let mut t = pair(p, 1 << 20);
        let remote = t.exposed.as_ref().unwrap().remote();
        let local = t
            .client
            .register(Arc::new(HeapMemory::new(2 << 20)), false)
            .unwrap();
        // Known to be out of range: refused before anything is posted.
        assert!(matches!(
            t.client
                .read(t.peer, &remote, (1 << 20) - 10, &local, 0, 11, TIMEOUT),
            Err(OfiError::OutOfRange { .. })
        ));
        // A peer that lies about the length: the target's provider refuses the range.
        let forged = RemoteRegion {
            len: 2 << 20,
            ..remote
        };
        let r = with_progress(&t.server, || {
            t.client
                .read(t.peer, &forged, (1 << 20) - 10, &local, 0, 4096, TIMEOUT)
        });
        assert!(
            matches!(r, Err(OfiError::ReadFailed { .. })),
            "{p}: a read past the registered end gave {r:?}"
        );
        // The server goes on serving. The client's connection may be gone (a remote access
        // error ends an RDMA connection; tcp;ofi_rxm drops it too and never reconnects that
        // address), so a client reads through a fresh endpoint after one.
        drop(local);
        let server_addr = t.server.address().unwrap();
        t.client = Endpoint::open(Some(p), "127.0.0.1").unwrap();
        t.peer = t.client.insert_peer(&server_addr).unwrap();
        let local = t
            .client
            .register(Arc::new(HeapMemory::new(8192)), false)
            .unwrap();
        with_progress(&t.server, || {
            t.client
                .read(t.peer, &remote, 100, &local, 0, 4096, TIMEOUT)
                .unwrap_or_else(|e| panic!("{p}: read through a fresh endpoint: {e}"))
        });
        let mut got = vec![0u8; 4096];
        local.memory().copy_out(0, &mut got);
        assert!(got == t.data[100..4196]);
        // Revoked: the registration is gone; a read with its key fails, never reads data.
        local.memory().copy_in(0, &[0xEE; 4096]);
        drop(t.exposed.take());
        let r = with_progress(&t.server, || {
            t.client.read(t.peer, &remote, 0, &local, 0, 4096, TIMEOUT)
        });
        assert!(
            matches!(r, Err(OfiError::ReadFailed { .. })),
            "{p}: a read with a revoked key gave {r:?}"
        );
        let mut got = vec![0u8; 4096];
        local.memory().copy_out(0, &mut got);
        assert!(
            got.iter().all(|b| *b == 0xEE),
            "{p}: a refused read wrote data"
        );
    }
}

#[test]
fn one_endpoint_registers_many_buffers_and_reads_into_each() {
    if !have_ofi() {
        return;
    }
    for p in PROVIDERS {
        let t = pair(p, 1 << 20);
        let remote = t.exposed.as_ref().unwrap().remote();
        // Providers that leave key choice to the caller refuse a key used twice.
        let bufs: Vec<_> = (0..8)
            .map(|i| {
                t.client
                    .register(Arc::new(HeapMemory::new(64 << 10)), false)
                    .unwrap_or_else(|e| panic!("{p}: registration {i}: {e}"))
            })
            .collect();
        with_progress(&t.server, || {
            for (i, b) in bufs.iter().enumerate() {
                let at = i as u64 * 4099;
                t.client
                    .read(t.peer, &remote, at, b, 0, 64 << 10, TIMEOUT)
                    .unwrap_or_else(|e| panic!("{p}: read into buffer {i}: {e}"));
                let mut got = vec![0u8; 64 << 10];
                b.memory().copy_out(0, &mut got);
                assert!(
                    got == t.data[at as usize..at as usize + (64 << 10)],
                    "{p}: buffer {i}"
                );
            }
        });
    }
}

#[test]
fn several_clients_read_concurrently() {
    if !have_ofi() {
        return;
    }
    for p in PROVIDERS {
        let t = pair(p, 8 << 20);
        let remote = t.exposed.as_ref().unwrap().remote();
        let addr = t.server.address().unwrap();
        let data = Arc::new(t.data.clone());
        with_progress(&t.server, || {
            let threads: Vec<_> = (0..4u64)
                .map(|k| {
                    let (addr, data) = (addr.clone(), Arc::clone(&data));
                    let p = p.to_string();
                    std::thread::spawn(move || {
                        let c = Endpoint::open(Some(&p), "127.0.0.1").unwrap();
                        let peer = c.insert_peer(&addr).unwrap();
                        let local = c
                            .register(Arc::new(HeapMemory::new(1 << 20)), false)
                            .unwrap();
                        let mut x = k + 1;
                        for _ in 0..100 {
                            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                            let len = 1 + (x >> 40) as usize % (256 << 10);
                            let at = (x >> 20) % ((8 << 20) - len as u64);
                            c.read(peer, &remote, at, &local, 0, len, TIMEOUT).unwrap();
                            let mut got = vec![0u8; len];
                            local.memory().copy_out(0, &mut got);
                            assert!(
                                got == data[at as usize..at as usize + len],
                                "{p}: client {k}"
                            );
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        });
    }
}

#[test]
fn two_sided_messages_go_both_ways() {
    if !have_ofi() {
        return;
    }
    const SLOT: usize = 64 << 10;
    for p in PROVIDERS {
        let server = Endpoint::open(Some(p), "127.0.0.1").expect("server endpoint");
        let client = Endpoint::open(Some(p), "127.0.0.1").expect("client endpoint");
        let to_server = client.insert_peer(&server.address().unwrap()).unwrap();
        let to_client = server.insert_peer(&client.address().unwrap()).unwrap();
        assert!(
            client.send(to_server, b"x", TIMEOUT).is_err(),
            "{p}: a send before enable_messages must fail"
        );
        server.enable_messages(32, SLOT).unwrap();
        client.enable_messages(32, SLOT).unwrap();
        // The server echoes every message back, reversed, on its own thread.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (server.clone(), Arc::clone(&stop));
        let echo = std::thread::spawn(move || {
            let mut n = 0;
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match s.recv() {
                    Some(mut m) => {
                        m.reverse();
                        s.send(to_client, &m, TIMEOUT).unwrap();
                        n += 1;
                    }
                    None => std::thread::sleep(Duration::from_micros(20)),
                }
            }
            n
        });
        let mut sent = 0;
        for (i, len) in [1usize, 2, 100, 4096, 65_535, SLOT]
            .into_iter()
            .cycle()
            .take(300)
            .enumerate()
        {
            let msg = pattern(len, i as u64);
            client
                .send(to_server, &msg, TIMEOUT)
                .unwrap_or_else(|e| panic!("{p}: send {i}: {e}"));
            sent += 1;
            let deadline = std::time::Instant::now() + TIMEOUT;
            let back = loop {
                if let Some(m) = client.recv() {
                    break m;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{p}: no echo of message {i}"
                );
                std::thread::yield_now();
            };
            let mut want = msg.clone();
            want.reverse();
            assert!(
                back == want,
                "{p}: echo of message {i} ({len} bytes) differs"
            );
        }
        assert!(matches!(
            client.send(to_server, &vec![0u8; SLOT + 1], TIMEOUT),
            Err(OfiError::OutOfRange { .. })
        ));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            echo.join().unwrap(),
            sent,
            "{p}: the server saw every message once"
        );
        assert_eq!(server.messages_dropped() + client.messages_dropped(), 0);
    }
}

#[test]
fn a_peer_of_another_endpoint_or_a_removed_one_is_refused_not_used() {
    if !have_ofi() {
        return;
    }
    for p in PROVIDERS {
        let t = pair(p, 1 << 16);
        let remote = t.exposed.as_ref().unwrap().remote();
        let other = Endpoint::open(Some(p), "127.0.0.1").unwrap();
        let local = other
            .register(Arc::new(HeapMemory::new(1 << 16)), false)
            .unwrap();
        // `t.peer` is an address in the client endpoint's table, not in `other`'s.
        assert!(matches!(
            other.read(t.peer, &remote, 0, &local, 0, 16, TIMEOUT),
            Err(OfiError::Failed(_))
        ));
        other.enable_messages(2, 64).unwrap();
        assert!(other.send(t.peer, b"hello", TIMEOUT).is_err());
        let own = t
            .client
            .register(Arc::new(HeapMemory::new(64)), false)
            .unwrap();
        t.client.remove_peer(t.peer);
        assert!(matches!(
            t.client.read(t.peer, &remote, 0, &own, 0, 16, TIMEOUT),
            Err(OfiError::Failed(_))
        ));
    }
}

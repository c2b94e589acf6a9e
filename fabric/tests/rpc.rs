//! The RPC layer on real loopback sockets: pipelining, timeouts, reconnection, caps, garbage,
//! payload corruption and one-sided region reads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use cfs_fabric::frame::{self, Kind};
use cfs_fabric::{
    Client, ClientConfig, ErrorCode, RegionTable, RpcError, Server, ServerConfig, Service,
    ServiceError, ServiceFuture,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO: u32 = 1;
const SLEEP: u32 = 2;
const FAIL: u32 = 3;

struct TestService;

impl Service for TestService {
    fn call(&self, method: u32, payload: Bytes) -> ServiceFuture {
        Box::pin(async move {
            match method {
                ECHO => Ok(payload),
                SLEEP => {
                    let ms = u64::from_le_bytes(payload[..8].try_into().unwrap());
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(payload)
                }
                FAIL => Err(ServiceError::new(ErrorCode::Service(1005), "no such file")),
                _ => Err(ServiceError::new(
                    ErrorCode::UnknownMethod,
                    format!("method {method}"),
                )),
            }
        })
    }
}

async fn server(addr: &str, cfg: ServerConfig) -> (Server, Arc<RegionTable>) {
    let regions = RegionTable::new();
    let s = Server::bind(addr, Arc::new(TestService), Arc::clone(&regions), cfg)
        .await
        .unwrap();
    (s, regions)
}

fn quick() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelined_calls_on_one_connection() {
    let (s, _) = server("127.0.0.1:0", ServerConfig::default()).await;
    let c = Client::new(s.local_addr().to_string(), quick());
    let mut tasks = Vec::new();
    for i in 0..2000u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let payload: Vec<u8> = (0..(i % 700)).map(|j| (i ^ j) as u8).collect();
            let got = c.call(ECHO, &payload).await.unwrap();
            assert_eq!(&got[..], &payload[..], "reply matched to its request");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Errors travel back with their code and message.
    match c.call(FAIL, b"x").await {
        Err(RpcError::Remote {
            code: ErrorCode::Service(1005),
            message,
        }) => assert_eq!(message, "no such file"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.call(99, b"").await,
        Err(RpcError::Remote {
            code: ErrorCode::UnknownMethod,
            ..
        })
    ));
    c.ping().await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_time_out_without_blocking_others() {
    let (s, _) = server("127.0.0.1:0", ServerConfig::default()).await;
    let c = Client::new(s.local_addr().to_string(), quick());
    let ms = 2000u64.to_le_bytes();
    let slow = c.call_timeout(SLEEP, &ms, Duration::from_millis(100));
    let fast = c.call(ECHO, b"fast");
    let (slow, fast) = tokio::join!(slow, fast);
    assert!(
        matches!(slow, Err(RpcError::Timeout { method: SLEEP, .. })),
        "{slow:?}"
    );
    assert_eq!(&fast.unwrap()[..], b"fast");
    // The late reply to the timed-out call is dropped; the connection keeps working.
    assert_eq!(&c.call(ECHO, b"after").await.unwrap()[..], b"after");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_server_restarts() {
    let (s, _) = server("127.0.0.1:0", ServerConfig::default()).await;
    let addr = s.local_addr().to_string();
    let c = Client::new(
        addr.clone(),
        ClientConfig {
            connect_timeout: Duration::from_millis(300),
            ..quick()
        },
    );
    c.call(ECHO, b"1").await.unwrap();
    // A call in flight when the server goes away fails as ConnectionLost, not a hang.
    let inflight = {
        let c = c.clone();
        tokio::spawn(async move { c.call(SLEEP, &5000u64.to_le_bytes()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.stop().await;
    assert!(matches!(
        inflight.await.unwrap(),
        Err(RpcError::ConnectionLost { .. })
    ));
    // Nothing listening: the call gives up after the connect timeout with a clear error.
    match c.call(ECHO, b"2").await {
        Err(RpcError::Connect { addr: a, .. }) => assert_eq!(a, addr),
        other => panic!("{other:?}"),
    }
    // Server back on the same port, started while the client is retrying with back-off.
    let c2 = Client::new(
        addr.clone(),
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            ..quick()
        },
    );
    let retry = tokio::spawn(async move { c2.call(ECHO, b"3").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s2, _) = server(&addr, ServerConfig::default()).await;
    assert_eq!(&retry.await.unwrap().unwrap()[..], b"3");
    assert_eq!(&c.call(ECHO, b"4").await.unwrap()[..], b"4");
    s2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_input_is_refused_and_the_server_lives_on() {
    let (s, _) = server(
        "127.0.0.1:0",
        ServerConfig {
            max_payload: 4096,
            ..ServerConfig::default()
        },
    )
    .await;
    let addr = s.local_addr().to_string();
    // The client's own cap stops a request before it is sent.
    let small = Client::new(
        addr.clone(),
        ClientConfig {
            max_payload: 1024,
            ..quick()
        },
    );
    assert!(matches!(
        small.call(ECHO, &[0u8; 2000]).await,
        Err(RpcError::TooLarge { .. })
    ));
    // Over the server's cap: an error reply naming the cap, then the connection is closed.
    let c = Client::new(addr.clone(), quick());
    match c.call(ECHO, &vec![1u8; 10_000]).await {
        Err(RpcError::Remote {
            code: ErrorCode::TooLarge,
            message,
        }) => assert!(message.contains("4096"), "{message}"),
        Err(RpcError::ConnectionLost { .. }) => {} // the close can win the race with the reply
        other => panic!("{other:?}"),
    }
    // The next call reconnects. It may first meet the connection the server is closing (the
    // close races with the call): that call fails as lost, as a caller would see, and the one
    // after it gets a new connection.
    let mut echoed = None;
    for _ in 0..3 {
        match c.call(ECHO, b"ok").await {
            Ok(b) => {
                echoed = Some(b);
                break;
            }
            Err(RpcError::ConnectionLost { .. }) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(&echoed.expect("reconnected")[..], b"ok");
    // Random garbage: the server closes that connection.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    cfs_fabric::auth::client(&mut raw, None, Duration::from_secs(5))
        .await
        .unwrap();
    raw.write_all(&[0x13u8; 200]).await.unwrap();
    let mut sink = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "no reply to garbage, just a close");
    // A frame whose payload was damaged in transit gets a checksum error; the connection stays.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    cfs_fabric::auth::client(&mut raw, None, Duration::from_secs(5))
        .await
        .unwrap();
    let mut bad = frame::encode_to_bytes(Kind::Request, ECHO, 77, b"hello").to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    raw.write_all(&bad).await.unwrap();
    raw.write_all(&frame::encode_to_bytes(Kind::Request, ECHO, 78, b"world"))
        .await
        .unwrap();
    let dec = frame::Decoder {
        max_payload: 1 << 20,
    };
    let mut buf = bytes::BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 2 {
        if let Some(f) = dec.decode(&mut buf).unwrap() {
            got.push(f);
            continue;
        }
        assert!(
            tokio::time::timeout(Duration::from_secs(5), raw.read_buf(&mut buf))
                .await
                .unwrap()
                .unwrap()
                > 0
        );
    }
    got.sort_by_key(|f| f.id);
    assert_eq!(
        (got[0].id, got[0].kind, ErrorCode::from_u32(got[0].method)),
        (77, Kind::Error, ErrorCode::Checksum)
    );
    assert_eq!(
        (got[1].id, got[1].kind, &got[1].payload[..]),
        (78, Kind::Response, &b"world"[..])
    );
    // Others are still served.
    assert_eq!(&c.call(ECHO, b"still").await.unwrap()[..], b"still");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sided_region_reads() {
    let (s, regions) = server("127.0.0.1:0", ServerConfig::default()).await;
    let data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let key = regions.register(Arc::new(data.clone()));
    let c = Client::new(s.local_addr().to_string(), quick());
    for (off, len) in [
        (0u64, 1u32),
        (1, 4095),
        (4096, 4096),
        (12345, 1 << 20),
        (0, 8 << 20),
        ((8 << 20) - 1, 1),
    ] {
        let got = c.read_region(key, off, len).await.unwrap();
        assert_eq!(
            &got[..],
            &data[off as usize..(off + u64::from(len)) as usize],
            "offset {off} len {len}"
        );
    }
    assert!(matches!(
        c.read_region(key, (8 << 20) - 10, 11).await,
        Err(RpcError::Remote {
            code: ErrorCode::OutOfRange,
            ..
        })
    ));
    assert!(matches!(
        c.read_region(key, u64::MAX, 2).await,
        Err(RpcError::Remote {
            code: ErrorCode::OutOfRange,
            ..
        })
    ));
    assert!(regions.revoke(key));
    assert!(matches!(
        c.read_region(key, 0, 1).await,
        Err(RpcError::Remote {
            code: ErrorCode::BadRegionKey,
            ..
        })
    ));
    // A new registration never reuses a revoked key.
    let key2 = regions.register(Arc::new(vec![1u8; 10]));
    assert_ne!(key2, key);
    assert_eq!(&c.read_region(key2, 0, 10).await.unwrap()[..], &[1u8; 10]);
    s.stop().await;
}

#[test]
fn blocking_client_calls_times_out_and_survives_restarts() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (s, _) = rt.block_on(server("127.0.0.1:0", ServerConfig::default()));
    let addr = s.local_addr().to_string();
    let c = Arc::new(cfs_fabric::BlockingClient::new(
        addr.clone(),
        ClientConfig {
            request_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(3),
            ..ClientConfig::default()
        },
    ));
    c.ping().unwrap();
    // Several threads at once, each with its own pooled connection.
    let handles: Vec<_> = (0..4u8)
        .map(|t| {
            let c = Arc::clone(&c);
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    let p = [t, (i % 256) as u8, 7];
                    assert_eq!(&c.call(ECHO, &p).unwrap()[..], &p);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(matches!(
        c.call(FAIL, b"").unwrap_err(),
        RpcError::Remote {
            code: ErrorCode::Service(1005),
            ..
        }
    ));
    assert!(matches!(
        c.call(SLEEP, &3000u64.to_le_bytes()).unwrap_err(),
        RpcError::Timeout { .. }
    ));
    assert_eq!(
        &c.call(ECHO, b"after timeout").unwrap()[..],
        b"after timeout"
    );
    // Server restart on the same port: pooled connections are noticed dead and replaced.
    rt.block_on(s.stop());
    let (s2, _) = rt.block_on(server(&addr, ServerConfig::default()));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(&c.call(ECHO, b"new server").unwrap()[..], b"new server");
    rt.block_on(s2.stop());
    assert!(matches!(
        c.call(ECHO, b"x").unwrap_err(),
        RpcError::Connect { .. } | RpcError::ConnectionLost { .. }
    ));
}

/// A server with a cluster secret serves clients that prove it and refuses, with a clear
/// error, clients without a token or with another cluster's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_token_is_required_and_checked() {
    let secret = [42u8; 32];
    let (s, _) = server(
        "127.0.0.1:0",
        ServerConfig {
            secret: Some(secret),
            ..ServerConfig::default()
        },
    )
    .await;
    let addr = s.local_addr().to_string();
    let with = |secret| ClientConfig { secret, ..quick() };
    let good = Client::new(addr.clone(), with(Some(secret)));
    assert_eq!(&good.call(ECHO, b"in").await.unwrap()[..], b"in");
    match Client::new(addr.clone(), with(None)).call(ECHO, b"x").await {
        Err(
            e @ RpcError::Refused {
                reason: cfs_fabric::AuthError::TokenRequired,
                ..
            },
        ) => {
            assert!(e.to_string().contains("requires a cluster token"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    match Client::new(addr.clone(), with(Some([1u8; 32])))
        .call(ECHO, b"x")
        .await
    {
        Err(RpcError::Refused {
            reason: cfs_fabric::AuthError::Refused,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // A raw connection that sends frames without the handshake gets nothing served.
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(&frame::encode_to_bytes(Kind::Request, ECHO, 1, &[0u8; 64]))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(
        sink.len() <= 42,
        "only the greeting and a refusal: {} bytes",
        sink.len()
    );
    assert!(sink.len() < 42 || sink[41] == 1, "the verdict is a refusal");
    // The blocking client too, and the good client still works.
    let blocking = |secret| cfs_fabric::BlockingClient::new(&addr, with(secret));
    assert_eq!(&blocking(Some(secret)).call(ECHO, b"b").unwrap()[..], b"b");
    assert!(matches!(
        blocking(Some([9u8; 32])).call(ECHO, b"b"),
        Err(RpcError::Refused { .. })
    ));
    assert_eq!(&good.call(ECHO, b"again").await.unwrap()[..], b"again");
    s.stop().await;
}

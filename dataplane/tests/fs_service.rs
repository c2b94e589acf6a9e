//! The file-system service end to end over real loopback RPC: namespace operations, file data,
//! errno mapping, permission checks with the caller's credentials, and persistence across a
//! server restart (metadata in redb, data in the chunk store).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::config::Config;
use cfs_dataplane::fs_service::FsService;
use cfs_dataplane::reactor::{self, Engine};
use cfs_fabric::{Client, ClientConfig, ErrorCode, RegionTable, RpcError, Server, ServerConfig};
use cfs_meta::{Creds, FileType, InodeId, RenameFlags, SetAttr};
use cfs_nvme::mem::MemDevice;
use cfs_nvme::BlockDevice;
use cfs_proto::{Reply, Request, ERRNO_BASE};
use std::path::Path;
use std::sync::Arc;

struct Fs {
    c: Client,
}

impl Fs {
    async fn req(&self, creds: &Creds, r: Request) -> Result<Reply, i32> {
        match self.c.call(r.method(), &r.encode(creds)).await {
            Ok(b) => Ok(Reply::decode(&b).expect("reply decodes")),
            Err(RpcError::Remote {
                code: ErrorCode::Service(c),
                ..
            }) => Err((c - ERRNO_BASE) as i32),
            Err(e) => panic!("rpc failed: {e}"),
        }
    }
    async fn attr(&self, creds: &Creds, r: Request) -> Result<cfs_meta::Attr, i32> {
        match self.req(creds, r).await? {
            Reply::Attr(a) => Ok(a),
            other => panic!("expected attributes, got {other:?}"),
        }
    }
}

fn setup(dev: &Arc<dyn BlockDevice>, format: bool) -> (Config, Arc<Engine>) {
    let cfg = Config::parse(
        "data_dir = \"/nonexistent\"\n[reactors]\ncores = [0]\n[hugepages]\npool_mib = 8\nbuf_kib = 64\n[format]\nshards_per_device = 2\n",
        Path::new("t.toml"),
    )
    .unwrap();
    if format {
        reactor::format(&cfg, std::slice::from_ref(dev), [8; 16], 0).unwrap();
    }
    let e = Arc::new(Engine::start(&cfg, vec![Arc::clone(dev)]).unwrap());
    (cfg, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_data_over_rpc_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("cfs-fs-service-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("meta.redb");
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem0", 4096, 65536, 3));
    let (_, engine) = setup(&dev, true);
    let svc = FsService::open(&db, Arc::clone(&engine)).unwrap();
    let server = Server::bind(
        "127.0.0.1:0",
        Arc::new(svc),
        RegionTable::new(),
        ServerConfig::default(),
    )
    .await
    .unwrap();
    let fs = Fs {
        c: Client::new(server.local_addr().to_string(), ClientConfig::default()),
    };
    let root = Creds::root();
    let r = InodeId::ROOT;

    let d = fs
        .attr(
            &root,
            Request::Mkdir {
                parent: r,
                name: b"docs".to_vec(),
                perm: 0o755,
            },
        )
        .await
        .unwrap();
    let f = fs
        .attr(
            &root,
            Request::Mknod {
                parent: d.ino,
                name: b"a.txt".to_vec(),
                kind: FileType::Regular,
                perm: 0o644,
                rdev: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        fs.attr(
            &root,
            Request::Lookup {
                parent: d.ino,
                name: b"a.txt".to_vec()
            }
        )
        .await
        .unwrap()
        .ino,
        f.ino
    );
    assert_eq!(
        fs.req(
            &root,
            Request::Lookup {
                parent: d.ino,
                name: b"zz".to_vec()
            }
        )
        .await,
        Err(2),
        "ENOENT"
    );
    assert_eq!(
        fs.req(
            &root,
            Request::Mkdir {
                parent: r,
                name: b"docs".to_vec(),
                perm: 0o755
            }
        )
        .await,
        Err(17),
        "EEXIST"
    );
    // Data: a write crossing a chunk boundary, a sparse hole, reads clamped at end of file.
    fs.req(
        &root,
        Request::Open {
            ino: f.ino,
            read: true,
            write: true,
            truncate: false,
        },
    )
    .await
    .unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let off = (64u64 << 20) - 1_000_000;
    let a = fs
        .attr(
            &root,
            Request::Write {
                ino: f.ino,
                offset: off,
                data: big.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(a.size, off + big.len() as u64);
    match fs
        .req(
            &root,
            Request::Read {
                ino: f.ino,
                offset: off,
                len: 4_000_000,
            },
        )
        .await
        .unwrap()
    {
        Reply::Data(got) => assert_eq!(got, big),
        other => panic!("{other:?}"),
    }
    match fs
        .req(
            &root,
            Request::Read {
                ino: f.ino,
                offset: 4096,
                len: 8192,
            },
        )
        .await
        .unwrap()
    {
        Reply::Data(got) => assert_eq!(got, vec![0u8; 8192], "holes read as zeros"),
        other => panic!("{other:?}"),
    }
    // Truncate down then up: the cut bytes read back as zeros.
    let cut = off + 10;
    fs.attr(
        &root,
        Request::SetAttr {
            ino: f.ino,
            set: SetAttr {
                size: Some(cut),
                ..SetAttr::default()
            },
        },
    )
    .await
    .unwrap();
    fs.attr(
        &root,
        Request::SetAttr {
            ino: f.ino,
            set: SetAttr {
                size: Some(cut + 100),
                ..SetAttr::default()
            },
        },
    )
    .await
    .unwrap();
    match fs
        .req(
            &root,
            Request::Read {
                ino: f.ino,
                offset: off,
                len: 110,
            },
        )
        .await
        .unwrap()
    {
        Reply::Data(got) => {
            assert_eq!(&got[..10], &big[..10]);
            assert_eq!(&got[10..], &[0u8; 100][..]);
        }
        other => panic!("{other:?}"),
    }
    // Permissions use the caller's credentials.
    let alice = Creds {
        uid: 1000,
        gid: 1000,
        groups: vec![],
    };
    assert_eq!(
        fs.req(
            &alice,
            Request::Mknod {
                parent: d.ino,
                name: b"b".to_vec(),
                kind: FileType::Regular,
                perm: 0o644,
                rdev: 0
            }
        )
        .await,
        Err(13),
        "EACCES"
    );
    assert_eq!(
        fs.req(
            &alice,
            Request::Open {
                ino: f.ino,
                read: false,
                write: true,
                truncate: false
            }
        )
        .await,
        Err(13)
    );
    // Rename, symlink, xattrs, readdir.
    fs.req(
        &root,
        Request::Rename {
            parent: d.ino,
            name: b"a.txt".to_vec(),
            newparent: r,
            newname: b"b.txt".to_vec(),
            flags: RenameFlags::default(),
        },
    )
    .await
    .unwrap();
    fs.attr(
        &root,
        Request::Symlink {
            parent: r,
            name: b"ln".to_vec(),
            target: b"b.txt".to_vec(),
        },
    )
    .await
    .unwrap();
    fs.req(
        &root,
        Request::SetXattr {
            ino: f.ino,
            name: b"user.tag".to_vec(),
            value: b"v1".to_vec(),
            mode: cfs_meta::XattrMode::Any,
        },
    )
    .await
    .unwrap();
    let names = match fs
        .req(
            &root,
            Request::ReadDir {
                ino: r,
                cookie: 0,
                limit: 100,
            },
        )
        .await
        .unwrap()
    {
        Reply::Entries(es) => es.into_iter().map(|e| e.name).collect::<Vec<_>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        names,
        vec![
            b".".to_vec(),
            b"..".to_vec(),
            b"docs".to_vec(),
            b"b.txt".to_vec(),
            b"ln".to_vec()
        ]
    );
    fs.req(&root, Request::Release { ino: f.ino })
        .await
        .unwrap();

    // Restart everything: the server, the metadata store and the engine (same device).
    server.stop().await;
    drop(fs);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let engine = Arc::try_unwrap(engine)
        .ok()
        .expect("engine free after the server stopped");
    tokio::task::spawn_blocking(move || engine.shutdown())
        .await
        .unwrap()
        .unwrap();
    let (_, engine) = setup(&dev, false);
    let svc = FsService::open(&db, Arc::clone(&engine)).unwrap();
    let server = Server::bind(
        "127.0.0.1:0",
        Arc::new(svc),
        RegionTable::new(),
        ServerConfig::default(),
    )
    .await
    .unwrap();
    let fs = Fs {
        c: Client::new(server.local_addr().to_string(), ClientConfig::default()),
    };
    let f2 = fs
        .attr(
            &root,
            Request::Lookup {
                parent: r,
                name: b"b.txt".to_vec(),
            },
        )
        .await
        .unwrap();
    assert_eq!((f2.ino, f2.size), (f.ino, cut + 100));
    match fs
        .req(
            &root,
            Request::Read {
                ino: f.ino,
                offset: off,
                len: 10,
            },
        )
        .await
        .unwrap()
    {
        Reply::Data(got) => assert_eq!(got, big[..10]),
        other => panic!("{other:?}"),
    }
    match fs
        .req(
            &root,
            Request::GetXattr {
                ino: f.ino,
                name: b"user.tag".to_vec(),
            },
        )
        .await
        .unwrap()
    {
        Reply::Data(v) => assert_eq!(v, b"v1"),
        other => panic!("{other:?}"),
    }
    // Unlinking the last name frees the file's data.
    fs.req(
        &root,
        Request::Unlink {
            parent: r,
            name: b"b.txt".to_vec(),
        },
    )
    .await
    .unwrap();
    let stats: u64 = engine.stats().unwrap().iter().map(|(_, s)| s.chunks).sum();
    assert_eq!(stats, 0, "data chunks deleted with the file");
    // Malformed requests get an error, not a crash.
    assert!(matches!(
        fs.c.call(3, &[1, 2, 3]).await,
        Err(RpcError::Remote {
            code: ErrorCode::BadRequest,
            ..
        })
    ));
    server.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

fn data(r: Result<Reply, cfs_fabric::ServiceError>) -> Vec<u8> {
    match r.unwrap() {
        Reply::Data(d) => d,
        other => panic!("{other:?}"),
    }
}

fn offset(r: Result<Reply, cfs_fabric::ServiceError>) -> Result<u64, u32> {
    match r {
        Ok(Reply::Offset(o)) => Ok(o),
        Ok(other) => panic!("{other:?}"),
        Err(e) => match e.code {
            ErrorCode::Service(c) => Err(c - ERRNO_BASE),
            other => panic!("{other:?}"),
        },
    }
}

fn errno_of(r: Result<Reply, cfs_fabric::ServiceError>) -> u32 {
    match r {
        Err(cfs_fabric::ServiceError {
            code: ErrorCode::Service(c),
            ..
        }) => c - ERRNO_BASE,
        other => panic!("expected an errno, got {other:?}"),
    }
}

#[test]
fn extents_fallocate_seek_data_hole_and_crash_leftovers() {
    use cfs_meta::CHUNK_BYTES as C;
    use cfs_proto::{FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE, SEEK_DATA, SEEK_HOLE};
    let dir = std::env::temp_dir().join(format!("cfs-fs-extents-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("meta.redb");
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem0", 4096, 65536, 3));
    let (_, engine) = setup(&dev, true);
    let svc = FsService::open(&db, Arc::clone(&engine)).unwrap();
    let root = Creds::root();
    let f = match svc
        .handle(
            &root,
            Request::Mknod {
                parent: InodeId::ROOT,
                name: b"f".to_vec(),
                kind: FileType::Regular,
                perm: 0o644,
                rdev: 0,
            },
        )
        .unwrap()
    {
        Reply::Attr(a) => a.ino,
        other => panic!("{other:?}"),
    };
    let write = |off: u64, len: usize| {
        svc.handle(
            &root,
            Request::Write {
                ino: f,
                offset: off,
                data: vec![7u8; len],
            },
        )
        .unwrap();
    };
    let seek = |off: u64, whence: u32| {
        offset(svc.handle(
            &root,
            Request::Lseek {
                ino: f,
                offset: off,
                whence,
            },
        ))
    };
    let falloc = |off: u64, len: u64, mode: u32| {
        svc.handle(
            &root,
            Request::Fallocate {
                ino: f,
                offset: off,
                len,
                mode,
            },
        )
    };
    let size = || match svc.handle(&root, Request::GetAttr { ino: f }).unwrap() {
        Reply::Attr(a) => a.size,
        other => panic!("{other:?}"),
    };
    write(0, 8192);
    write(C + 36 * 4096, 4096);
    let end = C + 37 * 4096;
    assert_eq!(size(), end);
    assert_eq!(seek(0, SEEK_DATA), Ok(0));
    assert_eq!(seek(0, SEEK_HOLE), Ok(8192));
    assert_eq!(seek(100, SEEK_HOLE), Ok(8192));
    assert_eq!(seek(8192, SEEK_DATA), Ok(C + 36 * 4096));
    assert_eq!(
        seek(C + 36 * 4096, SEEK_HOLE),
        Ok(end),
        "end of file is a hole"
    );
    assert_eq!(seek(end, SEEK_DATA), Err(6), "ENXIO at end of file");
    assert_eq!(seek(end - 1, SEEK_DATA), Ok(end - 1));
    // Punch the first block: data now starts at 4096 and the block reads as zeros.
    falloc(0, 4096, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE).unwrap();
    assert_eq!(seek(0, SEEK_DATA), Ok(4096));
    assert_eq!(seek(0, SEEK_HOLE), Ok(0));
    let got = data(svc.handle(
        &root,
        Request::Read {
            ino: f,
            offset: 0,
            len: 8192,
        },
    ));
    assert_eq!(&got[..4096], &[0u8; 4096][..]);
    assert_eq!(&got[4096..], &[7u8; 4096][..]);
    assert_eq!(size(), end, "punch keeps the size");
    // Punching a whole chunk deletes it from the store.
    let before = engine.list_chunks().unwrap().len();
    falloc(0, C, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE).unwrap();
    assert_eq!(engine.list_chunks().unwrap().len(), before - 1);
    assert_eq!(seek(0, SEEK_DATA), Ok(C + 36 * 4096));
    // Allocation grows the file (zeros), KEEP_SIZE does not; zero-range may extend.
    falloc(end, 1 << 20, 0).unwrap();
    assert_eq!(size(), end + (1 << 20));
    falloc(size(), 1 << 20, FALLOC_KEEP_SIZE).unwrap();
    assert_eq!(size(), end + (1 << 20));
    falloc(size(), 4096, FALLOC_ZERO_RANGE).unwrap();
    assert_eq!(size(), end + (1 << 20) + 4096);
    falloc(C + 36 * 4096 + 10, 20, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE).unwrap();
    let got = data(svc.handle(
        &root,
        Request::Read {
            ino: f,
            offset: C + 36 * 4096,
            len: 40,
        },
    ));
    assert_eq!(got[..10], [7u8; 10]);
    assert_eq!(got[10..30], [0u8; 20]);
    assert_eq!(got[30..], [7u8; 10]);
    // Bad requests: punch without KEEP_SIZE, unknown modes, zero length, on a directory.
    assert_eq!(errno_of(falloc(0, 1, FALLOC_PUNCH_HOLE)), 22);
    assert_eq!(
        errno_of(falloc(0, 1, 0x08)),
        95,
        "collapse-range unsupported"
    );
    assert_eq!(errno_of(falloc(0, 0, 0)), 22);
    assert_eq!(
        errno_of(svc.handle(
            &root,
            Request::Fallocate {
                ino: InodeId::ROOT,
                offset: 0,
                len: 1,
                mode: 0
            }
        )),
        21
    );
    assert_eq!(
        errno_of(falloc(0, 1 << 40, 0)),
        28,
        "ENOSPC beyond the store's free space"
    );
    // An overwrite inside the file defers its times; fsync makes them durable.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let over = match svc
        .handle(
            &root,
            Request::Write {
                ino: f,
                offset: 5,
                data: vec![9; 3],
            },
        )
        .unwrap()
    {
        Reply::Attr(a) => a,
        other => panic!("{other:?}"),
    };
    svc.handle(&root, Request::Fsync { ino: f }).unwrap();
    // Chunks left by a crash (data written, extent never committed) go at the next start.
    engine.write(0xdead_beef, 0, vec![1; 4096]).unwrap();
    drop(svc);
    let svc = FsService::open(&db, Arc::clone(&engine)).unwrap();
    match svc.handle(&root, Request::GetAttr { ino: f }).unwrap() {
        Reply::Attr(a) => assert_eq!(
            a.mtime, over.mtime,
            "fsync made the overwrite's mtime durable"
        ),
        other => panic!("{other:?}"),
    }
    // Create makes and opens a file in one request.
    match svc
        .handle(
            &root,
            Request::Create {
                parent: InodeId::ROOT,
                name: b"g".to_vec(),
                perm: 0o600,
            },
        )
        .unwrap()
    {
        Reply::Attr(a) => {
            assert_eq!(a.kind, FileType::Regular);
            svc.handle(&root, Request::Release { ino: a.ino }).unwrap();
        }
        other => panic!("{other:?}"),
    }
    assert!(!engine.list_chunks().unwrap().contains(&0xdead_beef));
    let got = data(svc.handle(
        &root,
        Request::Read {
            ino: f,
            offset: C + 36 * 4096,
            len: 10,
        },
    ));
    assert_eq!(got, [7u8; 10], "referenced data kept");
    drop(svc);
    // The database refuses a different store (it would delete that store's chunks).
    let other: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem1", 4096, 16384, 4));
    let cfg = Config::parse(
        "data_dir = \"/nonexistent\"\n[reactors]\ncores = [0]\n[hugepages]\npool_mib = 8\nbuf_kib = 64\n",
        Path::new("t.toml"),
    )
    .unwrap();
    reactor::format(&cfg, std::slice::from_ref(&other), [9; 16], 0).unwrap();
    let e2 = Arc::new(Engine::start(&cfg, vec![other]).unwrap());
    assert!(matches!(
        FsService::open(&db, Arc::clone(&e2)),
        Err(cfs_dataplane::fs_service::OpenError::WrongStore { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

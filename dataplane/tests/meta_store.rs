//! The namespace survives restarts exactly as it was last persisted, and unlinked-but-open files
//! are cleaned up at the next start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::meta_store::MetaStore;
use cfs_meta::{
    Creds, FileType, InodeId, Namespace, RenameFlags, SetAttr, Timespec, XattrMode, CHUNK_BYTES,
};
use cfs_nvme::rng::SimRng;

fn snapshot(ns: &Namespace) -> Vec<String> {
    let r = Creds::root();
    let (next, _, _) = ns.counters();
    let mut out = Vec::new();
    for i in 1..next {
        let ino = InodeId(i);
        if let Ok(a) = ns.getattr(ino) {
            out.push(format!("{a:?}"));
            if a.kind == FileType::Directory {
                out.push(format!("{:?}", ns.readdir(&r, ino, 0, usize::MAX).unwrap()));
            }
            if a.kind == FileType::Symlink {
                out.push(format!("{:?}", ns.readlink(ino).unwrap()));
            }
            if a.kind == FileType::Regular {
                out.push(format!("{:?}", ns.extents(ino, 0, u64::MAX).unwrap()));
            }
            out.push(format!("{:?}", ns.listxattr(&r, ino).unwrap()));
        }
    }
    out
}

#[test]
fn random_namespaces_survive_reopen() {
    let dir = std::env::temp_dir().join(format!("cfs-meta-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meta.redb");
    let r = Creds::root();
    let mut rng = SimRng::new(99);
    let (mut store, mut ns) = MetaStore::open(&path, Timespec::new(1, 0)).unwrap();
    let names: Vec<Vec<u8>> = (0..8).map(|i| format!("n{i}").into_bytes()).collect();
    for step in 0..3000u32 {
        let now = Timespec::new(i64::from(step) + 2, step);
        let (next, _, _) = ns.counters();
        let pick = |rng: &mut SimRng| InodeId(1 + rng.below(next - 1));
        let name = names[rng.below(8) as usize].clone();
        let (a, b) = (pick(&mut rng), pick(&mut rng));
        let _ = match rng.below(11) {
            9 => {
                let off = rng.below(4 * CHUNK_BYTES);
                let len = 1 + rng.below(2 * CHUNK_BYTES);
                ns.map_chunks(a, off, len)
                    .and_then(|m| ns.wrote(&r, a, off, len, &m, now))
                    .map(|_| ())
            }
            10 => ns
                .setattr(
                    &r,
                    a,
                    &SetAttr {
                        size: Some(rng.below(4 * CHUNK_BYTES)),
                        ..Default::default()
                    },
                    now,
                )
                .map(|_| ()),
            0 => ns.mkdir(&r, a, &name, 0o755, now).map(|_| ()),
            1 | 2 => ns
                .mknod(&r, a, &name, FileType::Regular, 0o644, 0, now)
                .map(|_| ()),
            3 => ns.symlink(&r, a, &name, b"target/path", now).map(|_| ()),
            4 => ns.unlink(&r, a, &name, now),
            5 => ns.rename(
                &r,
                a,
                &name,
                b,
                &names[rng.below(8) as usize],
                RenameFlags::default(),
                now,
            ),
            6 => ns.setxattr(&r, a, b"user.k", &name, XattrMode::Any, now),
            7 => ns
                .setattr(
                    &r,
                    a,
                    &SetAttr {
                        perm: Some(rng.below(0o7777) as u32),
                        ..Default::default()
                    },
                    now,
                )
                .map(|_| ()),
            _ => ns.link(&r, a, b, &name, now).map(|_| ()),
        };
        store.persist(&mut ns).unwrap();
        let _ = ns.take_freed();
        if step % 500 == 499 {
            let before = snapshot(&ns);
            drop(store);
            let (s2, ns2) = MetaStore::open(&path, Timespec::new(0, 0)).unwrap();
            assert_eq!(
                snapshot(&ns2),
                before,
                "step {step}: state differs after reopen"
            );
            ns2.check_invariants().unwrap();
            store = s2;
            ns = ns2;
        }
    }
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unlinked_open_files_are_freed_at_restart_and_numbers_never_reused() {
    let dir = std::env::temp_dir().join(format!("cfs-meta-orphan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meta.redb");
    let r = Creds::root();
    let t = Timespec::new(5, 0);
    let (store, mut ns) = MetaStore::open(&path, t).unwrap();
    let f = ns
        .mknod(&r, InodeId::ROOT, b"f", FileType::Regular, 0o644, 0, t)
        .unwrap();
    let g = ns
        .mknod(&r, InodeId::ROOT, b"g", FileType::Regular, 0o644, 0, t)
        .unwrap();
    ns.open(&r, f.ino, true, true).unwrap();
    ns.unlink(&r, InodeId::ROOT, b"f", t).unwrap();
    ns.unlink(&r, InodeId::ROOT, b"g", t).unwrap();
    store.persist(&mut ns).unwrap();
    assert_eq!(ns.getattr(f.ino).unwrap().nlink, 0);
    drop(store); // the server stops with f still open
    let (store, mut ns) = MetaStore::open(&path, t).unwrap();
    assert!(ns.getattr(f.ino).is_err(), "orphan freed at start");
    let h = ns
        .mknod(&r, InodeId::ROOT, b"h", FileType::Regular, 0o644, 0, t)
        .unwrap();
    assert!(h.ino.0 > g.ino.0, "inode numbers are not reused");
    store.persist(&mut ns).unwrap();
    drop(store);
    let (_, ns) = MetaStore::open(&path, t).unwrap();
    assert!(ns.getattr(f.ino).is_err());
    assert_eq!(ns.lookup(&r, InodeId::ROOT, b"h").unwrap().ino, h.ino);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_schema_1_database_gets_its_extent_map_from_the_old_fixed_layout() {
    let dir = std::env::temp_dir().join(format!("cfs-meta-v1-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meta.redb");
    let r = Creds::root();
    let t = Timespec::new(5, 0);
    let (store, mut ns) = MetaStore::open(&path, t).unwrap();
    let f = ns
        .mknod(&r, InodeId::ROOT, b"f", FileType::Regular, 0o644, 0, t)
        .unwrap();
    let m = ns.map_chunks(f.ino, 0, CHUNK_BYTES + 5).unwrap();
    ns.wrote(&r, f.ino, 0, CHUNK_BYTES + 5, &m, t).unwrap();
    store.persist(&mut ns).unwrap();
    drop(store);
    // Make it look like a schema 1 database: no extents table, no schema number.
    {
        let db = redb::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        w.delete_table(redb::TableDefinition::<(u64, u64), u64>::new("extents"))
            .unwrap();
        {
            let mut c = w
                .open_table(redb::TableDefinition::<&str, u64>::new("counters"))
                .unwrap();
            c.remove("schema").unwrap();
            c.remove("next_chunk").unwrap();
        }
        w.commit().unwrap();
    }
    let (store, ns) = MetaStore::open(&path, t).unwrap();
    let want: Vec<(u64, cfs_meta::ChunkId)> = (0..2)
        .map(|i| (i, cfs_meta::ChunkId((f.ino.0 << 16) | i)))
        .collect();
    assert_eq!(ns.extents(f.ino, 0, u64::MAX).unwrap(), want);
    ns.check_invariants().unwrap();
    drop(store);
    // Migrated once, durably: a second open reads the extents table.
    let (_store, ns) = MetaStore::open(&path, t).unwrap();
    assert_eq!(ns.extents(f.ino, 0, u64::MAX).unwrap(), want);
    assert!(
        ns.counters().2 > (f.ino.0 << 16) | 1,
        "new chunks get fresh ids"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The object tier's index is persisted with the change that made it and loaded at open: a
/// restarted single node still knows which chunks live in which blob, and which are evicted.
#[test]
fn the_tier_index_survives_reopen() {
    use cfs_meta::command::{Command, Op, Outcome};
    use cfs_meta::tier::Flushed;
    let dir = std::env::temp_dir().join(format!("cfs-meta-tier-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("meta.redb");
    let t = Timespec::new(5, 0);
    let run = |store: &MetaStore, ns: &mut Namespace, op: Op| {
        let out = ns.apply(&Command {
            creds: Creds::root(),
            now: t,
            op,
            session: None,
        });
        store.persist(ns).unwrap();
        out
    };
    let (chunk, index) = {
        let (store, mut ns) = MetaStore::open(&path, t).unwrap();
        let a = match run(
            &store,
            &mut ns,
            Op::Create {
                parent: InodeId::ROOT,
                name: b"f".to_vec(),
                perm: 0o644,
            },
        ) {
            Ok(Outcome::Attr(a)) => a,
            other => panic!("{other:?}"),
        };
        let chunks = ns.map_chunks(a.ino, 0, 8192).unwrap();
        run(
            &store,
            &mut ns,
            Op::Wrote {
                ino: a.ino,
                offset: 0,
                len: 8192,
                chunks: chunks.clone(),
            },
        )
        .unwrap();
        let chunk = chunks[0].1;
        let version = ns.tier().version(chunk);
        run(
            &store,
            &mut ns,
            Op::TierFlushed {
                blob: 0xAB << 16,
                payload_offset: 4096,
                payload_bytes: 8192,
                extents: vec![Flushed {
                    chunk,
                    version,
                    blob_offset: 4096,
                    len: 8192,
                    crc32c: 7,
                }],
            },
        )
        .unwrap();
        assert_eq!(
            run(&store, &mut ns, Op::TierEvicted { chunk, version }),
            Ok(Outcome::Committed(true))
        );
        (chunk, ns.tier().clone())
    };
    let (_store, ns) = MetaStore::open(&path, t).unwrap();
    assert_eq!(ns.tier(), &index);
    assert!(ns.tier().extent(chunk).unwrap().evicted);
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Commands round-trip through their encoding, malformed bytes never decode into anything, and
//! applying the same commands to two namespaces gives the same results and the same state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_meta::command::{Command, Op, Outcome};
use cfs_meta::placement::{Member, Placement};
use cfs_meta::session::Session;
use cfs_meta::tier::Flushed;
use cfs_meta::{
    ChunkId, Creds, Errno, FileType, InodeId, Namespace, RenameFlags, SetAttr, TimeSet, Timespec,
    XattrMode,
};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    let ino = (1u64..12).prop_map(InodeId);
    let name = prop::sample::select(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    prop_oneof![
        (ino.clone(), name.clone(), any::<u16>()).prop_map(|(parent, name, p)| Op::Mknod {
            parent,
            name,
            kind: FileType::Regular,
            perm: u32::from(p) & 0o7777,
            rdev: 0
        }),
        (ino.clone(), name.clone()).prop_map(|(parent, name)| Op::Mkdir {
            parent,
            name,
            perm: 0o755
        }),
        (ino.clone(), name.clone()).prop_map(|(parent, name)| Op::Symlink {
            parent,
            name,
            target: b"t".to_vec()
        }),
        (ino.clone(), ino.clone(), name.clone()).prop_map(|(ino, newparent, newname)| Op::Link {
            ino,
            newparent,
            newname
        }),
        (ino.clone(), name.clone()).prop_map(|(parent, name)| Op::Unlink { parent, name }),
        (ino.clone(), name.clone()).prop_map(|(parent, name)| Op::Rmdir { parent, name }),
        (ino.clone(), name.clone(), ino.clone(), name.clone(), 0u8..3).prop_map(
            |(parent, name, newparent, newname, f)| Op::Rename {
                parent,
                name,
                newparent,
                newname,
                flags: RenameFlags {
                    noreplace: f == 1,
                    exchange: f == 2
                }
            }
        ),
        (ino.clone(), any::<Option<u16>>(), any::<Option<u32>>()).prop_map(|(ino, p, s)| {
            Op::SetAttr {
                ino,
                set: SetAttr {
                    perm: p.map(|p| u32::from(p) & 0o7777),
                    size: s.map(u64::from),
                    mtime: Some(TimeSet::Now),
                    ..SetAttr::default()
                },
            }
        }),
        (ino.clone(), name.clone()).prop_map(|(ino, name)| Op::SetXattr {
            ino,
            name: [b"user.".as_slice(), &name].concat(),
            value: name,
            mode: XattrMode::Any
        }),
        (ino.clone(), name.clone()).prop_map(|(ino, name)| Op::RemoveXattr {
            ino,
            name: [b"user.".as_slice(), &name].concat()
        }),
        (ino.clone(), any::<bool>(), any::<bool>()).prop_map(|(ino, read, write)| Op::Open {
            ino,
            read,
            write
        }),
        ino.clone().prop_map(|ino| Op::Release { ino }),
        (ino.clone(), name.clone()).prop_map(|(parent, name)| Op::Create {
            parent,
            name,
            perm: 0o600
        }),
        (ino.clone(), any::<u32>(), 0u64..(1 << 28)).prop_map(|(ino, o, len)| Op::MapChunks {
            ino,
            offset: u64::from(o) << 4,
            len
        }),
        (ino.clone(), any::<u32>(), any::<u16>(), any::<u8>()).prop_map(|(ino, o, len, c)| {
            Op::Wrote {
                ino,
                offset: u64::from(o),
                len: u64::from(len),
                chunks: vec![(u64::from(o) >> 26, ChunkId(u64::from(c)))],
            }
        }),
        (ino.clone(), any::<u32>(), 1u64..(1 << 27), any::<bool>()).prop_map(
            |(ino, o, len, keep_size)| Op::Fallocate {
                ino,
                offset: u64::from(o),
                len,
                keep_size
            }
        ),
        (ino, any::<u32>(), 1u64..(1 << 27), any::<bool>()).prop_map(|(ino, o, len, extend)| {
            Op::Punched {
                ino,
                offset: u64::from(o),
                len,
                extend,
            }
        }),
        (
            proptest::collection::vec(1u64..20, 0..3),
            proptest::collection::vec(1u64..4, 0..3)
        )
            .prop_map(|(c, nodes)| Op::MarkStale {
                chunks: c.into_iter().map(ChunkId).collect(),
                nodes
            }),
        (1u64..20, 1u64..4).prop_map(|(c, node)| Op::Repaired {
            chunk: ChunkId(c),
            node
        }),
        (1u64..7, 0u8..3).prop_map(|(id, d)| Op::AddMember {
            id,
            addr: format!("10.0.0.{id}:7411"),
            domain: format!("rack{d}"),
        }),
        (1u64..7).prop_map(|id| Op::RemoveMember { id }),
        (1u64..20, proptest::collection::vec(1u64..7, 0..3)).prop_map(|(c, nodes)| {
            Op::AddHolders {
                chunk: ChunkId(c),
                nodes,
            }
        }),
        (1u64..20, proptest::collection::vec(1u64..7, 0..3)).prop_map(|(c, nodes)| {
            Op::DropHolders {
                chunk: ChunkId(c),
                nodes,
            }
        }),
        // Object tier: small blob ids (so later ops hit known blobs) and chunk ids.
        (
            0u128..4,
            proptest::collection::vec((1u64..20, 0u64..6, 1u32..5000, any::<u32>()), 0..4)
        )
            .prop_map(|(blob, es)| {
                let mut at = 64u64;
                let extents: Vec<Flushed> = es
                    .into_iter()
                    .map(|(c, version, len, crc32c)| {
                        let f = Flushed {
                            chunk: ChunkId(c),
                            version,
                            blob_offset: at,
                            len,
                            crc32c,
                        };
                        at += u64::from(len);
                        f
                    })
                    .collect();
                Op::TierFlushed {
                    blob,
                    payload_offset: 64,
                    payload_bytes: at - 64,
                    extents,
                }
            }),
        (1u64..20, 0u64..6).prop_map(|(c, version)| Op::TierEvicted {
            chunk: ChunkId(c),
            version
        }),
        (1u64..20).prop_map(|c| Op::TierRestored { chunk: ChunkId(c) }),
        (0u128..4).prop_map(|blob| Op::BlobDeleteStarted { blob }),
        (0u128..4).prop_map(|blob| Op::BlobDeleted { blob }),
        (0u128..6).prop_map(|blob| Op::TierUploadStarted { blob }),
        (0u128..6).prop_map(|blob| Op::TierUploadAbandoned { blob }),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    (
        op(),
        any::<bool>(),
        1i64..1000,
        proptest::collection::vec(any::<u32>(), 0..3),
    )
        .prop_map(|(op, root, sec, groups)| Command {
            creds: if root {
                Creds::root()
            } else {
                Creds {
                    uid: 1000,
                    gid: 1000,
                    groups,
                }
            },
            now: Timespec::new(sec, 7),
            op,
            // Root's commands come from one client whose few sequence numbers repeat: resends,
            // which must return the first result and change nothing.
            session: root.then_some(Session {
                client: 1,
                seq: (sec % 7) as u64,
            }),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn commands_round_trip_and_truncations_fail(c in command()) {
        let b = c.encode();
        prop_assert_eq!(Command::decode(&b), Some(c.clone()));
        for cut in [0, 1, b.len() / 2, b.len() - 1] {
            prop_assert_eq!(Command::decode(&b[..cut]), None);
        }
    }

    #[test]
    fn op_codes_match_the_encoding(c in command()) {
        // version | creds (root: 4 + 4 + 2) | time (8 + 4) | no session (1) | op code
        let plain = Command { creds: Creds::root(), session: None, ..c };
        prop_assert_eq!(plain.encode()[24], plain.op.code());
    }

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..120)) {
        let _ = Command::decode(&b);
        let _ = Outcome::decode(&b);
        let _ = Namespace::from_snapshot(&b);
    }

    /// Two replicas applying the same log agree on every result and end in the same state,
    /// which keeps its invariants.
    #[test]
    fn replicas_applying_one_log_agree(log in proptest::collection::vec(command(), 1..80)) {
        let t0 = Timespec::new(0, 0);
        let (mut a, mut b) = (Namespace::new(0, 0, 0o777, t0), Namespace::new(0, 0, 0o777, t0));
        // A three-node cluster keeping two copies: placement is part of the replicated state.
        let members = (1..=3u64)
            .map(|i| (i, Member { addr: format!("10.0.0.{i}:7411"), domain: format!("rack{i}") }))
            .collect();
        a.set_placement(Placement::new(members, 2));
        b.set_placement(a.placement().clone());
        for c in &log {
            // One replica gets the command through its encoding, as a follower would.
            let decoded = Command::decode(&c.encode()).unwrap();
            let (ra, rb) = (a.apply(c), b.apply(&decoded));
            prop_assert_eq!(&ra, &rb);
            if let Ok(o) = &ra {
                prop_assert_eq!(Outcome::decode(&o.encode()), Some(o.clone()));
            }
            a.check_invariants().map_err(TestCaseError::fail)?;
        }
        prop_assert_eq!(format!("{:?}", a.all_extents().collect::<Vec<_>>()), format!("{:?}", b.all_extents().collect::<Vec<_>>()));
        prop_assert_eq!(a.placement(), b.placement());
        prop_assert_eq!(a.tier(), b.tier());
        a.tier().check().map_err(TestCaseError::fail)?;
        for i in 1..40u64 {
            prop_assert_eq!(a.getattr(InodeId(i)), b.getattr(InodeId(i)));
        }
        // A snapshot restores the same state (handles included) and re-encodes identically.
        let snap = a.snapshot();
        let restored = Namespace::from_snapshot(&snap).map_err(TestCaseError::fail)?;
        prop_assert_eq!(restored.snapshot(), snap);
        restored.check_invariants().map_err(TestCaseError::fail)?;
    }
}

/// The tier index follows the file's data: a write kills a flushed copy, an evicted chunk
/// refuses changes until restored, and a deleted file's extents stop counting as live.
#[test]
fn tier_index_follows_the_data() {
    let t0 = Timespec::new(0, 0);
    let mut ns = Namespace::new(0, 0, 0o777, t0);
    let run = |ns: &mut Namespace, op: Op| {
        ns.apply(&Command {
            creds: Creds::root(),
            now: t0,
            op,
            session: None,
        })
    };
    let f = match run(
        &mut ns,
        Op::Create {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
            perm: 0o644,
        },
    ) {
        Ok(Outcome::Attr(a)) => a.ino,
        other => panic!("create: {other:?}"),
    };
    let chunks = match run(
        &mut ns,
        Op::MapChunks {
            ino: f,
            offset: 0,
            len: 4096,
        },
    ) {
        Ok(Outcome::Chunks(c)) => c,
        other => panic!("map: {other:?}"),
    };
    let chunk = chunks[0].1;
    run(
        &mut ns,
        Op::Wrote {
            ino: f,
            offset: 0,
            len: 4096,
            chunks: chunks.clone(),
        },
    )
    .unwrap();
    let v = ns.tier().version(chunk);
    let flushed = |blob, version| Op::TierFlushed {
        blob,
        payload_offset: 64,
        payload_bytes: 4096,
        extents: vec![Flushed {
            chunk,
            version,
            blob_offset: 64,
            len: 4096,
            crc32c: 1,
        }],
    };
    run(&mut ns, flushed(7, v)).unwrap();
    assert_eq!(ns.tier().blob(7).unwrap().live_bytes, 4096);
    assert_eq!(
        run(&mut ns, Op::TierEvicted { chunk, version: v }),
        Ok(Outcome::Committed(true))
    );
    // A write to the evicted chunk is refused, and changes nothing.
    assert_eq!(
        run(
            &mut ns,
            Op::Wrote {
                ino: f,
                offset: 0,
                len: 10,
                chunks: chunks.clone()
            }
        ),
        Err(Errno::Io)
    );
    assert_eq!(ns.getattr(f).unwrap().size, 4096);
    run(&mut ns, Op::TierRestored { chunk }).unwrap();
    run(
        &mut ns,
        Op::Wrote {
            ino: f,
            offset: 0,
            len: 10,
            chunks: chunks.clone(),
        },
    )
    .unwrap();
    assert_eq!(
        ns.tier().extent(chunk),
        None,
        "the stored copy is dead after a write"
    );
    assert_eq!(ns.tier().blob(7).unwrap().live_bytes, 0);
    // Dead blob: deleted in order (mark, then forget).
    assert_eq!(run(&mut ns, Op::BlobDeleted { blob: 7 }), Err(Errno::Again));
    run(&mut ns, Op::BlobDeleteStarted { blob: 7 }).unwrap();
    run(&mut ns, Op::BlobDeleted { blob: 7 }).unwrap();
    // A flush of the current version, then unlink: the extent goes with the file.
    let v = ns.tier().version(chunk);
    run(&mut ns, flushed(8, v)).unwrap();
    assert_eq!(ns.tier().blob(8).unwrap().live_bytes, 4096);
    run(&mut ns, Op::Release { ino: f }).unwrap();
    run(
        &mut ns,
        Op::Unlink {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
        },
    )
    .unwrap();
    assert_eq!(ns.tier().blob(8).unwrap().live_bytes, 0);
    assert_eq!(ns.tier().deletable(), vec![8]);
    // A stale flush report (a version the chunk no longer has) adds nothing live.
    run(&mut ns, flushed(9, v)).unwrap();
    assert_eq!(ns.tier().blob(9).unwrap().live_bytes, 0);
}

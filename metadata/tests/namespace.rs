//! POSIX behaviour of the namespace state machine, and its invariants under random sequences.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_meta::namespace::access;
use cfs_meta::{
    Creds, Errno, FileType, InodeId, Namespace, RenameFlags, SetAttr, TimeSet, Timespec, XattrMode,
};
use proptest::prelude::*;

const ROOT: InodeId = InodeId::ROOT;

fn t(s: i64) -> Timespec {
    Timespec::new(s, 0)
}
fn user(uid: u32) -> Creds {
    Creds {
        uid,
        gid: uid,
        groups: vec![],
    }
}

#[test]
fn create_lookup_link_unlink_and_times() {
    let r = Creds::root();
    let mut ns = Namespace::new(0, 0, 0o755, t(1));
    let d = ns.mkdir(&r, ROOT, b"d", 0o755, t(2)).unwrap();
    assert_eq!(ns.getattr(ROOT).unwrap().nlink, 3);
    assert_eq!(ns.getattr(ROOT).unwrap().mtime, t(2));
    let f = ns
        .mknod(&r, d.ino, b"f", FileType::Regular, 0o644, 0, t(3))
        .unwrap();
    assert_eq!(
        ns.mknod(&r, d.ino, b"f", FileType::Regular, 0o644, 0, t(3)),
        Err(Errno::Exist)
    );
    assert_eq!(ns.lookup(&r, d.ino, b"f").unwrap().ino, f.ino);
    assert_eq!(ns.lookup(&r, d.ino, b"..").unwrap().ino, ROOT);
    assert_eq!(ns.lookup(&r, d.ino, b"nope"), Err(Errno::NoEnt));
    assert_eq!(ns.lookup(&r, f.ino, b"x"), Err(Errno::NotDir));
    assert_eq!(ns.lookup(&r, d.ino, &[b'a'; 256]), Err(Errno::NameTooLong));
    let l = ns.link(&r, f.ino, ROOT, b"hard", t(4)).unwrap();
    assert_eq!(l.nlink, 2);
    assert_eq!(l.ctime, t(4));
    assert_eq!(ns.link(&r, d.ino, ROOT, b"dirlink", t(4)), Err(Errno::Perm));
    ns.unlink(&r, d.ino, b"f", t(5)).unwrap();
    assert_eq!(ns.getattr(f.ino).unwrap().nlink, 1);
    assert_eq!(ns.unlink(&r, ROOT, b"d", t(5)), Err(Errno::IsDir));
    assert_eq!(ns.rmdir(&r, ROOT, b"hard", t(5)), Err(Errno::NotDir));
    let s = ns.symlink(&r, ROOT, b"s", b"/some/where", t(6)).unwrap();
    assert_eq!(s.size, 11);
    assert_eq!(ns.readlink(s.ino).unwrap(), b"/some/where");
    assert_eq!(ns.readlink(f.ino), Err(Errno::Inval));
    ns.check_invariants().unwrap();
}

#[test]
fn unlinked_open_files_live_until_released() {
    let r = Creds::root();
    let mut ns = Namespace::new(0, 0, 0o755, t(1));
    let f = ns
        .mknod(&r, ROOT, b"f", FileType::Regular, 0o644, 0, t(1))
        .unwrap();
    ns.open(&r, f.ino, true, true).unwrap();
    let chunks = ns.map_chunks(f.ino, 0, 5000).unwrap();
    assert_eq!(chunks.len(), 1);
    ns.wrote(&r, f.ino, 0, 5000, &chunks, t(2)).unwrap();
    ns.unlink(&r, ROOT, b"f", t(3)).unwrap();
    assert_eq!(
        ns.getattr(f.ino).unwrap().nlink,
        0,
        "still there while open"
    );
    assert!(ns.take_freed().is_empty());
    ns.check_invariants().unwrap();
    ns.release(f.ino).unwrap();
    assert_eq!(ns.getattr(f.ino), Err(Errno::NoEnt));
    assert_eq!(ns.take_freed(), vec![chunks[0].1]);
    ns.check_invariants().unwrap();
}

#[test]
fn the_extent_map_allocates_frees_and_never_reuses_chunks() {
    let r = Creds::root();
    let mut ns = Namespace::new(0, 0, 0o755, t(1));
    let f = ns
        .mknod(&r, ROOT, b"f", FileType::Regular, 0o644, 0, t(1))
        .unwrap();
    const C: u64 = cfs_meta::CHUNK_BYTES;
    // A write across a chunk boundary maps two chunks; mapping again returns the same ones.
    let a = ns.map_chunks(f.ino, C - 10, 20).unwrap();
    assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(ns.map_chunks(f.ino, 0, 1).unwrap(), vec![a[0]]);
    ns.wrote(&r, f.ino, C - 10, 20, &a, t(2)).unwrap();
    // Sparse: a write at 5 GiB maps only its own chunk.
    let far = ns.map_chunks(f.ino, 5 << 30, 4096).unwrap();
    assert_eq!(far[0].0, (5 << 30) / C);
    ns.wrote(&r, f.ino, 5 << 30, 4096, &far, t(2)).unwrap();
    assert_eq!(ns.extents(f.ino, 0, u64::MAX).unwrap().len(), 3);
    assert_eq!(ns.extents(f.ino, 2 * C, C).unwrap(), vec![]);
    // Punching a range that covers chunk 1 whole drops it; chunk 0 is only partly covered.
    ns.punched(f.ino, 100, 2 * C, false, t(3)).unwrap();
    assert_eq!(ns.take_freed(), vec![a[1].1]);
    assert_eq!(
        ns.getattr(f.ino).unwrap().size,
        (5 << 30) + 4096,
        "punch keeps the size"
    );
    // Truncate drops chunks wholly past the end.
    let set = SetAttr {
        size: Some(10),
        ..SetAttr::default()
    };
    ns.setattr(&r, f.ino, &set, t(4)).unwrap();
    assert_eq!(ns.take_freed(), vec![far[0].1]);
    // A write whose chunk was dropped meanwhile fails instead of losing data silently.
    assert_eq!(ns.wrote(&r, f.ino, 5 << 30, 1, &far, t(5)), Err(Errno::Io));
    // New chunks get new ids.
    let b = ns.map_chunks(f.ino, C, 1).unwrap();
    assert!(b[0].1 > far[0].1);
    // fallocate maps and extends; KEEP_SIZE only maps.
    let at = ns.fallocate(f.ino, 3 * C, 10, true, t(6)).unwrap();
    assert_eq!(at.size, 10);
    assert_eq!(ns.extents(f.ino, 3 * C, 1).unwrap().len(), 1);
    assert_eq!(ns.fallocate(f.ino, 0, 100, false, t(6)).unwrap().size, 100);
    // Only regular files have extents.
    assert_eq!(ns.map_chunks(ROOT, 0, 1), Err(Errno::IsDir));
    ns.check_invariants().unwrap();
}

#[test]
fn permissions_sticky_and_ownership_rules() {
    let r = Creds::root();
    let mut ns = Namespace::new(0, 0, 0o755, t(1));
    let tmp = ns.mkdir(&r, ROOT, b"tmp", 0o1777, t(1)).unwrap();
    let (alice, bob) = (user(1000), user(1001));
    // Not writable by others: EACCES.
    assert_eq!(
        ns.mknod(&alice, ROOT, b"x", FileType::Regular, 0o644, 0, t(2)),
        Err(Errno::Access)
    );
    let af = ns
        .mknod(&alice, tmp.ino, b"a", FileType::Regular, 0o644, 0, t(2))
        .unwrap();
    assert_eq!((af.uid, af.gid), (1000, 1000));
    // Sticky directory: bob may not remove or rename alice's file.
    assert_eq!(ns.unlink(&bob, tmp.ino, b"a", t(3)), Err(Errno::Perm));
    assert_eq!(
        ns.rename(
            &bob,
            tmp.ino,
            b"a",
            tmp.ino,
            b"b",
            RenameFlags::default(),
            t(3)
        ),
        Err(Errno::Perm)
    );
    // chmod only by the owner; chown only by root; chgrp to own groups.
    assert_eq!(
        ns.setattr(
            &bob,
            af.ino,
            &SetAttr {
                perm: Some(0o600),
                ..Default::default()
            },
            t(3)
        ),
        Err(Errno::Perm)
    );
    assert_eq!(
        ns.setattr(
            &alice,
            af.ino,
            &SetAttr {
                uid: Some(1001),
                ..Default::default()
            },
            t(3)
        ),
        Err(Errno::Perm)
    );
    let alice2 = Creds {
        uid: 1000,
        gid: 1000,
        groups: vec![50],
    };
    let a = ns
        .setattr(
            &alice2,
            af.ino,
            &SetAttr {
                gid: Some(50),
                ..Default::default()
            },
            t(3),
        )
        .unwrap();
    assert_eq!(a.gid, 50);
    assert_eq!(
        ns.setattr(
            &alice,
            af.ino,
            &SetAttr {
                gid: Some(51),
                ..Default::default()
            },
            t(3)
        ),
        Err(Errno::Perm)
    );
    // setuid/setgid are dropped by chown and by a non-root write.
    let a = ns
        .setattr(
            &alice2,
            af.ino,
            &SetAttr {
                perm: Some(0o6755),
                ..Default::default()
            },
            t(4),
        )
        .unwrap();
    assert_eq!(a.perm, 0o6755);
    let a = ns
        .setattr(
            &r,
            af.ino,
            &SetAttr {
                uid: Some(1001),
                ..Default::default()
            },
            t(5),
        )
        .unwrap();
    assert_eq!(a.perm & 0o6000, 0);
    // utimens: explicit times need ownership; "now" needs ownership or write permission.
    assert_eq!(
        ns.setattr(
            &alice,
            af.ino,
            &SetAttr {
                mtime: Some(TimeSet::At(t(9))),
                ..Default::default()
            },
            t(6)
        ),
        Err(Errno::Perm)
    );
    assert_eq!(
        ns.setattr(
            &alice,
            af.ino,
            &SetAttr {
                mtime: Some(TimeSet::Now),
                ..Default::default()
            },
            t(6)
        ),
        Err(Errno::Access)
    );
    // Truncate needs write permission.
    assert_eq!(
        ns.setattr(
            &alice,
            af.ino,
            &SetAttr {
                size: Some(0),
                ..Default::default()
            },
            t(6)
        ),
        Err(Errno::Access)
    );
    assert_eq!(ns.access(&alice, af.ino, access::R), Ok(()));
    assert_eq!(ns.access(&alice, af.ino, access::W), Err(Errno::Access));
    assert_eq!(ns.open(&alice, af.ino, false, true), Err(Errno::Access));
    // Device nodes need root.
    assert_eq!(
        ns.mknod(
            &alice,
            tmp.ino,
            b"dev",
            FileType::CharDevice,
            0o644,
            0x0101,
            t(7)
        ),
        Err(Errno::Perm)
    );
    ns.mknod(
        &r,
        tmp.ino,
        b"dev",
        FileType::CharDevice,
        0o644,
        0x0101,
        t(7),
    )
    .unwrap();
    ns.check_invariants().unwrap();
}

#[test]
fn setgid_directories_pass_their_group_on() {
    let r = Creds::root();
    let mut ns = Namespace::new(0, 0, 0o777, t(1));
    let d = ns.mkdir(&r, ROOT, b"proj", 0o2777, t(1)).unwrap();
    ns.setattr(
        &r,
        d.ino,
        &SetAttr {
            gid: Some(77),
            ..Default::default()
        },
        t(1),
    )
    .unwrap();
    let f = ns
        .mknod(&user(5), d.ino, b"f", FileType::Regular, 0o644, 0, t(2))
        .unwrap();
    assert_eq!(f.gid, 77);
    let sub = ns.mkdir(&user(5), d.ino, b"sub", 0o755, t(2)).unwrap();
    assert_eq!((sub.gid, sub.perm & 0o2000), (77, 0o2000));
}

#[test]
fn rename_rules() {
    let r = Creds::root();
    let mut ns = Namespace::new(0, 0, 0o755, t(1));
    let a = ns.mkdir(&r, ROOT, b"a", 0o755, t(1)).unwrap();
    let b = ns.mkdir(&r, a.ino, b"b", 0o755, t(1)).unwrap();
    let f = ns
        .mknod(&r, ROOT, b"f", FileType::Regular, 0o644, 0, t(1))
        .unwrap();
    // Into its own subtree: EINVAL.
    assert_eq!(
        ns.rename(&r, ROOT, b"a", b.ino, b"a2", RenameFlags::default(), t(2)),
        Err(Errno::Inval)
    );
    // File over directory and the reverse.
    assert_eq!(
        ns.rename(&r, ROOT, b"f", ROOT, b"a", RenameFlags::default(), t(2)),
        Err(Errno::IsDir)
    );
    assert_eq!(
        ns.rename(&r, a.ino, b"b", ROOT, b"f", RenameFlags::default(), t(2)),
        Err(Errno::NotDir)
    );
    // Non-empty target directory.
    let c = ns.mkdir(&r, ROOT, b"c", 0o755, t(1)).unwrap();
    assert_eq!(
        ns.rename(&r, ROOT, b"c", ROOT, b"a", RenameFlags::default(), t(2)),
        Err(Errno::NotEmpty)
    );
    // Moving a directory updates both parents' link counts and its "..".
    ns.rename(&r, a.ino, b"b", c.ino, b"b", RenameFlags::default(), t(3))
        .unwrap();
    assert_eq!(ns.getattr(a.ino).unwrap().nlink, 2);
    assert_eq!(ns.getattr(c.ino).unwrap().nlink, 3);
    assert_eq!(ns.lookup(&r, b.ino, b"..").unwrap().ino, c.ino);
    // NOREPLACE and EXCHANGE.
    let g = ns
        .mknod(&r, ROOT, b"g", FileType::Regular, 0o644, 0, t(1))
        .unwrap();
    let nr = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    assert_eq!(
        ns.rename(&r, ROOT, b"f", ROOT, b"g", nr, t(4)),
        Err(Errno::Exist)
    );
    let ex = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    ns.rename(&r, ROOT, b"f", c.ino, b"b", ex, t(4)).unwrap();
    assert_eq!(ns.lookup(&r, ROOT, b"f").unwrap().ino, b.ino);
    assert_eq!(ns.lookup(&r, c.ino, b"b").unwrap().ino, f.ino);
    assert_eq!(ns.getattr(c.ino).unwrap().nlink, 2);
    assert_eq!(ns.getattr(ROOT).unwrap().nlink, 5);
    assert_eq!(ns.lookup(&r, b.ino, b"..").unwrap().ino, ROOT);
    // Replacing a file frees it.
    ns.rename(&r, ROOT, b"g", c.ino, b"b", RenameFlags::default(), t(5))
        .unwrap();
    assert_eq!(ns.getattr(f.ino), Err(Errno::NoEnt));
    assert_eq!(ns.getattr(g.ino).unwrap().ctime, t(5));
    ns.check_invariants().unwrap();
}

#[test]
fn readdir_is_stable_across_changes() {
    let r = Creds::root();
    let mut ns = Namespace::new(0, 0, 0o755, t(1));
    for i in 0..50 {
        ns.mknod(
            &r,
            ROOT,
            format!("f{i:02}").as_bytes(),
            FileType::Regular,
            0o644,
            0,
            t(1),
        )
        .unwrap();
    }
    let first = ns.readdir(&r, ROOT, 0, 10).unwrap();
    assert_eq!(first.len(), 10);
    assert_eq!(first[0].name, b".");
    assert_eq!(first[1].name, b"..");
    // Entries removed and added between calls don't make the listing skip or repeat others.
    ns.unlink(&r, ROOT, b"f00", t(2)).unwrap();
    ns.mknod(&r, ROOT, b"new", FileType::Regular, 0o644, 0, t(2))
        .unwrap();
    let mut seen: Vec<Vec<u8>> = first.iter().map(|e| e.name.clone()).collect();
    let mut cookie = first.last().unwrap().cookie;
    loop {
        let page = ns.readdir(&r, ROOT, cookie, 7).unwrap();
        if page.is_empty() {
            break;
        }
        cookie = page.last().unwrap().cookie;
        seen.extend(page.into_iter().map(|e| e.name));
    }
    for i in 1..50 {
        let n = format!("f{i:02}").into_bytes();
        assert_eq!(
            seen.iter().filter(|s| **s == n).count(),
            1,
            "{}",
            String::from_utf8_lossy(&n)
        );
    }
    assert!(seen.contains(&b"new".to_vec()));
}

#[test]
fn xattrs() {
    let r = Creds::root();
    let mut ns = Namespace::new(0, 0, 0o755, t(1));
    let f = ns
        .mknod(&r, ROOT, b"f", FileType::Regular, 0o644, 0, t(1))
        .unwrap();
    ns.setxattr(&r, f.ino, b"user.a", b"1", XattrMode::Any, t(2))
        .unwrap();
    assert_eq!(
        ns.setxattr(&r, f.ino, b"user.a", b"2", XattrMode::Create, t(2)),
        Err(Errno::Exist)
    );
    assert_eq!(
        ns.setxattr(&r, f.ino, b"user.b", b"2", XattrMode::Replace, t(2)),
        Err(Errno::NoData)
    );
    assert_eq!(ns.getxattr(&r, f.ino, b"user.a").unwrap(), b"1");
    assert_eq!(
        ns.setxattr(&user(7), f.ino, b"user.c", b"x", XattrMode::Any, t(2)),
        Err(Errno::Access)
    );
    assert_eq!(
        ns.setxattr(&r, f.ino, b"bogus.c", b"x", XattrMode::Any, t(2)),
        Err(Errno::NotSup)
    );
    ns.setxattr(&r, f.ino, b"trusted.t", b"x", XattrMode::Any, t(2))
        .unwrap();
    assert_eq!(ns.listxattr(&r, f.ino).unwrap().len(), 2);
    assert_eq!(
        ns.listxattr(&user(7), f.ino).unwrap(),
        vec![b"user.a".to_vec()]
    );
    ns.removexattr(&r, f.ino, b"user.a", t(3)).unwrap();
    assert_eq!(ns.getxattr(&r, f.ino, b"user.a"), Err(Errno::NoData));
}

#[derive(Clone, Debug)]
enum Op {
    Mkdir(u8, u8),
    Mknod(u8, u8),
    Symlink(u8, u8),
    Link(u8, u8, u8),
    Unlink(u8, u8),
    Rmdir(u8, u8),
    Rename(u8, u8, u8, u8, u8),
    Open(u8),
    Release(u8),
    Chmod(u8, u16),
    Write(u8, u8, u16),
    Truncate(u8, u8),
    Punch(u8, u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (any::<u8>(), 0u8..6).prop_map(|(d, n)| Op::Mkdir(d, n)),
        (any::<u8>(), 0u8..6).prop_map(|(d, n)| Op::Mknod(d, n)),
        (any::<u8>(), 0u8..6).prop_map(|(d, n)| Op::Symlink(d, n)),
        (any::<u8>(), any::<u8>(), 0u8..6).prop_map(|(i, d, n)| Op::Link(i, d, n)),
        (any::<u8>(), 0u8..6).prop_map(|(d, n)| Op::Unlink(d, n)),
        (any::<u8>(), 0u8..6).prop_map(|(d, n)| Op::Rmdir(d, n)),
        (any::<u8>(), 0u8..6, any::<u8>(), 0u8..6, 0u8..3)
            .prop_map(|(a, b, c, d, f)| Op::Rename(a, b, c, d, f)),
        any::<u8>().prop_map(Op::Open),
        any::<u8>().prop_map(Op::Release),
        (any::<u8>(), any::<u16>()).prop_map(|(i, m)| Op::Chmod(i, m)),
        (any::<u8>(), 0u8..8, 1u16..).prop_map(|(i, c, l)| Op::Write(i, c, l)),
        (any::<u8>(), 0u8..8).prop_map(|(i, c)| Op::Truncate(i, c)),
        (any::<u8>(), 0u8..8, 1u8..4).prop_map(|(i, c, n)| Op::Punch(i, c, n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Whatever sequence of operations (valid or not, by root or not) runs, the namespace keeps
    /// its invariants: link counts right, every entry valid, no cycles, nothing unreachable
    /// kept, and a failed operation changes nothing.
    #[test]
    fn invariants_hold_under_random_operations(ops in proptest::collection::vec((op(), any::<bool>()), 1..120)) {
        let mut ns = Namespace::new(0, 0, 0o777, t(0));
        let mut open: Vec<InodeId> = Vec::new();
        // Every chunk ever handed out, and every one freed: each must be exactly one of
        // referenced or freed (no leak, no double free, no reuse).
        let mut allocated = std::collections::BTreeSet::new();
        let mut freed = std::collections::BTreeSet::new();
        const C: u64 = cfs_meta::CHUNK_BYTES;
        let names = [b"a".as_slice(), b"b", b"c", b"d", b"e", b"f"];
        for (step, (o, as_root)) in ops.into_iter().enumerate() {
            let creds = if as_root { Creds::root() } else { user(1000) };
            let now = t(step as i64 + 1);
            // Pick inodes from those that exist, so operations hit real targets.
            let inos: Vec<InodeId> = (1..=200u64).map(InodeId).filter(|i| ns.getattr(*i).is_ok()).collect();
            let pick = |k: u8| inos[k as usize % inos.len()];
            let before = ns.clone();
            let result = match o {
                Op::Mkdir(d, n) => ns.mkdir(&creds, pick(d), names[n as usize], 0o777, now).map(|_| ()),
                Op::Mknod(d, n) => ns.mknod(&creds, pick(d), names[n as usize], FileType::Regular, 0o666, 0, now).map(|_| ()),
                Op::Symlink(d, n) => ns.symlink(&creds, pick(d), names[n as usize], b"target", now).map(|_| ()),
                Op::Link(i, d, n) => ns.link(&creds, pick(i), pick(d), names[n as usize], now).map(|_| ()),
                Op::Unlink(d, n) => ns.unlink(&creds, pick(d), names[n as usize], now),
                Op::Rmdir(d, n) => ns.rmdir(&creds, pick(d), names[n as usize], now),
                Op::Rename(a, b, c, d, f) => {
                    let flags = match f { 0 => RenameFlags::default(), 1 => RenameFlags { noreplace: true, exchange: false }, _ => RenameFlags { noreplace: false, exchange: true } };
                    ns.rename(&creds, pick(a), names[b as usize], pick(c), names[d as usize], flags, now)
                }
                Op::Open(i) => {
                    let ino = pick(i);
                    let r = ns.open(&creds, ino, false, false).map(|_| ());
                    if r.is_ok() { open.push(ino); }
                    r
                }
                Op::Release(i) => {
                    if open.is_empty() { Ok(()) } else {
                        let ino = open.swap_remove(i as usize % open.len());
                        ns.release(ino)
                    }
                }
                Op::Chmod(i, m) => ns.setattr(&creds, pick(i), &SetAttr { perm: Some(u32::from(m) & 0o7777), ..Default::default() }, now).map(|_| ()),
                Op::Write(i, c, l) => {
                    let (ino, off) = (pick(i), u64::from(c) * C / 2);
                    ns.map_chunks(ino, off, u64::from(l)).and_then(|m| {
                        allocated.extend(m.iter().map(|x| x.1));
                        ns.wrote(&creds, ino, off, u64::from(l), &m, now).map(|_| ())
                    })
                }
                Op::Truncate(i, c) => ns.setattr(&creds, pick(i), &SetAttr { size: Some(u64::from(c) * C / 3), ..Default::default() }, now).map(|_| ()),
                Op::Punch(i, c, n) => ns.punched(pick(i), u64::from(c) * C / 2, u64::from(n) * C / 2, false, now).map(|_| ()),
            };
            for c in ns.take_freed() {
                prop_assert!(freed.insert(c), "{} freed twice", c);
            }
            let referenced = ns.referenced_chunks();
            prop_assert!(referenced.is_disjoint(&freed), "a freed chunk is still referenced");
            prop_assert_eq!(referenced.len() + freed.len(), allocated.len(), "a chunk leaked");
            if let Err(e) = ns.check_invariants() {
                prop_assert!(false, "step {}: {:?} ({:?}) broke an invariant: {}", step, o, result, e);
            }
            if result.is_err() {
                // Failed operations leave no trace (compare the observable state).
                for i in &inos {
                    prop_assert_eq!(before.getattr(*i), ns.getattr(*i), "failed {:?} changed {}", o, i);
                }
            }
            prop_assert!(ns.getattr(ROOT).is_ok());
        }
    }
}

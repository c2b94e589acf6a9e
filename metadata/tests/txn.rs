//! Cross-shard transactions without faults: what each step does to the shards, the gate that
//! sends a command to the transaction path, locks, encodings (commands, outcomes, snapshots
//! holding transaction state). Faults are the simulator's job (`cfs-sim`, test `shards`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_meta::command::{Command, Op, Outcome};
use cfs_meta::session::Session;
use cfs_meta::shard::{shard_of_id, shard_of_new_dir, ShardSlot};
use cfs_meta::txn::{check_shards, merge_shards, Action, TxId, TxnDriver, TxnReads};
use cfs_meta::{Creds, Errno, InodeId, Namespace, RenameFlags, Timespec};

fn t(ms: u64) -> Timespec {
    Timespec::new(
        1_700_000_000 + (ms / 1000) as i64,
        ((ms % 1000) * 1_000_000) as u32,
    )
}

fn shards(count: u16) -> Vec<Namespace> {
    (0..count)
        .map(|k| Namespace::new_shard(ShardSlot::new(k, count).unwrap(), 0, 0, 0o755, t(0)))
        .collect()
}

fn cmd(op: Op, ms: u64) -> Command {
    Command {
        creds: Creds::root(),
        now: t(ms),
        op,
        session: None,
    }
}

/// Runs `c` to the end with no faults, applying each step on its shard.
fn drive(shards: &mut [Namespace], c: Command, nonce: u64) -> Result<Outcome, Errno> {
    let count = shards.len() as u16;
    let mut d = TxnDriver::new(
        count,
        c,
        Session {
            client: 99,
            seq: nonce,
        },
    );
    let mut a = d.start();
    loop {
        match a {
            Action::Send { shard, cmd } => {
                let r = shards[shard as usize].apply(&cmd);
                shards[shard as usize].check_invariants().unwrap();
                a = d.on_reply(r);
            }
            Action::Finished(r) => return r,
        }
    }
}

fn check(shards: &[Namespace]) {
    let refs: Vec<&Namespace> = shards.iter().collect();
    check_shards(&refs).unwrap();
}

/// A name in `parent` whose new directory lands on `want` (or elsewhere than `want`).
fn name_on(count: u16, parent: InodeId, want: u16, same: bool) -> Vec<u8> {
    (0..1000)
        .map(|i| format!("d{i}").into_bytes())
        .find(|n| (shard_of_new_dir(count, parent, n) == want) == same)
        .unwrap()
}

#[test]
fn a_directory_on_another_shard_is_made_by_a_transaction() {
    let mut s = shards(3);
    let root_shard = shard_of_id(3, InodeId::ROOT.0);
    let far = name_on(3, InodeId::ROOT, root_shard, false);
    // The root's shard cannot do it alone.
    let plain = cmd(
        Op::Mkdir {
            parent: InodeId::ROOT,
            name: far.clone(),
            perm: 0o755,
        },
        1,
    );
    assert_eq!(s[root_shard as usize].apply(&plain), Err(Errno::XDev));
    let a = match drive(&mut s, plain, 1) {
        Ok(Outcome::Attr(a)) => a,
        r => panic!("{r:?}"),
    };
    assert_eq!(
        shard_of_id(3, a.ino.0),
        shard_of_new_dir(3, InodeId::ROOT, &far)
    );
    check(&s);
    // Its children live on its shard; a file in it is one-shard.
    let home = shard_of_id(3, a.ino.0) as usize;
    let f = cmd(
        Op::Mknod {
            parent: a.ino,
            name: b"f".to_vec(),
            kind: cfs_meta::FileType::Regular,
            perm: 0o644,
            rdev: 0,
        },
        2,
    );
    assert!(s[home].apply(&f).is_ok());
    check(&s);
    // The root's link count went up with the entry: rmdir brings it back, across shards.
    assert_eq!(
        s[root_shard as usize].getattr(InodeId::ROOT).unwrap().nlink,
        3
    );
    let rm = cmd(
        Op::Rmdir {
            parent: InodeId::ROOT,
            name: far.clone(),
        },
        3,
    );
    assert_eq!(drive(&mut s, rm.clone(), 2), Err(Errno::NotEmpty));
    let un = cmd(
        Op::Unlink {
            parent: a.ino,
            name: b"f".to_vec(),
        },
        4,
    );
    assert!(s[home].apply(&un).is_ok());
    assert_eq!(drive(&mut s, rm, 3), Ok(Outcome::Unit));
    check(&s);
    assert_eq!(
        s[root_shard as usize].getattr(InodeId::ROOT).unwrap().nlink,
        2
    );
    assert!(
        s[home].getattr(a.ino).is_err(),
        "the directory's inode is gone"
    );
}

#[test]
fn renames_across_shards_match_one_namespace() {
    let mut s = shards(4);
    let mut one = Namespace::new(0, 0, 0o755, t(0));
    let mut n = 0;
    let mut both = |s: &mut Vec<Namespace>, one: &mut Namespace, op_sharded: Op, op_one: Op| {
        n += 1;
        let a = drive(s, cmd(op_sharded, n), n);
        let b = one.apply(&cmd(op_one, n));
        assert_eq!(a.is_ok(), b.is_ok(), "{a:?} vs {b:?}");
        check(s);
        let refs: Vec<&Namespace> = s.iter().collect();
        assert_eq!(merge_shards(&refs).listing(), one.listing());
        a
    };
    let mk = |p: InodeId, name: &[u8]| Op::Mkdir {
        parent: p,
        name: name.to_vec(),
        perm: 0o755,
    };
    // Directories x, y, and x/z; then move z into y, then y under x, then try x under y/.. (a
    // cycle: refused), exchange, and replace an empty directory.
    let lookup =
        |ns: &Namespace, p: InodeId, n: &[u8]| ns.lookup(&Creds::root(), p, n).map(|a| a.ino);
    let whole = |s: &Vec<Namespace>| merge_shards(&s.iter().collect::<Vec<_>>());
    let r = InodeId::ROOT;
    both(&mut s, &mut one, mk(r, b"x"), mk(r, b"x")).unwrap();
    both(&mut s, &mut one, mk(r, b"y"), mk(r, b"y")).unwrap();
    let (sx, ox) = (
        lookup(&whole(&s), r, b"x").unwrap(),
        lookup(&one, r, b"x").unwrap(),
    );
    let (sy, oy) = (
        lookup(&whole(&s), r, b"y").unwrap(),
        lookup(&one, r, b"y").unwrap(),
    );
    both(&mut s, &mut one, mk(sx, b"z"), mk(ox, b"z")).unwrap();
    let ren = |p: InodeId, n: &[u8], q: InodeId, m: &[u8], exchange: bool| Op::Rename {
        parent: p,
        name: n.to_vec(),
        newparent: q,
        newname: m.to_vec(),
        flags: RenameFlags {
            noreplace: false,
            exchange,
        },
    };
    both(
        &mut s,
        &mut one,
        ren(sx, b"z", sy, b"z", false),
        ren(ox, b"z", oy, b"z", false),
    )
    .unwrap();
    both(
        &mut s,
        &mut one,
        ren(r, b"y", sx, b"y", false),
        ren(r, b"y", ox, b"y", false),
    )
    .unwrap();
    // x under x/y: a cycle.
    let e = both(
        &mut s,
        &mut one,
        ren(r, b"x", sy, b"x", false),
        ren(r, b"x", oy, b"x", false),
    );
    assert_eq!(e, Err(Errno::Inval));
    both(&mut s, &mut one, mk(r, b"w"), mk(r, b"w")).unwrap();
    both(
        &mut s,
        &mut one,
        ren(r, b"w", sy, b"z", true),
        ren(r, b"w", oy, b"z", true),
    )
    .unwrap();
    // Replace an empty directory with another one.
    both(
        &mut s,
        &mut one,
        ren(r, b"z", sx, b"y", false),
        ren(r, b"z", ox, b"y", false),
    )
    .unwrap_err();
    both(&mut s, &mut one, mk(r, b"v"), mk(r, b"v")).unwrap();
    both(
        &mut s,
        &mut one,
        ren(r, b"v", r, b"z", false),
        ren(r, b"v", r, b"z", false),
    )
    .unwrap();
}

#[test]
fn a_lock_holds_off_local_commands_and_late_prepares_are_refused() {
    let mut s = shards(2);
    let home = shard_of_id(2, InodeId::ROOT.0) as usize;
    let begin = cmd(
        Op::TxnBegin {
            reads: TxnReads {
                inodes: vec![InodeId::ROOT],
                ..TxnReads::default()
            },
            op_session: None,
        },
        1,
    );
    let id = match s[home].apply(&begin) {
        Ok(Outcome::Txn { id, records }) => {
            assert_eq!(records.inodes.len(), 1);
            id
        }
        r => panic!("{r:?}"),
    };
    assert_eq!(id.home() as usize, home);
    let local = cmd(
        Op::Mknod {
            parent: InodeId::ROOT,
            name: b"f".to_vec(),
            kind: cfs_meta::FileType::Regular,
            perm: 0o644,
            rdev: 0,
        },
        2,
    );
    assert_eq!(s[home].apply(&local), Err(Errno::Again));
    // Snapshots carry the lock.
    let snap = s[home].snapshot();
    let back = Namespace::from_snapshot(&snap).unwrap();
    assert_eq!(back.snapshot(), snap);
    s[home] = back;
    assert_eq!(s[home].apply(&local), Err(Errno::Again));
    // Nothing happened yet: undecided, then overdue for the home shard.
    assert_eq!(
        s[home].txn_status(id, 1 - home as u16),
        cfs_meta::txn::TxnStatus::InProgress
    );
    let chores = s[home].txn_chores(t(10_000), 1000, 5000);
    assert_eq!(chores.abort, vec![id]);
    assert_eq!(
        s[home].apply(&cmd(Op::TxnAbort { id }, 3)),
        Ok(Outcome::Committed(false))
    );
    assert!(s[home].apply(&local).is_ok());
    // A late duplicate prepare of the ended transaction locks nothing.
    let late = cmd(
        Op::TxnPrepare {
            id,
            reads: TxnReads {
                inodes: vec![InodeId::ROOT],
                ..TxnReads::default()
            },
        },
        4,
    );
    assert_eq!(s[home].apply(&late), Err(Errno::Stale));
    assert!(s[home].txn_idle());
    // The decide of an aborted transaction reports it aborted.
    assert_eq!(
        s[home].apply(&cmd(
            Op::TxnDecide {
                id,
                writes: Vec::new(),
                result: None
            },
            5
        )),
        Ok(Outcome::Committed(false))
    );
    check(&s);
}

#[test]
fn transaction_commands_and_outcomes_round_trip() {
    let mut s = shards(2);
    let root_shard = shard_of_id(2, InodeId::ROOT.0);
    let far = name_on(2, InodeId::ROOT, root_shard, false);
    // Record every step of a real transaction and check each encodes and decodes to itself.
    let c = cmd(
        Op::Mkdir {
            parent: InodeId::ROOT,
            name: far,
            perm: 0o700,
        },
        1,
    );
    let mut d = TxnDriver::new(2, c, Session { client: 5, seq: 1 });
    let mut a = d.start();
    let mut seen = 0;
    while let Action::Send { shard, cmd } = a {
        assert_eq!(Command::decode(&cmd.encode()), Some(cmd.clone()), "{cmd:?}");
        let r = s[shard as usize].apply(&cmd);
        if let Ok(o) = &r {
            assert_eq!(Outcome::decode(&o.encode()).as_ref(), Some(o));
        }
        seen += 1;
        a = d.on_reply(r);
    }
    assert!(matches!(a, Action::Finished(Ok(Outcome::Attr(_)))));
    // try, begin, prepare (reserve), decide, commit, acked
    assert_eq!(seen, 6);
    assert!(TxId::new(3, 7).home() == 3);
    check(&s);
}

//! Byte layouts of persisted namespace records (little-endian, sized integers). Decoders check
//! every length and return `None` on anything malformed.
//!
//! ```text
//! inode record:
//!   u8 version (1) | u64 ino | u64 generation | u8 kind | u32 perm | u32 uid | u32 gid
//!   | u32 nlink | u64 size | u64 rdev | 4 x (i64 sec | u32 nsec)  atime mtime ctime btime
//!   | u64 parent | u64 next_cookie | u32 target_len | target
//!   | u32 xattr_count | xattr_count x (u16 name_len | name | u32 value_len | value)
//! directory entry (key = u64 parent | name):
//!   u8 version (1) | u64 ino | u8 kind | u64 cookie
//! extent (key = (u64 ino, u64 chunk index), a redb tuple key):
//!   u64 chunk id
//! ```
//! Extents live in their own table, not in the inode record, so growing a large file rewrites
//! one small record per new 64 MiB chunk rather than the whole map.
//! Open-handle counts are not persisted: handles do not survive a server restart.

use crate::namespace::{Dentry, Inode, RenameFlags, SetAttr, TimeSet, XattrMode};
use crate::types::{Attr, Creds, FileType, InodeId, Timespec};
use std::collections::BTreeMap;

const VERSION: u8 = 1;

/// A bounds-checked little-endian reader: every getter returns `None` instead of reading past
/// the end. Shared by the record codec here and the RPC codec in `cfs-proto`.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Reads from `b`.
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader(b)
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    /// A little-endian u64.
    pub fn u128(&mut self) -> Option<u128> {
        let lo = self.u64()?;
        let hi = self.u64()?;
        Some(u128::from(lo) | (u128::from(hi) << 64))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    /// A timestamp: i64 seconds, u32 nanoseconds (below one second).
    pub fn time(&mut self) -> Option<Timespec> {
        let sec = self.u64()? as i64;
        let nsec = self.u32()?;
        (nsec < 1_000_000_000).then_some(Timespec { sec, nsec })
    }
    /// `Some(())` if every byte was consumed.
    pub fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

impl Reader<'_> {
    /// A boolean byte (0 or 1; anything else is malformed).
    pub fn bool(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }
    /// A byte string: u32 length + bytes.
    pub fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        Some(self.take(n)?.to_vec())
    }
    /// An inode number.
    pub fn ino(&mut self) -> Option<InodeId> {
        Some(InodeId(self.u64()?))
    }
    /// An optional u32: u8 present | u32.
    pub fn opt_u32(&mut self) -> Option<Option<u32>> {
        Some(if self.bool()? {
            Some(self.u32()?)
        } else {
            None
        })
    }
    /// An optional timestamp setting: u8 0 none, 1 now, 2 explicit time.
    pub fn timeset(&mut self) -> Option<Option<TimeSet>> {
        Some(match self.u8()? {
            0 => None,
            1 => Some(TimeSet::Now),
            2 => Some(TimeSet::At(self.time()?)),
            _ => return None,
        })
    }
    /// Attributes (the layout of [`Writer::attr`]).
    pub fn attr(&mut self) -> Option<Attr> {
        Some(Attr {
            ino: self.ino()?,
            generation: self.u64()?,
            kind: FileType::from_byte(self.u8()?)?,
            perm: self.u32()?,
            uid: self.u32()?,
            gid: self.u32()?,
            nlink: self.u32()?,
            size: self.u64()?,
            rdev: self.u64()?,
            atime: self.time()?,
            mtime: self.time()?,
            ctime: self.time()?,
            btime: self.time()?,
        })
    }
    /// Attribute changes (the layout of [`Writer::setattr`]).
    pub fn setattr(&mut self) -> Option<SetAttr> {
        let perm = self.opt_u32()?;
        let uid = self.opt_u32()?;
        let gid = self.opt_u32()?;
        let size = if self.bool()? {
            Some(self.u64()?)
        } else {
            None
        };
        Some(SetAttr {
            perm,
            uid,
            gid,
            size,
            atime: self.timeset()?,
            mtime: self.timeset()?,
            via_write_handle: self.bool()?,
        })
    }
    /// Rename flags: bit 0 noreplace, bit 1 exchange.
    pub fn rename_flags(&mut self) -> Option<RenameFlags> {
        let f = self.u8()?;
        (f <= 3).then_some(RenameFlags {
            noreplace: f & 1 != 0,
            exchange: f & 2 != 0,
        })
    }
    /// setxattr mode: 0 any, 1 create, 2 replace.
    pub fn xattr_mode(&mut self) -> Option<XattrMode> {
        Some(match self.u8()? {
            0 => XattrMode::Any,
            1 => XattrMode::Create,
            2 => XattrMode::Replace,
            _ => return None,
        })
    }
    /// Credentials: u32 uid | u32 gid | u16 ngroups | ngroups x u32.
    pub fn creds(&mut self) -> Option<Creds> {
        let uid = self.u32()?;
        let gid = self.u32()?;
        let n = self.u16()? as usize;
        let mut groups = Vec::with_capacity(n.min(self.0.len() / 4));
        for _ in 0..n {
            groups.push(self.u32()?);
        }
        Some(Creds { uid, gid, groups })
    }
}

/// The little-endian writer matching [`Reader`], shared by the record, RPC and Raft command
/// codecs.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A little-endian u64.
    pub fn u128(&mut self, v: u128) {
        self.u64(v as u64);
        self.u64((v >> 64) as u64);
    }

    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A byte string: u32 length + bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    /// An inode number.
    pub fn ino(&mut self, i: InodeId) {
        self.u64(i.0);
    }
    /// A timestamp: i64 seconds | u32 nanoseconds.
    pub fn time(&mut self, t: Timespec) {
        put_time(&mut self.0, t);
    }
    /// An optional u32.
    pub fn opt_u32(&mut self, v: Option<u32>) {
        match v {
            Some(x) => {
                self.u8(1);
                self.u32(x);
            }
            None => self.u8(0),
        }
    }
    /// An optional timestamp setting.
    pub fn timeset(&mut self, t: Option<TimeSet>) {
        match t {
            None => self.u8(0),
            Some(TimeSet::Now) => self.u8(1),
            Some(TimeSet::At(ts)) => {
                self.u8(2);
                self.time(ts);
            }
        }
    }
    /// Attributes: u64 ino | u64 generation | u8 kind | u32 perm uid gid nlink | u64 size rdev
    /// | 4 x time.
    pub fn attr(&mut self, a: &Attr) {
        self.ino(a.ino);
        self.u64(a.generation);
        self.u8(a.kind.to_byte());
        for v in [a.perm, a.uid, a.gid, a.nlink] {
            self.u32(v);
        }
        self.u64(a.size);
        self.u64(a.rdev);
        for t in [a.atime, a.mtime, a.ctime, a.btime] {
            self.time(t);
        }
    }
    /// Attribute changes: opt perm, uid, gid | u8 has_size [u64 size] | atime, mtime settings
    /// | u8 via_write_handle.
    pub fn setattr(&mut self, set: &SetAttr) {
        self.opt_u32(set.perm);
        self.opt_u32(set.uid);
        self.opt_u32(set.gid);
        match set.size {
            Some(s) => {
                self.u8(1);
                self.u64(s);
            }
            None => self.u8(0),
        }
        self.timeset(set.atime);
        self.timeset(set.mtime);
        self.u8(u8::from(set.via_write_handle));
    }
    /// Rename flags.
    pub fn rename_flags(&mut self, f: RenameFlags) {
        self.u8(u8::from(f.noreplace) | u8::from(f.exchange) << 1);
    }
    /// setxattr mode.
    pub fn xattr_mode(&mut self, m: XattrMode) {
        self.u8(match m {
            XattrMode::Any => 0,
            XattrMode::Create => 1,
            XattrMode::Replace => 2,
        });
    }
    /// Credentials (groups beyond 65 535 are dropped).
    pub fn creds(&mut self, c: &Creds) {
        self.u32(c.uid);
        self.u32(c.gid);
        self.u16(c.groups.len().min(u16::MAX as usize) as u16);
        for g in c.groups.iter().take(u16::MAX as usize) {
            self.u32(*g);
        }
    }
}

fn put_time(out: &mut Vec<u8>, t: Timespec) {
    out.extend_from_slice(&t.sec.to_le_bytes());
    out.extend_from_slice(&t.nsec.to_le_bytes());
}

/// Encodes an inode record.
pub fn encode_inode(i: &Inode) -> Vec<u8> {
    let a = &i.attr;
    let mut out = Vec::with_capacity(128 + i.target.len());
    out.push(VERSION);
    out.extend_from_slice(&a.ino.0.to_le_bytes());
    out.extend_from_slice(&a.generation.to_le_bytes());
    out.push(a.kind.to_byte());
    for v in [a.perm, a.uid, a.gid, a.nlink] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&a.size.to_le_bytes());
    out.extend_from_slice(&a.rdev.to_le_bytes());
    for t in [a.atime, a.mtime, a.ctime, a.btime] {
        put_time(&mut out, t);
    }
    out.extend_from_slice(&i.parent.0.to_le_bytes());
    out.extend_from_slice(&i.next_cookie.to_le_bytes());
    out.extend_from_slice(&(i.target.len() as u32).to_le_bytes());
    out.extend_from_slice(&i.target);
    out.extend_from_slice(&(i.xattrs.len() as u32).to_le_bytes());
    for (k, v) in &i.xattrs {
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Decodes an inode record (open count 0).
pub fn decode_inode(b: &[u8]) -> Option<Inode> {
    let mut r = Reader::new(b);
    if r.u8()? != VERSION {
        return None;
    }
    let ino = InodeId(r.u64()?);
    let generation = r.u64()?;
    let kind = FileType::from_byte(r.u8()?)?;
    let (perm, uid, gid, nlink) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
    let (size, rdev) = (r.u64()?, r.u64()?);
    let (atime, mtime, ctime, btime) = (r.time()?, r.time()?, r.time()?, r.time()?);
    let parent = InodeId(r.u64()?);
    let next_cookie = r.u64()?;
    let tlen = r.u32()? as usize;
    let target = r.take(tlen)?.to_vec();
    let n = r.u32()?;
    let mut xattrs = BTreeMap::new();
    for _ in 0..n {
        let kl = r.u16()? as usize;
        let k = r.take(kl)?.to_vec();
        let vl = r.u32()? as usize;
        let v = r.take(vl)?.to_vec();
        xattrs.insert(k, v);
    }
    if r.end().is_none() || perm > 0o7777 {
        return None;
    }
    Some(Inode {
        attr: Attr {
            ino,
            generation,
            kind,
            perm,
            uid,
            gid,
            nlink,
            size,
            rdev,
            atime,
            mtime,
            ctime,
            btime,
        },
        target,
        xattrs,
        open: 0,
        parent,
        next_cookie,
        extents: BTreeMap::new(),
    })
}

/// Encodes a directory entry's key.
pub fn encode_dentry_key(parent: InodeId, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + name.len());
    // Big-endian parent so entries of one directory sort together in the store.
    k.extend_from_slice(&parent.0.to_be_bytes());
    k.extend_from_slice(name);
    k
}

/// Decodes a directory entry's key.
pub fn decode_dentry_key(k: &[u8]) -> Option<(InodeId, Vec<u8>)> {
    if k.len() < 9 {
        return None;
    }
    Some((
        InodeId(u64::from_be_bytes(k[..8].try_into().ok()?)),
        k[8..].to_vec(),
    ))
}

/// Encodes a directory entry's value.
pub fn encode_dentry(d: &Dentry) -> Vec<u8> {
    let mut out = Vec::with_capacity(18);
    out.push(VERSION);
    out.extend_from_slice(&d.ino.0.to_le_bytes());
    out.push(d.kind.to_byte());
    out.extend_from_slice(&d.cookie.to_le_bytes());
    out
}

/// Decodes a directory entry's value.
pub fn decode_dentry(b: &[u8]) -> Option<Dentry> {
    let mut r = Reader::new(b);
    if r.u8()? != VERSION {
        return None;
    }
    let d = Dentry {
        ino: InodeId(r.u64()?),
        kind: FileType::from_byte(r.u8()?)?,
        cookie: r.u64()?,
    };
    r.end().map(|()| d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn inode() -> impl Strategy<Value = Inode> {
        (
            any::<u64>(),
            any::<u64>(),
            1u8..=7,
            0u32..=0o7777,
            any::<(u32, u32, u32, u64, u64)>(),
            any::<(i64, i64)>(),
            proptest::collection::vec(any::<u8>(), 0..100),
            proptest::collection::btree_map(
                proptest::collection::vec(any::<u8>(), 1..20),
                proptest::collection::vec(any::<u8>(), 0..50),
                0..5,
            ),
        )
            .prop_map(
                |(
                    ino,
                    generation,
                    k,
                    perm,
                    (uid, gid, nlink, size, rdev),
                    (s1, s2),
                    target,
                    xattrs,
                )| Inode {
                    attr: Attr {
                        ino: InodeId(ino),
                        generation,
                        kind: FileType::from_byte(k).unwrap(),
                        perm,
                        uid,
                        gid,
                        nlink,
                        size,
                        rdev,
                        atime: Timespec::new(s1, 5),
                        mtime: Timespec::new(s2, 999_999_999),
                        ctime: Timespec::new(s1 ^ s2, 0),
                        btime: Timespec::new(0, 1),
                    },
                    target,
                    xattrs,
                    open: 0,
                    parent: InodeId(ino / 2),
                    next_cookie: generation / 3,
                    extents: BTreeMap::new(),
                },
            )
    }

    proptest! {
        #[test]
        fn inode_round_trip(i in inode()) {
            prop_assert_eq!(decode_inode(&encode_inode(&i)), Some(i));
        }

        #[test]
        fn truncated_or_extended_records_are_rejected(i in inode(), cut in any::<usize>()) {
            let b = encode_inode(&i);
            let cut = cut % b.len();
            prop_assert_eq!(decode_inode(&b[..cut]), None);
            let mut longer = b.clone();
            longer.push(0);
            prop_assert_eq!(decode_inode(&longer), None);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_inode(&b);
            let _ = decode_dentry(&b);
            let _ = decode_dentry_key(&b);
        }

        #[test]
        fn dentry_round_trip(ino in any::<u64>(), k in 1u8..=7, cookie in any::<u64>(), parent in any::<u64>(), name in proptest::collection::vec(any::<u8>(), 1..255)) {
            let d = Dentry { ino: InodeId(ino), kind: FileType::from_byte(k).unwrap(), cookie };
            prop_assert_eq!(decode_dentry(&encode_dentry(&d)), Some(d));
            prop_assert_eq!(decode_dentry_key(&encode_dentry_key(InodeId(parent), &name)), Some((InodeId(parent), name)));
        }
    }
}

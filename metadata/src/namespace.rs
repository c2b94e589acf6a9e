//! The namespace state machine: inodes, directory entries, attributes, xattrs and POSIX
//! permission rules. Deterministic: time and credentials come in with each call; nothing here
//! reads a clock or does I/O, so the same calls in the same order give the same state on every
//! replica (this is what Raft will replicate) and in the simulator.
//!
//! Every change also marks what it touched (`take_dirty`), so a persistence layer can write
//! exactly those keys durably before the reply goes out.

use crate::placement::{Member, Placement};
use crate::session::{Session, Sessions};
use crate::shard::{shard_of_id, ShardSlot};
use crate::txn::TxnState;
use crate::types::{mode, Attr, ChunkId, Creds, Errno, FileType, InodeId, Timespec};
use std::collections::{BTreeMap, BTreeSet};

/// Longest name of a directory entry in bytes.
pub const NAME_MAX: usize = 255;
/// Longest symlink target in bytes.
pub const SYMLINK_MAX: usize = 4095;
/// Most hard links to one inode.
pub const LINK_MAX: u32 = 65000;
/// Longest extended-attribute name.
pub const XATTR_NAME_MAX: usize = 255;
/// Largest extended-attribute value.
pub const XATTR_SIZE_MAX: usize = 65536;
/// Largest file size.
pub const MAX_FILE_SIZE: u64 = 1 << 50;

/// Access bits for permission checks.
pub mod access {
    /// Read.
    pub const R: u32 = 4;
    /// Write.
    pub const W: u32 = 2;
    /// Execute / search.
    pub const X: u32 = 1;
}

/// One inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Attributes.
    pub attr: Attr,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Open handles (an unlinked inode lives on while this is non-zero).
    pub open: u32,
    /// Directories: the parent (for "..").
    pub parent: InodeId,
    /// Directories: next readdir cookie to hand out.
    pub next_cookie: u64,
    /// Regular files: the extent map, chunk index (byte offset / [`CHUNK_BYTES`]) -> chunk.
    /// An index without an entry is a hole.
    pub extents: BTreeMap<u64, ChunkId>,
}

/// Bytes of file data per chunk: the extent map's granularity.
pub const CHUNK_BYTES: u64 = 64 << 20;

/// One directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dentry {
    /// Inode it names.
    pub ino: InodeId,
    /// Its type (for readdir without an inode lookup).
    pub kind: FileType,
    /// Stable readdir position within the directory.
    pub cookie: u64,
}

/// A readdir entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Name.
    pub name: Vec<u8>,
    /// Inode.
    pub ino: InodeId,
    /// Type.
    pub kind: FileType,
    /// Pass this back to continue after this entry.
    pub cookie: u64,
}

/// How to set a timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    /// The call's time.
    Now,
    /// An explicit time.
    At(Timespec),
}

/// Attribute changes for `setattr` (None = leave as is).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits.
    pub perm: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate/extend).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeSet>,
    /// New modification time.
    pub mtime: Option<TimeSet>,
    /// The caller holds the file open for writing (ftruncate): no write-permission check.
    pub via_write_handle: bool,
}

/// Rename flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    /// Fail with EEXIST if the target exists.
    pub noreplace: bool,
    /// Atomically swap source and target (both must exist).
    pub exchange: bool,
}

/// `setxattr` mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    #[default]
    Any,
    /// Fail if it exists.
    Create,
    /// Fail if it does not exist.
    Replace,
}

/// File-system totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsStats {
    /// Inodes in use.
    pub inodes: u64,
    /// Bytes of regular files (logical sizes).
    pub bytes: u64,
}

/// Keys changed since the last [`Namespace::take_dirty`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Inode records.
    pub inodes: Vec<InodeId>,
    /// Directory entries (parent, name).
    pub dentries: Vec<(InodeId, Vec<u8>)>,
    /// Extents (inode, chunk index).
    pub extents: Vec<(InodeId, u64)>,
    /// The tier index (persisted whole: [`Namespace::tier_record`]).
    pub tier: bool,
}

/// The namespace.
#[derive(Clone, Debug)]
pub struct Namespace {
    pub(crate) inodes: BTreeMap<InodeId, Inode>,
    pub(crate) dentries: BTreeMap<(InodeId, Vec<u8>), Dentry>,
    pub(crate) by_cookie: BTreeMap<(InodeId, u64), Vec<u8>>,
    /// Next inode number to hand out (owned by this shard: steps by the shard count).
    pub(crate) next_ino: u64,
    pub(crate) next_generation: u64,
    pub(crate) dirty_inodes: BTreeSet<InodeId>,
    pub(crate) dirty_dentries: BTreeSet<(InodeId, Vec<u8>)>,
    pub(crate) dirty_extents: BTreeSet<(InodeId, u64)>,
    /// Next chunk id to hand out (owned by this shard, like inode numbers).
    pub(crate) next_chunk: u64,
    /// Replicated clusters: members, and which nodes hold (current or stale) copies of each
    /// chunk. Empty on a single node.
    pub(crate) placement: Placement,
    /// Chunks no extent points at any more (truncated, punched, or of a freed inode): their
    /// data is to be deleted once the change is durable.
    pub(crate) freed: Vec<ChunkId>,
    /// Copies dropped from a node by a placement move (chunk, node): that node deletes them.
    dropped: Vec<(ChunkId, u64)>,
    /// Recent results per client, so a resent command is not applied twice.
    sessions: Sessions,
    /// Which shard of the namespace this is ([`ShardSlot::SINGLE`]: all of it).
    pub(crate) slot: ShardSlot,
    /// Cross-shard transactions: locks, prepared and coordinated ones ([`crate::txn`]).
    pub(crate) txn: TxnState,
    /// The object tier's index: which chunks' bytes are in which blob ([`crate::tier`]).
    pub(crate) tier: crate::tier::TierIndex,
    /// The tier index changed in a way a local database must persist.
    pub(crate) dirty_tier: bool,
}

fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.is_empty() {
        return Err(Errno::NoEnt);
    }
    if name.len() > NAME_MAX {
        return Err(Errno::NameTooLong);
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::Inval);
    }
    Ok(())
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// Whether `creds` may access an inode with `mask` (POSIX owner/group/other; root may read and
/// write anything and execute anything with an execute bit, or any directory).
pub fn permitted(creds: &Creds, attr: &Attr, mask: u32) -> bool {
    if creds.uid == 0 {
        if mask & access::X == 0 {
            return true;
        }
        return attr.kind == FileType::Directory || attr.perm & 0o111 != 0;
    }
    let bits = if creds.uid == attr.uid {
        (attr.perm >> 6) & 7
    } else if creds.in_group(attr.gid) {
        (attr.perm >> 3) & 7
    } else {
        attr.perm & 7
    };
    bits & mask == mask
}

impl Namespace {
    /// No inodes at all (not even a root): the starting point of `new` and `from_records`.
    fn empty() -> Namespace {
        Namespace {
            inodes: BTreeMap::new(),
            dentries: BTreeMap::new(),
            by_cookie: BTreeMap::new(),
            next_ino: InodeId::ROOT.0 + 1,
            next_generation: 1,
            dirty_inodes: BTreeSet::new(),
            dirty_dentries: BTreeSet::new(),
            dirty_extents: BTreeSet::new(),
            next_chunk: 1,
            placement: Placement::default(),
            freed: Vec::new(),
            dropped: Vec::new(),
            sessions: Sessions::default(),
            slot: ShardSlot::SINGLE,
            txn: TxnState::default(),
            tier: crate::tier::TierIndex::default(),
            dirty_tier: false,
        }
    }

    /// Shard `slot` of a new namespace: the root directory if the slot owns it, else nothing.
    pub fn new_shard(
        slot: ShardSlot,
        root_uid: u32,
        root_gid: u32,
        root_perm: u32,
        now: Timespec,
    ) -> Namespace {
        let mut ns = if slot.owns(InodeId::ROOT) {
            Namespace::new(root_uid, root_gid, root_perm, now)
        } else {
            Namespace::empty()
        };
        ns.slot = slot;
        ns.align_counters();
        ns
    }

    /// Which shard this is.
    pub fn slot(&self) -> ShardSlot {
        self.slot
    }

    /// Moves the id counters to ids this shard owns.
    fn align_counters(&mut self) {
        self.next_ino = self.slot.align(self.next_ino);
        self.next_chunk = self.slot.align(self.next_chunk);
    }

    /// Hands out an inode number and generation.
    pub(crate) fn alloc_ino(&mut self) -> (InodeId, u64) {
        let ino = InodeId(self.next_ino);
        assert!(
            self.slot.owns(ino),
            "inode counter not aligned to the shard"
        );
        self.next_ino += u64::from(self.slot.count);
        let generation = self.next_generation;
        self.next_generation += 1;
        (ino, generation)
    }

    /// A namespace holding only the root directory.
    pub fn new(root_uid: u32, root_gid: u32, root_perm: u32, now: Timespec) -> Namespace {
        let mut ns = Namespace::empty();
        let attr = Attr {
            ino: InodeId::ROOT,
            generation: 0,
            kind: FileType::Directory,
            perm: root_perm & mode::PERM_MASK,
            uid: root_uid,
            gid: root_gid,
            nlink: 2,
            size: 0,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
        };
        ns.inodes.insert(
            InodeId::ROOT,
            Inode {
                attr,
                target: Vec::new(),
                xattrs: BTreeMap::new(),
                open: 0,
                parent: InodeId::ROOT,
                next_cookie: 3,
                extents: BTreeMap::new(),
            },
        );
        ns.dirty_inodes.insert(InodeId::ROOT);
        ns
    }

    /// Rebuilds a namespace from persisted records. Handles do not survive a restart, so
    /// inodes kept only because they were open are freed (reported by `take_freed`). Returns an
    /// error naming the first inconsistency.
    pub fn from_records(
        inodes: impl IntoIterator<Item = Inode>,
        dentries: impl IntoIterator<Item = (InodeId, Vec<u8>, Dentry)>,
    ) -> Result<Namespace, String> {
        Namespace::rebuild(inodes, dentries, false, ShardSlot::SINGLE)
    }

    /// Encodes the whole namespace, open-handle counts included (under Raft, opens and
    /// releases are replicated commands, so handles are part of the state):
    /// `u8 version (8) | u64 next_ino | u64 next_generation | u64 next_chunk | u32 n_inodes |
    /// n x (u32 len | inode record | u32 open | u32 n_extents | n x (u64 index | u64 chunk)) |
    /// u32 n_entries | n x (bytes key | bytes entry) | placement | sessions | u16 shard |
    /// u16 shards | transactions | tier index` (bytes: a u32
    /// length, then the bytes; placement as in [`Placement::encode`], sessions as in
    /// [`Sessions::encode`], transactions as in [`TxnState::encode`], the tier index as in
    /// [`crate::tier::TierIndex::encode`]; version 7 no pending uploads in it, version 6 no tier index, version 5 no shard
    /// or transactions (one shard), version 4 no chunk generations in the placement, version 3
    /// no sessions either, version 2 only the placement's stale
    /// list, version 1 neither).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut w = crate::codec::Writer::default();
        w.u8(8);
        w.u64(self.next_ino);
        w.u64(self.next_generation);
        w.u64(self.next_chunk);
        w.u32(self.inodes.len() as u32);
        for i in self.inodes.values() {
            w.bytes(&crate::codec::encode_inode(i));
            w.u32(i.open);
            w.u32(i.extents.len() as u32);
            for (idx, c) in &i.extents {
                w.u64(*idx);
                w.u64(c.0);
            }
        }
        w.u32(self.dentries.len() as u32);
        for ((parent, name), d) in &self.dentries {
            w.bytes(&crate::codec::encode_dentry_key(*parent, name));
            w.bytes(&crate::codec::encode_dentry(d));
        }
        self.placement.encode(&mut w);
        self.sessions.encode(&mut w);
        w.u16(self.slot.index);
        w.u16(self.slot.count);
        self.txn.encode(&mut w);
        self.tier.encode(&mut w);
        w.0
    }

    /// The object tier's index.
    pub fn tier(&self) -> &crate::tier::TierIndex {
        &self.tier
    }

    /// The tier index as one record, for a local database ([`crate::tier::TierIndex::encode`]).
    pub fn tier_record(&self) -> Vec<u8> {
        let mut w = crate::codec::Writer::default();
        self.tier.encode(&mut w);
        w.0
    }

    /// Loads the tier index from a local database's record.
    pub fn load_tier_record(&mut self, b: &[u8]) -> Result<(), String> {
        let mut r = crate::codec::Reader::new(b);
        let t =
            crate::tier::TierIndex::decode(&mut r, true).ok_or("malformed tier index record")?;
        r.end()
            .ok_or("trailing bytes after the tier index record")?;
        t.check()?;
        self.tier = t;
        Ok(())
    }

    /// The data of `chunks` is changing (a write, a truncate, a punch): their copies on the
    /// object store are dead from now on. EIO if one is evicted: the data plane brings an
    /// evicted chunk back to flash before changing it, so this is a race lost, and nothing
    /// changes.
    pub(crate) fn tier_changed(
        &mut self,
        chunks: impl IntoIterator<Item = ChunkId> + Clone,
    ) -> Result<(), Errno> {
        if chunks
            .clone()
            .into_iter()
            .any(|c| self.tier.extent(c).is_some_and(|e| e.evicted))
        {
            return Err(Errno::Io);
        }
        for c in chunks {
            // Only an extent dropped matters to a restart: versions only order flushes in
            // flight, which do not survive one.
            self.dirty_tier |= self.tier.extent(c).is_some();
            self.tier
                .changed(c)
                .expect("no chunk is evicted: checked above");
        }
        Ok(())
    }

    /// A chunk no extent points at any more: its data goes after the commit.
    pub(crate) fn free_chunk(&mut self, c: ChunkId) {
        self.placement.forget(c);
        self.freed.push(c);
        self.dirty_tier |= self.tier.extent(c).is_some();
        self.tier.freed(c);
    }

    /// Rebuilds a namespace from [`Namespace::snapshot`]; `Err` names what is malformed or
    /// inconsistent.
    pub fn from_snapshot(b: &[u8]) -> Result<Namespace, String> {
        let bad = || "malformed namespace snapshot".to_string();
        let mut r = crate::codec::Reader::new(b);
        let version = r.u8().ok_or_else(bad)?;
        if !(1..=8).contains(&version) {
            return Err("unknown namespace snapshot version".into());
        }
        let (next_ino, next_gen, next_chunk) = (
            r.u64().ok_or_else(bad)?,
            r.u64().ok_or_else(bad)?,
            r.u64().ok_or_else(bad)?,
        );
        let n = r.u32().ok_or_else(bad)? as usize;
        let mut inodes = Vec::with_capacity(n.min(b.len() / 64));
        for _ in 0..n {
            let rec = r.bytes().ok_or_else(bad)?;
            let mut i = crate::codec::decode_inode(&rec).ok_or_else(bad)?;
            i.open = r.u32().ok_or_else(bad)?;
            let ne = r.u32().ok_or_else(bad)? as usize;
            for _ in 0..ne {
                let idx = r.u64().ok_or_else(bad)?;
                i.extents.insert(idx, ChunkId(r.u64().ok_or_else(bad)?));
            }
            inodes.push(i);
        }
        let n = r.u32().ok_or_else(bad)? as usize;
        let mut dentries = Vec::with_capacity(n.min(b.len() / 16));
        for _ in 0..n {
            let k = r.bytes().ok_or_else(bad)?;
            let v = r.bytes().ok_or_else(bad)?;
            let (parent, name) = crate::codec::decode_dentry_key(&k).ok_or_else(bad)?;
            dentries.push((
                parent,
                name,
                crate::codec::decode_dentry(&v).ok_or_else(bad)?,
            ));
        }
        let placement = match version {
            5..=8 => Placement::decode(&mut r).ok_or_else(bad)?,
            3 | 4 => Placement::decode_versioned(&mut r, false).ok_or_else(bad)?,
            2 => {
                let mut p = Placement::default();
                p.set_stale(Placement::decode_stale(&mut r).ok_or_else(bad)?);
                p
            }
            _ => Placement::default(),
        };
        let sessions = if version >= 4 {
            Sessions::decode(&mut r).ok_or_else(bad)?
        } else {
            Sessions::default()
        };
        let (slot, txn) = if version >= 6 {
            let (index, count) = (r.u16().ok_or_else(bad)?, r.u16().ok_or_else(bad)?);
            let slot = ShardSlot::new(index, count).ok_or("bad shard in namespace snapshot")?;
            (slot, TxnState::decode(&mut r).ok_or_else(bad)?)
        } else {
            (ShardSlot::SINGLE, TxnState::default())
        };
        let tier = if version >= 7 {
            crate::tier::TierIndex::decode(&mut r, version >= 8)
                .ok_or("malformed tier index in namespace snapshot")?
        } else {
            crate::tier::TierIndex::default()
        };
        r.end().ok_or_else(bad)?;
        let mut ns = Namespace::rebuild(inodes, dentries, true, slot)?;
        ns.placement = placement;
        ns.sessions = sessions;
        ns.txn = txn;
        ns.tier = tier;
        ns.check_invariants()?;
        ns.restore_counters(next_ino, next_gen, next_chunk);
        // A restored snapshot is a starting point, not a change to persist.
        ns.take_dirty();
        Ok(ns)
    }

    fn rebuild(
        inodes: impl IntoIterator<Item = Inode>,
        dentries: impl IntoIterator<Item = (InodeId, Vec<u8>, Dentry)>,
        keep_handles: bool,
        slot: ShardSlot,
    ) -> Result<Namespace, String> {
        let mut ns = Namespace::empty();
        ns.slot = slot;
        for mut i in inodes {
            if !keep_handles {
                i.open = 0;
            }
            ns.next_ino = ns.next_ino.max(i.attr.ino.0 + 1);
            ns.next_generation = ns.next_generation.max(i.attr.generation + 1);
            if let Some(c) = i.extents.values().max() {
                ns.next_chunk = ns.next_chunk.max(c.0 + 1);
            }
            ns.inodes.insert(i.attr.ino, i);
        }
        for (parent, name, d) in dentries {
            if ns
                .by_cookie
                .insert((parent, d.cookie), name.clone())
                .is_some()
            {
                return Err(format!(
                    "two entries of directory {parent} share cookie {}",
                    d.cookie
                ));
            }
            ns.dentries.insert((parent, name), d);
        }
        if slot.owns(InodeId::ROOT) && !ns.inodes.contains_key(&InodeId::ROOT) {
            return Err("no root directory".into());
        }
        let orphans: Vec<InodeId> = ns
            .inodes
            .iter()
            .filter(|(_, i)| i.attr.nlink == 0)
            .map(|(k, _)| *k)
            .collect();
        for ino in orphans {
            ns.maybe_free(ino);
        }
        ns.align_counters();
        if !keep_handles {
            // (A snapshot is checked whole by `from_snapshot`, once everything is in.)
            ns.check_invariants()?;
        }
        Ok(ns)
    }

    /// Counters that must survive restarts even when the inodes that used them are gone:
    /// (next inode number, next generation, next chunk id). Persist them with the dirty records.
    pub fn counters(&self) -> (u64, u64, u64) {
        (self.next_ino, self.next_generation, self.next_chunk)
    }

    /// Restores the counters (after `from_records`), never moving them backwards.
    pub fn restore_counters(&mut self, next_ino: u64, next_generation: u64, next_chunk: u64) {
        self.next_ino = self.next_ino.max(next_ino);
        self.next_generation = self.next_generation.max(next_generation);
        self.next_chunk = self.next_chunk.max(next_chunk);
        self.align_counters();
    }

    fn inode(&self, ino: InodeId) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(Errno::NoEnt)
    }

    fn inode_mut(&mut self, ino: InodeId) -> Result<&mut Inode, Errno> {
        self.dirty_inodes.insert(ino);
        self.inodes.get_mut(&ino).ok_or(Errno::NoEnt)
    }

    fn dir(&self, ino: InodeId) -> Result<&Inode, Errno> {
        let i = self.inode(ino)?;
        if i.attr.kind != FileType::Directory {
            return Err(Errno::NotDir);
        }
        Ok(i)
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: InodeId) -> Result<Attr, Errno> {
        Ok(self.inode(ino)?.attr.clone())
    }

    /// Attributes, checking the handle's generation (NFS file handles).
    pub fn getattr_gen(&self, ino: InodeId, generation: u64) -> Result<Attr, Errno> {
        let a = self.getattr(ino).map_err(|_| Errno::Stale)?;
        if a.generation != generation {
            return Err(Errno::Stale);
        }
        Ok(a)
    }

    /// Looks up `name` in directory `parent`.
    pub fn lookup(&self, creds: &Creds, parent: InodeId, name: &[u8]) -> Result<Attr, Errno> {
        let p = self.dir(parent)?;
        if !permitted(creds, &p.attr, access::X) {
            return Err(Errno::Access);
        }
        if name == b"." {
            return Ok(p.attr.clone());
        }
        if name == b".." {
            return self.getattr(p.parent);
        }
        check_name(name)?;
        let d = self
            .dentries
            .get(&(parent, name.to_vec()))
            .ok_or(Errno::NoEnt)?;
        self.getattr(d.ino)
    }

    /// [`Namespace::lookup`] on a shard: the inode the entry names, with its attributes when
    /// it lives on this shard (`None`: ask the inode's shard).
    pub fn lookup_entry(
        &self,
        creds: &Creds,
        parent: InodeId,
        name: &[u8],
    ) -> Result<(InodeId, Option<Attr>), Errno> {
        let p = self.dir(parent)?;
        if !permitted(creds, &p.attr, access::X) {
            return Err(Errno::Access);
        }
        let ino = match name {
            b"." => parent,
            b".." => p.parent,
            _ => {
                check_name(name)?;
                self.dentries
                    .get(&(parent, name.to_vec()))
                    .ok_or(Errno::NoEnt)?
                    .ino
            }
        };
        if !self.slot.owns(ino) {
            return Ok((ino, None));
        }
        Ok((ino, Some(self.getattr(ino)?)))
    }

    /// Checks the caller may add or remove entries in `parent`.
    fn may_modify_dir(&self, creds: &Creds, parent: InodeId) -> Result<(), Errno> {
        let p = self.dir(parent)?;
        // A removed directory (still open somewhere) takes no new entries.
        if p.attr.nlink == 0 {
            return Err(Errno::NoEnt);
        }
        if !permitted(creds, &p.attr, access::W | access::X) {
            return Err(Errno::Access);
        }
        Ok(())
    }

    /// Sticky-directory rule: in a sticky directory only the file's owner, the directory's
    /// owner or root may remove or rename an entry.
    fn sticky_ok(&self, creds: &Creds, parent: InodeId, victim: InodeId) -> Result<(), Errno> {
        let p = self.inode(parent)?;
        let v = self.inode(victim)?;
        if p.attr.perm & mode::S_ISVTX != 0
            && creds.uid != 0
            && creds.uid != p.attr.uid
            && creds.uid != v.attr.uid
        {
            return Err(Errno::Perm);
        }
        Ok(())
    }

    fn touch_dir(&mut self, dir: InodeId, now: Timespec) -> Result<(), Errno> {
        let d = self.inode_mut(dir)?;
        d.attr.mtime = now;
        d.attr.ctime = now;
        Ok(())
    }

    fn add_dentry(
        &mut self,
        parent: InodeId,
        name: &[u8],
        ino: InodeId,
        kind: FileType,
    ) -> Result<(), Errno> {
        let p = self.inode_mut(parent)?;
        let cookie = p.next_cookie;
        p.next_cookie += 1;
        let key = (parent, name.to_vec());
        self.by_cookie.insert((parent, cookie), name.to_vec());
        self.dirty_dentries.insert(key.clone());
        let prev = self.dentries.insert(key, Dentry { ino, kind, cookie });
        assert!(prev.is_none(), "directory entry added over an existing one");
        Ok(())
    }

    fn remove_dentry(&mut self, parent: InodeId, name: &[u8]) -> Dentry {
        let key = (parent, name.to_vec());
        let d = self
            .dentries
            .remove(&key)
            .expect("removing an existing directory entry");
        self.by_cookie.remove(&(parent, d.cookie));
        self.dirty_dentries.insert(key);
        d
    }

    /// Drops one link of `ino` and frees it once it has no links and no open handles.
    fn drop_link(&mut self, ino: InodeId, now: Timespec) -> Result<(), Errno> {
        let i = self.inode_mut(ino)?;
        i.attr.nlink = i
            .attr
            .nlink
            .saturating_sub(if i.attr.kind == FileType::Directory {
                i.attr.nlink
            } else {
                1
            });
        i.attr.ctime = now;
        self.maybe_free(ino);
        Ok(())
    }

    fn maybe_free(&mut self, ino: InodeId) {
        if let Some(i) = self.inodes.get(&ino) {
            if i.attr.nlink == 0 && i.open == 0 {
                if let Some(i) = self.inodes.remove(&ino) {
                    for (idx, c) in i.extents {
                        self.dirty_extents.insert((ino, idx));
                        self.free_chunk(c);
                    }
                }
                self.dirty_inodes.insert(ino);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        creds: &Creds,
        parent: InodeId,
        name: &[u8],
        kind: FileType,
        perm: u32,
        rdev: u64,
        target: &[u8],
        now: Timespec,
    ) -> Result<Attr, Errno> {
        if is_dot(name) {
            return Err(Errno::Exist);
        }
        check_name(name)?;
        self.may_modify_dir(creds, parent)?;
        if self.dentries.contains_key(&(parent, name.to_vec())) {
            return Err(Errno::Exist);
        }
        let p = self.inode(parent)?;
        if kind == FileType::Directory && p.attr.nlink >= LINK_MAX {
            return Err(Errno::MLink);
        }
        let parent_sgid = p.attr.perm & mode::S_ISGID != 0;
        let gid = if parent_sgid { p.attr.gid } else { creds.gid };
        let mut perm = perm & mode::PERM_MASK;
        if kind == FileType::Directory && parent_sgid {
            perm |= mode::S_ISGID;
        }
        // A non-root caller outside the file's group cannot create a setgid file.
        if kind != FileType::Directory
            && perm & mode::S_ISGID != 0
            && creds.uid != 0
            && !creds.in_group(gid)
        {
            perm &= !mode::S_ISGID;
        }
        let (ino, generation) = self.alloc_ino();
        let attr = Attr {
            ino,
            generation,
            kind,
            perm,
            uid: creds.uid,
            gid,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            size: if kind == FileType::Symlink {
                target.len() as u64
            } else {
                0
            },
            rdev,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
        };
        self.inodes.insert(
            ino,
            Inode {
                attr: attr.clone(),
                target: target.to_vec(),
                xattrs: BTreeMap::new(),
                open: 0,
                parent,
                next_cookie: 3,
                extents: BTreeMap::new(),
            },
        );
        self.dirty_inodes.insert(ino);
        self.add_dentry(parent, name, ino, kind)?;
        if kind == FileType::Directory {
            self.inode_mut(parent)?.attr.nlink += 1;
        }
        self.touch_dir(parent, now)?;
        Ok(attr)
    }

    /// Creates a regular file, device node, FIFO or socket.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &mut self,
        creds: &Creds,
        parent: InodeId,
        name: &[u8],
        kind: FileType,
        perm: u32,
        rdev: u64,
        now: Timespec,
    ) -> Result<Attr, Errno> {
        match kind {
            FileType::Directory | FileType::Symlink => Err(Errno::Inval),
            FileType::BlockDevice | FileType::CharDevice if creds.uid != 0 => Err(Errno::Perm),
            _ => self.create(creds, parent, name, kind, perm, rdev, &[], now),
        }
    }

    /// Creates a directory.
    pub fn mkdir(
        &mut self,
        creds: &Creds,
        parent: InodeId,
        name: &[u8],
        perm: u32,
        now: Timespec,
    ) -> Result<Attr, Errno> {
        self.create(creds, parent, name, FileType::Directory, perm, 0, &[], now)
    }

    /// Creates a symbolic link to `target`.
    pub fn symlink(
        &mut self,
        creds: &Creds,
        parent: InodeId,
        name: &[u8],
        target: &[u8],
        now: Timespec,
    ) -> Result<Attr, Errno> {
        if target.is_empty() {
            return Err(Errno::NoEnt);
        }
        if target.len() > SYMLINK_MAX {
            return Err(Errno::NameTooLong);
        }
        self.create(
            creds,
            parent,
            name,
            FileType::Symlink,
            0o777,
            0,
            target,
            now,
        )
    }

    /// A symlink's target.
    pub fn readlink(&self, ino: InodeId) -> Result<Vec<u8>, Errno> {
        let i = self.inode(ino)?;
        if i.attr.kind != FileType::Symlink {
            return Err(Errno::Inval);
        }
        Ok(i.target.clone())
    }

    /// Adds a hard link `newparent/newname` to `ino`.
    pub fn link(
        &mut self,
        creds: &Creds,
        ino: InodeId,
        newparent: InodeId,
        newname: &[u8],
        now: Timespec,
    ) -> Result<Attr, Errno> {
        if is_dot(newname) {
            return Err(Errno::Exist);
        }
        check_name(newname)?;
        let i = self.inode(ino)?;
        if i.attr.kind == FileType::Directory {
            return Err(Errno::Perm);
        }
        if i.attr.nlink == 0 {
            return Err(Errno::NoEnt);
        }
        if i.attr.nlink >= LINK_MAX {
            return Err(Errno::MLink);
        }
        let kind = i.attr.kind;
        self.may_modify_dir(creds, newparent)?;
        if self.dentries.contains_key(&(newparent, newname.to_vec())) {
            return Err(Errno::Exist);
        }
        self.add_dentry(newparent, newname, ino, kind)?;
        let i = self.inode_mut(ino)?;
        i.attr.nlink += 1;
        i.attr.ctime = now;
        let attr = i.attr.clone();
        self.touch_dir(newparent, now)?;
        Ok(attr)
    }

    /// Removes a non-directory entry.
    pub fn unlink(
        &mut self,
        creds: &Creds,
        parent: InodeId,
        name: &[u8],
        now: Timespec,
    ) -> Result<(), Errno> {
        if is_dot(name) {
            return Err(Errno::IsDir);
        }
        check_name(name)?;
        self.may_modify_dir(creds, parent)?;
        let d = *self
            .dentries
            .get(&(parent, name.to_vec()))
            .ok_or(Errno::NoEnt)?;
        if d.kind == FileType::Directory {
            return Err(Errno::IsDir);
        }
        self.sticky_ok(creds, parent, d.ino)?;
        self.remove_dentry(parent, name);
        self.touch_dir(parent, now)?;
        self.drop_link(d.ino, now)
    }

    /// Removes an empty directory.
    pub fn rmdir(
        &mut self,
        creds: &Creds,
        parent: InodeId,
        name: &[u8],
        now: Timespec,
    ) -> Result<(), Errno> {
        if name == b"." {
            return Err(Errno::Inval);
        }
        if name == b".." {
            return Err(Errno::NotEmpty);
        }
        check_name(name)?;
        self.may_modify_dir(creds, parent)?;
        let d = *self
            .dentries
            .get(&(parent, name.to_vec()))
            .ok_or(Errno::NoEnt)?;
        if d.kind != FileType::Directory {
            return Err(Errno::NotDir);
        }
        if self.has_entries(d.ino) {
            return Err(Errno::NotEmpty);
        }
        self.sticky_ok(creds, parent, d.ino)?;
        self.remove_dentry(parent, name);
        self.inode_mut(parent)?.attr.nlink -= 1;
        self.touch_dir(parent, now)?;
        self.drop_link(d.ino, now)
    }

    fn has_entries(&self, dir: InodeId) -> bool {
        self.dentries
            .range((dir, Vec::new())..)
            .next()
            .is_some_and(|((p, _), _)| *p == dir)
    }

    /// Whether `ancestor` is `ino` or one of its ancestors.
    fn is_ancestor(&self, ancestor: InodeId, mut ino: InodeId) -> bool {
        for _ in 0..=self.inodes.len() {
            if ino == ancestor {
                return true;
            }
            if ino == InodeId::ROOT {
                return false;
            }
            match self.inodes.get(&ino) {
                Some(i) => ino = i.parent,
                None => return false,
            }
        }
        panic!("directory parent chain longer than the number of inodes: a cycle");
    }

    /// Renames `parent/name` to `newparent/newname` (with RENAME_NOREPLACE / RENAME_EXCHANGE).
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &mut self,
        creds: &Creds,
        parent: InodeId,
        name: &[u8],
        newparent: InodeId,
        newname: &[u8],
        flags: RenameFlags,
        now: Timespec,
    ) -> Result<(), Errno> {
        if flags.noreplace && flags.exchange {
            return Err(Errno::Inval);
        }
        if is_dot(name) || is_dot(newname) {
            return Err(Errno::Inval);
        }
        check_name(name)?;
        check_name(newname)?;
        self.may_modify_dir(creds, parent)?;
        self.may_modify_dir(creds, newparent)?;
        let src = *self
            .dentries
            .get(&(parent, name.to_vec()))
            .ok_or(Errno::NoEnt)?;
        let dst = self.dentries.get(&(newparent, newname.to_vec())).copied();
        if flags.exchange && dst.is_none() {
            return Err(Errno::NoEnt);
        }
        if flags.noreplace && dst.is_some() {
            return Err(Errno::Exist);
        }
        self.sticky_ok(creds, parent, src.ino)?;
        if let Some(d) = dst {
            self.sticky_ok(creds, newparent, d.ino)?;
        }
        // Same inode (hard links, or the same name): nothing to do.
        if dst.is_some_and(|d| d.ino == src.ino) {
            return Ok(());
        }
        // A directory can't move under itself.
        if src.kind == FileType::Directory
            && newparent != parent
            && self.is_ancestor(src.ino, newparent)
        {
            return Err(Errno::Inval);
        }
        if let (true, Some(d)) = (flags.exchange, dst) {
            if d.kind == FileType::Directory
                && parent != newparent
                && self.is_ancestor(d.ino, parent)
            {
                return Err(Errno::Inval);
            }
        }
        // Moving a directory to a new parent rewrites its "..": needs write on it (non-root).
        let moved_dirs: Vec<InodeId> = std::iter::once(src)
            .chain(dst.filter(|_| flags.exchange))
            .filter(|d| d.kind == FileType::Directory && parent != newparent)
            .map(|d| d.ino)
            .collect();
        for d in &moved_dirs {
            if !permitted(creds, &self.inode(*d)?.attr, access::W) {
                return Err(Errno::Access);
            }
        }
        if flags.exchange {
            let d = dst.expect("checked above");
            self.remove_dentry(parent, name);
            self.remove_dentry(newparent, newname);
            self.add_dentry(parent, name, d.ino, d.kind)?;
            self.add_dentry(newparent, newname, src.ino, src.kind)?;
            if parent != newparent {
                for (ino, kind, to) in [(src.ino, src.kind, newparent), (d.ino, d.kind, parent)] {
                    if kind == FileType::Directory {
                        self.inode_mut(ino)?.parent = to;
                    }
                }
                let delta = i64::from(src.kind == FileType::Directory)
                    - i64::from(d.kind == FileType::Directory);
                self.adjust_nlink(parent, -delta)?;
                self.adjust_nlink(newparent, delta)?;
            }
            for ino in [src.ino, d.ino] {
                self.inode_mut(ino)?.attr.ctime = now;
            }
        } else {
            if let Some(d) = dst {
                match (
                    src.kind == FileType::Directory,
                    d.kind == FileType::Directory,
                ) {
                    (true, false) => return Err(Errno::NotDir),
                    (false, true) => return Err(Errno::IsDir),
                    (true, true) if self.has_entries(d.ino) => return Err(Errno::NotEmpty),
                    _ => {}
                }
                self.remove_dentry(newparent, newname);
                if d.kind == FileType::Directory {
                    self.inode_mut(newparent)?.attr.nlink -= 1;
                }
                self.drop_link(d.ino, now)?;
            }
            self.remove_dentry(parent, name);
            self.add_dentry(newparent, newname, src.ino, src.kind)?;
            if src.kind == FileType::Directory && parent != newparent {
                self.inode_mut(src.ino)?.parent = newparent;
                self.adjust_nlink(parent, -1)?;
                self.adjust_nlink(newparent, 1)?;
            }
            self.inode_mut(src.ino)?.attr.ctime = now;
        }
        self.touch_dir(parent, now)?;
        self.touch_dir(newparent, now)?;
        Ok(())
    }

    fn adjust_nlink(&mut self, dir: InodeId, delta: i64) -> Result<(), Errno> {
        let d = self.inode_mut(dir)?;
        let n = i64::from(d.attr.nlink) + delta;
        assert!(n >= 2, "directory link count would drop below 2");
        d.attr.nlink = n as u32;
        Ok(())
    }

    /// Changes attributes (chmod, chown, truncate, utimens) with POSIX rules.
    pub fn setattr(
        &mut self,
        creds: &Creds,
        ino: InodeId,
        set: &SetAttr,
        now: Timespec,
    ) -> Result<Attr, Errno> {
        let next = self.setattr_preview(creds, ino, set, now)?;
        if let Some(size) = set.size {
            // The caller cut the chunk holding the lower of the two ends: its data changed.
            let old = self.inode(ino)?.attr.size;
            let at = old.min(size);
            if old != size && !at.is_multiple_of(CHUNK_BYTES) {
                let cut = self.inode(ino)?.extents.get(&(at / CHUNK_BYTES)).copied();
                self.tier_changed(cut)?;
            }
        }
        self.inode_mut(ino)?.attr = next.clone();
        if let Some(size) = set.size {
            // Chunks wholly past the new end go; the caller cut the partial last one before.
            self.drop_extents(ino, size.div_ceil(CHUNK_BYTES), u64::MAX);
        }
        Ok(next)
    }

    /// What `setattr` would produce, checking every rule, without changing anything.
    pub fn setattr_preview(
        &self,
        creds: &Creds,
        ino: InodeId,
        set: &SetAttr,
        now: Timespec,
    ) -> Result<Attr, Errno> {
        let cur = self.inode(ino)?.attr.clone();
        let owner = creds.uid == 0 || creds.uid == cur.uid;
        let mut next = cur.clone();
        if let Some(perm) = set.perm {
            if !owner {
                return Err(Errno::Perm);
            }
            let mut perm = perm & mode::PERM_MASK;
            // Sticky on files and setgid outside one's groups are dropped for non-root callers.
            if creds.uid != 0 {
                if cur.kind != FileType::Directory && perm & mode::S_ISVTX != 0 {
                    perm &= !mode::S_ISVTX;
                }
                if perm & mode::S_ISGID != 0 && !creds.in_group(set.gid.unwrap_or(cur.gid)) {
                    perm &= !mode::S_ISGID;
                }
            }
            next.perm = perm;
        }
        if set.uid.is_some() || set.gid.is_some() {
            let new_uid = set.uid.unwrap_or(cur.uid);
            let new_gid = set.gid.unwrap_or(cur.gid);
            if creds.uid != 0 {
                // Only root gives files away; the owner may change the group to one of theirs.
                if new_uid != cur.uid || creds.uid != cur.uid {
                    return Err(Errno::Perm);
                }
                if new_gid != cur.gid && !creds.in_group(new_gid) {
                    return Err(Errno::Perm);
                }
            }
            if (new_uid != cur.uid || new_gid != cur.gid || creds.uid != 0)
                && cur.kind != FileType::Directory
            {
                // A change of owner drops setuid, and setgid where it means "set group id".
                next.perm &= !mode::S_ISUID;
                if next.perm & mode::S_IXGRP != 0 {
                    next.perm &= !mode::S_ISGID;
                }
            }
            next.uid = new_uid;
            next.gid = new_gid;
        }
        if let Some(size) = set.size {
            match cur.kind {
                FileType::Directory => return Err(Errno::IsDir),
                FileType::Regular => {}
                _ => return Err(Errno::Inval),
            }
            if size > MAX_FILE_SIZE {
                return Err(Errno::FBig);
            }
            if !set.via_write_handle && !permitted(creds, &cur, access::W) {
                return Err(Errno::Access);
            }
            // A successful truncate updates mtime and ctime even when the size is unchanged.
            next.size = size;
            next.mtime = now;
            if creds.uid != 0 && creds.uid != cur.uid {
                next.perm &= !mode::S_ISUID;
                if next.perm & mode::S_IXGRP != 0 {
                    next.perm &= !mode::S_ISGID;
                }
            }
        }
        for (which, slot) in [(set.atime, &mut next.atime), (set.mtime, &mut next.mtime)] {
            match which {
                None => {}
                Some(TimeSet::Now) => {
                    if !owner && !permitted(creds, &cur, access::W) {
                        return Err(Errno::Access);
                    }
                    *slot = now;
                }
                Some(TimeSet::At(t)) => {
                    if !owner {
                        return Err(Errno::Perm);
                    }
                    *slot = t;
                }
            }
        }
        next.ctime = now;
        Ok(next)
    }

    /// Checks `mask` (R/W/X bits, 0 = existence) for the caller.
    pub fn access(&self, creds: &Creds, ino: InodeId, mask: u32) -> Result<(), Errno> {
        let a = &self.inode(ino)?.attr;
        if mask == 0 || permitted(creds, a, mask) {
            Ok(())
        } else {
            Err(Errno::Access)
        }
    }

    /// Opens an inode: checks permission for the access mode and counts the handle.
    pub fn open(
        &mut self,
        creds: &Creds,
        ino: InodeId,
        read: bool,
        write: bool,
    ) -> Result<Attr, Errno> {
        let a = self.inode(ino)?.attr.clone();
        if write && a.kind == FileType::Directory {
            return Err(Errno::IsDir);
        }
        let mask = if read { access::R } else { 0 } | if write { access::W } else { 0 };
        if mask != 0 && !permitted(creds, &a, mask) {
            return Err(Errno::Access);
        }
        // Handle counts are not persisted (handles do not survive a restart): no dirty mark.
        self.inodes.get_mut(&ino).ok_or(Errno::NoEnt)?.open += 1;
        Ok(a)
    }

    /// Releases a handle; an unlinked inode goes away with its last handle.
    pub fn release(&mut self, ino: InodeId) -> Result<(), Errno> {
        let i = self.inodes.get_mut(&ino).ok_or(Errno::NoEnt)?;
        // A peer can send a release it never opened (or one from before a restart, when
        // handles were reset): an error, never a broken count.
        if i.open == 0 {
            return Err(Errno::Inval);
        }
        i.open -= 1;
        self.maybe_free(ino);
        Ok(())
    }

    /// Directory entries after `cookie` (0 = from the start, including "." and ".."), at most
    /// `limit`.
    pub fn readdir(
        &self,
        creds: &Creds,
        ino: InodeId,
        cookie: u64,
        limit: usize,
    ) -> Result<Vec<DirEntry>, Errno> {
        let d = self.dir(ino)?;
        if !permitted(creds, &d.attr, access::R) {
            return Err(Errno::Access);
        }
        let mut out = Vec::new();
        if cookie < 1 {
            out.push(DirEntry {
                name: b".".to_vec(),
                ino,
                kind: FileType::Directory,
                cookie: 1,
            });
        }
        if cookie < 2 {
            out.push(DirEntry {
                name: b"..".to_vec(),
                ino: d.parent,
                kind: FileType::Directory,
                cookie: 2,
            });
        }
        let first = cookie.max(2).saturating_add(1);
        for ((_, c), name) in self
            .by_cookie
            .range((ino, first)..=(ino, u64::MAX))
            .take(limit.saturating_sub(out.len()))
        {
            let de = self
                .dentries
                .get(&(ino, name.clone()))
                .expect("readdir index matches the entries");
            out.push(DirEntry {
                name: name.clone(),
                ino: de.ino,
                kind: de.kind,
                cookie: *c,
            });
        }
        out.truncate(limit);
        Ok(out)
    }

    fn xattr_allowed(
        &self,
        creds: &Creds,
        ino: InodeId,
        name: &[u8],
        write: bool,
    ) -> Result<(), Errno> {
        if name.is_empty() {
            return Err(Errno::Inval);
        }
        if name.len() > XATTR_NAME_MAX {
            return Err(Errno::Range);
        }
        let a = &self.inode(ino)?.attr;
        if name.starts_with(b"user.") {
            if !matches!(a.kind, FileType::Regular | FileType::Directory) {
                return Err(if write { Errno::Perm } else { Errno::NoData });
            }
            let mask = if write { access::W } else { access::R };
            if !permitted(creds, a, mask) {
                return Err(Errno::Access);
            }
            Ok(())
        } else if name.starts_with(b"trusted.") {
            if creds.uid != 0 {
                return Err(if write { Errno::Perm } else { Errno::NoData });
            }
            Ok(())
        } else if name.starts_with(b"security.") {
            if write && creds.uid != 0 && creds.uid != a.uid {
                return Err(Errno::Perm);
            }
            Ok(())
        } else {
            Err(Errno::NotSup)
        }
    }

    /// Sets an extended attribute.
    pub fn setxattr(
        &mut self,
        creds: &Creds,
        ino: InodeId,
        name: &[u8],
        value: &[u8],
        how: XattrMode,
        now: Timespec,
    ) -> Result<(), Errno> {
        self.xattr_allowed(creds, ino, name, true)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(Errno::Range);
        }
        let exists = self.inode(ino)?.xattrs.contains_key(name);
        match (how, exists) {
            (XattrMode::Create, true) => return Err(Errno::Exist),
            (XattrMode::Replace, false) => return Err(Errno::NoData),
            _ => {}
        }
        let i = self.inode_mut(ino)?;
        i.xattrs.insert(name.to_vec(), value.to_vec());
        i.attr.ctime = now;
        Ok(())
    }

    /// Reads an extended attribute.
    pub fn getxattr(&self, creds: &Creds, ino: InodeId, name: &[u8]) -> Result<Vec<u8>, Errno> {
        self.xattr_allowed(creds, ino, name, false)?;
        self.inode(ino)?
            .xattrs
            .get(name)
            .cloned()
            .ok_or(Errno::NoData)
    }

    /// Names of the extended attributes the caller may see.
    pub fn listxattr(&self, creds: &Creds, ino: InodeId) -> Result<Vec<Vec<u8>>, Errno> {
        let i = self.inode(ino)?;
        Ok(i.xattrs
            .keys()
            .filter(|n| creds.uid == 0 || !n.starts_with(b"trusted."))
            .cloned()
            .collect())
    }

    /// Removes an extended attribute.
    pub fn removexattr(
        &mut self,
        creds: &Creds,
        ino: InodeId,
        name: &[u8],
        now: Timespec,
    ) -> Result<(), Errno> {
        self.xattr_allowed(creds, ino, name, true)?;
        let i = self.inode_mut(ino)?;
        if i.xattrs.remove(name).is_none() {
            return Err(Errno::NoData);
        }
        i.attr.ctime = now;
        Ok(())
    }

    /// Records a write of `len` bytes at `offset` through an open handle, whose data went to
    /// `chunks` (from [`Namespace::map_chunks`]): size and times change, and a write by anyone
    /// but root drops setuid/setgid. EIO if the extent map no longer points at those chunks
    /// (a concurrent truncate or punch dropped them, so the data may be gone).
    #[allow(clippy::too_many_arguments)]
    pub fn wrote(
        &mut self,
        creds: &Creds,
        ino: InodeId,
        offset: u64,
        len: u64,
        chunks: &[(u64, ChunkId)],
        now: Timespec,
    ) -> Result<Attr, Errno> {
        let end = offset.checked_add(len).ok_or(Errno::FBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Errno::FBig);
        }
        let i = self.inode(ino)?;
        if i.attr.kind != FileType::Regular {
            return Err(Errno::Inval);
        }
        if chunks.iter().any(|(idx, c)| i.extents.get(idx) != Some(c)) {
            return Err(Errno::Io);
        }
        self.tier_changed(chunks.iter().map(|(_, c)| *c))?;
        let i = self.inode_mut(ino)?;
        i.attr.size = i.attr.size.max(end);
        i.attr.mtime = now;
        i.attr.ctime = now;
        if creds.uid != 0 {
            i.attr.perm &= !mode::S_ISUID;
            if i.attr.perm & mode::S_IXGRP != 0 {
                i.attr.perm &= !mode::S_ISGID;
            }
        }
        Ok(i.attr.clone())
    }

    fn regular(&self, ino: InodeId) -> Result<&Inode, Errno> {
        let i = self.inode(ino)?;
        match i.attr.kind {
            FileType::Regular => Ok(i),
            FileType::Directory => Err(Errno::IsDir),
            _ => Err(Errno::Inval),
        }
    }

    /// The chunks holding bytes `[offset, offset+len)` of a regular file: (chunk index, chunk)
    /// for every index in the range that is mapped (the others are holes).
    pub fn extents(
        &self,
        ino: InodeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, ChunkId)>, Errno> {
        let i = self.regular(ino)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / CHUNK_BYTES;
        let last = offset.saturating_add(len - 1) / CHUNK_BYTES;
        Ok(i.extents
            .range(first..=last)
            .map(|(&k, &c)| (k, c))
            .collect())
    }

    /// Maps every chunk index of `[offset, offset+len)` (`len` > 0), allocating chunk ids for
    /// holes; returns (chunk index, chunk) for each. New extents are persisted with the next
    /// commit; data may be written to them before that (a crash leaves an unreferenced chunk,
    /// which the server deletes at start).
    pub fn map_chunks(
        &mut self,
        ino: InodeId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, ChunkId)>, Errno> {
        assert!(len > 0, "map_chunks of an empty range");
        let end = offset.checked_add(len).ok_or(Errno::FBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Errno::FBig);
        }
        self.regular(ino)?;
        let (first, last) = (offset / CHUNK_BYTES, (end - 1) / CHUNK_BYTES);
        let mut out = Vec::with_capacity((last - first + 1) as usize);
        for idx in first..=last {
            let existing = self
                .inodes
                .get(&ino)
                .and_then(|i| i.extents.get(&idx).copied());
            let c = match existing {
                Some(c) => c,
                None => {
                    let c = ChunkId(self.next_chunk);
                    assert_eq!(
                        shard_of_id(self.slot.count, c.0),
                        self.slot.index,
                        "chunk counter not aligned to the shard"
                    );
                    self.next_chunk += u64::from(self.slot.count);
                    self.placement.new_chunk(c);
                    self.inodes
                        .get_mut(&ino)
                        .ok_or(Errno::NoEnt)?
                        .extents
                        .insert(idx, c);
                    self.dirty_extents.insert((ino, idx));
                    c
                }
            };
            out.push((idx, c));
        }
        Ok(out)
    }

    /// Unmaps chunk indexes `first..end` of `ino`; their chunks are freed after the commit.
    fn drop_extents(&mut self, ino: InodeId, first: u64, end: u64) {
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if first >= end {
            return;
        }
        let gone: Vec<u64> = i.extents.range(first..end).map(|(&k, _)| k).collect();
        for idx in gone {
            let removed = self
                .inodes
                .get_mut(&ino)
                .and_then(|i| i.extents.remove(&idx));
            if let Some(c) = removed {
                self.dirty_extents.insert((ino, idx));
                self.free_chunk(c);
            }
        }
    }

    /// `fallocate` without flags (or with KEEP_SIZE): maps every chunk of the range and, unless
    /// `keep_size`, extends the file to cover it. Space is not reserved on the devices (the
    /// chunk store is copy-on-write); the caller checks free space.
    pub fn fallocate(
        &mut self,
        ino: InodeId,
        offset: u64,
        len: u64,
        keep_size: bool,
        now: Timespec,
    ) -> Result<Attr, Errno> {
        if len == 0 {
            return Err(Errno::Inval);
        }
        self.map_chunks(ino, offset, len)?;
        let i = self.inode_mut(ino)?;
        let end = offset + len;
        if !keep_size && end > i.attr.size {
            i.attr.size = end;
            i.attr.mtime = now;
        }
        i.attr.ctime = now;
        Ok(i.attr.clone())
    }

    /// After the caller zeroed the partial chunks of `[offset, offset+len)` in the store: unmaps
    /// the chunks the range covers whole and updates the times (`fallocate` PUNCH_HOLE and
    /// ZERO_RANGE). With `extend`, the file grows to cover the range (ZERO_RANGE without
    /// KEEP_SIZE).
    pub fn punched(
        &mut self,
        ino: InodeId,
        offset: u64,
        len: u64,
        extend: bool,
        now: Timespec,
    ) -> Result<Attr, Errno> {
        let end = offset.checked_add(len).ok_or(Errno::FBig)?;
        if len == 0 || end > MAX_FILE_SIZE {
            return Err(if len == 0 { Errno::Inval } else { Errno::FBig });
        }
        // Chunks the range covers in part were zeroed there by the caller: their data changed.
        let partial: Vec<ChunkId> = self
            .regular(ino)?
            .extents
            .range(offset / CHUNK_BYTES..=(end - 1) / CHUNK_BYTES)
            .filter(|(idx, _)| **idx * CHUNK_BYTES < offset || (**idx + 1) * CHUNK_BYTES > end)
            .map(|(_, c)| *c)
            .collect();
        self.tier_changed(partial)?;
        self.drop_extents(ino, offset.div_ceil(CHUNK_BYTES), end / CHUNK_BYTES);
        let i = self.inode_mut(ino)?;
        if extend && end > i.attr.size {
            i.attr.size = end;
        }
        i.attr.mtime = now;
        i.attr.ctime = now;
        Ok(i.attr.clone())
    }

    /// Totals for statfs.
    pub fn stats(&self) -> FsStats {
        FsStats {
            inodes: self.inodes.len() as u64,
            bytes: self
                .inodes
                .values()
                .filter(|i| i.attr.kind == FileType::Regular)
                .map(|i| i.attr.size)
                .sum(),
        }
    }

    /// Whether anything changed since the last `take_dirty`.
    pub fn is_dirty(&self) -> bool {
        !self.dirty_inodes.is_empty()
            || !self.dirty_dentries.is_empty()
            || !self.dirty_extents.is_empty()
            || self.dirty_tier
    }

    /// Keys changed since the last call. The persistence layer writes their current values
    /// (or deletes them when absent) before replying.
    pub fn take_dirty(&mut self) -> Dirty {
        Dirty {
            inodes: std::mem::take(&mut self.dirty_inodes).into_iter().collect(),
            dentries: std::mem::take(&mut self.dirty_dentries)
                .into_iter()
                .collect(),
            extents: std::mem::take(&mut self.dirty_extents)
                .into_iter()
                .collect(),
            tier: std::mem::take(&mut self.dirty_tier),
        }
    }

    /// Chunks unreferenced since the last call: delete their data once the change is durable.
    pub fn take_freed(&mut self) -> Vec<ChunkId> {
        std::mem::take(&mut self.freed)
    }

    /// Where chunk index `idx` of `ino` points (for persistence).
    pub fn extent(&self, ino: InodeId, idx: u64) -> Option<ChunkId> {
        self.inodes.get(&ino)?.extents.get(&idx).copied()
    }

    /// Records that `nodes` missed a change to `chunks` (replicated clusters). Chunks no file
    /// maps any more are ignored.
    pub fn mark_stale(&mut self, chunks: &[ChunkId], nodes: &[u64]) {
        for c in chunks {
            if self.is_live_chunk(*c) {
                self.placement.mark_stale(*c, nodes);
            }
        }
    }

    /// Whether a file maps `chunk`. A chunk with recorded holders is mapped (the placement
    /// invariant), which answers it without a scan of every extent in a cluster.
    fn is_live_chunk(&self, chunk: ChunkId) -> bool {
        self.placement.holders(chunk).is_some() || self.referenced_chunks().contains(&chunk)
    }

    /// `node` holds the current data of `chunk` again.
    pub fn repaired(&mut self, chunk: ChunkId, node: u64) {
        self.placement.repaired(chunk, node);
    }

    /// Nodes whose copy of `chunk` is out of date.
    pub fn stale_nodes(&self, chunk: ChunkId) -> BTreeSet<u64> {
        self.placement.stale_nodes(chunk)
    }

    /// Every (chunk, stale nodes) pair (status and repair).
    pub fn all_stale(&self) -> impl Iterator<Item = (ChunkId, &BTreeSet<u64>)> + '_ {
        self.placement.all_stale()
    }

    /// The first result of a command applied under `s`, if remembered.
    pub fn session_result(&self, s: Session) -> Option<Result<crate::command::Outcome, Errno>> {
        self.sessions.lookup(s).cloned()
    }

    /// Remembers the result of a command applied under `s`.
    pub fn record_session(
        &mut self,
        s: Session,
        now: Timespec,
        r: Result<crate::command::Outcome, Errno>,
    ) {
        self.sessions.record(s, now, r);
    }

    /// Cluster membership and chunk placement.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// A new cluster's namespace starts with its members and replication factor.
    pub fn set_placement(&mut self, p: Placement) {
        self.placement = p;
    }

    /// Adds target nodes of `chunk` as stale holders (a placement move, step one).
    pub fn add_holders(&mut self, chunk: ChunkId, nodes: &[u64]) -> Result<(), Errno> {
        if !self.is_live_chunk(chunk) {
            return Err(Errno::NoEnt);
        }
        self.placement.add_holders(chunk, nodes);
        Ok(())
    }

    /// Drops holders of `chunk` outside its target once the target is current (step two);
    /// the dropped nodes' copies are no longer referenced.
    pub fn drop_holders(&mut self, chunk: ChunkId, nodes: &[u64]) {
        for n in self.placement.drop_holders(chunk, nodes) {
            self.dropped.push((chunk, n));
        }
    }

    /// Copies dropped by placement moves since the last call: (chunk, node whose copy goes).
    pub fn take_dropped(&mut self) -> Vec<(ChunkId, u64)> {
        std::mem::take(&mut self.dropped)
    }

    /// Adds (or re-addresses) a cluster member.
    pub fn add_member(&mut self, id: u64, member: Member) -> Result<(), Errno> {
        self.placement.add_member(id, member)
    }

    /// Removes a cluster member for good (its copies no longer count).
    pub fn remove_member(&mut self, id: u64) -> Result<(), Errno> {
        self.placement.remove_member(id)
    }

    pub(crate) fn check_placement(&self) -> Result<(), String> {
        self.placement.check()?;
        let live = self.referenced_chunks();
        if let Some((c, _)) = self
            .placement
            .all_holders()
            .find(|(c, _)| !live.contains(c))
        {
            return Err(format!("{c} has holders but no file maps it"));
        }
        if let Some((c, _)) = self.placement.all_stale().find(|(c, _)| !live.contains(c)) {
            return Err(format!("{c} is marked stale but no file maps it"));
        }
        if let Some(c) = self.placement.generations().find(|c| !live.contains(c)) {
            return Err(format!("{c} has a generation but no file maps it"));
        }
        Ok(())
    }

    /// Every extent: (inode, chunk index, chunk).
    pub fn all_extents(&self) -> impl Iterator<Item = (InodeId, u64, ChunkId)> + '_ {
        self.inodes
            .iter()
            .flat_map(|(ino, i)| i.extents.iter().map(move |(idx, c)| (*ino, *idx, *c)))
    }

    /// Every chunk some extent points at (to find chunks left behind by a crash).
    pub fn referenced_chunks(&self) -> BTreeSet<ChunkId> {
        self.inodes
            .values()
            .flat_map(|i| i.extents.values().copied())
            .collect()
    }

    /// An inode record (for persistence).
    pub fn inode_record(&self, ino: InodeId) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    /// A directory entry (for persistence).
    pub fn dentry(&self, parent: InodeId, name: &[u8]) -> Option<Dentry> {
        self.dentries.get(&(parent, name.to_vec())).copied()
    }

    /// Checks every structural invariant; `Err` describes the first violation. Used by tests
    /// and the simulator after every step. A shard of a split namespace checks what it can see
    /// alone (`Namespace::check_shard`); [`crate::txn::check_shards`] checks the whole.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.slot.is_sharded() {
            return self.check_shard();
        }
        self.check_structure()?;
        self.txn.check(self.slot)?;
        self.check_placement()
    }

    /// Link counts, reachability, readdir index, extents: for a whole namespace.
    pub(crate) fn check_structure(&self) -> Result<(), String> {
        let mut links: BTreeMap<InodeId, u32> = BTreeMap::new();
        let mut subdirs: BTreeMap<InodeId, u32> = BTreeMap::new();
        for ((parent, name), d) in &self.dentries {
            let p = self
                .inodes
                .get(parent)
                .ok_or(format!("entry {name:?} in missing directory {parent}"))?;
            if p.attr.kind != FileType::Directory {
                return Err(format!("entry {name:?} in non-directory {parent}"));
            }
            let i = self
                .inodes
                .get(&d.ino)
                .ok_or(format!("entry {name:?} points at missing {}", d.ino))?;
            if i.attr.kind != d.kind {
                return Err(format!("entry {name:?} type differs from inode {}", d.ino));
            }
            if self.by_cookie.get(&(*parent, d.cookie)) != Some(name) {
                return Err(format!("readdir index misses {name:?} in {parent}"));
            }
            *links.entry(d.ino).or_default() += 1;
            if d.kind == FileType::Directory {
                if i.parent != *parent {
                    return Err(format!(
                        "directory {} has '..' {} but lives in {parent}",
                        d.ino, i.parent
                    ));
                }
                *subdirs.entry(*parent).or_default() += 1;
            }
        }
        if self.by_cookie.len() != self.dentries.len() {
            return Err("readdir index has stale entries".into());
        }
        for (ino, i) in &self.inodes {
            let n = links.get(ino).copied().unwrap_or(0);
            if i.attr.kind == FileType::Directory {
                let expect = if *ino == InodeId::ROOT || n == 1 {
                    2 + subdirs.get(ino).copied().unwrap_or(0)
                } else {
                    0
                };
                if n > 1 {
                    return Err(format!("directory {ino} has {n} names"));
                }
                if (n == 1 || *ino == InodeId::ROOT) && i.attr.nlink != expect {
                    return Err(format!(
                        "directory {ino} nlink {} but {expect} expected",
                        i.attr.nlink
                    ));
                }
                if *ino != InodeId::ROOT && n == 0 && i.open == 0 {
                    return Err(format!("unreachable directory {ino} kept"));
                }
                if *ino != InodeId::ROOT && !self.is_ancestor(InodeId::ROOT, *ino) && n == 1 {
                    return Err(format!("directory {ino} not under the root"));
                }
            } else {
                if i.attr.nlink != n {
                    return Err(format!("inode {ino} nlink {} but {n} names", i.attr.nlink));
                }
                if n == 0 && i.open == 0 {
                    return Err(format!(
                        "inode {ino} has no names and no handles but was kept"
                    ));
                }
            }
        }
        // Extents: only regular files have them, and no chunk backs two places.
        let mut seen = BTreeSet::new();
        for (ino, i) in &self.inodes {
            if !i.extents.is_empty() && i.attr.kind != FileType::Regular {
                return Err(format!("{ino} is not a regular file but has extents"));
            }
            for (idx, c) in &i.extents {
                if c.0 >= self.next_chunk {
                    return Err(format!("{ino} index {idx}: {c} not yet allocated"));
                }
                if !seen.insert(*c) {
                    return Err(format!("{c} is mapped twice (at {ino} index {idx})"));
                }
            }
        }
        Ok(())
    }
}

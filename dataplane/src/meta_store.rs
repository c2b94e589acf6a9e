//! Durable home of the namespace: a redb database (one file, ACID, copy-on-write B-trees).
//!
//! The namespace state machine runs in memory; after each operation the service calls
//! [`MetaStore::persist`], which writes exactly the records the operation touched in one redb
//! transaction with immediate durability, before the reply goes out. On open the whole
//! namespace is loaded and checked.

use cfs_meta::codec;
use cfs_meta::namespace::{Dirty, Namespace};
use cfs_meta::{ChunkId, FileType, Timespec, CHUNK_BYTES};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const DENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dentries");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const EXTENTS: TableDefinition<(u64, u64), u64> = TableDefinition::new("extents");
/// The object tier's index, one record under "index" (absent: nothing tiered yet).
const TIER: TableDefinition<&str, &[u8]> = TableDefinition::new("tier");

/// Layout version of the database. 1: no extent map (file data at the fixed chunk
/// `(ino << 16) | index`); 2: extent map. Version 1 databases are migrated on open.
const SCHEMA: u64 = 2;

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaStoreError {
    /// redb failed (I/O, corruption, a full disk).
    #[error("metadata database {path}: {source}")]
    Db {
        /// Database file.
        path: String,
        /// What redb said.
        source: redb::Error,
    },
    /// A record does not decode, or the records are inconsistent.
    #[error("metadata database {path} is damaged: {what}")]
    Corrupt {
        /// Database file.
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// The metadata database.
pub struct MetaStore {
    db: Database,
    path: String,
}

impl MetaStore {
    fn err(&self, e: impl Into<redb::Error>) -> MetaStoreError {
        MetaStoreError::Db {
            path: self.path.clone(),
            source: e.into(),
        }
    }

    /// Opens (or creates, with an empty root directory) the database at `path`.
    pub fn open(path: &Path, now: Timespec) -> Result<(MetaStore, Namespace), MetaStoreError> {
        let p = path.display().to_string();
        let db = Database::create(path).map_err(|e| MetaStoreError::Db {
            path: p.clone(),
            source: e.into(),
        })?;
        let store = MetaStore { db, path: p };
        let loaded = store.load()?;
        let mut ns = match loaded {
            Some(ns) => ns,
            None => {
                let mut ns = Namespace::new(0, 0, 0o755, now);
                store.persist(&mut ns)?;
                ns
            }
        };
        // Inodes freed at load (unlinked files that were open when the server stopped) are
        // committed now; their data is the caller's to release (`take_freed`).
        if ns.is_dirty() {
            store.persist(&mut ns)?;
        }
        Ok((store, ns))
    }

    fn load(&self) -> Result<Option<Namespace>, MetaStoreError> {
        let rtx = self.db.begin_read().map_err(|e| self.err(e))?;
        let inodes_t = match rtx.open_table(INODES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let corrupt = |what: String| MetaStoreError::Corrupt {
            path: self.path.clone(),
            what,
        };
        let mut inodes: Vec<cfs_meta::namespace::Inode> = Vec::new();
        for item in inodes_t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let i = codec::decode_inode(v.value())
                .ok_or_else(|| corrupt(format!("inode {} does not decode", k.value())))?;
            if i.attr.ino.0 != k.value() {
                return Err(corrupt(format!(
                    "inode record under key {} says {}",
                    k.value(),
                    i.attr.ino
                )));
            }
            inodes.push(i);
        }
        let mut dentries = Vec::new();
        let dt = rtx.open_table(DENTRIES).map_err(|e| self.err(e))?;
        for item in dt.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let (parent, name) = codec::decode_dentry_key(k.value())
                .ok_or_else(|| corrupt("bad entry key".into()))?;
            let d = codec::decode_dentry(v.value())
                .ok_or_else(|| corrupt(format!("entry {name:?} in {parent} does not decode")))?;
            dentries.push((parent, name, d));
        }
        let ct = rtx.open_table(COUNTERS).map_err(|e| self.err(e))?;
        let get = |name: &str| -> Result<u64, MetaStoreError> {
            Ok(ct
                .get(name)
                .map_err(|e| self.err(e))?
                .map(|g| g.value())
                .unwrap_or(0))
        };
        let (next_ino, next_gen) = (get("next_ino")?, get("next_generation")?);
        let next_chunk = get("next_chunk")?;
        let schema = get("schema")?.max(1);
        if schema > SCHEMA {
            return Err(corrupt(format!(
                "schema {schema} is newer than this server understands ({SCHEMA}); upgrade cfs-dataplane"
            )));
        }
        let mut by_ino: std::collections::HashMap<u64, usize> = inodes
            .iter()
            .enumerate()
            .map(|(k, i)| (i.attr.ino.0, k))
            .collect();
        if schema >= 2 {
            let et = rtx.open_table(EXTENTS).map_err(|e| self.err(e))?;
            for item in et.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                let (ino, idx) = k.value();
                let at = *by_ino
                    .get(&ino)
                    .ok_or_else(|| corrupt(format!("extent {idx} of missing inode #{ino}")))?;
                inodes[at].extents.insert(idx, ChunkId(v.value()));
            }
        } else {
            // Version 1: data of byte o of inode i lived in chunk (i << 16) | (o / 64 MiB).
            for i in inodes.iter_mut() {
                if i.attr.kind == FileType::Regular {
                    for idx in 0..i.attr.size.div_ceil(CHUNK_BYTES) {
                        i.extents.insert(idx, ChunkId((i.attr.ino.0 << 16) | idx));
                    }
                }
            }
            tracing::info!(
                "metadata database {}: migrating schema 1 to {SCHEMA}",
                self.path
            );
        }
        by_ino.clear();
        let mut ns = Namespace::from_records(inodes, dentries).map_err(corrupt)?;
        ns.restore_counters(next_ino, next_gen, next_chunk);
        match rtx.open_table(TIER) {
            Ok(t) => {
                if let Some(v) = t.get("index").map_err(|e| self.err(e))? {
                    ns.load_tier_record(v.value()).map_err(corrupt)?;
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(self.err(e)),
        }
        if schema < SCHEMA {
            // Write every extent and the new schema number in one transaction.
            self.persist_all_extents(&ns)?;
        }
        Ok(Some(ns))
    }

    fn persist_all_extents(&self, ns: &Namespace) -> Result<(), MetaStoreError> {
        let wtx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut et = wtx.open_table(EXTENTS).map_err(|e| self.err(e))?;
            for (ino, idx, c) in ns.all_extents() {
                et.insert((ino.0, idx), c.0).map_err(|e| self.err(e))?;
            }
            let mut ct = wtx.open_table(COUNTERS).map_err(|e| self.err(e))?;
            ct.insert("next_chunk", ns.counters().2)
                .map_err(|e| self.err(e))?;
            ct.insert("schema", SCHEMA).map_err(|e| self.err(e))?;
        }
        wtx.commit().map_err(|e| self.err(e))
    }

    /// The chunk store this database describes (its UUID), if recorded. The server refuses to
    /// pair a database with another store: it deletes chunks no extent points at.
    pub fn store_uuid(&self) -> Result<Option<[u8; 16]>, MetaStoreError> {
        let rtx = self.db.begin_read().map_err(|e| self.err(e))?;
        let ct = match rtx.open_table(COUNTERS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let hi = ct
            .get("store_uuid_hi")
            .map_err(|e| self.err(e))?
            .map(|g| g.value());
        let lo = ct
            .get("store_uuid_lo")
            .map_err(|e| self.err(e))?
            .map(|g| g.value());
        Ok(match (hi, lo) {
            (Some(hi), Some(lo)) => {
                let mut u = [0u8; 16];
                u[..8].copy_from_slice(&hi.to_be_bytes());
                u[8..].copy_from_slice(&lo.to_be_bytes());
                Some(u)
            }
            _ => None,
        })
    }

    /// Records the chunk store's UUID (see [`MetaStore::store_uuid`]).
    pub fn set_store_uuid(&self, uuid: [u8; 16]) -> Result<(), MetaStoreError> {
        let mut hi = [0u8; 8];
        let mut lo = [0u8; 8];
        hi.copy_from_slice(&uuid[..8]);
        lo.copy_from_slice(&uuid[8..]);
        let wtx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut ct = wtx.open_table(COUNTERS).map_err(|e| self.err(e))?;
            ct.insert("store_uuid_hi", u64::from_be_bytes(hi))
                .map_err(|e| self.err(e))?;
            ct.insert("store_uuid_lo", u64::from_be_bytes(lo))
                .map_err(|e| self.err(e))?;
        }
        wtx.commit().map_err(|e| self.err(e))
    }

    /// Writes what the namespace changed since the last call, durably, in one transaction.
    pub fn persist(&self, ns: &mut Namespace) -> Result<(), MetaStoreError> {
        let Dirty {
            inodes,
            dentries,
            extents,
            tier,
        } = ns.take_dirty();
        let (next_ino, next_gen, next_chunk) = ns.counters();
        let wtx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut it = wtx.open_table(INODES).map_err(|e| self.err(e))?;
            for ino in inodes {
                match ns.inode_record(ino) {
                    Some(rec) => {
                        it.insert(ino.0, codec::encode_inode(rec).as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    None => {
                        it.remove(ino.0).map_err(|e| self.err(e))?;
                    }
                }
            }
            let mut dt = wtx.open_table(DENTRIES).map_err(|e| self.err(e))?;
            for (parent, name) in dentries {
                let key = codec::encode_dentry_key(parent, &name);
                match ns.dentry(parent, &name) {
                    Some(d) => {
                        dt.insert(key.as_slice(), codec::encode_dentry(&d).as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    None => {
                        dt.remove(key.as_slice()).map_err(|e| self.err(e))?;
                    }
                }
            }
            let mut et = wtx.open_table(EXTENTS).map_err(|e| self.err(e))?;
            for (ino, idx) in extents {
                match ns.extent(ino, idx) {
                    Some(c) => {
                        et.insert((ino.0, idx), c.0).map_err(|e| self.err(e))?;
                    }
                    None => {
                        et.remove((ino.0, idx)).map_err(|e| self.err(e))?;
                    }
                }
            }
            if tier {
                let mut tt = wtx.open_table(TIER).map_err(|e| self.err(e))?;
                tt.insert("index", ns.tier_record().as_slice())
                    .map_err(|e| self.err(e))?;
            }
            let mut ct = wtx.open_table(COUNTERS).map_err(|e| self.err(e))?;
            ct.insert("next_ino", next_ino).map_err(|e| self.err(e))?;
            ct.insert("next_generation", next_gen)
                .map_err(|e| self.err(e))?;
            ct.insert("next_chunk", next_chunk)
                .map_err(|e| self.err(e))?;
            ct.insert("schema", SCHEMA).map_err(|e| self.err(e))?;
        }
        wtx.commit().map_err(|e| self.err(e))?;
        Ok(())
    }
}

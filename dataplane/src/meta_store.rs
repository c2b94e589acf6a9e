//! Durable home of the namespace: a redb database (one file, ACID, copy-on-write B-trees).
//!
//! The namespace state machine runs in memory; after each operation the service calls
//! [`MetaStore::persist`], which writes exactly the records the operation touched in one redb
//! transaction with immediate durability, before the reply goes out. On open the whole
//! namespace is loaded and checked.

use cfs_meta::codec;
use cfs_meta::namespace::Namespace;
use cfs_meta::Timespec;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const DENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("dentries");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

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
        let mut inodes = Vec::new();
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
        let mut ns = Namespace::from_records(inodes, dentries).map_err(corrupt)?;
        ns.restore_counters(next_ino, next_gen);
        Ok(Some(ns))
    }

    /// Writes what the namespace changed since the last call, durably, in one transaction.
    pub fn persist(&self, ns: &mut Namespace) -> Result<(), MetaStoreError> {
        let (inodes, dentries) = ns.take_dirty();
        let (next_ino, next_gen) = ns.counters();
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
            let mut ct = wtx.open_table(COUNTERS).map_err(|e| self.err(e))?;
            ct.insert("next_ino", next_ino).map_err(|e| self.err(e))?;
            ct.insert("next_generation", next_gen)
                .map_err(|e| self.err(e))?;
        }
        wtx.commit().map_err(|e| self.err(e))?;
        Ok(())
    }
}

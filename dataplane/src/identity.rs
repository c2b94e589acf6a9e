//! A node's cluster identity, made by `cfs-dataplane init` (a new cluster) or `join` (an
//! existing one) and kept in `data_dir/cluster.toml`: its id, the cluster secret, and the
//! cluster's founding configuration (founding members, replication factor, metadata voters).
//! The founding configuration must be identical on every node: it is the state every replica
//! starts from before replaying the log (see `docs/architecture.md`, "Membership").
//!
//! ```toml
//! node_id = 4
//! secret = "<64 hex digits>"
//! replicas = 3
//! meta_replicas = 3
//! [peers]        # founding members
//! 1 = "10.0.0.1:7411"
//! [domains]      # their failure domains (absent: the id)
//! [members]      # a joined node: the members when it joined (how to reach them at first)
//! 3 = "10.0.0.3:7411"
//! ```

use cfs_fabric::Secret;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name under the data directory.
pub const FILE: &str = "cluster.toml";

/// RPC method of a join request (outside the file-system range). Payload: `bytes addr |
/// bytes domain` (u32 length + bytes each); reply: a [`JoinReply`] as JSON.
pub const JOIN_METHOD: u32 = 0x0100_0003;

/// Errors reading or writing the identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// I/O on the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file does not parse or holds bad values.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// The founding configuration a joining node receives (and `init` writes for itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinReply {
    /// The id the cluster gave the node.
    pub node_id: u64,
    /// Copies of each chunk.
    pub replicas: usize,
    /// Metadata voters.
    pub meta_replicas: usize,
    /// Metadata shards (Raft groups), fixed when the cluster is made.
    #[serde(default = "one_shard")]
    pub meta_shards: u16,
    /// Founding members: id -> address.
    pub peers: BTreeMap<String, String>,
    /// Founding members' failure domains.
    #[serde(default)]
    pub domains: BTreeMap<String, String>,
    /// The members when this node joined: id -> address. Not part of the founding state:
    /// how a joined node reaches its groups' leaders before their logs tell it (the founders
    /// may be gone).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, String>,
}

/// A node's identity (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// This node's id.
    pub node_id: u64,
    /// The cluster secret, hex.
    pub secret: String,
    /// Copies of each chunk.
    pub replicas: usize,
    /// Metadata voters.
    pub meta_replicas: usize,
    /// Metadata shards (Raft groups), fixed when the cluster is made.
    #[serde(default = "one_shard")]
    pub meta_shards: u16,
    /// Founding members: id -> address.
    pub peers: BTreeMap<String, String>,
    /// Founding members' failure domains.
    #[serde(default)]
    pub domains: BTreeMap<String, String>,
    /// The members when this node joined: id -> address. Not part of the founding state:
    /// how a joined node reaches its groups' leaders before their logs tell it (the founders
    /// may be gone).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, String>,
}

fn one_shard() -> u16 {
    1
}

fn ids(m: &BTreeMap<String, String>, path: &Path) -> Result<BTreeMap<u64, String>, IdentityError> {
    m.iter()
        .map(|(k, v)| {
            k.parse::<u64>()
                .ok()
                .filter(|id| *id > 0)
                .map(|id| (id, v.clone()))
                .ok_or_else(|| IdentityError::Invalid {
                    path: path.to_path_buf(),
                    problem: format!("member id {k:?} is not a positive integer"),
                })
        })
        .collect()
}

impl Identity {
    /// Path of the identity file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// Loads the identity, `None` if the node has none.
    pub fn load(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let path = Identity::path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Io { path, source }),
        };
        let id: Identity = toml::from_str(&text).map_err(|e| IdentityError::Invalid {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        let bad = |problem: &str| IdentityError::Invalid {
            path: path.clone(),
            problem: problem.into(),
        };
        if id.node_id == 0 {
            return Err(bad("node_id must be positive"));
        }
        if id.secret_bytes().is_none() {
            return Err(bad("secret must be 64 hex digits"));
        }
        if id.peers_by_id()?.is_empty() {
            return Err(bad("no founding members"));
        }
        if !(1..=cfs_meta::shard::MAX_SHARDS).contains(&id.meta_shards) {
            return Err(bad("meta_shards must be 1 to 64"));
        }
        Ok(Some(id))
    }

    /// Writes the identity durably (temporary file, fsync, rename), refusing to replace one.
    pub fn save_new(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let path = Identity::path(data_dir);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        if path.exists() {
            return Err(IdentityError::Invalid {
                path: path.clone(),
                problem: "this node already belongs to a cluster".into(),
            });
        }
        let text = toml::to_string(self).map_err(|e| IdentityError::Invalid {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        let tmp = data_dir.join(format!("{FILE}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }

    /// The secret's bytes.
    pub fn secret_bytes(&self) -> Option<Secret> {
        cfs_fabric::auth::from_hex(&self.secret)
    }

    /// Founding members by numeric id.
    pub fn peers_by_id(&self) -> Result<BTreeMap<u64, String>, IdentityError> {
        ids(&self.peers, Path::new(FILE))
    }

    /// The members when this node joined, by numeric id.
    pub fn members_by_id(&self) -> Result<BTreeMap<u64, String>, IdentityError> {
        ids(&self.members, Path::new(FILE))
    }

    /// Founding members' domains by numeric id.
    pub fn domains_by_id(&self) -> Result<BTreeMap<u64, String>, IdentityError> {
        ids(&self.domains, Path::new(FILE))
    }
}

/// Encodes a join request.
pub fn encode_join(addr: &str, domain: &str) -> Vec<u8> {
    let mut w = cfs_meta::codec::Writer::default();
    w.bytes(addr.as_bytes());
    w.bytes(domain.as_bytes());
    w.0
}

/// Decodes a join request: (address, domain).
pub fn decode_join(b: &[u8]) -> Option<(String, String)> {
    let mut r = cfs_meta::codec::Reader::new(b);
    let addr = String::from_utf8(r.bytes()?).ok()?;
    let domain = String::from_utf8(r.bytes()?).ok()?;
    r.end()?;
    (!addr.is_empty() && addr.len() <= 256 && domain.len() <= 256).then_some((addr, domain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_saves_loads_and_refuses_a_second_one() {
        let dir = std::env::temp_dir().join(format!("cfs-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = Identity {
            node_id: 2,
            secret: "ab".repeat(32),
            replicas: 3,
            meta_replicas: 3,
            meta_shards: 2,
            peers: [("1".to_string(), "127.0.0.1:1".to_string())].into(),
            domains: BTreeMap::new(),
            members: [("3".to_string(), "127.0.0.1:3".to_string())].into(),
        };
        assert!(Identity::load(&dir).unwrap().is_none());
        id.save_new(&dir).unwrap();
        assert_eq!(Identity::load(&dir).unwrap(), Some(id.clone()));
        assert!(id.save_new(&dir).is_err());
        std::fs::write(Identity::path(&dir), "node_id = 0\nsecret = \"x\"").unwrap();
        assert!(Identity::load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn join_requests_round_trip() {
        let b = encode_join("10.0.0.9:7411", "rack2");
        assert_eq!(
            decode_join(&b),
            Some(("10.0.0.9:7411".into(), "rack2".into()))
        );
        assert_eq!(decode_join(&b[..b.len() - 1]), None);
        assert_eq!(decode_join(&encode_join("", "x")), None);
    }
}

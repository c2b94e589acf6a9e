//! `cfs-dataplane` configuration (TOML). Only `data_dir` is required; everything else has a
//! default that works on any Linux box. Errors name the key and the problem.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory for state: default device files live here.
    pub data_dir: PathBuf,
    /// Devices (files or block devices); default: one 4 GiB file `data_dir/data0.img`.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Reactor threads.
    #[serde(default)]
    pub reactors: ReactorConfig,
    /// Hugepage buffer pool.
    #[serde(default)]
    pub hugepages: HugepageConfig,
    /// Format-time layout.
    #[serde(default)]
    pub format: FormatConfig,
    /// The file-system RPC endpoint.
    #[serde(default)]
    pub server: ServerSection,
    /// Membership of the metadata Raft group; absent, the node runs alone with a local
    /// metadata database.
    #[serde(default)]
    pub cluster: Option<ClusterSection>,
    /// One-sided reads over libfabric (`[rma]`).
    #[serde(default)]
    pub rma: RmaSection,
    /// The object tier (`[tier]`); absent: data stays on flash.
    #[serde(default)]
    pub tier: Option<TierSection>,
}

/// `[tier]`: cold data goes to an S3-compatible store in blobs (see [`crate::tier`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSection {
    /// Endpoint URL ("http://127.0.0.1:9000"); empty: AWS itself for `region`.
    #[serde(default)]
    pub endpoint: String,
    /// Bucket (must exist).
    pub bucket: String,
    /// Region used for signing.
    #[serde(default = "default_region")]
    pub region: String,
    /// Key prefix of this cluster's blobs.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Virtual-hosted addressing (`bucket.endpoint`) instead of path-style.
    #[serde(default)]
    pub virtual_host: bool,
    /// Access key; absent: `AWS_ACCESS_KEY_ID`.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret key; absent: `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Target blob size, KiB (64 MiB by default; a larger chunk gets a blob of its own).
    #[serde(default = "default_blob_kib")]
    pub blob_kib: u64,
    /// Blocks of new blobs carry their own CRC32C, KiB: a read of evicted data fetches the
    /// blocks around it (smaller: less read amplification, a longer table). A power of two
    /// from 4 KiB to 64 MiB; 0 writes blobs without block CRCs (format 1: every read of an
    /// evicted chunk fetches the whole chunk first).
    #[serde(default = "default_block_kib")]
    pub block_kib: u64,
    /// Memory for blocks of evicted data read from the store lately (checked), MiB: reads
    /// smaller than a block and the background restore of the chunk share them. 0: none.
    #[serde(default = "default_read_cache_mib")]
    pub read_cache_mib: u64,
    /// Data not written for this long is flushed.
    #[serde(default = "default_min_age_ms")]
    pub min_age_ms: u64,
    /// Flash use (percent of capacity) above which flushed data is evicted...
    #[serde(default = "default_evict_above")]
    pub evict_above_pct: u8,
    /// ...down to this.
    #[serde(default = "default_evict_to")]
    pub evict_to_pct: u8,
    /// Unflushed data allowed while the store is down before writes are slowed, MiB.
    #[serde(default = "default_reserve_mib")]
    pub reserve_mib: u64,
    /// Past the reserve by this much, writes fail with ENOSPC, MiB.
    #[serde(default = "default_reserve_slack_mib")]
    pub reserve_slack_mib: u64,
    /// Blobs whose live fraction is below this (percent) are rewritten.
    #[serde(default = "default_compact_below")]
    pub compact_below_pct: u8,
    /// Pause between two rounds of the tiering loop.
    #[serde(default = "default_scan_ms")]
    pub scan_interval_ms: u64,
    /// One request to the store may take this long.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Reads and deletes give up after this long (uploads never do).
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Sign each blob's SHA-256 (SigV4) rather than send `UNSIGNED-PAYLOAD` (blobs carry
    /// CRC32Cs checked on every read; signing costs a hash of every byte).
    #[serde(default)]
    pub sign_payload: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_prefix() -> String {
    "cfs".into()
}
fn default_blob_kib() -> u64 {
    64 << 10
}
fn default_block_kib() -> u64 {
    1 << (cfs_objtier::blob::BLOCK_SHIFT - 10)
}
fn default_read_cache_mib() -> u64 {
    64
}
fn default_min_age_ms() -> u64 {
    300_000
}
fn default_evict_above() -> u8 {
    85
}
fn default_evict_to() -> u8 {
    70
}
fn default_reserve_mib() -> u64 {
    8 << 10
}
fn default_reserve_slack_mib() -> u64 {
    1 << 10
}
fn default_compact_below() -> u8 {
    50
}
fn default_scan_ms() -> u64 {
    2_000
}
fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_deadline_ms() -> u64 {
    30_000
}

/// `[cluster]`: a static cluster (this node's id and every founding member's RPC address),
/// or, for a node made by `cfs-dataplane init`/`join` (identity in `data_dir/cluster.toml`),
/// only the timing and policy settings below.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's id (a key of `peers`); not set for an init/join node.
    #[serde(default)]
    pub node_id: Option<u64>,
    /// Every founding member, this node included: id -> "host:port" (its `server.listen`).
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
    /// Cluster secret (64 hex digits) a static cluster's nodes and clients must prove they
    /// know; init/join nodes take it from their identity file.
    #[serde(default)]
    pub secret: Option<String>,
    /// This node's failure domain when it joins (default: its own id).
    #[serde(default)]
    pub domain: Option<String>,
    /// Milliseconds per Raft tick.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Ticks without a leader before an election (randomised up to twice that).
    #[serde(default = "default_election_ticks")]
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    #[serde(default = "default_heartbeat_ticks")]
    pub heartbeat_ticks: usize,
    /// Applied commands between Raft log compactions.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// Milliseconds a metadata change may wait for its commit before the caller gets EIO.
    #[serde(default = "default_propose_timeout_ms")]
    pub propose_timeout_ms: u64,
    /// Milliseconds the leader waits for a member to apply a chunk change before recording its
    /// copy stale (too short and a loaded member looks gone; too long and a cut-off member holds
    /// writes up that long).
    #[serde(default = "default_replica_timeout_ms")]
    pub replica_timeout_ms: u64,
    /// Copies of each chunk (1 to 5; fewer while the cluster has fewer members).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Voters of the metadata Raft group (the lowest ids; other members are learners).
    #[serde(default = "default_meta_replicas")]
    pub meta_replicas: usize,
    /// Metadata shards, each its own Raft group (static clusters; `init --meta-shards` for
    /// others). Fixed when the cluster is made: every node must use the same number.
    #[serde(default = "default_meta_shards")]
    pub meta_shards: u16,
    /// Failure domain of members, id -> name (missing: each node its own domain). Copies of a
    /// chunk go to distinct domains first.
    #[serde(default)]
    pub domains: std::collections::BTreeMap<String, String>,
    /// Milliseconds the leader waits without hearing from a member before removing it for
    /// good (its chunks are re-replicated, its vote handed to a learner). Long by default: a
    /// rebooting node must not cost a full re-replication.
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
    /// Milliseconds a chunk copy this node's namespace no longer gives it (deleted or moved
    /// while the node was away) must look orphaned, twice, before it is deleted.
    #[serde(default = "default_orphan_grace_ms")]
    pub orphan_grace_ms: u64,
    /// How the leader makes reads linearizable: "index" (a quorum round per batch of reads,
    /// no clock assumption) or "lease" (no round while its lease holds; assumes clocks on the
    /// nodes advance at similar rates).
    #[serde(default = "default_read_mode")]
    pub read_mode: String,
}

fn default_read_mode() -> String {
    "index".into()
}

fn default_replica_timeout_ms() -> u64 {
    10_000
}
fn default_replicas() -> usize {
    3
}
fn default_meta_replicas() -> usize {
    3
}
fn default_meta_shards() -> u16 {
    1
}
fn default_dead_after_ms() -> u64 {
    600_000
}
fn default_orphan_grace_ms() -> u64 {
    300_000
}

fn default_tick_ms() -> u64 {
    100
}
fn default_election_ticks() -> usize {
    10
}
fn default_heartbeat_ticks() -> usize {
    2
}
fn default_snapshot_every() -> u64 {
    10_000
}
fn default_propose_timeout_ms() -> u64 {
    10_000
}

impl ClusterSection {
    /// Members by numeric id; errors name the bad key.
    pub fn members(&self) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in &self.peers {
            let id: u64 = k.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                invalid(format!("cluster.peers.{k}"), "ids are positive integers")
            })?;
            if v.is_empty() {
                return Err(invalid(format!("cluster.peers.{k}"), "address is empty"));
            }
            out.insert(id, v.clone());
        }
        Ok(out)
    }

    /// Failure domains by numeric member id.
    pub fn domain_map(&self) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in &self.domains {
            let id: u64 = k.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                invalid(format!("cluster.domains.{k}"), "ids are positive integers")
            })?;
            out.insert(id, v.clone());
        }
        Ok(out)
    }
}

/// Where `cfs-dataplane run` listens.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on for clients ("host:port").
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "127.0.0.1:7411".into()
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: default_listen(),
        }
    }
}

/// One-sided reads over libfabric: clients that negotiate it pull read data from registered
/// staging memory instead of receiving it in the RPC reply.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RmaSection {
    /// "auto": RMA when `provider` opens here, else TCP only; "rma": refuse to start without
    /// it; "tcp": never.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// libfabric provider ("verbs" for InfiniBand/RoCE; "tcp;ofi_rxm" or "sockets" give real
    /// one-sided reads over plain TCP, for tests).
    #[serde(default = "default_provider")]
    pub provider: String,
    /// Registered staging memory for reads in flight (hugepages when reserved), MiB.
    #[serde(default = "default_staging_mib")]
    pub staging_mib: usize,
    /// Bytes per staging buffer (a power of two, 4 KiB to 2 MiB): larger reads go inline.
    #[serde(default = "default_staging_buf_kib")]
    pub staging_buf_kib: usize,
    /// How long staged data stays in place for the client after the answer.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u32,
    /// Reads shorter than this go inline (measured: a 4 KiB RMA read is slower than TCP).
    #[serde(default = "default_min_bytes")]
    pub min_bytes: usize,
}

fn default_transport() -> String {
    "auto".into()
}
fn default_provider() -> String {
    "verbs".into()
}
fn default_staging_mib() -> usize {
    64
}
fn default_staging_buf_kib() -> usize {
    1024
}
fn default_lease_ms() -> u32 {
    2000
}
fn default_min_bytes() -> usize {
    64 << 10
}

impl Default for RmaSection {
    fn default() -> Self {
        RmaSection {
            transport: default_transport(),
            provider: default_provider(),
            staging_mib: default_staging_mib(),
            staging_buf_kib: default_staging_buf_kib(),
            lease_ms: default_lease_ms(),
            min_bytes: default_min_bytes(),
        }
    }
}

/// One device.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Path of a regular file or block device; relative paths are under `data_dir` (driven
    /// with io_uring). Empty when `pci` is given.
    #[serde(default)]
    pub path: PathBuf,
    /// PCI address of an NVMe controller bound to vfio-pci (e.g. "0000:00:02.0"), driven by
    /// our userspace driver; its namespace 1 is the device. Instead of `path`.
    #[serde(default)]
    pub pci: Option<String>,
    /// Size of a file device created by `format` (e.g. "4G"); ignored for block devices.
    #[serde(default = "default_device_size")]
    pub size: String,
}

/// A configured device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A file or block device (path, size of a file `format` creates).
    File(PathBuf, u64),
    /// An NVMe controller bound to vfio-pci.
    Pci(String),
}

/// `DDDD:BB:DD.F` in hex.
fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && s.char_indices()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

fn default_device_size() -> String {
    "4G".into()
}

/// Reactor settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorConfig {
    /// CPU cores to pin one reactor each to.
    #[serde(default = "default_cores")]
    pub cores: Vec<usize>,
    /// Never sleep when idle (dedicates the cores; lowest latency).
    #[serde(default)]
    pub busy_poll: bool,
    /// Idle loop iterations before an idle reactor starts sleeping.
    #[serde(default = "default_idle_spin")]
    pub idle_spin: u32,
    /// Longest idle sleep in microseconds (a new request wakes a sleeping reactor at once).
    #[serde(default = "default_idle_sleep_us")]
    pub idle_sleep_us: u64,
    /// Commands in flight per queue pair.
    #[serde(default = "default_queue_depth")]
    pub queue_depth: u32,
    /// Use io_uring SQPOLL (a kernel thread polls submissions: no syscall per I/O).
    #[serde(default)]
    pub sqpoll: bool,
    /// Capacity of each reactor's inbound message queue.
    #[serde(default = "default_inbox")]
    pub inbox: usize,
    /// Most requests a reactor works on at once (the rest wait in its inbox).
    #[serde(default = "default_max_tasks")]
    pub max_tasks: usize,
}

fn default_cores() -> Vec<usize> {
    vec![0]
}
fn default_idle_spin() -> u32 {
    2000
}
fn default_idle_sleep_us() -> u64 {
    2000
}
fn default_queue_depth() -> u32 {
    128
}
fn default_inbox() -> usize {
    4096
}
fn default_max_tasks() -> usize {
    1024
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            cores: default_cores(),
            busy_poll: false,
            idle_spin: default_idle_spin(),
            idle_sleep_us: default_idle_sleep_us(),
            queue_depth: default_queue_depth(),
            sqpoll: false,
            inbox: default_inbox(),
            max_tasks: default_max_tasks(),
        }
    }
}

/// Buffer pool settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HugepageConfig {
    /// Pool size in MiB, split evenly between reactors.
    #[serde(default = "default_pool_mib")]
    pub pool_mib: usize,
    /// Buffer size in KiB (power of two, 4..=2048).
    #[serde(default = "default_buf_kib")]
    pub buf_kib: usize,
    /// "2M" or "1G".
    #[serde(default = "default_page_size")]
    pub page_size: String,
    /// Refuse to start without hugepages instead of falling back to locked 4 KiB pages.
    #[serde(default)]
    pub require: bool,
}

fn default_pool_mib() -> usize {
    64
}
fn default_buf_kib() -> usize {
    128
}
fn default_page_size() -> String {
    "2M".into()
}

impl Default for HugepageConfig {
    fn default() -> Self {
        HugepageConfig {
            pool_mib: default_pool_mib(),
            buf_kib: default_buf_kib(),
            page_size: default_page_size(),
            require: false,
        }
    }
}

/// Layout chosen by `format`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    /// Shards per device; each is owned by one reactor (shard i -> reactor i mod reactors).
    #[serde(default = "default_shards")]
    pub shards_per_device: u32,
    /// Largest chunk in MiB.
    #[serde(default = "default_max_chunk_mib")]
    pub max_chunk_mib: u64,
    /// Journal blocks (4 KiB) per shard; default scales with the shard.
    #[serde(default)]
    pub journal_blocks: Option<u32>,
}

fn default_shards() -> u32 {
    4
}
fn default_max_chunk_mib() -> u64 {
    64
}

impl Default for FormatConfig {
    fn default() -> Self {
        FormatConfig {
            shards_per_device: default_shards(),
            max_chunk_mib: default_max_chunk_mib(),
            journal_blocks: None,
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// Config path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/mistyped key (the message names it and the line).
    #[error("config {path}: {message}")]
    Parse {
        /// Config path.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// Parses "4G", "512M", "64k", "4096" into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].trim().to_ascii_uppercase();
            let unit = unit
                .strip_suffix("IB")
                .or_else(|| unit.strip_suffix('B'))
                .unwrap_or(&unit)
                .to_string();
            let m: u64 = match unit.as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return None,
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

impl Config {
    /// Defaults for everything but the data directory.
    pub fn with_data_dir(dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: dir.into(),
            devices: Vec::new(),
            reactors: ReactorConfig::default(),
            hugepages: HugepageConfig::default(),
            format: FormatConfig::default(),
            server: ServerSection::default(),
            cluster: None,
            rma: RmaSection::default(),
            tier: None,
        }
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value that the type system does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(c) = &self.cluster {
            let members = c.members()?;
            match c.node_id {
                Some(id) if !members.contains_key(&id) => {
                    return Err(invalid("cluster.node_id", "must be one of cluster.peers"))
                }
                None if !members.is_empty() => {
                    return Err(invalid("cluster.node_id", "needed with cluster.peers"))
                }
                _ => {}
            }
            if let Some(h) = &c.secret {
                if cfs_fabric::auth::from_hex(h).is_none() {
                    return Err(invalid("cluster.secret", "must be 64 hex digits"));
                }
            }
            if c.read_mode != "index" && c.read_mode != "lease" {
                return Err(invalid(
                    "cluster.read_mode",
                    "must be \"index\" or \"lease\"",
                ));
            }
            if !(1..=5).contains(&c.replicas) {
                return Err(invalid("cluster.replicas", "must be 1 to 5"));
            }
            if !(1..=7).contains(&c.meta_replicas) {
                return Err(invalid("cluster.meta_replicas", "must be 1 to 7"));
            }
            if !(1..=cfs_meta::shard::MAX_SHARDS).contains(&c.meta_shards) {
                return Err(invalid("cluster.meta_shards", "must be 1 to 64"));
            }
            c.domain_map()?;
            if c.tick_ms == 0 || c.heartbeat_ticks == 0 || c.heartbeat_ticks >= c.election_ticks {
                return Err(invalid(
                    "cluster",
                    "need tick_ms > 0 and 0 < heartbeat_ticks < election_ticks",
                ));
            }
        }
        if let Some(t) = &self.tier {
            if t.bucket.is_empty() {
                return Err(invalid("tier.bucket", "is empty"));
            }
            if t.blob_kib < 4 {
                return Err(invalid("tier.blob_kib", "must be at least 4"));
            }
            if t.block_kib != 0
                && (!t.block_kib.is_power_of_two() || !(4..=65536).contains(&t.block_kib))
            {
                return Err(invalid(
                    "tier.block_kib",
                    "must be a power of two from 4 to 65536, or 0 (no block CRCs)",
                ));
            }
            if t.evict_to_pct > t.evict_above_pct || t.evict_above_pct > 100 {
                return Err(invalid(
                    "tier.evict_to_pct",
                    "must be at most evict_above_pct, which is at most 100",
                ));
            }
            if t.compact_below_pct > 100 {
                return Err(invalid("tier.compact_below_pct", "is a percentage"));
            }
        }
        let r = &self.rma;
        if !["auto", "rma", "tcp"].contains(&r.transport.as_str()) {
            return Err(invalid(
                "rma.transport",
                "must be \"auto\", \"rma\" or \"tcp\"",
            ));
        }
        if !r.staging_buf_kib.is_power_of_two() || !(4..=2048).contains(&r.staging_buf_kib) {
            return Err(invalid(
                "rma.staging_buf_kib",
                "must be a power of two from 4 to 2048",
            ));
        }
        if r.staging_mib == 0 || r.staging_mib << 10 < r.staging_buf_kib || r.lease_ms == 0 {
            return Err(invalid(
                "rma",
                "need staging_mib of at least one buffer and lease_ms > 0",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        for (i, d) in self.devices.iter().enumerate() {
            match (&d.pci, d.path.as_os_str().is_empty()) {
                (Some(_), false) => {
                    return Err(invalid(
                        format!("devices[{i}]"),
                        "give either `path` (a file or block device) or `pci` (an NVMe controller), not both",
                    ))
                }
                (None, true) => {
                    return Err(invalid(
                        format!("devices[{i}]"),
                        "needs `path` (a file or block device) or `pci` (an NVMe controller)",
                    ))
                }
                (Some(p), true) if !is_pci_address(p) => {
                    return Err(invalid(
                        format!("devices[{i}].pci"),
                        format!("`{p}` is not a PCI address like \"0000:00:02.0\""),
                    ))
                }
                _ => {}
            }
            if parse_size(&d.size).is_none_or(|b| b < 16 << 20) {
                return Err(invalid(
                    format!("devices[{i}].size"),
                    format!("`{}` is not a size of at least 16M (e.g. \"4G\")", d.size),
                ));
            }
        }
        let r = &self.reactors;
        if r.cores.is_empty() {
            return Err(invalid("reactors.cores", "needs at least one core"));
        }
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let max_core = core_affinity::get_core_ids()
            .map(|ids| ids.iter().map(|c| c.id).max().unwrap_or(0))
            .unwrap_or(ncpu - 1);
        for (i, &c) in r.cores.iter().enumerate() {
            if c > max_core {
                return Err(invalid(
                    format!("reactors.cores[{i}]"),
                    format!("core {c} does not exist (highest is {max_core})"),
                ));
            }
            if r.cores[..i].contains(&c) {
                return Err(invalid(
                    format!("reactors.cores[{i}]"),
                    format!("core {c} listed twice"),
                ));
            }
        }
        if !(1..=4096).contains(&r.queue_depth) {
            return Err(invalid(
                "reactors.queue_depth",
                "must be between 1 and 4096",
            ));
        }
        if !(16..=1 << 20).contains(&r.inbox) {
            return Err(invalid("reactors.inbox", "must be between 16 and 1048576"));
        }
        if !(1..=1 << 16).contains(&r.max_tasks) {
            return Err(invalid("reactors.max_tasks", "must be between 1 and 65536"));
        }
        let h = &self.hugepages;
        if !h.buf_kib.is_power_of_two() || !(4..=2048).contains(&h.buf_kib) {
            return Err(invalid(
                "hugepages.buf_kib",
                "must be a power of two between 4 and 2048",
            ));
        }
        if h.pool_mib == 0 {
            return Err(invalid("hugepages.pool_mib", "must be at least 1"));
        }
        if h.pool_mib * 1024 / r.cores.len() < h.buf_kib * 32 {
            return Err(invalid(
                "hugepages.pool_mib",
                format!(
                    "{} MiB leaves fewer than 32 buffers of {} KiB per reactor",
                    h.pool_mib, h.buf_kib
                ),
            ));
        }
        self.page_size()?;
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "server.listen",
                format!(
                    "`{}` is not an address like \"127.0.0.1:7411\"",
                    self.server.listen
                ),
            ));
        }
        let f = &self.format;
        if f.shards_per_device == 0 || f.shards_per_device > 1024 {
            return Err(invalid(
                "format.shards_per_device",
                "must be between 1 and 1024",
            ));
        }
        if f.max_chunk_mib == 0 || f.max_chunk_mib > 1 << 20 {
            return Err(invalid(
                "format.max_chunk_mib",
                "must be between 1 and 1048576",
            ));
        }
        if let Some(j) = f.journal_blocks {
            if j < 512 {
                return Err(invalid("format.journal_blocks", "must be at least 512"));
            }
        }
        Ok(())
    }

    /// The hugepage size.
    pub fn page_size(&self) -> Result<cfs_hugepages::PageSize, ConfigError> {
        match self.hugepages.page_size.to_ascii_uppercase().as_str() {
            "2M" => Ok(cfs_hugepages::PageSize::Huge2M),
            "1G" => Ok(cfs_hugepages::PageSize::Huge1G),
            other => Err(invalid(
                "hugepages.page_size",
                format!("`{other}` is not \"2M\" or \"1G\""),
            )),
        }
    }

    /// The devices in order: files and block devices with paths resolved against `data_dir`
    /// and sizes in bytes, or NVMe controllers by PCI address.
    pub fn device_specs(&self) -> Vec<DeviceSpec> {
        let list = if self.devices.is_empty() {
            vec![DeviceConfig {
                path: "data0.img".into(),
                pci: None,
                size: default_device_size(),
            }]
        } else {
            self.devices.clone()
        };
        list.into_iter()
            .map(|d| match d.pci {
                Some(pci) => DeviceSpec::Pci(pci),
                None => {
                    let p = if d.path.is_absolute() {
                        d.path
                    } else {
                        self.data_dir.join(d.path)
                    };
                    DeviceSpec::File(p, parse_size(&d.size).unwrap_or(4 << 30))
                }
            })
            .collect()
    }

    /// The file and block devices (paths resolved against `data_dir`, sizes in bytes); NVMe
    /// controllers given by PCI address are left out.
    pub fn resolved_devices(&self) -> Vec<(PathBuf, u64)> {
        self.device_specs()
            .into_iter()
            .filter_map(|d| match d {
                DeviceSpec::File(p, size) => Some((p, size)),
                DeviceSpec::Pci(_) => None,
            })
            .collect()
    }

    /// Format parameters.
    pub fn format_params(&self) -> crate::store::FormatParams {
        crate::store::FormatParams {
            shards_per_device: self.format.shards_per_device,
            journal_blocks: self.format.journal_blocks,
            max_chunk_bytes: self.format.max_chunk_mib << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("test.toml"))
    }

    #[test]
    fn nvme_controllers_by_pci_address() {
        let c = parse("data_dir = \"/x\"\n[[devices]]\npci = \"0000:00:02.0\"\n[[devices]]\npath = \"b.img\"\n")
            .unwrap();
        assert_eq!(
            c.device_specs(),
            vec![
                DeviceSpec::Pci("0000:00:02.0".into()),
                DeviceSpec::File("/x/b.img".into(), 4 << 30)
            ]
        );
        // Files only: what damage and the like look at.
        assert_eq!(c.resolved_devices().len(), 1);
        let both = parse("data_dir = \"/x\"\n[[devices]]\npci = \"0000:00:02.0\"\npath = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(both.contains("not both"), "{both}");
        let neither = parse("data_dir = \"/x\"\n[[devices]]\nsize = \"1G\"\n")
            .unwrap_err()
            .to_string();
        assert!(neither.contains("needs `path`"), "{neither}");
        let bad = parse("data_dir = \"/x\"\n[[devices]]\npci = \"00:02.0\"\n")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("not a PCI address"), "{bad}");
    }

    #[test]
    fn minimal_config_is_just_a_data_dir() {
        let c = parse("data_dir = \"/tmp/x\"").unwrap();
        assert_eq!(c.reactors.cores, vec![0]);
        let devs = c.resolved_devices();
        assert_eq!(devs, vec![(PathBuf::from("/tmp/x/data0.img"), 4 << 30)]);
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("data_dir = \"/x\"\n[reactors]\ncores = [0, 999]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("reactors.cores[1]") && e.contains("999"), "{e}");
        let e = parse("data_dir = \"/x\"\n[reactors]\ncorez = [0]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("corez"), "{e}");
        let e = parse("data_dir = \"/x\"\n[[devices]]\npath = \"a\"\nsize = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("devices[0].size"), "{e}");
        let e = parse("[reactors]\n").unwrap_err().to_string();
        assert!(e.contains("data_dir"), "{e}");
        let e = parse("data_dir = \"/x\"\n[hugepages]\nbuf_kib = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hugepages.buf_kib"), "{e}");
        let e = parse("data_dir = \"/x\"\n[hugepages]\npage_size = \"4M\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hugepages.page_size"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Some(4 << 30));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4X"), None);
        assert_eq!(parse_size(""), None);
    }
}

//! `cfs-dataplane`: format and run a ClaudeFS data plane node, plus crash-test and benchmark
//! tools that drive the real engine.

use anyhow::{anyhow, bail, Context, Result};
use cfs_dataplane::config::{Config, DeviceSpec};
use cfs_dataplane::reactor::{self, Engine};
use cfs_nvme::uring::UringDevice;
use cfs_nvme::vfio::VfioNvme;
use cfs_nvme::BlockDevice;
use clap::{Parser, Subcommand};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod bench;

#[derive(Parser)]
#[command(name = "cfs-dataplane", version, about = "ClaudeFS data plane node")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create (if needed) and format the configured devices as a new, empty store.
    Format {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file: all defaults).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overwrite an existing store.
        #[arg(long)]
        force: bool,
    },
    /// Run the data plane until SIGINT/SIGTERM.
    Run {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print store statistics every this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        stats_every: u64,
    },
    /// Print the store's layout and per-shard statistics (the node must not be running).
    Status {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Crash-test load: seeded durable writes, printing `I id chunk first_sector sectors`
    /// before each write and `A id` once it is acknowledged durable.
    Load {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Workload seed.
        #[arg(long)]
        seed: u64,
        /// Operations to issue.
        #[arg(long, default_value_t = 100_000)]
        ops: u64,
        /// Writes in flight.
        #[arg(long, default_value_t = 16)]
        depth: usize,
        /// Id of the first operation (ids must be unique across runs).
        #[arg(long, default_value_t = 1)]
        first_id: u64,
        /// Chunks written.
        #[arg(long, default_value_t = 8)]
        chunks: u64,
        /// Bytes of each chunk written.
        #[arg(long, default_value_t = 1 << 20)]
        span: u64,
    },
    /// Check a stopped store against the output of `load` (its `I`/`A`/`E` lines): every
    /// sector of every chunk must hold the last acknowledged write to it, or (for sectors an
    /// unacknowledged write touched) that write's data; zeros where nothing was written.
    CheckLoad {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The output of `load` (one or more runs, appended).
        #[arg(long)]
        log: PathBuf,
        /// Chunks written (as given to `load`).
        #[arg(long, default_value_t = 8)]
        chunks: u64,
        /// Bytes of each chunk written (as given to `load`).
        #[arg(long, default_value_t = 1 << 20)]
        span: u64,
    },
    /// For tests: through a running node's file-system RPC, create `files` files of `size`
    /// bytes in the root directory with seeded contents and read them back (`--verify-only`:
    /// only read back files an earlier run wrote, e.g. after the node restarted).
    RpcCheck {
        /// Comma-separated node addresses, or a cluster token.
        #[arg(long)]
        server: String,
        /// Files to write and check.
        #[arg(long, default_value_t = 8)]
        files: u32,
        /// Bytes per file.
        #[arg(long, default_value_t = 3 << 20)]
        size: u64,
        /// Only read back and compare.
        #[arg(long)]
        verify_only: bool,
        /// Contents seed (files written with one seed read back only with it).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Overwrite files an earlier run created (one try per request, no retry).
        #[arg(long)]
        overwrite: bool,
    },
    /// List the NVMe controllers on this machine: PCI address, driver, IOMMU group, model and
    /// whether the userspace driver can take them (`[[devices]] pci = "..."`).
    Devices,
    /// Check a stopped node: recover every shard, load and check the namespace, and match the
    /// chunk store's chunks against the files that own them. Exit status 1 if anything is wrong.
    Fsck {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Delete chunks that no file owns (left by a crash between freeing a file and its data).
        #[arg(long)]
        repair: bool,
    },
    /// Create a new cluster with this node as its first member (id 1) and print the join
    /// token other nodes and clients use. The node must be formatted; start it with `run`.
    Init {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address other nodes and clients reach this node at (default: server.listen).
        #[arg(long)]
        advertise: Option<String>,
        /// Copies of each chunk (1 to 5).
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Voters of the metadata Raft group.
        #[arg(long, default_value_t = 3)]
        meta_replicas: usize,
        /// Metadata shards, each its own Raft group (1 to 64; fixed for the cluster's life).
        #[arg(long, default_value_t = 1)]
        meta_shards: u16,
    },
    /// Join the cluster a token names: the cluster gives this node an id and starts moving
    /// chunk copies onto it once it runs. The node must be formatted; start it with `run`.
    Join {
        /// The join token printed by `init`.
        token: String,
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address other nodes and clients reach this node at (default: server.listen).
        #[arg(long)]
        advertise: Option<String>,
    },
    /// Print a join token naming every current member (the one `init` printed names only the
    /// first node): asks this running node for the membership.
    Token {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Check a running cluster's chunk copies byte by byte: asks the leader (found among
    /// `--servers`) where every chunk lives, reads every current copy from its node and
    /// compares them. Exit status 1 if copies differ, a copy is unreadable, or a chunk has
    /// fewer current copies than the cluster wants.
    Verify {
        /// Comma-separated RPC addresses of cluster nodes (any of them), or the join token.
        #[arg(long)]
        servers: String,
    },
    /// Read every current copy of every chunk in full (the leader does it); copies that fail
    /// their checksums are recorded stale and rewritten from a good copy by repair. Prints a
    /// JSON summary; exit status 1 if a bad copy was found.
    Scrub {
        /// Comma-separated RPC addresses of cluster nodes (any of them), or the join token.
        #[arg(long)]
        servers: String,
    },
    /// Testing tool: flip one bit of a stored chunk's data on the device (the node must be
    /// stopped), to check that reads detect it by checksum, use another copy and repair this one.
    Damage {
        /// Config file (TOML).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Data directory (instead of a config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The chunk.
        #[arg(long)]
        chunk: u64,
        /// Byte offset in the chunk whose block is damaged.
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Benchmark the chunk store and fio on the same file.
    Bench(bench::BenchArgs),
}

fn load_config(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<Config> {
    match (config, data_dir) {
        (Some(p), None) => Ok(Config::load(&p)?),
        (None, Some(d)) => {
            let c = Config::with_data_dir(d);
            c.validate()?;
            Ok(c)
        }
        (Some(_), Some(_)) => bail!("give either --config or --data-dir, not both"),
        (None, None) => bail!("give --config FILE or --data-dir DIR"),
    }
}

/// Open devices and the files whose locks keep other processes off them.
type LockedDevices = (Vec<Arc<dyn BlockDevice>>, Vec<File>);

/// Pending write of the crash-test load: (id, chunk, first sector, sectors, result).
type InFlight = (
    u64,
    u64,
    u64,
    u64,
    std::sync::mpsc::Receiver<Result<(), cfs_dataplane::store::StoreError>>,
);

/// Opens the configured devices, holding an exclusive lock on each so two processes can never
/// drive the same store.
pub(crate) fn open_devices(cfg: &Config, create: bool) -> Result<LockedDevices> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    let mut devs: Vec<Arc<dyn BlockDevice>> = Vec::new();
    let mut locks = Vec::new();
    for spec in cfg.device_specs() {
        let (path, size) = match spec {
            DeviceSpec::Pci(pci) => {
                // VFIO lets one process at a time hold the device's group: that is the lock.
                let dev = VfioNvme::open(&pci).with_context(|| {
                    format!("cannot take NVMe controller {pci} (is it bound to vfio-pci? see scripts/nvme-bind)")
                })?;
                devs.push(Arc::new(dev));
                continue;
            }
            DeviceSpec::File(path, size) => (path, size),
        };
        if create && !path.exists() {
            UringDevice::create_file(&path, size)?;
        }
        let lock =
            File::open(&path).with_context(|| format!("cannot open device {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!(
                    "device {} is in use by another cfs-dataplane process",
                    path.display()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock device {}", path.display()))
            }
        }
        locks.push(lock);
        devs.push(Arc::new(UringDevice::open(&path)?));
    }
    Ok((devs, locks))
}

fn random_uuid() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    let mut f = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40; // version 4
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

fn uuid_str(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

pub(crate) fn start_engine(cfg: &Config) -> Result<(Engine, Vec<File>)> {
    let (devs, locks) = open_devices(cfg, false)?;
    let engine = Engine::start(cfg, devs).context("cannot start the data plane")?;
    Ok((engine, locks))
}

fn cmd_format(cfg: &Config, force: bool) -> Result<()> {
    let (devs, _locks) = open_devices(cfg, true)?;
    if !force {
        // Refuse to destroy an existing store by accident.
        if let Ok(e) = Engine::start(cfg, devs.clone()) {
            let uuid = e.layout().uuid();
            drop(e);
            bail!(
                "the devices already hold store {}; pass --force to overwrite it",
                uuid_str(&uuid)
            );
        }
    }
    let uuid = random_uuid()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let layout = reactor::format(cfg, &devs, uuid, now).context("format failed")?;
    println!(
        "formatted store {} on {} device(s):",
        uuid_str(&uuid),
        layout.devices.len()
    );
    for (sb, d) in layout.devices.iter().zip(&devs) {
        println!(
            "  {}: {} MiB, {} shards x {} MiB data, journal {} MiB per shard",
            d.name(),
            (sb.device_blocks * 4096) >> 20,
            sb.shards,
            (u64::from(sb.data_blocks) * 4096) >> 20,
            (u64::from(sb.journal_blocks) * 4096) >> 20
        );
    }
    Ok(())
}

fn cmd_status(cfg: &Config) -> Result<()> {
    let (engine, _locks) = start_engine(cfg)?;
    let l = engine.layout().clone();
    println!(
        "store {}: {} device(s), {} shards, {} reactor(s)",
        uuid_str(&l.uuid()),
        l.devices.len(),
        l.total_shards(),
        engine.reactors()
    );
    let (region, phys) = engine.pool_region();
    println!(
        "buffer pool: {} MiB of {} at {:#x}{}",
        region.len >> 20,
        region.backing,
        region.base,
        if phys {
            " (physical addresses known)"
        } else {
            ""
        }
    );
    println!(
        "{:>6} {:>8} {:>12} {:>12} {:>9}",
        "shard", "chunks", "used MiB", "free MiB", "crc errs"
    );
    for (i, s) in engine.stats()? {
        println!(
            "{i:>6} {:>8} {:>12} {:>12} {:>9}",
            s.chunks,
            (s.live_blocks * 4096) >> 20,
            (s.free_blocks * 4096) >> 20,
            s.checksum_errors
        );
    }
    engine.shutdown()?;
    Ok(())
}

fn cmd_fsck(cfg: &Config, repair: bool) -> Result<()> {
    use cfs_meta::Timespec;
    let (engine, _locks) = start_engine(cfg)?;
    println!(
        "chunk store: every shard recovered (superblocks, checkpoints and journals check out)"
    );
    let db = cfg.data_dir.join("meta.redb");
    if !db.exists() {
        bail!("no metadata database at {}", db.display());
    }
    let (store, ns) = cfs_dataplane::meta_store::MetaStore::open(&db, Timespec::new(0, 0))
        .with_context(|| format!("metadata database {}", db.display()))?;
    if let Some(u) = store.store_uuid()? {
        if u != engine.layout().uuid() {
            bail!(
                "metadata database {} belongs to store {}, not to this store {}",
                db.display(),
                uuid_str(&u),
                uuid_str(&engine.layout().uuid())
            );
        }
    }
    ns.check_invariants()
        .map_err(anyhow::Error::msg)
        .context("namespace check")?;
    let stats = ns.stats();
    let referenced = ns.referenced_chunks();
    println!(
        "namespace: {} inodes, {} bytes in files, {} chunks mapped: link counts, entries, tree and extent map check out",
        stats.inodes,
        stats.bytes,
        referenced.len()
    );
    let chunks = engine.list_chunks()?;
    let orphans: Vec<u64> = chunks
        .iter()
        .copied()
        .filter(|c| !referenced.contains(&cfs_meta::ChunkId(*c)))
        .collect();
    println!(
        "data: {} chunks stored, {} not referenced by any file",
        chunks.len(),
        orphans.len()
    );
    if !orphans.is_empty() {
        if repair {
            for c in &orphans {
                engine
                    .delete(*c)
                    .with_context(|| format!("deleting unreferenced chunk {c:#x}"))?;
            }
            println!("repair: deleted {} unreferenced chunks", orphans.len());
        } else {
            // Expected after a crash (data written, extent not yet committed): harmless, and
            // the server deletes them when it starts.
            println!(
                "note: unreferenced chunks are left by a crash between a data write and its commit; the server deletes them at start (or run fsck --repair)"
            );
        }
    }
    engine.shutdown()?;
    println!("fsck: clean");
    Ok(())
}

fn cmd_run(cfg: &Config, stats_every: u64) -> Result<()> {
    let term = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&term))
            .context("cannot install signal handler")?;
    }
    let (engine, _locks) = start_engine(cfg)?;
    let engine = Arc::new(engine);
    let l = engine.layout().clone();
    let (region, _) = engine.pool_region();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("cfs-rpc")
        .build()
        .context("cannot start the RPC runtime")?;
    let cluster_cfg = effective_cluster(cfg)?;
    let secret = cluster_cfg.as_ref().and_then(|c| c.secret);
    let service = match cluster_cfg {
        None => {
            let db = cfg.data_dir.join("meta.redb");
            cfs_dataplane::fs_service::FsService::open(&db, Arc::clone(&engine))
                .with_context(|| format!("cannot open the metadata database {}", db.display()))?
        }
        Some(cc) => {
            let (node_id, members, shards) = (cc.node_id, cc.peers.len(), cc.meta_shards);
            let fences = Arc::new(cfs_dataplane::replication::Fences::default());
            let mut groups = Vec::with_capacity(usize::from(shards));
            for k in 0..shards {
                // Shard 0 keeps the name a one-shard cluster always had.
                let db = match k {
                    0 => cfg.data_dir.join("raft.redb"),
                    k => cfg.data_dir.join(format!("raft-{k}.redb")),
                };
                let eng = Arc::clone(&engine);
                let fences_freed = Arc::clone(&fences);
                let freed = Box::new(move |chunks: Vec<cfs_meta::ChunkId>| {
                    for ch in chunks {
                        fences_freed.forget(ch);
                        if let Err(e) = eng.delete(ch.0) {
                            if !matches!(e, cfs_dataplane::store::StoreError::NotFound { .. }) {
                                tracing::warn!("cannot delete {ch}: {e}");
                            }
                        }
                    }
                });
                let slot = cfs_meta::shard::ShardSlot::new(k, shards)
                    .context("meta_shards must be 1 to 64")?;
                let group = cfs_dataplane::cluster::Cluster::start(
                    cc.clone(),
                    slot,
                    &db,
                    rt.handle().clone(),
                    freed,
                )
                .with_context(|| {
                    format!(
                        "cannot start the metadata replica of shard {k} ({})",
                        db.display()
                    )
                })?;
                groups.push(group);
            }
            tracing::info!(
                node = node_id,
                founding_members = members,
                shards,
                "metadata Raft group member"
            );
            cfs_dataplane::fs_service::FsService::open_cluster(
                groups,
                Arc::clone(&engine),
                fences,
                rt.handle().clone(),
            )
        }
    };
    service.set_rma(start_rma(cfg, &engine, &service, rt.handle())?);
    let mut tier_handle = None;
    if let Some(t) = &cfg.tier {
        let node = service.cluster().map(|c| c.node_id()).unwrap_or(0);
        let tier = cfs_dataplane::tier::Tier::new(t, node)
            .map_err(|e| anyhow::anyhow!(e))
            .context("cannot set up the object tier ([tier])")?;
        tracing::info!(
            "object tier: blobs of {} KiB to {} bucket {} under {}/",
            t.blob_kib,
            if t.endpoint.is_empty() {
                "AWS"
            } else {
                &t.endpoint
            },
            t.bucket,
            t.prefix
        );
        let tier = Arc::new(tier);
        service.set_tier(Arc::clone(&tier), rt.handle().clone());
        tier_handle = Some(tier);
    }
    let groups = service.groups().to_vec();
    let server = rt
        .block_on(cfs_fabric::Server::bind(
            &cfg.server.listen,
            Arc::new(service),
            cfs_fabric::RegionTable::new(),
            cfs_fabric::ServerConfig {
                secret,
                ..cfs_fabric::ServerConfig::default()
            },
        ))
        .with_context(|| format!("cannot listen on {}", cfg.server.listen))?;
    tracing::info!(
        store = %uuid_str(&l.uuid()),
        devices = l.devices.len(),
        shards = l.total_shards(),
        reactors = engine.reactors(),
        pool = %region.backing,
        listen = %server.local_addr(),
        "cfs-dataplane running"
    );
    println!(
        "cfs-dataplane running: store {} ({} shards, {} reactors, buffers on {}), serving on {}; SIGINT/SIGTERM to stop",
        uuid_str(&l.uuid()),
        l.total_shards(),
        engine.reactors(),
        region.backing,
        server.local_addr()
    );
    let mut last = Instant::now();
    while !term.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if stats_every > 0 && last.elapsed() >= Duration::from_secs(stats_every) {
            last = Instant::now();
            let stats = engine.stats()?;
            let used: u64 = stats.iter().map(|(_, s)| s.live_blocks).sum();
            let chunks: u64 = stats.iter().map(|(_, s)| s.chunks).sum();
            tracing::info!(chunks, used_mib = (used * 4096) >> 20, "store status");
        }
    }
    println!("stopping: closing connections, checkpointing shards");
    if let Some(t) = &tier_handle {
        // The tier loop holds the service; an upload in flight is abandoned (done again later).
        t.stop(Duration::from_secs(5));
    }
    rt.block_on(server.stop());
    for g in &groups {
        g.stop();
    }
    drop(rt);
    // Background work (repair) notices the stop within a second and lets go of the engine.
    let mut engine = engine;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(engine) {
            Ok(e) => {
                e.shutdown()?;
                break;
            }
            Err(e) if Instant::now() < deadline => {
                engine = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(_) => bail!("the engine is still in use at shutdown"),
        }
    }
    println!("stopped cleanly");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_load(
    cfg: &Config,
    seed: u64,
    ops: u64,
    depth: usize,
    first_id: u64,
    chunks: u64,
    span: u64,
) -> Result<()> {
    use cfs_dataplane::workload::{fill_range, SECTOR};
    use cfs_nvme::rng::SimRng;
    let (engine, _locks) = start_engine(cfg)?;
    let mut rng = SimRng::new(seed);
    let sectors = span / SECTOR as u64;
    let mut inflight: Vec<InFlight> = Vec::new();
    let out = std::io::stdout();
    let mut issued = 0u64;
    let mut id = first_id;
    println!("READY");
    while issued < ops || !inflight.is_empty() {
        while issued < ops && inflight.len() < depth {
            let chunk = 1 + rng.below(chunks);
            let start = rng.below(sectors);
            let cap = if rng.chance(1, 8) { 2048 } else { 64 };
            let len = 1 + rng.below((sectors - start).min(cap));
            if inflight
                .iter()
                .any(|&(_, c, s, n, _)| c == chunk && s < start + len && start < s + n)
            {
                continue;
            }
            let mut data = vec![0u8; (len as usize) * SECTOR];
            fill_range(id, start, &mut data);
            writeln!(out.lock(), "I {id} {chunk} {start} {len}")?;
            let rx = engine.write_async(chunk, start * SECTOR as u64, data);
            inflight.push((id, chunk, start, len, rx));
            id += 1;
            issued += 1;
        }
        let mut i = 0;
        let mut progressed = false;
        while i < inflight.len() {
            match inflight[i].4.try_recv() {
                Ok(r) => {
                    let (oid, ..) = inflight.swap_remove(i);
                    match r {
                        Ok(()) => writeln!(out.lock(), "A {oid}")?,
                        Err(e) => writeln!(out.lock(), "E {oid} {e}")?,
                    }
                    progressed = true;
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => i += 1,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => bail!("reactor went away"),
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    engine.shutdown()?;
    println!("DONE");
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CFS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Format {
            config,
            data_dir,
            force,
        } => cmd_format(&load_config(config, data_dir)?, force),
        Cmd::Run {
            config,
            data_dir,
            stats_every,
        } => cmd_run(&load_config(config, data_dir)?, stats_every),
        Cmd::Status { config, data_dir } => cmd_status(&load_config(config, data_dir)?),
        Cmd::Load {
            config,
            data_dir,
            seed,
            ops,
            depth,
            first_id,
            chunks,
            span,
        } => {
            if span % 512 != 0 || span == 0 || chunks == 0 || depth == 0 {
                bail!("--span must be a non-zero multiple of 512; --chunks and --depth non-zero");
            }
            cmd_load(
                &load_config(config, data_dir)?,
                seed,
                ops,
                depth,
                first_id,
                chunks,
                span,
            )
        }
        Cmd::Fsck {
            config,
            data_dir,
            repair,
        } => cmd_fsck(&load_config(config, data_dir)?, repair),
        Cmd::CheckLoad {
            config,
            data_dir,
            log,
            chunks,
            span,
        } => cmd_check_load(&load_config(config, data_dir)?, &log, chunks, span),
        Cmd::RpcCheck {
            server,
            files,
            size,
            verify_only,
            seed,
            overwrite,
        } => cmd_rpc_check(&server, files, size, seed, (verify_only, overwrite)),
        Cmd::Devices => {
            cmd_devices();
            Ok(())
        }
        Cmd::Verify { servers } => cmd_verify(&servers),
        Cmd::Token { config, data_dir } => cmd_token(&load_config(config, data_dir)?),
        Cmd::Scrub { servers } => cmd_scrub(&servers),
        Cmd::Damage {
            config,
            data_dir,
            chunk,
            offset,
        } => cmd_damage(&load_config(config, data_dir)?, chunk, offset),
        Cmd::Init {
            config,
            data_dir,
            advertise,
            replicas,
            meta_replicas,
            meta_shards,
        } => cmd_init(
            &load_config(config, data_dir)?,
            advertise,
            replicas,
            meta_replicas,
            meta_shards,
        ),
        Cmd::Join {
            token,
            config,
            data_dir,
            advertise,
        } => cmd_join(&load_config(config, data_dir)?, &token, advertise),
        Cmd::Bench(args) => bench::run(args),
    }
}

/// The cluster this node serves, from its identity (init/join) or a static `[cluster]`
/// section; `None` for a single node.
fn effective_cluster(cfg: &Config) -> Result<Option<cfs_dataplane::cluster::ClusterConfig>> {
    use cfs_dataplane::identity::Identity;
    let identity = Identity::load(&cfg.data_dir)?;
    let section = match (&cfg.cluster, &identity) {
        (None, None) => return Ok(None),
        (Some(c), Some(_)) if c.node_id.is_some() => bail!(
            "this node has a cluster identity ({}) and the config has a static [cluster] node_id: keep one",
            Identity::path(&cfg.data_dir).display()
        ),
        (Some(c), None) if c.node_id.is_none() => bail!(
            "[cluster] has no node_id and this node has no cluster identity: run `cfs-dataplane init` or `cfs-dataplane join TOKEN` first"
        ),
        (Some(c), _) => c.clone(),
        (None, Some(_)) => toml::from_str("").context("default [cluster] settings")?,
    };
    let known = match &identity {
        Some(id) => id.members_by_id()?,
        None => std::collections::BTreeMap::new(),
    };
    let (node_id, peers, domains, replicas, meta_replicas, meta_shards, secret) = match &identity {
        Some(id) => (
            id.node_id,
            id.peers_by_id()?,
            id.domains_by_id()?,
            id.replicas,
            id.meta_replicas,
            id.meta_shards,
            id.secret_bytes(),
        ),
        None => (
            section.node_id.context("[cluster] node_id")?,
            section.members()?,
            section.domain_map()?,
            section.replicas,
            section.meta_replicas,
            section.meta_shards,
            section
                .secret
                .as_deref()
                .and_then(cfs_fabric::auth::from_hex),
        ),
    };
    let mut addresses = peers.clone();
    addresses.extend(known);
    Ok(Some(cfs_dataplane::cluster::ClusterConfig {
        node_id,
        addresses: cfs_dataplane::cluster::AddressBook::new(addresses),
        peers,
        domains,
        replicas,
        meta_replicas,
        meta_shards,
        secret,
        tick_ms: section.tick_ms,
        election_ticks: section.election_ticks,
        heartbeat_ticks: section.heartbeat_ticks,
        snapshot_every: section.snapshot_every,
        propose_timeout_ms: section.propose_timeout_ms,
        replica_timeout_ms: section.replica_timeout_ms,
        dead_after_ms: section.dead_after_ms,
        orphan_grace_ms: section.orphan_grace_ms,
        lease_reads: section.read_mode == "lease",
    }))
}

fn check_joinable(cfg: &Config) -> Result<()> {
    if cfg.cluster.as_ref().is_some_and(|c| c.node_id.is_some()) {
        bail!("the config has a static [cluster] node_id; init/join is for nodes without one");
    }
    if let Some(id) = cfs_dataplane::identity::Identity::load(&cfg.data_dir)? {
        bail!(
            "this node already belongs to a cluster as node {} ({})",
            id.node_id,
            cfs_dataplane::identity::Identity::path(&cfg.data_dir).display()
        );
    }
    for db in ["raft.redb", "raft-1.redb", "meta.redb"] {
        if cfg.data_dir.join(db).exists() {
            bail!(
                "{} exists: this node already holds a file system; format it anew to make it a cluster member",
                cfg.data_dir.join(db).display()
            );
        }
    }
    if !cfg.data_dir.is_dir() {
        bail!(
            "{} does not exist: run `cfs-dataplane format` first",
            cfg.data_dir.display()
        );
    }
    Ok(())
}

/// See `Cmd::Init`.
fn cmd_init(
    cfg: &Config,
    advertise: Option<String>,
    replicas: usize,
    meta_replicas: usize,
    meta_shards: u16,
) -> Result<()> {
    check_joinable(cfg)?;
    if !(1..=5).contains(&replicas) || !(1..=7).contains(&meta_replicas) {
        bail!("--replicas must be 1 to 5 and --meta-replicas 1 to 7");
    }
    if !(1..=cfs_meta::shard::MAX_SHARDS).contains(&meta_shards) {
        bail!("--meta-shards must be 1 to {}", cfs_meta::shard::MAX_SHARDS);
    }
    let addr = advertise.unwrap_or_else(|| cfg.server.listen.clone());
    if addr.starts_with("0.0.0.0") || addr.starts_with("[::]") {
        bail!("{addr} is not an address others can reach: pass --advertise HOST:PORT");
    }
    let secret = cfs_fabric::auth::random32().context("reading /dev/urandom")?;
    let domain = cfg.cluster.as_ref().and_then(|c| c.domain.clone());
    let id = cfs_dataplane::identity::Identity {
        node_id: 1,
        secret: cfs_fabric::auth::to_hex(&secret),
        replicas,
        meta_replicas,
        meta_shards,
        peers: [("1".to_string(), addr.clone())].into(),
        domains: domain.map(|d| ("1".to_string(), d)).into_iter().collect(),
        members: std::collections::BTreeMap::new(),
    };
    id.save_new(&cfg.data_dir)?;
    let token = cfs_fabric::JoinToken {
        secret,
        addrs: vec![addr],
    };
    eprintln!(
        "new cluster: this node is member 1 (R={replicas}, {meta_replicas} metadata voters, {meta_shards} metadata shard(s)); start it with `cfs-dataplane run`"
    );
    eprintln!("join other nodes with `cfs-dataplane join TOKEN`, mount with `cfs mount TOKEN DIR`; keep the token secret");
    println!("{token}");
    Ok(())
}

/// See `Cmd::Join`.
fn cmd_join(cfg: &Config, token: &str, advertise: Option<String>) -> Result<()> {
    check_joinable(cfg)?;
    let t = cfs_fabric::JoinToken::parse(token)
        .context("not a join token (expected cfs1:<64 hex digits>@host:port[,...])")?;
    let addr = advertise.unwrap_or_else(|| cfg.server.listen.clone());
    if addr.starts_with("0.0.0.0") || addr.starts_with("[::]") {
        bail!("{addr} is not an address others can reach: pass --advertise HOST:PORT");
    }
    let domain = cfg
        .cluster
        .as_ref()
        .and_then(|c| c.domain.clone())
        .unwrap_or_default();
    let ccfg = cfs_fabric::ClientConfig {
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(3),
        secret: Some(t.secret),
        ..cfs_fabric::ClientConfig::default()
    };
    let payload = cfs_dataplane::identity::encode_join(&addr, &domain);
    let give_up = Instant::now() + Duration::from_secs(60);
    let reply = 'asked: loop {
        let mut last = None;
        for server in &t.addrs {
            let c = cfs_fabric::BlockingClient::new(server, ccfg.clone());
            match c.call(cfs_dataplane::identity::JOIN_METHOD, &payload) {
                Ok(b) => break 'asked b,
                Err(e @ cfs_fabric::RpcError::Refused { .. }) => {
                    bail!("{e}")
                }
                Err(cfs_fabric::RpcError::Remote {
                    code: cfs_fabric::ErrorCode::BadRequest,
                    message,
                }) => bail!("{server} refused the join: {message}"),
                Err(e) => last = Some(e),
            }
        }
        if Instant::now() >= give_up {
            bail!(
                "no member of the cluster took the join request: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let r: cfs_dataplane::identity::JoinReply =
        serde_json::from_slice(&reply).context("malformed join reply")?;
    let id = cfs_dataplane::identity::Identity {
        node_id: r.node_id,
        secret: cfs_fabric::auth::to_hex(&t.secret),
        replicas: r.replicas,
        meta_replicas: r.meta_replicas,
        meta_shards: r.meta_shards,
        peers: r.peers,
        domains: r.domains,
        members: r.members,
    };
    id.save_new(&cfg.data_dir)?;
    eprintln!(
        "joined as member {}; start it with `cfs-dataplane run` (chunk copies move onto it once it runs)",
        r.node_id
    );
    println!("{}", r.node_id);
    Ok(())
}

/// Opens the one-sided read path as `[rma]` says: `Err(why)` when the server runs on TCP only
/// (refused with `transport = "rma"`). Its progress is polled by reactor 0.
fn start_rma(
    cfg: &Config,
    engine: &Arc<cfs_dataplane::reactor::Engine>,
    service: &cfs_dataplane::fs_service::FsService,
    rt: &tokio::runtime::Handle,
) -> Result<Result<Arc<cfs_dataplane::rma::RmaServer>, String>> {
    let r = &cfg.rma;
    if r.transport == "tcp" {
        tracing::info!("transport: TCP only ([rma] transport = \"tcp\")");
        return Ok(Err("[rma] transport = \"tcp\"".into()));
    }
    // The endpoint listens where the RPC server does.
    let host = cfg
        .server
        .listen
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or("0.0.0.0")
        .to_string();
    match cfs_dataplane::rma::RmaServer::open(r, &host) {
        Ok(server) => {
            let server = Arc::new(server);
            let polled = Arc::clone(&server);
            // Reactor 0 drives the endpoint and takes request messages; an RPC task runs each
            // (its reply sent from a blocking thread: a send waits for its completion). The
            // task, not the poller, holds the service: the engine (which owns the poller) must
            // not be kept alive by it at shutdown.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(
                cfs_fabric::ofi::Peer,
                cfs_proto::rma::MsgRequest,
            )>(1024);
            let (svc, srv) = (service.clone(), Arc::clone(&server));
            rt.spawn(async move {
                while let Some((peer, req)) = rx.recv().await {
                    let (svc, srv) = (svc.clone(), Arc::clone(&srv));
                    tokio::spawn(async move {
                        let reply = svc.rma_read_request(req.read).await.map_err(|e| e.message);
                        let m = cfs_proto::rma::MsgReply { id: req.id, reply };
                        let _ = tokio::task::spawn_blocking(move || srv.reply(peer, m)).await;
                    });
                }
            });
            let poll = move || {
                let mut work = polled.poll();
                for _ in 0..64 {
                    let Some(r) = polled.next_request() else {
                        break;
                    };
                    work += 1;
                    // Full: dropped, as a lossy link would (the client asks over TCP).
                    let _ = tx.try_send(r);
                }
                work
            };
            engine
                .add_poller(0, poll)
                .context("cannot hand the RMA endpoint to reactor 0")?;
            tracing::info!(
                provider = server.provider(),
                "transport: one-sided reads over RMA for clients that speak {}, TCP for the others",
                server.provider()
            );
            Ok(Ok(server))
        }
        Err(e) if r.transport == "rma" => {
            bail!(
                "[rma] transport = \"rma\" but provider {:?} cannot be used here: {e}",
                r.provider
            )
        }
        Err(e) => {
            let why = format!("provider {:?}: {e}", r.provider);
            tracing::info!("transport: TCP only (no RMA: {why})");
            Ok(Err(why))
        }
    }
}

/// See `Cmd::Scrub`.
fn cmd_scrub(servers: &str) -> Result<()> {
    let (servers, secret) = cfs_fabric::auth::servers_arg(servers).map_err(|e| anyhow!(e))?;
    let cfg = cfs_fabric::ClientConfig {
        request_timeout: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(2),
        secret,
        ..cfs_fabric::ClientConfig::default()
    };
    let client = cfs_fabric::FailoverClient::new(&servers, cfg, Duration::from_secs(30));
    let b = client
        .call(cfs_dataplane::fs_service::SCRUB_METHOD, &[])
        .context("scrub")?;
    let v: serde_json::Value = serde_json::from_slice(&b).context("scrub summary")?;
    println!("{v}");
    if v["bad_copies"].as_u64().unwrap_or(0) > 0
        || v["unreadable_chunks"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    {
        bail!("bad copies found (recorded stale: repair rewrites them)");
    }
    Ok(())
}

/// See `Cmd::CheckLoad`.
fn cmd_check_load(cfg: &Config, log: &std::path::Path, chunks: u64, span: u64) -> Result<()> {
    use cfs_dataplane::workload::{sector_is, SECTOR};
    use std::collections::HashMap;
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    // Writes issued (id -> chunk, first sector, sectors) and which were acknowledged.
    let mut issued: HashMap<u64, (u64, u64, u64)> = HashMap::new();
    let mut acked = std::collections::HashSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["I", id, c, s, n] => {
                issued.insert(id.parse()?, (c.parse()?, s.parse()?, n.parse()?));
            }
            ["A", id] => {
                acked.insert(id.parse::<u64>()?);
            }
            _ => {}
        }
    }
    let sectors = span / SECTOR as u64;
    // Per sector: the last acknowledged write (ids grow in issue order, and writes to the same
    // sector are never in flight together), and any unacknowledged ones after it.
    let mut want: HashMap<(u64, u64), (Option<u64>, Vec<u64>)> = HashMap::new();
    let mut ids: Vec<&u64> = issued.keys().collect();
    ids.sort();
    for id in ids {
        let (c, s, n) = issued[id];
        for sector in s..s + n {
            let e = want.entry((c, sector)).or_default();
            if acked.contains(id) {
                *e = (Some(*id), Vec::new());
            } else {
                e.1.push(*id);
            }
        }
    }
    let (engine, _locks) = start_engine(cfg)?;
    let (mut checked, mut wrong, mut bad) = (0u64, 0u64, Vec::new());
    for chunk in 1..=chunks {
        let data = match engine.read(chunk, 0, span as usize) {
            Ok(d) => d,
            Err(cfs_dataplane::store::StoreError::NotFound { .. }) => vec![0u8; span as usize],
            Err(e) => return Err(e).with_context(|| format!("reading chunk {chunk}")),
        };
        for sector in 0..sectors {
            let bytes = &data[(sector as usize) * SECTOR..(sector as usize + 1) * SECTOR];
            let ok = match want.get(&(chunk, sector)) {
                None => bytes.iter().all(|b| *b == 0),
                Some((last, later)) => {
                    last.map_or_else(
                        || bytes.iter().all(|b| *b == 0),
                        |id| sector_is(id, sector, bytes),
                    ) || later.iter().any(|id| sector_is(*id, sector, bytes))
                }
            };
            checked += 1;
            if !ok {
                wrong += 1;
                if bad.len() < 10 {
                    bad.push(format!("chunk {chunk} sector {sector}"));
                }
            }
        }
    }
    engine.shutdown().context("stopping the store")?;
    if !bad.is_empty() {
        bail!(
            "{wrong} of {checked} sectors wrong, e.g. {}",
            bad.join(", ")
        );
    }
    println!(
        "check-load: {checked} sectors of {chunks} chunks hold the last acknowledged write ({} writes issued, {} acknowledged)",
        issued.len(),
        acked.len()
    );
    Ok(())
}

/// See `Cmd::RpcCheck`.
fn cmd_rpc_check(
    server: &str,
    files: u32,
    size: u64,
    seed: u64,
    (verify_only, overwrite): (bool, bool),
) -> Result<()> {
    use cfs_meta::{Creds, InodeId};
    use cfs_proto::{Reply, Request};
    // Addresses, or a cluster token. A request is sent once: a server that cannot be reached
    // is skipped for the next, one that may have run it is not retried.
    let (servers, secret) = cfs_fabric::auth::servers_arg(server).map_err(|e| anyhow!(e))?;
    if servers.is_empty() {
        bail!("no server address given");
    }
    let client = cfs_fabric::FailoverClient::new(
        &servers,
        cfs_fabric::ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
            secret,
            ..cfs_fabric::ClientConfig::default()
        },
        Duration::from_secs(20),
    );
    let call = |r: Request| -> Result<Reply> {
        let b = client
            .call(r.method(), &r.encode(&Creds::root()))
            .map_err(|e| anyhow!("{server}: {e}"))?;
        Reply::decode(&b).ok_or_else(|| anyhow!("malformed reply"))
    };
    let content = |i: u32, off: u64, len: usize| -> Vec<u8> {
        (0..len as u64)
            .map(|k| {
                let x = (off + k).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ u64::from(i)
                    ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
                (x >> 29) as u8
            })
            .collect()
    };
    const PIECE: u64 = 1 << 20;
    for i in 0..files {
        let name = format!("rpc-check-{i}").into_bytes();
        let ino = if verify_only || overwrite {
            match call(Request::Lookup {
                parent: InodeId::ROOT,
                name,
            })? {
                Reply::Attr(a) => a.ino,
                other => bail!("lookup of file {i}: unexpected reply {other:?}"),
            }
        } else {
            match call(Request::Create {
                parent: InodeId::ROOT,
                name,
                perm: 0o644,
            })? {
                Reply::Attr(a) => a.ino,
                other => bail!("create of file {i}: unexpected reply {other:?}"),
            }
        };
        if !verify_only {
            let mut off = 0;
            while off < size {
                let len = (size - off).min(PIECE) as usize;
                call(Request::Write {
                    ino,
                    offset: off,
                    data: content(i, off, len),
                })?;
                off += len as u64;
            }
            call(Request::Fsync { ino })?;
        }
        let mut off = 0;
        while off < size {
            let len = (size - off).min(PIECE) as u32;
            let got = match call(Request::Read {
                ino,
                offset: off,
                len,
            })? {
                Reply::Data(d) => d,
                other => bail!("read of file {i}: unexpected reply {other:?}"),
            };
            if got != content(i, off, len as usize) {
                bail!(
                    "file {i} differs at offset {off} ({} bytes read)",
                    got.len()
                );
            }
            off += u64::from(len);
        }
    }
    println!(
        "rpc-check: {files} files of {size} bytes {} through {server}",
        if verify_only {
            "read back"
        } else {
            "written, fsync'd and read back"
        }
    );
    Ok(())
}

/// See `Cmd::Devices`.
fn cmd_devices() {
    let list = cfs_nvme::vfio::list_controllers();
    if list.is_empty() {
        println!("no NVMe controllers");
        return;
    }
    println!(
        "{:<14} {:<10} {:>5}  {:<24} usable by cfs-dataplane ([[devices]] pci = ...)",
        "pci", "driver", "group", "model"
    );
    for c in list {
        println!(
            "{:<14} {:<10} {:>5}  {:<24} {}",
            c.pci,
            if c.driver.is_empty() { "-" } else { &c.driver },
            c.iommu_group.map_or("-".to_string(), |g| g.to_string()),
            if c.model.is_empty() { "-" } else { &c.model },
            match c.claimable {
                Ok(()) => "yes".to_string(),
                Err(why) => format!("no: {why}"),
            }
        );
    }
}

/// See `Cmd::Damage`.
fn cmd_damage(cfg: &Config, chunk: u64, offset: u64) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let (engine, locks) = start_engine(cfg)?;
    let at = engine.locate(chunk, offset).context("locating the chunk")?;
    engine.shutdown().context("stopping the store")?;
    drop(locks);
    let Some((device, byte)) = at else {
        bail!("chunk {chunk} has no data at offset {offset} on this node");
    };
    let path = cfg
        .resolved_devices()
        .into_iter()
        .map(|(p, _)| p)
        .find(|p| p.display().to_string() == device)
        .unwrap_or_else(|| PathBuf::from(&device));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // Mid-block, so the block's checksum (not its header) catches it.
    let pos = byte + 1000;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(pos))?;
    f.read_exact(&mut b)?;
    b[0] ^= 0x10;
    f.seek(SeekFrom::Start(pos))?;
    f.write_all(&b)?;
    f.sync_all()?;
    println!(
        "flipped a bit of chunk {chunk} (offset {offset}) at byte {pos} of {}",
        path.display()
    );
    Ok(())
}

/// See `Cmd::Token`.
fn cmd_token(cfg: &Config) -> Result<()> {
    let id = cfs_dataplane::identity::Identity::load(&cfg.data_dir)?
        .context("this node has no cluster identity (made by `init` or `join`)")?;
    let secret = id
        .secret_bytes()
        .context("bad secret in the identity file")?;
    let listen = cfg.server.listen.replace("0.0.0.0", "127.0.0.1");
    let ccfg = cfs_fabric::ClientConfig {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        secret: Some(secret),
        ..cfs_fabric::ClientConfig::default()
    };
    let req = cfs_proto::Request::Status;
    let b = cfs_fabric::BlockingClient::new(&listen, ccfg)
        .call(req.method(), &req.encode(&cfs_meta::Creds::root()))
        .with_context(|| format!("asking the node at {listen} (is it running?)"))?;
    let Some(cfs_proto::Reply::Data(d)) = cfs_proto::Reply::decode(&b) else {
        bail!("unexpected status reply");
    };
    let v: serde_json::Value = serde_json::from_slice(&d)?;
    let addrs: Vec<String> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["addr"].as_str().map(String::from))
        .collect();
    if addrs.is_empty() {
        bail!("the node reports no members");
    }
    println!("{}", cfs_fabric::JoinToken { secret, addrs });
    Ok(())
}

/// See `Cmd::Verify`.
fn cmd_verify(servers: &str) -> Result<()> {
    use cfs_dataplane::replication::{self, ChunkOp, CHUNK_METHOD};
    let cfg = cfs_fabric::ClientConfig {
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(2),
        ..cfs_fabric::ClientConfig::default()
    };
    let (servers, secret) = cfs_fabric::auth::servers_arg(servers).map_err(|e| anyhow!(e))?;
    let cfg = cfs_fabric::ClientConfig { secret, ..cfg };
    let req = cfs_proto::Request::Status;
    let payload = req.encode(&cfs_meta::Creds::root());
    let mut leader = None;
    for addr in &servers {
        let client = cfs_fabric::BlockingClient::new(addr, cfg.clone());
        let Ok(b) = client.call(req.method(), &payload) else {
            continue;
        };
        if let Some(cfs_proto::Reply::Data(d)) = cfs_proto::Reply::decode(&b) {
            let v: serde_json::Value = serde_json::from_slice(&d)?;
            if v["role"] == "leader" {
                leader = Some(v);
                break;
            }
        }
    }
    let v = leader.context("no leader among the servers given")?;
    let addrs: std::collections::BTreeMap<u64, String> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| Some((m["id"].as_u64()?, m["addr"].as_str()?.to_string())))
        .collect();
    let stale: std::collections::BTreeMap<u64, Vec<u64>> = v["stale"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let nodes = s["stale_on"].as_array()?.iter().filter_map(|n| n.as_u64());
            Some((s["chunk"].as_u64()?, nodes.collect()))
        })
        .collect();
    let want = v["effective_replicas"].as_u64().unwrap_or(1) as usize;
    let clients: std::collections::BTreeMap<u64, cfs_fabric::BlockingClient> = addrs
        .iter()
        .map(|(id, a)| (*id, cfs_fabric::BlockingClient::new(a, cfg.clone())))
        .collect();
    let call = |node: u64, chunk: u64, op: ChunkOp| -> Result<Vec<u8>> {
        let c = clients
            .get(&node)
            .with_context(|| format!("no address for member {node}"))?;
        let b = c
            .call(
                CHUNK_METHOD,
                &replication::encode(cfs_meta::ChunkId(chunk), &op, Default::default()),
            )
            .with_context(|| format!("member {node}, chunk {chunk}"))?;
        Ok(b.to_vec())
    };
    let (mut chunks, mut copies, mut bytes, mut problems) = (0u64, 0u64, 0u64, 0u64);
    for entry in v["holders"].as_array().into_iter().flatten() {
        let Some(chunk) = entry[0].as_u64() else {
            continue;
        };
        let holders: Vec<u64> = entry[1]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_u64())
            .filter(|n| !stale.get(&chunk).is_some_and(|s| s.contains(n)))
            .collect();
        chunks += 1;
        if holders.len() < want {
            println!(
                "chunk {chunk}: {} current copies, {want} wanted",
                holders.len()
            );
            problems += 1;
        }
        let mut lens = Vec::new();
        for h in &holders {
            let b = call(*h, chunk, ChunkOp::Len)?;
            lens.push(u64::from_le_bytes(
                b.try_into().map_err(|_| anyhow!("bad length"))?,
            ));
        }
        if lens.windows(2).any(|w| w[0] != w[1]) {
            println!("chunk {chunk}: lengths differ between {holders:?}: {lens:?}");
            problems += 1;
            continue;
        }
        let len = lens.first().copied().unwrap_or(0);
        for (off, n) in replication::copy_pieces(len) {
            let first = call(
                holders[0],
                chunk,
                ChunkOp::Read {
                    offset: off,
                    len: n,
                },
            )?;
            for h in &holders[1..] {
                let other = call(
                    *h,
                    chunk,
                    ChunkOp::Read {
                        offset: off,
                        len: n,
                    },
                )?;
                if other != first {
                    let at = first.iter().zip(&other).position(|(a, b)| a != b);
                    println!(
                        "chunk {chunk}: copy on {h} differs from {} near byte {}",
                        holders[0],
                        off + at.unwrap_or(0) as u64
                    );
                    problems += 1;
                }
            }
        }
        copies += holders.len() as u64;
        bytes += len * holders.len() as u64;
    }
    println!(
        "verified {chunks} chunks, {copies} copies, {} MiB compared: {problems} problems",
        bytes >> 20
    );
    if problems > 0 {
        bail!("{problems} problems found");
    }
    Ok(())
}

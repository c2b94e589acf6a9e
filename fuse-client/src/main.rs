//! `cfs`: the ClaudeFS client. `cfs mount SERVER MOUNTPOINT` mounts a cluster through FUSE;
//! `cfs umount MOUNTPOINT` unmounts it.

#![deny(unsafe_code)]

mod fs;
mod rma;
#[allow(unsafe_code)]
mod sys;
mod tier_cli;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cfs", version, about = "ClaudeFS client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount a ClaudeFS server (runs until unmounted, SIGINT or SIGTERM).
    Mount {
        /// Server address (host:port of a cfs-dataplane), several members of a cluster
        /// separated by commas (the mount moves to another when one cannot be reached), or the
        /// cluster's join token (addresses and the secret a cluster made by `init` requires).
        server: String,
        /// Where to mount.
        mountpoint: PathBuf,
        /// Seconds the kernel may cache attributes and entries. 0 (the default) gives
        /// close-to-open consistency between mounts; more saves round trips but another
        /// mount's changes may be seen that much later.
        #[arg(long, default_value_t = 0.0)]
        cache_ttl: f64,
        /// Seconds a request may take before it fails with EIO (a dead server never hangs
        /// the mount for longer).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// FUSE worker threads: each holds a request for its whole round trip, so this bounds
        /// the requests in flight from this mount.
        #[arg(long, default_value_t = 16)]
        threads: usize,
        /// Kernel readahead for the mount in KiB (the FUSE default is 128).
        #[arg(long, default_value_t = 1024)]
        readahead_kb: u32,
        /// Let the kernel cache writes and flush them in large batches (FUSE writeback
        /// cache). Small writes get much faster; another mount sees them after this one closes
        /// or fsyncs the file (close-to-open still holds), and an fsync is needed for
        /// durability, as on a local disk.
        #[arg(long)]
        writeback_cache: bool,
        /// How file data is read: "auto" (one-sided RMA reads from servers that speak
        /// --rma-provider, TCP from the others), "rma" (refuse to mount without it), "tcp".
        #[arg(long, default_value = "auto")]
        transport: String,
        /// libfabric provider for RMA reads ("verbs" on InfiniBand/RoCE; "tcp;ofi_rxm" or
        /// "sockets" give real one-sided reads over plain TCP).
        #[arg(long, default_value = "verbs")]
        rma_provider: String,
    },
    /// Show each server's view of the cluster: role, term, applied index, stale chunk copies
    /// (the repair backlog) and store usage.
    Status {
        /// One or more servers, separated by commas, or the cluster's join token.
        servers: String,
        /// Print each server's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve paths to inode numbers without a mount, by speculative parallel lookups: each
    /// round sends every lookup the entry cache can guess at once, each to the leader of its
    /// shard, and validates the answers in order (a warm path takes one round trip). Paths
    /// are resolved in order with one cache; prints `PATH ino=N rounds=R`. Symlinks are not
    /// followed (like lstat).
    Resolve {
        /// One or more servers, separated by commas, or the cluster's join token.
        servers: String,
        /// Absolute paths inside the file system.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// The object tier: what is on flash and on the object store, flush now, pin files.
    Tier {
        #[command(subcommand)]
        cmd: TierCmd,
    },
    /// Unmount a ClaudeFS mount point.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
}

#[derive(Subcommand)]
enum TierCmd {
    /// Bytes on flash and on the object store, the flush queue, the store's health.
    Status {
        /// One or more servers, separated by commas, or the cluster's join token.
        servers: String,
        /// Print each server's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Flush everything not yet on the object store, whatever its age.
    Flush {
        /// One or more servers, separated by commas, or the cluster's join token.
        servers: String,
        /// Wait until it is done, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Keep files on flash: still copied to the object store, never evicted.
    Pin {
        /// Files in a ClaudeFS mount.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Remove the pin instead.
        #[arg(long)]
        unpin: bool,
    },
}

fn umount(mountpoint: &std::path::Path) -> Result<()> {
    for cmd in [["fusermount3", "-u"], ["umount", ""]] {
        let mut c = std::process::Command::new(cmd[0]);
        if !cmd[1].is_empty() {
            c.arg(cmd[1]);
        }
        if let Ok(st) = c.arg(mountpoint).status() {
            if st.success() {
                return Ok(());
            }
        }
    }
    bail!("cannot unmount {}", mountpoint.display())
}

/// Sets the mount's readahead through its backing-device entry in sysfs (root only; a failure
/// only costs sequential read speed, so it is a warning).
fn set_readahead(mountpoint: &std::path::Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = md.dev();
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        tracing::warn!("cannot set readahead via {path}: {e}");
    }
}

/// One server's status answer (JSON).
fn status_of(addr: &str, cfg: &cfs_fabric::ClientConfig) -> Result<serde_json::Value> {
    let req = cfs_proto::Request::Status;
    let client = cfs_fabric::BlockingClient::new(addr, cfg.clone());
    let b = client.call(req.method(), &req.encode(&cfs_meta::Creds::root()))?;
    match cfs_proto::Reply::decode(&b) {
        Some(cfs_proto::Reply::Data(d)) => Ok(serde_json::from_slice(&d)?),
        _ => bail!("unexpected reply"),
    }
}

/// The member addresses a status answer names (none for a single server).
fn member_addrs(v: &serde_json::Value) -> Vec<String> {
    v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["addr"].as_str().map(String::from))
        .collect()
}

/// The given servers plus every member the first one answering names, the leader it knows of
/// first (requests sent there need no forwarding hop): a mount given one address or a token
/// keeps working when that node dies.
fn discover(addrs: &[String], cfg: &cfs_fabric::ClientConfig) -> Vec<String> {
    let mut out = addrs.to_vec();
    for a in addrs {
        if let Ok(v) = status_of(a, cfg) {
            for m in member_addrs(&v) {
                if !out.contains(&m) {
                    out.push(m);
                }
            }
            let leader = v["leader"].as_u64().and_then(|l| {
                v["members"]
                    .as_array()?
                    .iter()
                    .find(|m| m["id"].as_u64() == Some(l))?["addr"]
                    .as_str()
                    .map(String::from)
            });
            if let Some(pos) = leader.and_then(|l| out.iter().position(|x| *x == l)) {
                let l = out.remove(pos);
                out.insert(0, l);
            }
            break;
        }
    }
    out
}

fn status(servers: &str, json: bool) -> Result<()> {
    let cfg = cfs_fabric::ClientConfig {
        request_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(1),
        ..cfs_fabric::ClientConfig::default()
    };
    let (servers, secret) =
        cfs_fabric::auth::servers_arg(servers).map_err(|e| anyhow::anyhow!(e))?;
    let cfg = cfs_fabric::ClientConfig { secret, ..cfg };
    let mut reachable = 0;
    let mut transports = Vec::new();
    let mut leader_view: Option<serde_json::Value> = None;
    if !json {
        println!(
            "{:<22} {:<10} {:>6} {:>7} {:>9} {:>8} {:>10} {:>10}",
            "server", "role", "node", "term", "applied", "chunks", "used MiB", "stale"
        );
    }
    // Members the answers name are asked too: one address (or the token's) shows the cluster.
    let mut servers = servers;
    let mut i = 0;
    while i < servers.len() && i < 64 {
        let addr = servers[i].clone();
        i += 1;
        let v = match status_of(&addr, &cfg) {
            Ok(v) => {
                for a in member_addrs(&v) {
                    if !servers.contains(&a) {
                        servers.push(a);
                    }
                }
                Ok(v)
            }
            Err(e) => Err(e),
        };
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                println!("{addr:<22} unreachable: {e}");
                continue;
            }
        };
        reachable += 1;
        if json {
            println!("{addr} {v}");
            continue;
        }
        let g = |k: &str| {
            v.get(k)
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into())
        };
        let store = |k: &str| v["store"].get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        let role = v.get("role").and_then(|r| r.as_str()).unwrap_or("single");
        transports.push((addr.clone(), v["transport"].clone()));
        if role == "leader" {
            leader_view = Some(v.clone());
        }
        println!(
            "{addr:<22} {role:<10} {:>6} {:>7} {:>9} {:>8} {:>10} {:>10}",
            g("node"),
            g("term"),
            g("applied"),
            store("chunks"),
            store("used_bytes") >> 20,
            g("stale_chunk_copies"),
        );
    }
    if reachable == 0 {
        bail!("no server answered");
    }
    println!();
    for (addr, t) in &transports {
        println!("{addr:<22} reads over {}", transport_line(t));
    }
    if let Some(v) = leader_view {
        print_cluster(&v);
    }
    Ok(())
}

/// A server's transports as `cfs status` prints them.
fn transport_line(t: &serde_json::Value) -> String {
    let r = &t["rma"];
    if r.is_null() {
        return format!("TCP only ({})", t["tcp_only"].as_str().unwrap_or("-"));
    }
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    format!(
        "RMA ({}, requests {}) and TCP: {} reads staged ({} MiB), {} inline, {} leases expired, {} client hellos",
        r["provider"].as_str().unwrap_or("?"),
        if r["request_messages"] == true {
            "as fabric messages"
        } else {
            "over TCP"
        },
        n("reads_staged"),
        n("bytes_staged") >> 20,
        n("reads_inline"),
        n("leases_expired"),
        n("hellos"),
    )
}

/// The cluster as the leader sees it: members, replication, chunk health, rebuild progress.
fn print_cluster(v: &serde_json::Value) {
    println!();
    println!(
        "{:<6} {:<22} {:<10} {:<8} {:>10}",
        "member", "address", "domain", "raft", "silent ms"
    );
    for m in v["members"].as_array().into_iter().flatten() {
        println!(
            "{:<6} {:<22} {:<10} {:<8} {:>10}",
            m["id"],
            m["addr"].as_str().unwrap_or("-"),
            m["domain"].as_str().unwrap_or("-"),
            m["raft"].as_str().unwrap_or("-"),
            m["silent_ms"]
                .as_u64()
                .map_or_else(|| "-".to_string(), |x| x.to_string()),
        );
    }
    // Every shard's Raft group has the same members (shard 0's membership, mirrored).
    let count = |role: &str| {
        v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["raft"] == role)
            .count()
    };
    let shards = v["shards"].as_array().cloned().unwrap_or_default();
    println!(
        "metadata shards: {} ({} voters, {} learners each)",
        shards.len().max(1),
        count("voter"),
        count("learner"),
    );
    for s in &shards {
        println!(
            "  shard {}: leader node {}, term {}, applied {}{}",
            s["shard"],
            s["leader"],
            s["term"],
            s["applied"],
            if s["transactions_idle"] == false {
                ", transactions in flight"
            } else {
                ""
            }
        );
    }
    if let Some(r) = v["removed"].as_array().filter(|r| !r.is_empty()) {
        let ids: Vec<String> = r.iter().map(|x| x.to_string()).collect();
        println!("removed members: {}", ids.join(", "));
    }
    let c = &v["chunks"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    println!(
        "chunks: {} with {} copies wanted ({} configured); under-replicated {}, stale copies {}, moves pending {}, lost {}",
        n("total"),
        v["effective_replicas"],
        v["replicas"],
        n("under_replicated"),
        n("stale_copies"),
        n("misplaced"),
        n("lost"),
    );
    if n("under_replicated") + n("misplaced") + n("stale_copies") == 0 {
        println!("rebuild: idle, every chunk has its copies");
    } else {
        println!(
            "rebuild: in progress ({} chunks short of copies, {} to move)",
            n("under_replicated"),
            n("misplaced")
        );
    }
}

/// See `Cmd::Resolve`.
fn resolve(servers: &str, paths: &[String]) -> Result<()> {
    use cfs_proto::resolve::{EntryCache, Lookup};
    let (addrs, secret) = cfs_fabric::auth::servers_arg(servers).map_err(|e| anyhow::anyhow!(e))?;
    let cfg = cfs_fabric::ClientConfig {
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        secret,
        ..cfs_fabric::ClientConfig::default()
    };
    let addrs = discover(&addrs, &cfg);
    let client = cfs_fabric::FailoverClient::new(&addrs, cfg, Duration::from_secs(20));
    let router = fs::Router::default();
    if let Err(e) = router.refresh(&client) {
        tracing::info!("no shard routes ({e}); lookups go through any member");
    }
    let creds = cfs_meta::Creds::root();
    let lookup = |l: &Lookup| -> Result<cfs_meta::InodeId, String> {
        let req = cfs_proto::Request::Lookup {
            parent: l.parent,
            name: l.name.clone(),
        };
        let payload = req.encode(&creds);
        let r = match router.leader_for(&req) {
            Some(i) => client.call_at(i, req.method(), &payload),
            None => client.call(req.method(), &payload),
        };
        match r {
            Ok(b) => match cfs_proto::Reply::decode(&b) {
                Some(cfs_proto::Reply::Attr(a)) => Ok(a.ino),
                _ => Err("unexpected reply".into()),
            },
            Err(cfs_fabric::RpcError::Remote {
                code: cfs_fabric::ErrorCode::Service(c),
                message,
            }) if cfs_proto::errno_of_code(c).is_some() => Err(message),
            Err(e) => Err(e.to_string()),
        }
    };
    let mut cache = EntryCache::new(4096);
    let mut failed = false;
    for p in paths {
        let r = cfs_proto::resolve::resolve(p.as_bytes(), &mut cache, |plan| {
            // The round's lookups at once, one thread each (a path has few components).
            std::thread::scope(|s| {
                let hs: Vec<_> = plan.iter().map(|l| s.spawn(|| lookup(l))).collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("lookup thread panicked".into()))
                    })
                    .collect()
            })
        });
        match r {
            Ok(Ok((ino, rounds))) => println!("{p} ino={} rounds={rounds}", ino.0),
            Ok(Err(e)) => {
                failed = true;
                println!("{p} error: {e}");
            }
            Err(e) => {
                failed = true;
                println!("{p} error: {e}");
            }
        }
    }
    if failed {
        bail!("some paths did not resolve");
    }
    Ok(())
}

/// Sets up the RMA read path as `--transport` says: the client (if any) and what the mount
/// reads over, for the log.
fn start_rma(
    client: &cfs_fabric::FailoverClient,
    transport: &str,
    provider: &str,
    threads: usize,
) -> Result<(Option<Arc<rma::RmaClient>>, String)> {
    if transport == "tcp" {
        return Ok((None, "TCP (--transport tcp)".into()));
    }
    let first = client.current();
    let addr = client.addr(first).unwrap_or_default().to_string();
    let r = match rma::RmaClient::open(provider, &addr, threads) {
        Ok(r) => r,
        Err(e) if transport == "rma" => {
            bail!("--transport rma: the RMA provider {provider:?} cannot be used here: {e}")
        }
        Err(e) => {
            tracing::info!("reads over TCP: RMA provider {provider:?} unavailable: {e}");
            return Ok((None, format!("TCP (no RMA provider {provider:?} here)")));
        }
    };
    match r.hello(client, first) {
        Ok(p) => {
            tracing::info!("reads over RMA ({p}) from {addr}");
            Ok((Some(Arc::new(r)), format!("RMA ({p})")))
        }
        Err(why) if transport == "rma" => {
            bail!("--transport rma: {addr} does not read over RMA: {why}")
        }
        Err(why) => {
            // Other servers may speak it: each is asked on first use.
            tracing::info!("reads from {addr} over TCP: {why}");
            Ok((Some(Arc::new(r)), format!("TCP ({addr}: {why})")))
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CFS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Umount { mountpoint } => umount(&mountpoint),
        Cmd::Status { servers, json } => status(&servers, json),
        Cmd::Resolve { servers, paths } => resolve(&servers, &paths),
        Cmd::Tier { cmd } => match cmd {
            TierCmd::Status { servers, json } => tier_cli::status(&servers, json),
            TierCmd::Flush {
                servers,
                wait,
                timeout,
            } => tier_cli::flush(&servers, wait, timeout),
            TierCmd::Pin { paths, unpin } => tier_cli::pin(&paths, unpin),
        },
        Cmd::Mount {
            server,
            mountpoint,
            cache_ttl,
            timeout,
            threads,
            readahead_kb,
            writeback_cache,
            transport,
            rma_provider,
        } => {
            if !["auto", "rma", "tcp"].contains(&transport.as_str()) {
                bail!("--transport must be auto, rma or tcp");
            }
            if !(0.0..=3600.0).contains(&cache_ttl) {
                bail!("--cache-ttl must be between 0 and 3600 seconds");
            }
            let (addrs, secret) =
                cfs_fabric::auth::servers_arg(&server).map_err(|e| anyhow::anyhow!(e))?;
            // The token's secret never goes into the mount table: name the addresses only.
            let server = addrs.join(",");
            let total = Duration::from_secs(timeout.max(1));
            let quick = cfs_fabric::ClientConfig {
                request_timeout: Duration::from_secs(3),
                connect_timeout: Duration::from_secs(1),
                secret,
                ..cfs_fabric::ClientConfig::default()
            };
            let addrs = discover(&addrs, &quick);
            let cfg = cfs_fabric::ClientConfig {
                request_timeout: total,
                // With several members (given or discovered), a dead one costs at most a
                // second before the next is tried.
                connect_timeout: if addrs.len() > 1 {
                    total.min(Duration::from_secs(1))
                } else {
                    total
                },
                secret,
                ..cfs_fabric::ClientConfig::default()
            };
            let client = Arc::new(cfs_fabric::FailoverClient::new(&addrs, cfg, total));
            client
                .ping()
                .with_context(|| format!("cannot reach the server at {server}"))?;
            // Shard leaders: learned now, then refreshed every second (one small request) so
            // requests keep going straight to their shard's leader as leadership moves.
            let router = Arc::new(fs::Router::default());
            if let Err(e) = router.refresh(&client) {
                tracing::info!("no shard routes yet ({e}); requests go through any member");
            }
            {
                let (client, router) = (Arc::clone(&client), Arc::clone(&router));
                std::thread::Builder::new()
                    .name("cfs-routes".into())
                    .spawn(move || loop {
                        std::thread::sleep(Duration::from_secs(1));
                        if let Err(e) = router.refresh(&client) {
                            tracing::debug!("refreshing shard routes: {e}");
                        }
                    })
                    .context("cannot start the route refresher")?;
            }
            let session_id = u64::from_le_bytes(
                cfs_fabric::auth::random32().context("reading /dev/urandom")?[..8]
                    .try_into()
                    .context("session id")?,
            );
            let (rma, reads_over) = start_rma(&client, &transport, &rma_provider, threads.max(1))?;
            let counters = rma.as_ref().map(|r| Arc::clone(&r.counters));
            let fs = fs::CfsFs::new(
                client,
                router,
                fs::FsOptions {
                    cache_ttl: Duration::from_secs_f64(cache_ttl),
                    writeback_cache,
                },
                session_id,
                rma,
            );
            let mut config = fuser::Config::default();
            config.mount_options = vec![
                fuser::MountOption::FSName(format!("cfs:{server}")),
                fuser::MountOption::Subtype("cfs".into()),
                fuser::MountOption::Dev,
                fuser::MountOption::Suid,
                fuser::MountOption::RW,
            ];
            config.acl = fuser::SessionACL::All;
            config.n_threads = Some(threads.max(1));
            let session = fuser::spawn_mount(fs, &mountpoint, &config)
                .with_context(|| format!("cannot mount on {}", mountpoint.display()))?;
            set_readahead(&mountpoint, readahead_kb);
            println!(
                "mounted cfs:{server} on {} (reads over {reads_over})",
                mountpoint.display()
            );
            let term = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, Arc::clone(&term))
                    .context("cannot install signal handler")?;
            }
            while !term.load(Ordering::Relaxed) && !session.guard.is_finished() {
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(c) = counters {
                println!(
                    "RMA reads: {} ({} bytes), {} answered inline, {} requests as fabric messages, {} fell back to TCP",
                    c.rma_reads.load(Ordering::Relaxed),
                    c.rma_bytes.load(Ordering::Relaxed),
                    c.inline.load(Ordering::Relaxed),
                    c.messages.load(Ordering::Relaxed),
                    c.failed.load(Ordering::Relaxed)
                );
            }
            if term.load(Ordering::Relaxed) {
                session.umount_and_join().context("unmount failed")?;
                println!("unmounted {}", mountpoint.display());
            } else {
                session.join().context("FUSE session ended with an error")?;
            }
            Ok(())
        }
    }
}

//! `cfs tier`: the object tier's status, flushing on demand, pinning files to flash.

use anyhow::{bail, Context, Result};
use std::time::Duration;

/// RPC method of tier requests (the server's `cfs_dataplane::tier::TIER_METHOD`).
const TIER_METHOD: u32 = 0x0100_0020;
/// The extended attribute a pinned file carries (the server's `PIN_XATTR`).
const PIN_XATTR: &str = "user.cfs.pin";

/// Every reachable server's answer to a tier request (members named by the first answer's
/// status are asked too).
fn ask_all(servers: &str, op: &str) -> Result<Vec<(String, serde_json::Value)>> {
    let (addrs, secret) = cfs_fabric::auth::servers_arg(servers).map_err(|e| anyhow::anyhow!(e))?;
    let cfg = cfs_fabric::ClientConfig {
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(1),
        secret,
        ..cfs_fabric::ClientConfig::default()
    };
    let addrs = crate::discover(&addrs, &cfg);
    let body = serde_json::json!({ "op": op }).to_string();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for a in addrs {
        let client = cfs_fabric::BlockingClient::new(&a, cfg.clone());
        match client.call(TIER_METHOD, body.as_bytes()) {
            Ok(b) => out.push((
                a.clone(),
                serde_json::from_slice(&b).with_context(|| format!("answer of {a}"))?,
            )),
            Err(e) => errors.push(format!("{a}: {e}")),
        }
    }
    if out.is_empty() {
        bail!("no server answered: {}", errors.join("; "));
    }
    for e in errors {
        eprintln!("warning: {e}");
    }
    Ok(out)
}

fn sum(v: &[(String, serde_json::Value)], k: &str) -> u64 {
    v.iter()
        .map(|(_, x)| x["stats"][k].as_u64().unwrap_or(0))
        .sum()
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

/// `cfs tier status`.
pub fn status(servers: &str, json: bool) -> Result<()> {
    let v = ask_all(servers, "status")?;
    if json {
        for (a, x) in &v {
            println!("{a} {x}");
        }
        return Ok(());
    }
    let store = &v[0].1["store"];
    println!(
        "object store: {} bucket {} prefix {}/",
        store["endpoint"].as_str().unwrap_or("AWS"),
        store["bucket"].as_str().unwrap_or("?"),
        store["prefix"].as_str().unwrap_or("")
    );
    println!(
        "on flash:        {} ({} unflushed in {} chunks, oldest unflushed write {:.0} s ago)",
        mib(sum(&v, "flash_bytes")),
        mib(sum(&v, "unflushed_bytes")),
        sum(&v, "unflushed_chunks"),
        v.iter()
            .map(|(_, x)| x["stats"]["oldest_unflushed_ms"].as_u64().unwrap_or(0))
            .max()
            .unwrap_or(0) as f64
            / 1000.0
    );
    println!(
        "on object store: {} in {} blobs ({} evicted from flash; {} blobs being deleted)",
        mib(sum(&v, "store_bytes")),
        sum(&v, "blobs"),
        mib(sum(&v, "evicted_bytes")),
        sum(&v, "blobs_deleting")
    );
    let mut missing = 0;
    for (a, x) in &v {
        let s = &x["store"];
        missing += s["missing_blobs"].as_u64().unwrap_or(0);
        println!(
            "{a:<22} node {:>3}: {} PUTs, {} GETs, {} retries, {} evictions, {} reads from the store ({}), {} from the read cache, {} chunks back on flash ({}), {} compactions, {} DELETEs, store {}{}",
            x["node"],
            s["puts"],
            s["gets"],
            s["retries"],
            x["stats"]["evictions"],
            x["stats"]["store_reads"],
            mib(x["stats"]["store_read_bytes"].as_u64().unwrap_or(0)),
            x["stats"]["cache_reads"],
            x["stats"]["restores"],
            mib(x["stats"]["restore_bytes"].as_u64().unwrap_or(0)),
            x["stats"]["compactions"],
            x["stats"]["blobs_deleted"],
            if s["breaker_open"].as_bool().unwrap_or(false) {
                "DOWN (backing off)"
            } else if s["failing"].as_bool().unwrap_or(false) {
                "FAILING (retrying)"
            } else {
                "up"
            },
            s["last_error"]
                .as_str()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    if missing > 0 {
        bail!("{missing} blob(s) MISSING on the object store: data the index points at is gone (see the servers' logs)");
    }
    Ok(())
}

/// `cfs tier flush [--wait]`.
pub fn flush(servers: &str, wait: bool, timeout_s: u64) -> Result<()> {
    let v = ask_all(servers, "flush")?;
    let start: Vec<(String, u64)> = v
        .iter()
        .map(|(a, x)| (a.clone(), x["stats"]["rounds"].as_u64().unwrap_or(0)))
        .collect();
    let total = sum(&v, "unflushed_bytes").max(1);
    println!("flush asked on {} server(s)", v.len());
    if !wait {
        return Ok(());
    }
    let give_up = std::time::Instant::now() + Duration::from_secs(timeout_s);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let v = ask_all(servers, "status")?;
        let done = start.iter().all(|(a, r0)| {
            v.iter().any(|(b, x)| {
                b == a
                    && x["flush_asked"].as_u64() == Some(0)
                    && x["stats"]["rounds"].as_u64().unwrap_or(0) > *r0
            })
        });
        let left = sum(&v, "unflushed_bytes");
        let pct = 100u64.saturating_sub(left.min(total) * 100 / total);
        let bar: String = (0..40)
            .map(|i| if i * 100 / 40 < pct { '#' } else { '.' })
            .collect();
        let err = v
            .iter()
            .find_map(|(_, x)| {
                let down = x["store"]["breaker_open"].as_bool().unwrap_or(false)
                    || x["store"]["failing"].as_bool().unwrap_or(false);
                x["store"]["last_error"].as_str().filter(|_| down)
            })
            .map(|e| format!("  store down: {e}"))
            .unwrap_or_default();
        eprint!("\r[{bar}] {pct:>3}% {} left{err}   ", mib(left));
        if done {
            eprintln!();
            println!(
                "flushed: {} on the object store",
                mib(sum(&v, "store_bytes"))
            );
            return Ok(());
        }
        if std::time::Instant::now() >= give_up {
            eprintln!();
            bail!(
                "flush not finished after {timeout_s} s ({} left)",
                mib(left)
            );
        }
    }
}

/// `cfs tier pin PATH...` / `--unpin`.
pub fn pin(paths: &[std::path::PathBuf], unpin: bool) -> Result<()> {
    for p in paths {
        if unpin {
            crate::sys::remove_xattr(p, PIN_XATTR)
        } else {
            crate::sys::set_xattr(p, PIN_XATTR, b"1")
        }
        .with_context(|| format!("{}: is it a file in a ClaudeFS mount?", p.display()))?;
        println!(
            "{} {}",
            p.display(),
            if unpin { "unpinned" } else { "pinned to flash" }
        );
    }
    Ok(())
}

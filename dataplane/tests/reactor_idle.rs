//! Reactor behaviour on the real engine (memory device): an idle reactor backs off and does not
//! burn its core unless `busy_poll` says so, and a message wakes a sleeping reactor. Alone in
//! its test binary because it measures the process's CPU time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::config::Config;
use cfs_dataplane::reactor::{self, Engine};
use cfs_nvme::mem::MemDevice;
use cfs_nvme::BlockDevice;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn cpu_secs() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn engine(busy: bool, cores: &str) -> Engine {
    let text = format!(
        "data_dir = \"/nonexistent\"\n[reactors]\ncores = {cores}\nbusy_poll = {busy}\nidle_spin = 100\nidle_sleep_us = 5000\n[hugepages]\npool_mib = 8\nbuf_kib = 64\n[format]\nshards_per_device = 4\n"
    );
    let cfg = Config::parse(&text, Path::new("t.toml")).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem0", 4096, 16384, 1));
    reactor::format(&cfg, std::slice::from_ref(&dev), [1; 16], 0).unwrap();
    Engine::start(&cfg, vec![dev]).unwrap()
}

#[test]
fn idle_reactor_sleeps_and_busy_poll_spins() {
    // Both engines in one test so nothing else in this process uses CPU meanwhile.
    let e = engine(false, "[0]");
    std::thread::sleep(Duration::from_millis(200));
    let c0 = cpu_secs();
    std::thread::sleep(Duration::from_secs(1));
    let idle = cpu_secs() - c0;
    // A message wakes the sleeping reactor and is served.
    e.write(42, 0, vec![7; 5000]).unwrap();
    assert_eq!(e.read(42, 0, 5000).unwrap(), vec![7; 5000]);
    e.shutdown().unwrap();
    assert!(
        idle < 0.25,
        "an idle reactor used {idle:.2} CPU seconds in 1 s"
    );

    let e = engine(true, "[0]");
    std::thread::sleep(Duration::from_millis(200));
    let c0 = cpu_secs();
    std::thread::sleep(Duration::from_secs(1));
    let busy = cpu_secs() - c0;
    e.shutdown().unwrap();
    assert!(
        busy > 0.4,
        "a busy-polling reactor used only {busy:.2} CPU seconds in 1 s"
    );
}

//! Opening a libfabric endpoint leaves the process's signal handlers alone (libfabric's
//! providers install SIGTERM/SIGINT/... handlers that exit(1); the shim puts back what was
//! there). Its own test binary: the check reads the process-wide mask of caught signals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_fabric::ofi::{self, Endpoint};
use std::sync::Arc;
use std::time::Duration;

/// The caught-signals mask from /proc/self/status.
fn caught() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn loading_libfabric_and_opening_endpoints_keep_the_programs_signal_handlers() {
    // Before anything loads libfabric (its constructors install the handlers).
    let before = caught();
    if let Err(e) = ofi::available() {
        assert!(
            std::env::var_os("CFS_REQUIRE_OFI").is_none(),
            "CFS_REQUIRE_OFI is set but {e}"
        );
        eprintln!("skipped: {e}");
        return;
    }
    assert_eq!(
        caught(),
        before,
        "loading libfabric changed the caught signals"
    );
    for p in ["tcp;ofi_rxm", "sockets"] {
        let same = |step: &str| assert_eq!(caught(), before, "{p}: {step} changed them");
        let server = Endpoint::open(Some(p), "127.0.0.1").expect("endpoint");
        same("opening an endpoint");
        let exposed = server
            .register(Arc::new(ofi::HeapMemory::new(1 << 16)), true)
            .expect("register");
        let client = Endpoint::open(Some(p), "127.0.0.1").expect("endpoint");
        let local = client
            .register(Arc::new(ofi::HeapMemory::new(1 << 16)), false)
            .expect("register");
        let peer = client
            .insert_peer(&server.address().unwrap())
            .expect("peer");
        same("registering memory and adding a peer");
        let s2 = server.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let t = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                s2.progress().unwrap();
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        client
            .read(
                peer,
                &exposed.remote(),
                0,
                &local,
                0,
                4096,
                Duration::from_secs(10),
            )
            .expect("read");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        same("a one-sided read");
    }
}

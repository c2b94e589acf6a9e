//! A real FUSE mount (root only): a server (engine on a memory device, file-system service,
//! RPC) runs in this process; the `cfs` binary mounts it; the test uses the mount through the
//! kernel with plain std::fs calls, then unmounts and stops everything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::config::Config;
use cfs_dataplane::fs_service::FsService;
use cfs_dataplane::reactor::{self, Engine};
use cfs_fabric::{RegionTable, Server, ServerConfig};
use cfs_nvme::mem::MemDevice;
use cfs_nvme::BlockDevice;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

const CFS: &str = env!("CARGO_BIN_EXE_cfs");

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

struct Mounted {
    child: Child,
    mnt: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(CFS).arg("umount").arg(&self.mnt).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(clippy::zombie_processes)] // Mounted's Drop kills and waits for it
fn mount(addr: &str, mnt: &Path) -> Mounted {
    let mut child = Command::new(CFS)
        .args(["mount", addr])
        .arg(mnt)
        .args(["--cache-ttl", "0"])
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .contains(&format!(" {} fuse", mnt.display()))
        {
            return Mounted {
                child,
                mnt: mnt.to_path_buf(),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("mount did not appear");
}

#[test]
fn posix_basics_through_the_kernel() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: needs root and /dev/fuse");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cfs-mount-test-{}", std::process::id()));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let cfg = Config::parse(
        "data_dir = \"/nonexistent\"\n[reactors]\ncores = [0]\n[hugepages]\npool_mib = 16\nbuf_kib = 128\n[format]\nshards_per_device = 2\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new("mem0", 4096, 65536, 7));
    reactor::format(&cfg, std::slice::from_ref(&dev), [2; 16], 0).unwrap();
    let engine = Arc::new(Engine::start(&cfg, vec![dev]).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let svc = FsService::open(&dir.join("meta.redb"), Arc::clone(&engine)).unwrap();
    let server = rt
        .block_on(Server::bind(
            "127.0.0.1:0",
            Arc::new(svc),
            RegionTable::new(),
            ServerConfig::default(),
        ))
        .unwrap();
    let m = mount(&server.local_addr().to_string(), &mnt);

    // Files, directories, data across a chunk boundary, sparse reads, truncate.
    std::fs::create_dir(mnt.join("d")).unwrap();
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(mnt.join("d/f"), &data).unwrap();
    assert_eq!(std::fs::read(mnt.join("d/f")).unwrap(), data);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("d/f"))
        .unwrap();
    f.seek(SeekFrom::Start((64 << 20) + 10)).unwrap();
    f.write_all(b"far").unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), (64 << 20) + 13);
    f.seek(SeekFrom::Start(10_000_000)).unwrap();
    let mut hole = vec![1u8; 4096];
    f.read_exact(&mut hole).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "holes read as zeros");
    f.set_len(100).unwrap();
    drop(f);
    assert_eq!(std::fs::read(mnt.join("d/f")).unwrap(), data[..100]);
    // Names: rename, hard link, symlink, readdir, rmdir of a non-empty directory.
    std::fs::rename(mnt.join("d/f"), mnt.join("g")).unwrap();
    std::fs::hard_link(mnt.join("g"), mnt.join("d/h")).unwrap();
    assert_eq!(std::fs::metadata(mnt.join("g")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("g", mnt.join("s")).unwrap();
    assert_eq!(std::fs::read_link(mnt.join("s")).unwrap(), Path::new("g"));
    assert_eq!(std::fs::read(mnt.join("s")).unwrap().len(), 100);
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["d", "g", "s"]);
    assert_eq!(
        std::fs::remove_dir(mnt.join("d"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    assert_eq!(
        std::fs::read(mnt.join("nope")).unwrap_err().raw_os_error(),
        Some(libc::ENOENT)
    );
    // chmod and mode bits.
    std::fs::set_permissions(mnt.join("g"), std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        std::fs::metadata(mnt.join("g"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    // Open-but-unlinked files stay readable.
    let mut o = std::fs::File::open(mnt.join("g")).unwrap();
    std::fs::remove_file(mnt.join("g")).unwrap();
    std::fs::remove_file(mnt.join("d/h")).unwrap();
    let mut buf = Vec::new();
    o.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, data[..100]);
    drop(o);
    drop(m);
    rt.block_on(server.stop());
    drop(rt);
    std::thread::sleep(Duration::from_millis(100));
    if let Ok(e) = Arc::try_unwrap(engine) {
        e.shutdown().unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

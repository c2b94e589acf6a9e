//! Flip bits in the backing file of a real (io_uring) store: reads give checksum errors for the
//! damaged blocks and the right bytes for every other block, never wrong data; damaged metadata
//! stops the store from opening (or falls back to the superblock copy) instead of losing data.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::config::Config;
use cfs_dataplane::reactor::{self, Engine};
use cfs_dataplane::store::StoreError;
use cfs_nvme::rng::SimRng;
use cfs_nvme::uring::UringDevice;
use cfs_nvme::BlockDevice;
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn setup(name: &str) -> (PathBuf, Config) {
    let dir = std::env::temp_dir().join(format!("cfs-bitflip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        "data_dir = \"{}\"\n[[devices]]\npath = \"d.img\"\nsize = \"64M\"\n[hugepages]\npool_mib = 8\nbuf_kib = 64\n[format]\nshards_per_device = 2\n",
        dir.display()
    );
    let cfg = Config::parse(&text, Path::new("t.toml")).unwrap();
    let (path, size) = cfg.resolved_devices().remove(0);
    UringDevice::create_file(&path, size).unwrap();
    (dir, cfg)
}

fn devices(cfg: &Config) -> Vec<Arc<dyn BlockDevice>> {
    cfg.resolved_devices()
        .into_iter()
        .map(|(p, _)| Arc::new(UringDevice::open(&p).unwrap()) as Arc<dyn BlockDevice>)
        .collect()
}

fn flip(path: &Path, byte: u64, bit: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, byte).unwrap();
    b[0] ^= 1 << bit;
    f.write_all_at(&b, byte).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn flipped_data_bits_give_checksum_errors_never_wrong_data() {
    let (dir, cfg) = setup("data");
    let path = cfg.resolved_devices()[0].0.clone();
    reactor::format(&cfg, &devices(&cfg), [3; 16], 0).unwrap();
    let mut rng = SimRng::new(7);
    let chunks: Vec<(u64, Vec<u8>)> = (1..=6u64)
        .map(|c| {
            let mut d = vec![0u8; 256 << 10];
            rng.fill(&mut d);
            (c * 1000, d)
        })
        .collect();
    let engine = Engine::start(&cfg, devices(&cfg)).unwrap();
    for (c, d) in &chunks {
        engine.write(*c, 0, d.clone()).unwrap();
        // Overwrite a middle part so blocks are remapped (copy-on-write) too.
        engine.write(*c, 70_000, d[..9000].to_vec()).unwrap();
    }
    let mut expected = chunks.clone();
    for (_, d) in &mut expected {
        let head = d[..9000].to_vec();
        d[70_000..79_000].copy_from_slice(&head);
    }
    // Pick 20 random blocks and flip one random bit in each.
    let mut damaged = HashSet::new();
    let mut flips = Vec::new();
    for _ in 0..20 {
        let (c, _) = &expected[rng.below(expected.len() as u64) as usize];
        let block = rng.below(64);
        let (_, dev_off) = engine
            .locate(*c, block * 4096)
            .unwrap()
            .expect("written block is allocated");
        damaged.insert((*c, block));
        flips.push((dev_off + rng.below(4096), rng.below(8) as u8));
    }
    engine.shutdown().unwrap();
    for (byte, bit) in flips {
        flip(&path, byte, bit);
    }
    let engine = Engine::start(&cfg, devices(&cfg)).unwrap();
    let (mut good, mut bad) = (0, 0);
    for (c, d) in &expected {
        for block in 0..64u64 {
            match engine.read(*c, block * 4096, 4096) {
                Ok(got) => {
                    assert!(
                        !damaged.contains(&(*c, block)),
                        "chunk {c} block {block}: damaged block read without error"
                    );
                    assert_eq!(
                        got,
                        d[block as usize * 4096..(block as usize + 1) * 4096],
                        "chunk {c} block {block}: wrong data"
                    );
                    good += 1;
                }
                Err(StoreError::Checksum { chunk, offset, .. }) => {
                    assert_eq!((chunk, offset), (*c, block * 4096));
                    assert!(
                        damaged.contains(&(*c, block)),
                        "chunk {c} block {block}: checksum error on an intact block"
                    );
                    bad += 1;
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        // A large read spanning a damaged block fails as a whole: no partial wrong data.
        if (0..64).any(|b| damaged.contains(&(*c, b))) {
            assert!(matches!(
                engine.read(*c, 0, 256 << 10),
                Err(StoreError::Checksum { .. })
            ));
        }
    }
    assert_eq!(bad, damaged.len());
    assert_eq!(good + bad, 6 * 64);
    let errs: u64 = engine
        .stats()
        .unwrap()
        .iter()
        .map(|(_, s)| s.checksum_errors)
        .sum();
    assert!(errs >= bad as u64);
    engine.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_metadata_is_refused_or_repaired_never_silently_lost() {
    let (dir, cfg) = setup("meta");
    let path = cfg.resolved_devices()[0].0.clone();
    let layout = reactor::format(&cfg, &devices(&cfg), [4; 16], 0).unwrap();
    let engine = Engine::start(&cfg, devices(&cfg)).unwrap();
    for c in 0..50u64 {
        engine.write(c, 0, vec![c as u8; 10_000]).unwrap();
    }
    engine.shutdown().unwrap(); // checkpoints every shard
                                // Primary superblock damaged: the copy is used.
    flip(&path, 100, 3);
    let engine = Engine::start(&cfg, devices(&cfg)).unwrap();
    assert_eq!(engine.read(7, 0, 10_000).unwrap(), vec![7u8; 10_000]);
    engine.shutdown().unwrap();
    // Both superblocks damaged: a clear error.
    flip(&path, 4096 + 100, 3);
    let e = Engine::start(&cfg, devices(&cfg))
        .err()
        .expect("must refuse")
        .to_string();
    assert!(
        e.contains("no ClaudeFS store") || e.contains("checksum"),
        "{e}"
    );
    flip(&path, 100, 3);
    flip(&path, 4096 + 100, 3);
    // The newest checkpoint's body damaged: refuse to open (not an older, wrong state).
    let sb = &layout.devices[0];
    let sh = sb.shard_layout(0);
    // Shutdown wrote one checkpoint after format's, so the newest is in slot 1... or 0 after
    // another cycle: damage both bodies' first byte past the bitmap length to be sure.
    for slot in 0..2 {
        flip(&path, (sh.ckpt_slot(slot) + 1) * 4096 + 9, 0);
    }
    let e = Engine::start(&cfg, devices(&cfg))
        .err()
        .expect("must refuse")
        .to_string();
    assert!(e.contains("damaged"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

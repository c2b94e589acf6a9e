//! Thousands of seeded power-loss cycles of the chunk store on the memory backend.
//!
//! Each cycle recovers the store, checks every acknowledged write is intact and every
//! unacknowledged one is either wholly present or wholly absent (never torn), runs a concurrent
//! random workload (writes of any alignment, reads, truncates, deletes) and cuts the power after a
//! random number of device commands; the device then keeps, drops or tears each unflushed write.
//! A failing seed is printed and reproduces exactly: `CFS_SIM_SEED=<seed> cargo test -p
//! cfs-dataplane --test power_loss`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cfs_dataplane::exec::Executor;
use cfs_dataplane::io::{Buffers, IoDriver};
use cfs_dataplane::store::format::ChunkId;
use cfs_dataplane::store::shard::Shard;
use cfs_dataplane::store::{self, DevIo, FormatParams, StoreError, StoreLayout};
use cfs_hugepages::{BufferPool, PageSize, PoolConfig};
use cfs_nvme::mem::MemDevice;
use cfs_nvme::rng::SimRng;
use cfs_nvme::{BlockDevice, QueuePairConfig};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;

const SECTOR: usize = 512;
const CHUNK_SPAN: usize = 192 << 10; // bytes of each chunk the workload touches
const SECTORS: usize = CHUNK_SPAN / SECTOR;
const CHUNKS: [ChunkId; 5] = [1, 2, 3, 1 << 40, u64::MAX];

/// What a sector holds: zeros or the content of one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Zero,
    Op(u64),
}

fn fill(op: u64, sector: usize, out: &mut [u8]) {
    let mut r = SimRng::new(op.wrapping_mul(0x1000_0000_01b3) ^ sector as u64);
    r.fill(out);
}

fn content_of(bytes: &[u8], sector: usize, candidates: &[Content]) -> Option<Content> {
    let mut buf = [0u8; SECTOR];
    for &c in candidates {
        match c {
            Content::Zero if bytes.iter().all(|&b| b == 0) => return Some(c),
            Content::Op(id) => {
                fill(id, sector, &mut buf);
                if buf == bytes {
                    return Some(c);
                }
            }
            Content::Zero => {}
        }
    }
    None
}

#[derive(Clone, Debug)]
struct Unacked {
    op: u64,
    chunk: ChunkId,
    /// Sector range affected and what each sector would hold if the op happened.
    sectors: std::ops::Range<usize>,
    after: Content,
}

struct Model {
    /// Acknowledged content per chunk and sector.
    acked: HashMap<ChunkId, Vec<Content>>,
    /// Operations issued but not acknowledged before the power went.
    unacked: Vec<Unacked>,
    /// Ranges with an operation in flight: (chunk, first sector, end sector).
    busy: Vec<(ChunkId, usize, usize)>,
    next_op: u64,
}

struct Harness {
    dev: MemDevice,
    pool_core: Option<cfs_hugepages::PoolCore>,
    _pool: BufferPool,
}

fn run<T: 'static>(
    ex: &Executor,
    drivers: &[Rc<IoDriver>],
    fut: impl Future<Output = T> + 'static,
) -> T {
    let out = Rc::new(RefCell::new(None));
    let o = Rc::clone(&out);
    ex.spawn(async move { *o.borrow_mut() = Some(fut.await) });
    for _ in 0..10_000_000u64 {
        ex.run_ready();
        for d in drivers {
            d.poll();
        }
        if let Some(v) = out.borrow_mut().take() {
            return v;
        }
    }
    panic!("simulation did not finish");
}

struct Opened {
    ex: Rc<Executor>,
    driver: Rc<IoDriver>,
    shards: Vec<Rc<Shard>>,
    layout: StoreLayout,
}

fn open(h: &mut Harness, bufs: &Rc<Buffers>) -> Result<Opened, StoreError> {
    let ex = Executor::new();
    let qp = h
        .dev
        .create_queue_pair(QueuePairConfig {
            depth: 32,
            region: None,
            sqpoll: false,
            worker_cpus: Vec::new(),
        })
        .unwrap();
    let driver = IoDriver::new(qp, 64);
    let dev = DevIo::new(
        "mem0".into(),
        Rc::clone(&driver),
        Rc::clone(bufs),
        h.dev.namespace(),
    )?;
    let d2 = dev.clone();
    let (layout, _) = run(&ex, &[Rc::clone(&driver)], async move {
        store::load_layout(&[d2]).await
    })?;
    let mut shards = Vec::new();
    for g in 0..layout.total_shards() {
        let (_, spec) = layout.shard_spec(g, &dev);
        let d2 = dev.clone();
        let s = run(&ex, &[Rc::clone(&driver)], async move {
            Shard::open(spec, d2).await
        })?;
        shards.push(Rc::new(s));
    }
    Ok(Opened {
        ex,
        driver,
        shards,
        layout,
    })
}

fn shard_for(o: &Opened, chunk: ChunkId) -> Rc<Shard> {
    Rc::clone(&o.shards[o.layout.shard_of(chunk) as usize])
}

/// Reads every chunk, checks it against the model and collapses the model to what is there.
fn verify(o: &Opened, m: &mut Model, seed: u64, cycle: u32) {
    let mut actual: HashMap<ChunkId, Vec<Content>> = HashMap::new();
    for &chunk in &CHUNKS {
        let s = shard_for(o, chunk);
        let data = run(&o.ex, &[Rc::clone(&o.driver)], async move {
            s.read(chunk, 0, CHUNK_SPAN).await
        });
        let data = match data {
            Ok(d) => d,
            Err(StoreError::NotFound { .. }) => vec![0u8; CHUNK_SPAN],
            Err(e) => panic!(
                "seed {seed} cycle {cycle}: read of chunk {chunk:#x} failed after recovery: {e}"
            ),
        };
        let acked = m
            .acked
            .entry(chunk)
            .or_insert_with(|| vec![Content::Zero; SECTORS]);
        let mut got = Vec::with_capacity(SECTORS);
        for (i, sector) in data.chunks(SECTOR).enumerate() {
            let mut cands = vec![acked[i]];
            cands.extend(
                m.unacked
                    .iter()
                    .filter(|u| u.chunk == chunk && u.sectors.contains(&i))
                    .map(|u| u.after),
            );
            match content_of(sector, i, &cands) {
                Some(c) => got.push(c),
                None => panic!(
                    "seed {seed} cycle {cycle}: chunk {chunk:#x} sector {i} holds data of no acknowledged or in-flight write (acked {:?}, candidates {cands:?})",
                    acked[i]
                ),
            }
        }
        actual.insert(chunk, got);
    }
    // Every unacknowledged operation is all there or not at all.
    for u in &m.unacked {
        let got = &actual[&u.chunk];
        let acked = &m.acked[&u.chunk];
        let applied = u
            .sectors
            .clone()
            .filter(|&i| got[i] == u.after && acked[i] != u.after)
            .count();
        let differs = u.sectors.clone().filter(|&i| acked[i] != u.after).count();
        assert!(
            applied == 0 || applied == differs,
            "seed {seed} cycle {cycle}: operation {} on chunk {:#x} is torn: {applied} of {differs} sectors applied",
            u.op,
            u.chunk
        );
    }
    m.acked = actual;
    m.unacked.clear();
    // After recovery nothing is in limbo: every block is live or free.
    for s in &o.shards {
        let st = s.stats();
        assert_eq!(
            st.live_blocks + st.free_blocks,
            u64::from(s_data_blocks(o, s.index)),
            "seed {seed}: blocks leaked"
        );
    }
}

fn s_data_blocks(o: &Opened, g: u32) -> u32 {
    let sb = &o.layout.devices[0];
    sb.shard_layout(g - sb.first_shard).data_blocks
}

async fn worker(
    o: Rc<(Vec<Rc<Shard>>, StoreLayout)>,
    model: Rc<RefCell<Model>>,
    rng: Rc<RefCell<SimRng>>,
    ops: u32,
    alive: Rc<Cell<bool>>,
) {
    for _ in 0..ops {
        if !alive.get() {
            return;
        }
        let (kind, chunk, start, end) = {
            let mut r = rng.borrow_mut();
            let chunk = CHUNKS[r.below(CHUNKS.len() as u64) as usize];
            let kind = r.below(100);
            if !(80..92).contains(&kind) {
                let start = r.below(SECTORS as u64) as usize;
                let max_len = (SECTORS - start).min(if r.chance(1, 4) { SECTORS } else { 24 });
                let len = 1 + r.below(max_len as u64) as usize;
                (if kind < 80 { 0 } else { 1 }, chunk, start, start + len)
            } else if kind < 86 {
                (2, chunk, 0, SECTORS) // truncate
            } else {
                (3, chunk, 0, SECTORS) // delete
            }
        };
        let busy = model
            .borrow()
            .busy
            .iter()
            .any(|&(c, s, e)| c == chunk && s < end && start < e);
        if busy {
            cfs_dataplane::exec::yield_now().await;
            continue;
        }
        let shard = Rc::clone(&o.0[o.1.shard_of(chunk) as usize]);
        let op = {
            let mut m = model.borrow_mut();
            m.busy.push((chunk, start, end));
            m.next_op += 1;
            m.next_op
        };
        let release = |m: &mut Model| {
            let i = m
                .busy
                .iter()
                .position(|&b| b == (chunk, start, end))
                .unwrap();
            m.busy.swap_remove(i);
        };
        match kind {
            0 => {
                let mut data = vec![0u8; (end - start) * SECTOR];
                for (i, s) in data.chunks_mut(SECTOR).enumerate() {
                    fill(op, start + i, s);
                }
                let r = shard.write(chunk, (start * SECTOR) as u64, &data).await;
                let mut m = model.borrow_mut();
                release(&mut m);
                match r {
                    Ok(()) => {
                        let a = m
                            .acked
                            .entry(chunk)
                            .or_insert_with(|| vec![Content::Zero; SECTORS]);
                        a[start..end].fill(Content::Op(op));
                    }
                    Err(_) => {
                        alive.set(false);
                        m.unacked.push(Unacked {
                            op,
                            chunk,
                            sectors: start..end,
                            after: Content::Op(op),
                        });
                    }
                }
            }
            1 => {
                let r = shard
                    .read(chunk, (start * SECTOR) as u64, (end - start) * SECTOR)
                    .await;
                let mut m = model.borrow_mut();
                release(&mut m);
                let data = match r {
                    Ok(d) => d,
                    Err(StoreError::NotFound { .. }) => vec![0u8; (end - start) * SECTOR],
                    Err(_) => {
                        alive.set(false);
                        continue;
                    }
                };
                let a = m
                    .acked
                    .entry(chunk)
                    .or_insert_with(|| vec![Content::Zero; SECTORS]);
                for (i, s) in data.chunks(SECTOR).enumerate() {
                    assert!(
                        content_of(s, start + i, &[a[start + i]]).is_some(),
                        "read returned data that is not the acknowledged content"
                    );
                }
            }
            2 | 3 => {
                // Truncate to a sector boundary (delete = everything goes).
                let keep = if kind == 2 {
                    rng.borrow_mut().below(SECTORS as u64) as usize
                } else {
                    0
                };
                let r = if kind == 2 {
                    shard.truncate(chunk, (keep * SECTOR) as u64).await
                } else {
                    shard.delete(chunk).await
                };
                let mut m = model.borrow_mut();
                release(&mut m);
                match r {
                    Ok(()) | Err(StoreError::NotFound { .. }) => {
                        let a = m
                            .acked
                            .entry(chunk)
                            .or_insert_with(|| vec![Content::Zero; SECTORS]);
                        a[keep..].fill(Content::Zero);
                    }
                    Err(_) => {
                        alive.set(false);
                        m.unacked.push(Unacked {
                            op,
                            chunk,
                            sectors: keep..SECTORS,
                            after: Content::Zero,
                        });
                    }
                }
            }
            _ => unreachable!(),
        }
    }
}

fn run_seed(seed: u64, cycles: u32, fail_ppm: u32) {
    let mut pool = BufferPool::new(&PoolConfig {
        // Few buffers on purpose: operations must share them without deadlocking.
        total_bytes: 512 << 10,
        buf_bytes: 32 << 10,
        cores: 1,
        page_size: PageSize::Huge2M,
        require_hugepages: false,
    })
    .unwrap();
    let core = pool.take_core(0).unwrap();
    let mut h = Harness {
        dev: MemDevice::new("mem0", 4096, 2 * 1300, seed),
        pool_core: Some(core),
        _pool: pool,
    };
    let bufs = Buffers::new(h.pool_core.take().unwrap());
    let mut rng = SimRng::new(seed);
    // Format.
    {
        let ex = Executor::new();
        let qp = h
            .dev
            .create_queue_pair(QueuePairConfig {
                depth: 32,
                region: None,
                sqpoll: false,
                worker_cpus: Vec::new(),
            })
            .unwrap();
        let driver = IoDriver::new(qp, 64);
        let dev = DevIo::new(
            "mem0".into(),
            Rc::clone(&driver),
            Rc::clone(&bufs),
            h.dev.namespace(),
        )
        .unwrap();
        let p = FormatParams {
            shards_per_device: 2,
            journal_blocks: Some(512),
            max_chunk_bytes: 1 << 20,
        };
        run(&ex, &[driver], async move {
            store::format_store(&[dev], &p, [seed as u8; 16], 0).await
        })
        .unwrap();
    }
    let mut model = Model {
        acked: HashMap::new(),
        unacked: Vec::new(),
        busy: Vec::new(),
        next_op: seed << 20,
    };
    for cycle in 0..cycles {
        let o = match open(&mut h, &bufs) {
            Ok(o) => o,
            Err(e) => panic!("seed {seed} cycle {cycle}: recovery failed: {e}"),
        };
        verify(&o, &mut model, seed, cycle);
        // Workload with the power going out after a random number of commands (or not at all).
        let budget = 1 + rng.below(400);
        let clean = rng.chance(1, 10);
        if !clean {
            h.dev.cut_power_after(budget);
        }
        // Media errors during the workload only (recovery must be able to read the device).
        h.dev.set_fail_ppm(fail_ppm);
        let shared = Rc::new((o.shards.clone(), o.layout.clone()));
        let model_rc = Rc::new(RefCell::new(std::mem::replace(
            &mut model,
            Model {
                acked: HashMap::new(),
                unacked: Vec::new(),
                busy: Vec::new(),
                next_op: 0,
            },
        )));
        let wrng = Rc::new(RefCell::new(SimRng::new(rng.next_u64())));
        let alive = Rc::new(Cell::new(true));
        let tasks = 1 + rng.below(6) as usize;
        let done = Rc::new(Cell::new(0usize));
        for _ in 0..tasks {
            let (s, m, r, a, d) = (
                Rc::clone(&shared),
                Rc::clone(&model_rc),
                Rc::clone(&wrng),
                Rc::clone(&alive),
                Rc::clone(&done),
            );
            o.ex.spawn(async move {
                worker(s, m, r, 40, a).await;
                d.set(d.get() + 1);
            });
        }
        let mut spins = 0u64;
        while done.get() < tasks {
            o.ex.run_ready();
            o.driver.poll();
            spins += 1;
            assert!(
                spins < 50_000_000,
                "seed {seed} cycle {cycle}: workload hung"
            );
        }
        h.dev.set_fail_ppm(0);
        if clean {
            for s in &o.shards {
                let s = Rc::clone(s);
                let r = run(
                    &o.ex,
                    &[Rc::clone(&o.driver)],
                    async move { s.close().await },
                );
                // A shard stopped by an injected journal error refuses; anything else is a bug.
                if let Err(e) = r {
                    assert!(
                        fail_ppm > 0 && matches!(e, StoreError::ShardFailed { .. }),
                        "seed {seed}: close failed: {e}"
                    );
                }
            }
        }
        drop(shared);
        drop(o);
        model = Rc::try_unwrap(model_rc)
            .ok()
            .expect("workers finished")
            .into_inner();
        assert!(model.busy.is_empty());
        h.dev.power_cycle();
    }
}

#[test]
fn power_loss_cycles() {
    let cycles: u32 = std::env::var("CFS_SIM_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let seeds: Vec<u64> = match std::env::var("CFS_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("CFS_SIM_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("CFS_SIM_SEEDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(40);
            let base: u64 = std::env::var("CFS_SIM_BASE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0x5eed_0000);
            (base..base + n).collect()
        }
    };
    let total = seeds.len() as u32 * cycles;
    for seed in seeds {
        eprintln!("power_loss: seed {seed} ({cycles} cycles)");
        run_seed(seed, cycles, 0);
    }
    eprintln!("power_loss: {total} power-loss cycles verified");
}

/// The same cycles with 1 % of device commands failing during the workload: every error reaches
/// the caller, a failed journal write stops the shard (fail-stop) instead of acknowledging, and
/// after restart the same invariants hold.
#[test]
fn io_fault_cycles() {
    let seeds: u64 = std::env::var("CFS_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
        / 4;
    let cycles: u32 = std::env::var("CFS_SIM_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    for seed in 0xfa17_0000..0xfa17_0000 + seeds.max(1) {
        eprintln!("io_fault: seed {seed} ({cycles} cycles)");
        run_seed(seed, cycles, 10_000);
    }
}

//! Reactors: one thread per configured core, pinned, each owning its queue pairs, its share of
//! the buffer pool and its shards. Work arrives only as messages in a bounded lock-free inbox;
//! each request runs as a task on the reactor's executor until it completes (run to
//! completion), while the loop busy-polls the inbox and the queue pairs. An idle reactor backs
//! off (spin, then sleep up to `idle_sleep_us`; a new message wakes it at once) unless
//! `busy_poll` dedicates the core.

use crate::config::Config;
use crate::exec::Executor;
use crate::io::{Buffers, IoDriver};
use crate::store::format::ChunkId;
use crate::store::shard::{ChunkInfo, Shard, ShardStats};
use crate::store::{self, DevIo, FormatParams, StoreError, StoreLayout};
use cfs_hugepages::{BufferPool, PoolConfig, PoolCore};
use cfs_nvme::{BlockDevice, QueuePairConfig};
use crossbeam_queue::ArrayQueue;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

/// A reply channel for one request.
pub type Reply<T> = SyncSender<Result<T, StoreError>>;

/// A closure run on a reactor's thread with its context.
pub type ReactorFn = Box<dyn FnOnce(&Rc<ReactorCtx>) + Send>;

/// Work for a reactor.
pub enum Request {
    /// Durable write.
    Write {
        /// Chunk.
        chunk: ChunkId,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        data: Vec<u8>,
        /// Where the result goes.
        reply: Reply<()>,
    },
    /// Verified read.
    Read {
        /// Chunk.
        chunk: ChunkId,
        /// Byte offset.
        offset: u64,
        /// Bytes wanted.
        len: usize,
        /// Where the data goes.
        reply: Reply<Vec<u8>>,
    },
    /// Delete a chunk.
    Delete {
        /// Chunk.
        chunk: ChunkId,
        /// Where the result goes.
        reply: Reply<()>,
    },
    /// Set a chunk's length.
    Truncate {
        /// Chunk.
        chunk: ChunkId,
        /// New length.
        len: u64,
        /// Where the result goes.
        reply: Reply<()>,
    },
    /// Make a byte range a hole.
    Punch {
        /// Chunk.
        chunk: ChunkId,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Where the result goes.
        reply: Reply<()>,
    },
    /// Byte ranges holding data.
    DataRanges {
        /// Chunk.
        chunk: ChunkId,
        /// Where the answer goes.
        reply: Reply<Vec<(u64, u64)>>,
    },
    /// Chunk facts.
    Stat {
        /// Chunk.
        chunk: ChunkId,
        /// Where the answer goes.
        reply: Reply<Option<ChunkInfo>>,
    },
    /// Device location of a chunk's byte.
    Locate {
        /// Chunk.
        chunk: ChunkId,
        /// Byte offset.
        offset: u64,
        /// Where the answer goes.
        reply: Reply<Option<(String, u64)>>,
    },
    /// A chunk's map digest (`Shard::map_digest`).
    MapDigest {
        /// Chunk.
        chunk: ChunkId,
        /// Where the answer goes.
        reply: Reply<Option<(u64, [u8; 32])>>,
    },
    /// The chunks every shard of the reactor found changed last when it recovered.
    BootSuspects {
        /// Where the answer goes.
        reply: Reply<Vec<ChunkId>>,
    },
    /// Every chunk of every shard of the reactor.
    List {
        /// Where the answer goes.
        reply: Reply<Vec<ChunkId>>,
    },
    /// Counters of every shard of the reactor.
    Stats {
        /// Where the answer goes.
        reply: Reply<Vec<(u32, ShardStats)>>,
    },
    /// Run a closure on the reactor (benchmarks, tests): it may spawn tasks on the executor.
    Run(ReactorFn),
    /// Checkpoint every shard and stop.
    Shutdown {
        /// Where the result goes.
        reply: Reply<()>,
    },
}

/// What a reactor owns, visible to tasks and `Run` closures on its thread.
pub struct ReactorCtx {
    /// Reactor index.
    pub index: usize,
    /// Its executor.
    pub ex: Rc<Executor>,
    /// Its shards by global index.
    pub shards: HashMap<u32, Rc<Shard>>,
    /// Its buffers.
    pub bufs: Rc<Buffers>,
    /// The store layout.
    pub layout: StoreLayout,
    drivers: Vec<Rc<IoDriver>>,
    /// Nanoseconds spent in loop iterations that did work (SPDK's "busy ticks"); the rest of
    /// the thread's time is idle polling or sleeping.
    pub busy_ns: std::cell::Cell<u64>,
    /// Extra work polled every loop iteration (e.g. an RMA endpoint's progress); each
    /// returns how much it did or has in flight (non-zero keeps the reactor from sleeping).
    pollers: std::cell::RefCell<Vec<Box<dyn Fn() -> usize>>>,
}

impl ReactorCtx {
    /// The shard for a chunk, if this reactor owns it.
    pub fn shard_for(&self, chunk: ChunkId) -> Option<Rc<Shard>> {
        self.shards.get(&self.layout.shard_of(chunk)).cloned()
    }
}

struct Inbox {
    queue: ArrayQueue<Request>,
    thread: OnceLock<Thread>,
    alive: AtomicBool,
}

/// Errors starting the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Buffer pool.
    #[error(transparent)]
    Pool(#[from] cfs_hugepages::PoolError),
    /// A device.
    #[error(transparent)]
    Device(#[from] cfs_nvme::DeviceError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A reactor thread died.
    #[error("reactor {0} died")]
    ReactorDied(usize),
    /// An OS-level problem (thread spawn, locks).
    #[error("{0}")]
    Os(String),
}

/// The running data plane: reactors plus the routing table from chunk to reactor.
pub struct Engine {
    inboxes: Vec<Arc<Inbox>>,
    threads: Vec<JoinHandle<()>>,
    layout: StoreLayout,
    pool_info: (cfs_hugepages::RegionInfo, bool),
}

/// Pool configuration from the config.
pub fn pool_config(cfg: &Config, cores: usize) -> Result<PoolConfig, EngineError> {
    Ok(PoolConfig {
        total_bytes: cfg.hugepages.pool_mib << 20,
        buf_bytes: cfg.hugepages.buf_kib << 10,
        cores,
        page_size: cfg.page_size()?,
        require_hugepages: cfg.hugepages.require,
    })
}

/// Runs a future to completion on the calling thread, polling the given drivers (format,
/// tools and tests; reactors use their own loop).
pub fn block_on<T: 'static>(
    ex: &Rc<Executor>,
    drivers: &[Rc<IoDriver>],
    fut: impl Future<Output = T> + 'static,
) -> T {
    let out = Rc::new(std::cell::RefCell::new(None));
    let o = Rc::clone(&out);
    ex.spawn(async move { *o.borrow_mut() = Some(fut.await) });
    loop {
        ex.run_ready();
        let mut n = 0;
        for d in drivers {
            n += d.poll();
        }
        if let Some(v) = out.borrow_mut().take() {
            return v;
        }
        if n == 0 && !ex.has_ready() {
            std::thread::yield_now();
        }
    }
}

/// Formats the devices as a new store on the calling thread.
pub fn format(
    cfg: &Config,
    devices: &[Arc<dyn BlockDevice>],
    uuid: [u8; 16],
    now_secs: u64,
) -> Result<StoreLayout, EngineError> {
    let mut pool = BufferPool::new(&pool_config(cfg, 1)?)?;
    let core = pool
        .take_core(0)
        .ok_or_else(|| EngineError::Os("pool share".into()))?;
    let bufs = Buffers::new(core);
    let ex = Executor::new();
    let (drivers, devs) = open_queue_pairs(cfg, devices, &bufs, false, Vec::new())?;
    let params: FormatParams = cfg.format_params();
    Ok(block_on(&ex, &drivers, async move {
        store::format_store(&devs, &params, uuid, now_secs).await
    })?)
}

impl Engine {
    /// Starts one reactor per configured core over the given devices (in any order) and
    /// recovers every shard. Returns once all shards are open.
    pub fn start(cfg: &Config, devices: Vec<Arc<dyn BlockDevice>>) -> Result<Engine, EngineError> {
        let n = cfg.reactors.cores.len();
        let mut pool = BufferPool::new(&pool_config(cfg, n)?)?;
        let pool_info = (pool.region(), pool.has_phys_addrs());
        let (ready_tx, ready_rx) = sync_channel::<Result<StoreLayout, EngineError>>(n);
        let mut inboxes = Vec::new();
        let mut threads = Vec::new();
        for (i, &core) in cfg.reactors.cores.iter().enumerate() {
            let inbox = Arc::new(Inbox {
                queue: ArrayQueue::new(cfg.reactors.inbox),
                thread: OnceLock::new(),
                alive: AtomicBool::new(true),
            });
            let share = pool
                .take_core(i)
                .ok_or_else(|| EngineError::Os("pool share".into()))?;
            let devs = devices.clone();
            let cfg2 = cfg.clone();
            let ib = Arc::clone(&inbox);
            let tx = ready_tx.clone();
            // Computed here: a pinned reactor would only see its own core.
            let helpers = helper_cpus(cfg);
            let t = std::thread::Builder::new()
                .name(format!("cfs-reactor-{i}"))
                .spawn(move || {
                    let _ = ib.thread.set(std::thread::current());
                    reactor_main(i, n, core, &cfg2, devs, share, &ib, tx, helpers);
                    ib.alive.store(false, Ordering::Release);
                })
                .map_err(|e| EngineError::Os(format!("cannot start reactor thread: {e}")))?;
            inboxes.push(inbox);
            threads.push(t);
        }
        drop(ready_tx);
        let mut layout = None;
        let mut first_err = None;
        for _ in 0..n {
            match ready_rx.recv() {
                Ok(Ok(l)) => layout = Some(l),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(EngineError::ReactorDied(0));
                }
            }
        }
        let engine = Engine {
            inboxes,
            threads,
            layout: layout.unwrap_or(StoreLayout {
                devices: Vec::new(),
            }),
            pool_info,
        };
        if let Some(e) = first_err {
            engine.stop_threads();
            return Err(e);
        }
        Ok(engine)
    }

    fn stop_threads(mut self) {
        for (i, ib) in self.inboxes.iter().enumerate() {
            let (tx, _rx) = sync_channel(1);
            let _ = self.send_to(i, Request::Shutdown { reply: tx });
            let _ = ib;
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// The store layout.
    pub fn layout(&self) -> &StoreLayout {
        &self.layout
    }

    /// Number of reactors.
    pub fn reactors(&self) -> usize {
        self.inboxes.len()
    }

    /// The buffer pool's region and whether physical addresses are known.
    pub fn pool_region(&self) -> (cfs_hugepages::RegionInfo, bool) {
        self.pool_info
    }

    /// Which reactor owns a chunk.
    pub fn reactor_of(&self, chunk: ChunkId) -> usize {
        self.layout.shard_of(chunk) as usize % self.inboxes.len()
    }

    /// Sends a request to reactor `r`, waiting (with back-off) while its inbox is full.
    pub fn send_to(&self, r: usize, mut req: Request) -> Result<(), EngineError> {
        let ib = &self.inboxes[r];
        let mut spins = 0u32;
        loop {
            if !ib.alive.load(Ordering::Acquire) {
                return Err(EngineError::ReactorDied(r));
            }
            match ib.queue.push(req) {
                Ok(()) => {
                    if let Some(t) = ib.thread.get() {
                        t.unpark();
                    }
                    return Ok(());
                }
                Err(back) => {
                    req = back;
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }
        }
    }

    fn call<T>(&self, r: usize, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (tx, rx) = sync_channel(1);
        self.send_to(r, make(tx)).map_err(|_| StoreError::Closed)?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    /// Starts a durable write; the receiver yields the result.
    pub fn write_async(
        &self,
        chunk: ChunkId,
        offset: u64,
        data: Vec<u8>,
    ) -> Receiver<Result<(), StoreError>> {
        let (tx, rx) = sync_channel(1);
        let r = self.reactor_of(chunk);
        if let Err(e) = self.send_to(
            r,
            Request::Write {
                chunk,
                offset,
                data,
                reply: tx.clone(),
            },
        ) {
            let _ = tx.send(Err(StoreError::Layout(e.to_string())));
        }
        rx
    }

    /// Durable write.
    pub fn write(&self, chunk: ChunkId, offset: u64, data: Vec<u8>) -> Result<(), StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::Write {
            chunk,
            offset,
            data,
            reply,
        })
    }

    /// Verified read.
    pub fn read(&self, chunk: ChunkId, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::Read {
            chunk,
            offset,
            len,
            reply,
        })
    }

    /// Delete a chunk.
    pub fn delete(&self, chunk: ChunkId) -> Result<(), StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::Delete {
            chunk,
            reply,
        })
    }

    /// Set a chunk's length.
    pub fn truncate(&self, chunk: ChunkId, len: u64) -> Result<(), StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::Truncate {
            chunk,
            len,
            reply,
        })
    }

    /// Make `[offset, offset+len)` of a chunk read as zeros, freeing whole blocks.
    pub fn punch(&self, chunk: ChunkId, offset: u64, len: u64) -> Result<(), StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::Punch {
            chunk,
            offset,
            len,
            reply,
        })
    }

    /// Byte ranges of a chunk that hold data (the rest reads as zeros).
    pub fn data_ranges(&self, chunk: ChunkId) -> Result<Vec<(u64, u64)>, StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::DataRanges {
            chunk,
            reply,
        })
    }

    /// Chunk facts.
    pub fn stat(&self, chunk: ChunkId) -> Result<Option<ChunkInfo>, StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::Stat {
            chunk,
            reply,
        })
    }

    /// Where byte `offset` of `chunk` lives: (device name, byte offset on the device).
    pub fn locate(&self, chunk: ChunkId, offset: u64) -> Result<Option<(String, u64)>, StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::Locate {
            chunk,
            offset,
            reply,
        })
    }

    /// A digest of a chunk's length and block checksums (`None` if it does not exist).
    pub fn map_digest(&self, chunk: ChunkId) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        self.call(self.reactor_of(chunk), |reply| Request::MapDigest {
            chunk,
            reply,
        })
    }

    /// The chunks recovery found changed last in every shard (possibly by writes the cluster
    /// never acknowledged).
    pub fn boot_suspects(&self) -> Result<Vec<ChunkId>, StoreError> {
        let mut all = Vec::new();
        for r in 0..self.inboxes.len() {
            all.extend(self.call(r, |reply| Request::BootSuspects { reply })?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    /// Every chunk in the store.
    pub fn list_chunks(&self) -> Result<Vec<ChunkId>, StoreError> {
        let mut all = Vec::new();
        for r in 0..self.inboxes.len() {
            all.extend(self.call(r, |reply| Request::List { reply })?);
        }
        all.sort_unstable();
        Ok(all)
    }

    /// Counters of every shard.
    pub fn stats(&self) -> Result<Vec<(u32, ShardStats)>, StoreError> {
        let mut all = Vec::new();
        for r in 0..self.inboxes.len() {
            all.extend(self.call(r, |reply| Request::Stats { reply })?);
        }
        all.sort_by_key(|(i, _)| *i);
        Ok(all)
    }

    /// Runs `f` on reactor `r`.
    pub fn run_on(
        &self,
        r: usize,
        f: impl FnOnce(&Rc<ReactorCtx>) + Send + 'static,
    ) -> Result<(), EngineError> {
        self.send_to(r, Request::Run(Box::new(f)))
    }

    /// Polls `f` on reactor `r` every loop iteration from now on (see `ReactorCtx::pollers`).
    pub fn add_poller(
        &self,
        r: usize,
        f: impl Fn() -> usize + Send + 'static,
    ) -> Result<(), EngineError> {
        self.run_on(r, move |ctx| ctx.pollers.borrow_mut().push(Box::new(f)))
    }

    /// Checkpoints every shard and stops the reactors.
    pub fn shutdown(mut self) -> Result<(), StoreError> {
        let mut result = Ok(());
        for r in 0..self.inboxes.len() {
            if let Err(e) = self.call(r, |reply| Request::Shutdown { reply }) {
                result = result.and(Err(e));
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        result
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        for r in 0..self.inboxes.len() {
            let (tx, _rx) = sync_channel(1);
            let _ = self.send_to(r, Request::Shutdown { reply: tx });
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Creates this thread's queue pair on every device, registered with its buffer pool share.
fn open_queue_pairs(
    cfg: &Config,
    devices: &[Arc<dyn BlockDevice>],
    bufs: &Rc<Buffers>,
    sqpoll: bool,
    worker_cpus: Vec<usize>,
) -> Result<(Vec<Rc<IoDriver>>, Vec<DevIo>), EngineError> {
    let mut drivers = Vec::new();
    let mut devs = Vec::new();
    for d in devices {
        let qp = d.create_queue_pair(QueuePairConfig {
            depth: cfg.reactors.queue_depth,
            region: Some(bufs.region()),
            sqpoll,
            worker_cpus: worker_cpus.clone(),
        })?;
        // Room for a backlog of commands beyond the queue depth.
        let io = IoDriver::new(qp, cfg.reactors.queue_depth * 4);
        drivers.push(Rc::clone(&io));
        devs.push(DevIo::new(
            d.name().into(),
            io,
            Rc::clone(bufs),
            d.namespace(),
        )?);
    }
    Ok((drivers, devs))
}

/// CPUs for kernel helper threads (io_uring's io-wq workers that run fsync and fallocate): every
/// CPU that is not a reactor's, so they never preempt a polling core. Empty (inherit) when the
/// reactors take every CPU.
fn helper_cpus(cfg: &Config) -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .filter(|c| !cfg.reactors.cores.contains(c))
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn reactor_main(
    index: usize,
    reactors: usize,
    core: usize,
    cfg: &Config,
    devices: Vec<Arc<dyn BlockDevice>>,
    share: PoolCore,
    inbox: &Inbox,
    ready: SyncSender<Result<StoreLayout, EngineError>>,
    helpers: Vec<usize>,
) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        tracing::warn!(reactor = index, core, "could not pin reactor to its core");
    }
    let ex = Executor::new();
    let bufs = Buffers::new(share);
    let setup = open_queue_pairs(cfg, &devices, &bufs, cfg.reactors.sqpoll, helpers);
    let (drivers, devs) = match setup {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let opened = {
        let devs2 = devs.clone();
        block_on(&ex, &drivers, async move {
            let (layout, order) = store::load_layout(&devs2).await?;
            let mut shards = HashMap::new();
            for g in (0..layout.total_shards()).filter(|g| *g as usize % reactors == index) {
                let probe = &devs2[order[layout.shard_spec(g, &devs2[0]).0]];
                let (_, spec) = layout.shard_spec(g, probe);
                let shard = Shard::open(spec, probe.clone()).await?;
                shards.insert(g, Rc::new(shard));
            }
            Ok::<_, StoreError>((layout, shards))
        })
    };
    let (layout, shards) = match opened {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let _ = ready.send(Ok(layout.clone()));
    drop(ready);
    let ctx = Rc::new(ReactorCtx {
        index,
        ex: Rc::clone(&ex),
        shards,
        bufs,
        layout,
        drivers,
        busy_ns: std::cell::Cell::new(0),
        pollers: std::cell::RefCell::new(Vec::new()),
    });
    tracing::info!(
        reactor = index,
        core,
        shards = ctx.shards.len(),
        "reactor running"
    );
    run_loop(&ctx, cfg, inbox);
}

fn run_loop(ctx: &Rc<ReactorCtx>, cfg: &Config, inbox: &Inbox) {
    let stop = Rc::new(std::cell::Cell::new(false));
    let min_sleep = Duration::from_micros(1);
    let max_sleep = Duration::from_micros(cfg.reactors.idle_sleep_us.max(1));
    let mut sleep = min_sleep;
    let mut idle = 0u32;
    // Busy time is charged from one clock read per iteration: the previous iteration's span
    // counts when it did work.
    let mut last = std::time::Instant::now();
    let mut last_did_work = false;
    loop {
        let now = std::time::Instant::now();
        if last_did_work {
            ctx.busy_ns
                .set(ctx.busy_ns.get() + now.duration_since(last).as_nanos() as u64);
        }
        last = now;
        let mut work = 0usize;
        while ctx.ex.live_tasks() < cfg.reactors.max_tasks {
            let Some(req) = inbox.queue.pop() else { break };
            work += 1;
            dispatch(ctx, req, &stop);
        }
        work += ctx.ex.run_ready();
        let mut in_flight = 0;
        for d in &ctx.drivers {
            work += d.poll();
            in_flight += d.in_flight();
        }
        work += ctx.ex.run_ready();
        for p in ctx.pollers.borrow().iter() {
            in_flight += p();
        }
        if stop.get() && ctx.ex.live_tasks() == 0 {
            return;
        }
        last_did_work = work > 0;
        if work > 0 || in_flight > 0 || cfg.reactors.busy_poll {
            idle = 0;
            sleep = min_sleep;
            continue;
        }
        idle += 1;
        if idle > cfg.reactors.idle_spin {
            std::thread::park_timeout(sleep);
            sleep = (sleep * 2).min(max_sleep);
        } else {
            std::hint::spin_loop();
        }
    }
}

fn missing(chunk: ChunkId) -> StoreError {
    StoreError::Layout(format!(
        "chunk {chunk:#x} routed to a reactor that does not own its shard"
    ))
}

fn dispatch(ctx: &Rc<ReactorCtx>, req: Request, stop: &Rc<std::cell::Cell<bool>>) {
    match req {
        Request::Write {
            chunk,
            offset,
            data,
            reply,
        } => match ctx.shard_for(chunk) {
            Some(s) => ctx.ex.spawn(async move {
                let _ = reply.send(s.write(chunk, offset, &data).await);
            }),
            None => drop(reply.send(Err(missing(chunk)))),
        },
        Request::Read {
            chunk,
            offset,
            len,
            reply,
        } => match ctx.shard_for(chunk) {
            Some(s) => ctx.ex.spawn(async move {
                let _ = reply.send(s.read(chunk, offset, len).await);
            }),
            None => drop(reply.send(Err(missing(chunk)))),
        },
        Request::Delete { chunk, reply } => match ctx.shard_for(chunk) {
            Some(s) => ctx.ex.spawn(async move {
                let _ = reply.send(s.delete(chunk).await);
            }),
            None => drop(reply.send(Err(missing(chunk)))),
        },
        Request::Truncate { chunk, len, reply } => match ctx.shard_for(chunk) {
            Some(s) => ctx.ex.spawn(async move {
                let _ = reply.send(s.truncate(chunk, len).await);
            }),
            None => drop(reply.send(Err(missing(chunk)))),
        },
        Request::Punch {
            chunk,
            offset,
            len,
            reply,
        } => match ctx.shard_for(chunk) {
            Some(s) => ctx.ex.spawn(async move {
                let _ = reply.send(s.punch(chunk, offset, len).await);
            }),
            None => drop(reply.send(Err(missing(chunk)))),
        },
        Request::DataRanges { chunk, reply } => {
            let r = ctx
                .shard_for(chunk)
                .ok_or_else(|| missing(chunk))
                .map(|s| s.data_ranges(chunk));
            let _ = reply.send(r);
        }
        Request::Stat { chunk, reply } => {
            let r = ctx
                .shard_for(chunk)
                .ok_or_else(|| missing(chunk))
                .map(|s| s.stat(chunk));
            let _ = reply.send(r);
        }
        Request::Locate {
            chunk,
            offset,
            reply,
        } => {
            let r = ctx.shard_for(chunk).ok_or_else(|| missing(chunk)).map(|s| {
                s.locate(chunk, offset).map(|b| {
                    (
                        s.device().to_string(),
                        b * crate::store::format::BLOCK as u64,
                    )
                })
            });
            let _ = reply.send(r);
        }
        Request::MapDigest { chunk, reply } => {
            let r = ctx
                .shard_for(chunk)
                .ok_or_else(|| missing(chunk))
                .map(|s| s.map_digest(chunk));
            let _ = reply.send(r);
        }
        Request::BootSuspects { reply } => {
            let _ = reply.send(Ok(ctx
                .shards
                .values()
                .flat_map(|s| s.boot_suspects())
                .collect()));
        }
        Request::List { reply } => {
            let _ = reply.send(Ok(ctx.shards.values().flat_map(|s| s.list()).collect()));
        }
        Request::Stats { reply } => {
            let _ = reply.send(Ok(ctx
                .shards
                .iter()
                .map(|(&i, s)| (i, s.stats()))
                .collect()));
        }
        Request::Run(f) => f(ctx),
        Request::Shutdown { reply } => {
            if stop.get() {
                let _ = reply.send(Ok(()));
                return;
            }
            stop.set(true);
            let shards: Vec<Rc<Shard>> = ctx.shards.values().cloned().collect();
            ctx.ex.spawn(async move {
                let mut result = Ok(());
                for s in shards {
                    match s.close().await {
                        Ok(()) | Err(StoreError::Closed) => {}
                        Err(e) => result = Err(e),
                    }
                }
                let _ = reply.send(result);
            });
        }
    }
}

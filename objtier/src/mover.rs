//! Moving blobs through an unreliable store: every request is retried with exponential backoff
//! and full jitter ([`crate::policy::backoff_ms`]) behind a circuit breaker
//! ([`crate::policy::Breaker`]): after a run of failures no request is sent for a while, then
//! one probe decides. Uploads keep trying until they succeed (the flusher runs in the
//! background and the data is safe on flash meanwhile); reads and deletes give up after a
//! deadline with the last error. A blob the store says is missing is not retried: it is
//! reported at once, loudly (the index points at it).

use crate::blob::{BlobId, ExtentBlocks, FetchedBlocks, Placed, Table};
use crate::policy::{backoff_ms, Breaker, BreakerState};
use crate::s3::{BlobStore, S3Error};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Retry knobs.
#[derive(Clone, Copy, Debug)]
pub struct MoverConfig {
    /// First backoff ceiling.
    pub backoff_base_ms: u64,
    /// Largest backoff.
    pub backoff_cap_ms: u64,
    /// Failures in a row that open the breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker stays open.
    pub breaker_open_ms: u64,
    /// Reads and deletes give up after this long (uploads never do).
    pub deadline_ms: u64,
}

impl Default for MoverConfig {
    fn default() -> Self {
        MoverConfig {
            backoff_base_ms: 100,
            backoff_cap_ms: 5_000,
            breaker_threshold: 5,
            breaker_open_ms: 2_000,
            deadline_ms: 30_000,
        }
    }
}

/// What `cfs tier status` shows of the store's health.
#[derive(Clone, Debug, Default)]
pub struct MoverStatus {
    /// Requests that failed and were tried again.
    pub retries: u64,
    /// Blobs uploaded.
    pub puts: u64,
    /// Extents read back.
    pub gets: u64,
    /// Blobs found missing on the store.
    pub missing: u64,
    /// Whether the breaker is open (the store is being left alone).
    pub breaker_open: bool,
    /// Whether the last request failed (the store is unreachable or failing right now).
    pub failing: bool,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// Blob traffic with retries (see the module documentation).
pub struct Mover {
    store: BlobStore,
    cfg: MoverConfig,
    breaker: Mutex<Breaker>,
    origin: Instant,
    seed: AtomicU64,
    retries: AtomicU64,
    puts: AtomicU64,
    gets: AtomicU64,
    missing: AtomicU64,
    failing: std::sync::atomic::AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Mover {
    /// A mover over `store`.
    pub fn new(store: BlobStore, cfg: MoverConfig) -> Mover {
        Mover {
            store,
            cfg,
            breaker: Mutex::new(Breaker::new(cfg.breaker_threshold, cfg.breaker_open_ms)),
            origin: Instant::now(),
            seed: AtomicU64::new(0x5EED),
            retries: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            missing: AtomicU64::new(0),
            failing: std::sync::atomic::AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` until it succeeds, fails for good (`Missing`, `Config`), or (`deadline`) time
    /// runs out, waiting between tries and while the breaker is open.
    async fn retry<T, F, Fut>(
        &self,
        what: &str,
        deadline: Option<Instant>,
        op: F,
    ) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        let mut attempt = 0u32;
        loop {
            let allowed = self.breaker().allow(self.now_ms());
            if !allowed {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(self.breaker_error(what));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            match op().await {
                Ok(v) => {
                    self.breaker().success();
                    self.failing.store(false, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e @ (S3Error::Missing { .. } | S3Error::Config(_))) => {
                    // The store answered: it is up; this blob or this config is the problem.
                    self.breaker().success();
                    if matches!(e, S3Error::Missing { .. }) {
                        self.missing.fetch_add(1, Ordering::Relaxed);
                        tracing::error!("{what}: {e}");
                    }
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(e.to_string());
                    return Err(e);
                }
                Err(e) => {
                    self.breaker().failure(self.now_ms());
                    self.failing.store(true, Ordering::Relaxed);
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    let msg = e.to_string();
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(e);
                    }
                    let seed = self.seed.fetch_add(0x9E37_79B9, Ordering::Relaxed);
                    let wait = backoff_ms(
                        self.cfg.backoff_base_ms,
                        self.cfg.backoff_cap_ms,
                        attempt,
                        seed,
                    );
                    if attempt < 3 || attempt.is_power_of_two() {
                        tracing::warn!(
                            "{what}: {msg}; trying again in {wait} ms (try {})",
                            attempt + 2
                        );
                    }
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
    }

    fn breaker_error(&self, what: &str) -> S3Error {
        S3Error::Config(format!(
            "{what}: the object store failed repeatedly and is being left alone for now ({})",
            self.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default()
        ))
    }

    fn deadline(&self) -> Option<Instant> {
        Some(Instant::now() + Duration::from_millis(self.cfg.deadline_ms))
    }

    /// Uploads a blob, trying until it is on the store.
    pub async fn put_blob(&self, id: BlobId, bytes: bytes::Bytes) -> Result<(), S3Error> {
        let what = format!("PUT blob {id}");
        self.retry(&what, None, || self.store.put_blob(id, bytes.clone()))
            .await?;
        self.puts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A read (checked by the store client), tried until the deadline, counted.
    async fn get<T, F, Fut>(&self, what: &str, op: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        let v = self.retry(what, self.deadline(), op).await?;
        self.gets.fetch_add(1, Ordering::Relaxed);
        Ok(v)
    }

    /// Reads an extent back (checked), trying until the deadline.
    pub async fn get_extent(&self, p: &Placed) -> Result<Vec<u8>, S3Error> {
        let what = format!("GET blob {} at {}", p.blob, p.blob_offset);
        self.get(&what, || self.store.get_extent(p)).await
    }

    /// Reads a blob's extent table with its block CRCs (checked), trying until the deadline.
    pub async fn read_table(&self, id: BlobId) -> Result<Table, S3Error> {
        let what = format!("GET table of blob {id}");
        self.get(&what, || self.store.read_full_table(id)).await
    }

    /// The checked blocks around a piece of an extent ([`BlobStore::get_blocks`]), trying
    /// until the deadline.
    pub async fn get_blocks(
        &self,
        p: &Placed,
        blocks: &ExtentBlocks,
        offset: u64,
        len: u64,
    ) -> Result<FetchedBlocks, S3Error> {
        let what = format!("GET blob {} at {}+{offset}", p.blob, p.blob_offset);
        self.get(&what, || self.store.get_blocks(p, blocks, offset, len))
            .await
    }

    /// Deletes a blob, trying until the deadline.
    pub async fn delete_blob(&self, id: BlobId) -> Result<(), S3Error> {
        let what = format!("DELETE blob {id}");
        self.retry(&what, self.deadline(), || self.store.delete_blob(id))
            .await
    }

    /// Whether the store answers: the last request succeeded and the breaker is closed (cheap:
    /// asked on every write for back-pressure).
    pub fn healthy(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
            && matches!(self.breaker().state(), BreakerState::Closed)
    }

    /// Health and counters.
    pub fn status(&self) -> MoverStatus {
        MoverStatus {
            retries: self.retries.load(Ordering::Relaxed),
            puts: self.puts.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            missing: self.missing.load(Ordering::Relaxed),
            breaker_open: !matches!(self.breaker().state(), BreakerState::Closed),
            failing: self.failing.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

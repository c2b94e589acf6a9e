//! The tiering policy: which extents to flush, when to evict, when to push back on writers,
//! which blobs to rewrite, and how to treat a store that fails. Pure: times come in as
//! milliseconds from the caller's clock and randomness as a seed, so the policy runs inside the
//! simulator and in property tests.

/// Knobs of the policy (config `[tier]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// An extent not written for this long is cold: flush it.
    pub min_age_ms: u64,
    /// Flash use (of capacity, in percent) above which flushed extents are evicted...
    pub evict_above_pct: u8,
    /// ...down to this.
    pub evict_to_pct: u8,
    /// Unflushed bytes allowed while the store is unreachable before writers are slowed down.
    pub reserve_bytes: u64,
    /// Beyond `reserve_bytes` by this much, writes fail with ENOSPC.
    pub reserve_slack_bytes: u64,
    /// A blob whose live fraction (percent of its payload) is below this is rewritten.
    pub compact_below_pct: u8,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            min_age_ms: 300_000,
            evict_above_pct: 85,
            evict_to_pct: 70,
            reserve_bytes: 8 << 30,
            reserve_slack_bytes: 1 << 30,
            compact_below_pct: 50,
        }
    }
}

/// One extent on flash, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashExtent {
    /// Chunk id.
    pub chunk: u64,
    /// Bytes.
    pub bytes: u64,
    /// Last write (caller's clock, ms).
    pub written_ms: u64,
    /// Already in a blob on the store (a copy there is current).
    pub flushed: bool,
    /// Pinned to flash (`cfs tier pin`): never evicted (it is still flushed, for safety).
    pub pinned: bool,
    /// Last read (caller's clock, ms): the coldest flushed extents are evicted first.
    pub read_ms: u64,
}

/// The unflushed extents old enough to flush, oldest first, up to `max_bytes` (one blob).
pub fn to_flush(
    cfg: &PolicyConfig,
    now_ms: u64,
    extents: &[FlashExtent],
    max_bytes: u64,
) -> Vec<u64> {
    let mut cold: Vec<&FlashExtent> = extents
        .iter()
        .filter(|e| !e.flushed && now_ms.saturating_sub(e.written_ms) >= cfg.min_age_ms)
        .collect();
    cold.sort_by_key(|e| (e.written_ms, e.chunk));
    let mut out = Vec::new();
    let mut total = 0u64;
    for e in cold {
        if !out.is_empty() && total + e.bytes > max_bytes {
            break;
        }
        total += e.bytes;
        out.push(e.chunk);
    }
    out
}

/// The flushed, unpinned extents to evict (least recently read first) so flash use drops to
/// `evict_to_pct` once it is above `evict_above_pct`; empty below the watermark.
pub fn to_evict(cfg: &PolicyConfig, used: u64, capacity: u64, extents: &[FlashExtent]) -> Vec<u64> {
    if capacity == 0 || used * 100 <= capacity * u64::from(cfg.evict_above_pct) {
        return Vec::new();
    }
    let target = capacity * u64::from(cfg.evict_to_pct) / 100;
    let mut candidates: Vec<&FlashExtent> =
        extents.iter().filter(|e| e.flushed && !e.pinned).collect();
    candidates.sort_by_key(|e| (e.read_ms.max(e.written_ms), e.chunk));
    let mut freed = 0u64;
    let mut out = Vec::new();
    for e in candidates {
        if used - freed <= target {
            break;
        }
        freed += e.bytes.min(used - freed);
        out.push(e.chunk);
    }
    out
}

/// What writers get while unflushed data piles up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    /// Write freely.
    Normal,
    /// Slow down (the mount delays writes by this many ms each).
    Throttle(u64),
    /// Refuse new data with ENOSPC (already acknowledged data is safe on flash).
    Full,
}

/// Back-pressure from the unflushed bytes (only while the store cannot take them: with a
/// healthy store, flushing keeps up and flash watermarks govern instead).
pub fn pressure(cfg: &PolicyConfig, unflushed_bytes: u64, store_healthy: bool) -> Pressure {
    if store_healthy || unflushed_bytes <= cfg.reserve_bytes {
        return Pressure::Normal;
    }
    let over = unflushed_bytes - cfg.reserve_bytes;
    if over >= cfg.reserve_slack_bytes {
        return Pressure::Full;
    }
    // Up to 100 ms per write, growing with how far into the slack we are.
    Pressure::Throttle(1 + over * 99 / cfg.reserve_slack_bytes.max(1))
}

/// Blobs worth rewriting: live payload below `compact_below_pct` of the blob's payload.
/// Input: (blob id, live bytes, payload bytes); output sorted emptiest first.
pub fn to_compact(cfg: &PolicyConfig, blobs: &[(u128, u64, u64)]) -> Vec<u128> {
    let mut v: Vec<&(u128, u64, u64)> = blobs
        .iter()
        .filter(|(_, live, total)| {
            *total > 0 && live * 100 < total * u64::from(cfg.compact_below_pct)
        })
        .collect();
    v.sort_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)).then(a.0.cmp(&b.0)));
    v.into_iter().map(|b| b.0).collect()
}

/// Exponential backoff with full jitter: the wait before try `attempt` (0-based), between 0
/// and `min(cap, base * 2^attempt)`, drawn from `seed`.
pub fn backoff_ms(base_ms: u64, cap_ms: u64, attempt: u32, seed: u64) -> u64 {
    let ceiling = base_ms
        .saturating_mul(1u64.checked_shl(attempt.min(62)).unwrap_or(u64::MAX))
        .min(cap_ms);
    // splitmix64 of the seed: uniform enough for jitter.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if ceiling == 0 {
        0
    } else {
        z % (ceiling + 1)
    }
}

/// A circuit breaker for the store: after `threshold` failures in a row it opens (no request
/// is sent) for `open_ms`, then lets one probe through (half-open); a success closes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Breaker {
    threshold: u32,
    open_ms: u64,
    failures: u32,
    state: BreakerState,
}

/// Where a [`Breaker`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// No requests until the given time (ms).
    Open {
        /// When a probe may go.
        until_ms: u64,
    },
    /// One probe is out; its result decides.
    HalfOpen,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_ms: u64) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            open_ms,
            failures: 0,
            state: BreakerState::Closed,
        }
    }

    /// Where it is now.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a request may be sent at `now_ms` (an open breaker past its time lets exactly
    /// one probe through).
    pub fn allow(&mut self, now_ms: u64) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { until_ms } if now_ms >= until_ms => {
                self.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => false,
        }
    }

    /// A request succeeded.
    pub fn success(&mut self) {
        self.failures = 0;
        self.state = BreakerState::Closed;
    }

    /// A request failed at `now_ms`.
    pub fn failure(&mut self, now_ms: u64) {
        self.failures = self.failures.saturating_add(1);
        if self.state == BreakerState::HalfOpen || self.failures >= self.threshold {
            self.state = BreakerState::Open {
                until_ms: now_ms + self.open_ms,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext() -> impl Strategy<Value = FlashExtent> {
        (
            0u64..1000,
            1u64..10_000_000,
            0u64..1_000_000,
            any::<bool>(),
            any::<bool>(),
            0u64..1_000_000,
        )
            .prop_map(
                |(chunk, bytes, written_ms, flushed, pinned, read_ms)| FlashExtent {
                    chunk,
                    bytes,
                    written_ms,
                    flushed,
                    pinned,
                    read_ms,
                },
            )
    }

    proptest! {
        #[test]
        fn flush_takes_only_cold_unflushed_oldest_first_within_a_blob(es in proptest::collection::vec(ext(), 0..60), now in 0u64..2_000_000, max in 1u64..50_000_000) {
            let mut es = es;
            let mut seen = std::collections::HashSet::new();
            es.retain(|e| seen.insert(e.chunk)); // one extent per chunk
            let cfg = PolicyConfig { min_age_ms: 100_000, ..PolicyConfig::default() };
            let picked = to_flush(&cfg, now, &es, max);
            let get = |c: u64| es.iter().find(|e| e.chunk == c).expect("picked from the input");
            let mut total = 0;
            for w in picked.windows(2) {
                prop_assert!(get(w[0]).written_ms <= get(w[1]).written_ms, "oldest first");
            }
            for c in &picked {
                let e = get(*c);
                prop_assert!(!e.flushed && now.saturating_sub(e.written_ms) >= 100_000);
                total += e.bytes;
            }
            // Within one blob, unless a single extent is larger than a blob.
            prop_assert!(picked.len() <= 1 || total <= max);
            // Nothing cold was left out while room remained for it.
            if let Some(last) = picked.last() {
                let last_w = get(*last).written_ms;
                for e in es.iter().filter(|e| !e.flushed && now.saturating_sub(e.written_ms) >= 100_000 && e.written_ms < last_w) {
                    prop_assert!(picked.contains(&e.chunk), "skipped an older cold extent");
                }
            }
        }

        #[test]
        fn eviction_never_touches_pinned_or_unflushed_and_stops_at_the_target(es in proptest::collection::vec(ext(), 0..60), cap in 1u64..1_000_000_000) {
            let used: u64 = es.iter().map(|e| e.bytes).sum();
            let cfg = PolicyConfig::default();
            let ev = to_evict(&cfg, used, cap, &es);
            for c in &ev {
                prop_assert!(es.iter().any(|e| e.chunk == *c && e.flushed && !e.pinned));
            }
            if used * 100 <= cap * 85 {
                prop_assert!(ev.is_empty());
            }
        }

        #[test]
        fn pressure_grows_with_the_backlog_and_never_without_an_outage(a in 0u64..20 << 30, b in 0u64..20 << 30) {
            let cfg = PolicyConfig::default();
            prop_assert_eq!(pressure(&cfg, a, true), Pressure::Normal);
            let rank = |p: Pressure| match p { Pressure::Normal => 0, Pressure::Throttle(ms) => ms, Pressure::Full => 1000 };
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(rank(pressure(&cfg, lo, false)) <= rank(pressure(&cfg, hi, false)));
        }

        #[test]
        fn backoff_stays_under_its_ceiling(base in 1u64..1000, cap in 1u64..100_000, attempt in 0u32..100, seed in any::<u64>()) {
            let w = backoff_ms(base, cap, attempt, seed);
            prop_assert!(w <= cap.min(base.saturating_mul(1u64.checked_shl(attempt.min(62)).unwrap_or(u64::MAX))));
        }
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let mut b = Breaker::new(3, 1000);
        for t in 0..3 {
            assert!(b.allow(t));
            b.failure(t);
        }
        assert_eq!(b.state(), BreakerState::Open { until_ms: 1002 });
        assert!(!b.allow(500));
        assert!(b.allow(1002), "one probe after the open time");
        assert!(!b.allow(1003), "only one probe");
        b.failure(1003);
        assert_eq!(b.state(), BreakerState::Open { until_ms: 2003 });
        assert!(b.allow(2003));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(2004));
    }

    #[test]
    fn compaction_picks_mostly_dead_blobs_emptiest_first() {
        let cfg = PolicyConfig::default();
        let blobs = [
            (1u128, 90, 100),
            (2, 10, 100),
            (3, 49, 100),
            (4, 0, 0),
            (5, 0, 100),
        ];
        assert_eq!(to_compact(&cfg, &blobs), vec![5, 2, 3]);
    }
}

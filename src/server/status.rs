//! The status page on the admin port: `/` (one self-contained HTML page) and `/status.json`
//! (what it shows), HAProxy's stats page for embeddings.
//!
//! The page is embedded in the binary and loads nothing from anywhere else (no CDN, no font, no
//! external script; its Content-Security-Policy forbids it), so it works in an air-gapped
//! cluster, from `kubectl port-forward` alone.
//!
//! The JSON is read straight from the [`Metrics`] fields (`.get()` on counters and gauges,
//! `collect()` on the few labelled vectors with bounded labels), never by rendering and parsing
//! the Prometheus text: a page polling every 2 s should cost next to nothing.
//!
//! **Why the history is kept in the process** (a ring of [`HISTORY_POINTS`] snapshots taken
//! every [`SAMPLE_INTERVAL`] by a task, about 5 minutes, a few KiB) rather than by the page from
//! its own polls: an operator who opens the page during an incident sees the minutes before it,
//! and a reload keeps them. The cost is one snapshot every few seconds whether or not anyone
//! looks, which is nothing next to the traffic. Several open pages share one history.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::core::Collector;
use serde_json::{json, Map, Value};
use tokio::time::{Instant, MissedTickBehavior};

use crate::{config::base_url::BaseUrl, http::route::Route, metrics::Metrics, AppState};

/// The page itself, embedded so the binary is all an air-gapped cluster needs.
pub const PAGE: &str = include_str!("status.html");
/// How often the history takes a snapshot: fine enough to see a burst, coarse enough that the
/// sampler's cost is nil.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Points of history kept: 5 minutes at [`SAMPLE_INTERVAL`], the span an operator looks back
/// over when paged; older trends are Prometheus' job.
pub const HISTORY_POINTS: usize = 60;
/// Snapshots back that "recent" upstream latency is taken over (30 s): long enough to hold a
/// few calls of a slow upstream, short enough to show a change as it happens.
pub const RECENT_LATENCY_POINTS: usize = 6;

/// One snapshot of the counters the history and the "recent" figures are differences of.
#[derive(Clone, Default)]
struct Snapshot {
    at: Option<Instant>,
    inputs: u64,
    cache_hits: u64,
    coalesced: u64,
    upstream_calls: u64,
    upstream_inputs: u64,
    latency_count: u64,
    latency_sum: f64,
    limit: i64,
    queue_depth: i64,
    /// `embedcar_shed_requests_total` and `embedcar_errors_total` by reason, and upstream
    /// exchanges by status (all routes).
    shed: BTreeMap<String, u64>,
    own_errors: BTreeMap<String, u64>,
    upstream: BTreeMap<String, u64>,
}

impl Snapshot {
    fn take(m: &Metrics) -> Snapshot {
        let (latency_count, latency_sum) = m
            .upstream_duration_of(Route::Embeddings)
            .map_or((0, 0.0), |h| (h.get_sample_count(), h.get_sample_sum()));
        Snapshot {
            at: Some(Instant::now()),
            inputs: m.embeddings.inputs.get(),
            cache_hits: m.embeddings.cache_hits.get(),
            coalesced: m.embeddings.coalesced.get(),
            upstream_calls: m.embeddings.batch_inputs.get_sample_count(),
            upstream_inputs: as_count(m.embeddings.batch_inputs.get_sample_sum()),
            latency_count,
            latency_sum,
            limit: m.resilience.adaptive_limit.get(),
            queue_depth: m.embeddings.queue_depth.get(),
            shed: by_label(&m.requests.shed, "reason"),
            own_errors: by_label(&m.requests.errors, "reason"),
            upstream: by_label(&m.upstream.requests, "status"),
        }
    }

    /// Failures in this snapshot: everything shed, every error embedcar answered, and every
    /// upstream outcome but a 1xx-3xx.
    fn errors(&self) -> u64 {
        let upstream: u64 = self
            .upstream
            .iter()
            .filter(|(status, _)| !matches!(status.as_bytes().first(), Some(b'1'..=b'3')))
            .map(|(_, n)| n)
            .sum();
        self.shed.values().sum::<u64>() + self.own_errors.values().sum::<u64>() + upstream
    }
}

/// A counter family's values summed by one label (the others, e.g. `route`, folded in), without
/// the series still at 0 (the page lists what happened). The labels are bounded (see
/// `metrics.rs`), so this is a few dozen entries at most.
fn by_label(vec: &impl Collector, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for family in vec.collect() {
        for metric in family.get_metric() {
            let Some(value) = metric
                .get_label()
                .iter()
                .find(|l| l.name() == label)
                .map(|l| l.value())
            else {
                continue;
            };
            let count = as_count(metric.get_counter().get_value());
            if count > 0 {
                *out.entry(value.to_string()).or_insert(0) += count;
            }
        }
    }
    out
}

fn as_count(v: f64) -> u64 {
    // Counters hold whole numbers; `as` saturates and maps NaN to 0.
    v.round() as u64
}

/// The history and the clock of the status page; one per admin listener.
pub struct Status {
    history: Mutex<VecDeque<Snapshot>>,
    started: Instant,
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

impl Status {
    pub fn new() -> Status {
        Status {
            // One more snapshot than points: each point is the difference of two.
            history: Mutex::new(VecDeque::with_capacity(HISTORY_POINTS + 1)),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Snapshot>> {
        // A panic elsewhere while holding it leaves a deque that is still valid.
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a snapshot to the history, dropping the oldest beyond [`HISTORY_POINTS`].
    pub fn sample(&self, metrics: &Metrics) {
        let snapshot = Snapshot::take(metrics);
        let mut h = self.lock();
        if h.len() > HISTORY_POINTS {
            h.pop_front();
        }
        h.push_back(snapshot);
    }

    /// Samples every [`SAMPLE_INTERVAL`] (the first at once) until dropped or aborted.
    pub async fn run_sampler(self: Arc<Self>, metrics: Arc<Metrics>) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        // A stalled runtime should not produce a burst of snapshots a moment apart.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sample(&metrics);
        }
    }

    /// The body of `/status.json` (its shape is documented in README.md, "Status page").
    pub fn json(&self, state: &AppState) -> Vec<u8> {
        let m = &state.metrics;
        let now = Snapshot::take(m);
        let history = self.lock();
        let oldest = history.front();
        let recent_latency_from = history
            .len()
            .checked_sub(RECENT_LATENCY_POINTS)
            .and_then(|i| history.get(i))
            .or(oldest);

        let recent_window = oldest
            .and_then(|o| o.at)
            .and_then(|at| now.at.map(|n| n.duration_since(at).as_secs_f64()))
            .unwrap_or(0.0);

        let body = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "upstream": BaseUrl::mask_userinfo(&state.config.upstream.url),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "draining": state.is_draining(),
            "embeddings": embeddings_json(state, &now),
            "concurrency": concurrency_json(state, &now, recent_latency_from),
            "breaker": {
                "enabled": state.config.breaker.enabled,
                "state": if m.resilience.breaker_state.get() == 0 { "closed" } else { "open" },
                "open_credentials": m.resilience.breaker_open_credentials.get(),
            },
            "rate_gate": {
                "closures": m.resilience.gate_closures.get(),
                "rejections": m.resilience.gate_rejections.get(),
            },
            "recent_window_seconds": recent_window,
            "shed": labelled_json(&now.shed, oldest.map(|o| &o.shed)),
            "errors_by_reason": labelled_json(&now.own_errors, oldest.map(|o| &o.own_errors)),
            "upstream_statuses": labelled_json(&now.upstream, oldest.map(|o| &o.upstream)),
            "history": history_json(&history),
        });
        drop(history);
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// The `embeddings` section: inputs, calls and what the cache and coalescing saved.
fn embeddings_json(state: &AppState, now: &Snapshot) -> Value {
    let m = &state.metrics;
    let hit_ratio = (now.inputs > 0).then(|| now.cache_hits as f64 / now.inputs as f64);
    let tokens = by_label(&m.embeddings.tokens, "source");
    let (cache_entries, cache_bytes) = state.engine.as_ref().map_or((0, 0), |e| e.cache().usage());
    json!({
        "enabled": state.engine.is_some(),
        "inputs": now.inputs,
        "cache_hits": now.cache_hits,
        "coalesced": now.coalesced,
        "abandoned": m.embeddings.abandoned.get(),
        "upstream_calls": now.upstream_calls,
        "upstream_inputs": now.upstream_inputs,
        "saved_inputs": now.inputs.saturating_sub(now.upstream_inputs),
        "cache_hit_ratio": hit_ratio,
        "queue_depth": now.queue_depth,
        "tokens_upstream": tokens.get("upstream").copied().unwrap_or(0),
        "tokens_cache": tokens.get("cache").copied().unwrap_or(0),
        "cache_entries": cache_entries,
        "cache_bytes": cache_bytes,
    })
}

/// The `concurrency` section: the adaptive limit, its latency baseline, and the mean latency
/// of embeddings calls since `recent_latency_from`.
fn concurrency_json(
    state: &AppState,
    now: &Snapshot,
    recent_latency_from: Option<&Snapshot>,
) -> Value {
    let m = &state.metrics;
    let baseline = m.resilience.adaptive_baseline.get();
    let recent_latency = recent_latency_from.and_then(|from| {
        let calls = now.latency_count.saturating_sub(from.latency_count);
        (calls > 0).then(|| (now.latency_sum - from.latency_sum).max(0.0) / calls as f64)
    });
    json!({
        "adaptive": state.config.limits.adaptive_concurrency,
        "limit": now.limit,
        "ceiling": state.config.limits.max_concurrency,
        "upstream_in_flight": m.upstream.in_flight.get(),
        "latency_baseline_seconds": (baseline > 0.0).then_some(baseline),
        "latency_recent_seconds": recent_latency,
    })
}

/// A labelled counter's values as `{label: {total, recent}}`, recent being since `then`.
fn labelled_json(now: &BTreeMap<String, u64>, then: Option<&BTreeMap<String, u64>>) -> Value {
    let mut out = Map::new();
    for (label, total) in now {
        let before = then.and_then(|t| t.get(label)).copied().unwrap_or(0);
        out.insert(
            label.clone(),
            json!({"total": total, "recent": total.saturating_sub(before)}),
        );
    }
    Value::Object(out)
}

/// The sparklines' series, oldest first, one point per [`SAMPLE_INTERVAL`]: counts are per
/// interval (differences of snapshots), gauges as sampled, latency the mean of the interval's
/// embeddings calls in milliseconds (`null` when there were none).
fn history_json(history: &VecDeque<Snapshot>) -> Value {
    let pairs = || history.iter().zip(history.iter().skip(1));
    let delta = |f: fn(&Snapshot) -> u64| -> Vec<u64> {
        pairs().map(|(a, b)| f(b).saturating_sub(f(a))).collect()
    };
    let latency: Vec<Option<f64>> = pairs()
        .map(|(a, b)| {
            let calls = b.latency_count.saturating_sub(a.latency_count);
            (calls > 0).then(|| (b.latency_sum - a.latency_sum).max(0.0) * 1000.0 / calls as f64)
        })
        .collect();
    json!({
        "interval_seconds": SAMPLE_INTERVAL.as_secs(),
        "max_points": HISTORY_POINTS,
        "inputs": delta(|s| s.inputs),
        "upstream_inputs": delta(|s| s.upstream_inputs),
        "upstream_calls": delta(|s| s.upstream_calls),
        "cache_hits": delta(|s| s.cache_hits),
        "coalesced": delta(|s| s.coalesced),
        "errors": delta(Snapshot::errors),
        "limit": history.iter().skip(1).map(|s| s.limit).collect::<Vec<_>>(),
        "queue_depth": history.iter().skip(1).map(|s| s.queue_depth).collect::<Vec<_>>(),
        "latency_ms": latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_counts_are_per_interval() {
        let m = Metrics::new();
        let status = Status::new();
        for i in 0..(HISTORY_POINTS as u64 + 10) {
            m.embeddings.inputs.inc_by(i);
            m.requests.shed.with_label_values(&["queue_full"]).inc();
            status.sample(&m);
        }
        let h = status.lock();
        assert_eq!(h.len(), HISTORY_POINTS + 1);
        let v = history_json(&h);
        let inputs = v["inputs"].as_array().expect("inputs");
        assert_eq!(inputs.len(), HISTORY_POINTS);
        assert_eq!(
            inputs.last().and_then(Value::as_u64),
            Some(HISTORY_POINTS as u64 + 9)
        );
        assert!(v["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .all(|e| e == 1));
        assert!(v["latency_ms"]
            .as_array()
            .expect("latency")
            .iter()
            .all(Value::is_null));
    }

    #[test]
    fn labelled_counters_are_summed_across_other_labels() {
        let m = Metrics::new();
        m.observe_upstream_status(Route::Embeddings, http::StatusCode::OK, Duration::ZERO);
        m.observe_upstream_status(Route::Models, http::StatusCode::OK, Duration::ZERO);
        m.observe_upstream(Route::Embeddings, "timeout", Duration::ZERO);
        let s = Snapshot::take(&m);
        assert_eq!(s.upstream.get("200"), Some(&2));
        assert_eq!(s.upstream.get("timeout"), Some(&1));
        assert_eq!(s.errors(), 1);
        assert_eq!(s.latency_count, 2, "embeddings route only");
    }
}

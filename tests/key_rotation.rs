//! A held key rotated the way Kubernetes rotates a mounted Secret: the key file is
//! `key -> ..data/key`, and `..data` is a symlink to a timestamped directory that is replaced
//! atomically by renaming a new symlink over it. embedcar must follow without a restart, without
//! failing a request, and must keep the key it has when the new file is empty or unusable.

mod support;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use fake_openai::{Behavior, FakeUpstream, Rule};
use http::StatusCode;
use serde_json::json;
use support::harness::*;

/// Short, so the test takes seconds; the default is 2 s.
const RELOAD_INTERVAL: Duration = Duration::from_millis(100);
/// How long a new key may take to reach the upstream: many reload intervals.
const ROTATION_DEADLINE: Duration = Duration::from_secs(5);

/// A Secret volume as the kubelet lays it out.
struct SecretVolume {
    dir: PathBuf,
    generation: usize,
}

impl SecretVolume {
    fn new(name: &str, key: &str) -> SecretVolume {
        let dir = std::env::temp_dir().join(format!(
            "embedcar-key-rotation-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut v = SecretVolume { dir, generation: 0 };
        v.publish(key);
        std::os::unix::fs::symlink("..data/key", v.key_path()).unwrap();
        v
    }

    /// What the config names: the stable path behind the symlinks.
    fn key_path(&self) -> PathBuf {
        self.dir.join("key")
    }

    /// Writes `content` into a new timestamped directory and swaps `..data` to it atomically
    /// (a new symlink renamed over the old one), as the kubelet's atomic writer does.
    fn publish(&mut self, content: &str) {
        self.generation += 1;
        let name = format!(
            "..2026_11_30_07_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        );
        let data_dir = self.dir.join(&name);
        std::fs::create_dir(&data_dir).unwrap();
        std::fs::write(data_dir.join("key"), content).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

impl Drop for SecretVolume {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Keeps pass-through and embeddings requests going until stopped; counts failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

/// Embeddings callers at once: with each upstream call taking a while, their lane always has
/// work queued or in flight, so it lives across the rotation (an idle lane is dropped and made
/// anew, which would hide a key baked into a lane).
const EMBEDDINGS_WORKERS: usize = 4;
/// How long the first embeddings call takes, holding its lane open: well past
/// [`ROTATION_DEADLINE`].
const LANE_HELD_FOR: Duration = Duration::from_secs(8);
/// How long the fake upstream takes per request.
const UPSTREAM_DELAY: Duration = Duration::from_millis(50);

impl Traffic {
    fn start(base: String) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let workers: Vec<_> = (0..=EMBEDDINGS_WORKERS)
            .map(|worker| {
                let (stop, sent, failures) = (stop.clone(), sent.clone(), failures.clone());
                let base = base.clone();
                tokio::spawn(async move {
                    let c = client();
                    // The first embeddings worker's first call goes out alone (it is the one
                    // the upstream holds); the others start once it is on its way, or their
                    // first inputs would join it in one merged call and be held with it.
                    if worker > 1 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        // Worker 0 passes through; the others send distinct inputs, so each
                        // one goes upstream rather than being answered from the cache.
                        let (what, req) = if worker == 0 {
                            ("models", get(&format!("{base}/v1/models")))
                        } else {
                            let input = format!("rotation {worker} {i}");
                            let body = json!({"input": input, "model": "text-embedding-3-small"});
                            (
                                "embeddings",
                                post_json(&format!("{base}/v1/embeddings"), &body),
                            )
                        };
                        sent.fetch_add(1, Ordering::Relaxed);
                        match c.request(req).await {
                            Ok(r) if r.status() == StatusCode::OK => {
                                body_bytes(r).await;
                            }
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{what}: {}", r.status())),
                            Err(e) => failures.lock().unwrap().push(format!("{what}: {e}")),
                        }
                    }
                })
            })
            .collect();
        let task = tokio::spawn(async move {
            for w in workers {
                w.await.unwrap();
            }
        });
        Traffic {
            stop,
            sent,
            failures,
            task,
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let failures = self.failures.lock().unwrap().clone();
        (self.sent.load(Ordering::Relaxed), failures)
    }
}

/// The `authorization` header of every upstream request from index `from` on, per path kind.
fn keys_seen(upstream: &FakeUpstream, from: usize) -> Vec<(String, String)> {
    upstream.requests()[from..]
        .iter()
        .map(|r| {
            (
                r.path().to_string(),
                r.header("authorization").unwrap_or("<none>").to_string(),
            )
        })
        .collect()
}

/// Waits until both an embeddings call and a pass-through request carried `bearer`; returns
/// the number of recorded requests at that point.
async fn wait_for_key(upstream: &FakeUpstream, from: usize, bearer: &str) -> usize {
    let started = Instant::now();
    loop {
        let seen = keys_seen(upstream, from);
        let on = |path: &str| seen.iter().any(|(p, k)| p == path && k == bearer);
        if on("/v1/embeddings") && on("/v1/models") {
            return from + seen.len();
        }
        assert!(
            started.elapsed() < ROTATION_DEADLINE,
            "{bearer} not seen upstream on both paths within {ROTATION_DEADLINE:?}: {:?}",
            seen.iter().rev().take(12).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn proxy_config(upstream: &FakeUpstream, key_file: &Path) -> embedcar::Config {
    let mut config = config_for(&upstream.url());
    config.credentials.api_key_file = Some(key_file.display().to_string());
    config.credentials.reload_interval = RELOAD_INTERVAL;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_is_used_without_a_restart_and_a_bad_one_is_not() {
    let upstream = FakeUpstream::start().await;
    upstream.set_behavior(Behavior::Delay(UPSTREAM_DELAY));
    // The first embeddings call takes longer than the rotation may: its lane stays alive (work
    // in flight) across the rotation, so a key baked into the lane when it was made would
    // still be sent on the lane's later calls and the new key would not show in time.
    upstream.push_rule(Rule::once(Behavior::Delay(LANE_HELD_FOR)).on_path("/v1/embeddings"));
    let mut volume = SecretVolume::new("rotate", "sk-old-key\n");
    let mut config = proxy_config(&upstream, &volume.key_path());
    // The adaptive limit would cut the held call at 10 times the others' latency and retry it;
    // a fixed limit lets it run its full time.
    config.limits.adaptive_concurrency = false;
    let proxy = start_proxy(config).await;
    wait_ready(&proxy).await;
    let traffic = Traffic::start(proxy.url());

    let mark = wait_for_key(&upstream, 0, "Bearer sk-old-key").await;

    volume.publish("sk-new-key\n");
    let rotated_at = wait_for_key(&upstream, mark, "Bearer sk-new-key").await;
    // Let anything sent before the swap land, then only the new key may appear.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = upstream.request_count();
    let after = wait_for_key(&upstream, settled, "Bearer sk-new-key").await;
    let stale: Vec<_> = keys_seen(&upstream, settled)
        .into_iter()
        .filter(|(_, k)| k != "Bearer sk-new-key")
        .collect();
    assert!(
        stale.is_empty(),
        "old or other keys after the rotation: {stale:?}"
    );
    assert!(rotated_at > mark && after > settled);

    // An empty file, then one that cannot be a header value: the new key stays in use.
    for bad in ["", "  \n", "sk-broken\u{7f}key"] {
        volume.publish(bad);
        // Several reload intervals, so the watcher has certainly read the bad file.
        tokio::time::sleep(RELOAD_INTERVAL * 5).await;
        let from = upstream.request_count();
        wait_for_key(&upstream, from, "Bearer sk-new-key").await;
        let other: Vec<_> = keys_seen(&upstream, from)
            .into_iter()
            .filter(|(_, k)| k != "Bearer sk-new-key")
            .collect();
        assert!(other.is_empty(), "after publishing {bad:?}: {other:?}");
    }

    let (sent, failures) = traffic.finish().await;
    assert!(sent > 20, "traffic kept flowing: {sent} requests");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_caller_key_is_replaced_by_the_rotated_key_in_both_paths() {
    let upstream = FakeUpstream::start().await;
    let mut volume = SecretVolume::new("replace", "sk-first");
    let proxy = start_proxy(proxy_config(&upstream, &volume.key_path())).await;
    volume.publish("sk-second");
    tokio::time::sleep(RELOAD_INTERVAL * 5).await;
    let c = client();
    let r = send(
        &c,
        post_json(
            &format!("{}/v1/embeddings", proxy.url()),
            &json!({"input": "x", "model": "text-embedding-3-small"}),
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(&c, get(&format!("{}/v1/models", proxy.url()))).await;
    assert_eq!(r.status(), StatusCode::OK);
    for (path, key) in keys_seen(&upstream, 0) {
        assert_eq!(key, "Bearer sk-second", "{path}");
    }
    proxy.shutdown().await.unwrap();
}

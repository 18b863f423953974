//! The in-process cache of vectors: bounded in bytes, entries expire after a TTL, and hot
//! inputs stay (quick_cache's CLOCK-Pro policy is scan resistant: a burst of one-off inputs
//! cannot flush them).
//!
//! Keys are (cache scope, input hash): the scope separates tenants unless the operator lets
//! them share (see `keys.rs`). An entry holds what a later caller needs to answer exactly as a
//! miss would: the vector, the input's token count and the model name the upstream gave.
//!
//! quick_cache rather than moka: with every request a miss, a full moka cache spent more CPU
//! per request rehashing its concurrent map to clear eviction tombstones than the engine spent
//! on everything else but I/O (measured in the engine benchmark). quick_cache has no TTL of
//! its own, so an entry carries its expiry and a lookup that finds it stale removes it; stale
//! entries nobody asks for age out under the byte bound like any cold entry.
//!
//! With the shared tier (`src/shared_tier.rs`) this is L1 in front of an L2 in Redis that all
//! replicas share: L1's misses are looked up there in one MGET (`fetch_shared`), a hit fills
//! L1, and the upstream's answers go there too, written behind (`share`).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::time::Instant;

use crate::{config::CacheConfig, shared_tier::SharedTier};

/// What the engine knows about one input once the upstream has answered for it.
#[derive(Debug)]
pub struct Embedded {
    pub vector: Box<[f32]>,
    /// This input's tokens: exact for known tokenizers, else its share of the call's total.
    pub tokens: u64,
    /// The model as the upstream named it in its reply.
    pub model: Arc<str>,
}

/// Fixed bytes charged per entry on top of the vector: key, expiry, Arc, the cache's own
/// bookkeeping.
const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// The vector size the table is first sized for (OpenAI's text-embedding-3-small); other sizes
/// only make it grow or sit emptier.
const TYPICAL_DIMENSIONS: u64 = 1536;

/// Most entries the table is sized for up front, however large the byte bound.
const MAX_PRESIZED_ENTRIES: u64 = 1 << 20;

pub type CacheKey = (u128, u128);

#[derive(Clone)]
struct Entry {
    embedded: Arc<Embedded>,
    expires: Instant,
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<CacheKey, Entry> for ByBytes {
    fn weight(&self, _key: &CacheKey, entry: &Entry) -> u64 {
        (entry.embedded.vector.len() as u64).saturating_mul(4) + ENTRY_OVERHEAD_BYTES
    }
}

pub struct VectorCache {
    inner: Option<quick_cache::sync::Cache<CacheKey, Entry, ByBytes>>,
    ttl: Duration,
    /// L2, once attached (`attach_shared`).
    shared: OnceLock<Arc<SharedTier>>,
}

impl VectorCache {
    pub fn new(config: &CacheConfig) -> Self {
        let inner = config.enabled.then(|| {
            let entries = (config.max_bytes / (TYPICAL_DIMENSIONS * 4 + ENTRY_OVERHEAD_BYTES))
                .clamp(1, MAX_PRESIZED_ENTRIES);
            quick_cache::sync::Cache::with_weighter(entries as usize, config.max_bytes, ByBytes)
        });
        Self {
            inner,
            ttl: config.ttl,
            shared: OnceLock::new(),
        }
    }

    /// Puts the shared cache behind this one (if the tier shares its cache). Once only.
    pub fn attach_shared(&self, tier: Arc<SharedTier>) {
        if tier.shares_cache && self.inner.is_some() {
            let _ = self.shared.set(tier);
        }
    }

    /// L1's misses `hashes` (under `scope`) looked up in L2, in one round trip; each hit is
    /// put in L1. Without L2, or while Redis cannot be asked, all misses.
    pub async fn fetch_shared(&self, scope: u128, hashes: &[u128]) -> Vec<Option<Arc<Embedded>>> {
        let Some(tier) = self.shared.get().filter(|_| !hashes.is_empty()) else {
            return vec![None; hashes.len()];
        };
        let keys: Vec<CacheKey> = hashes.iter().map(|h| (scope, *h)).collect();
        tier.fetch(&keys)
            .await
            .into_iter()
            .zip(keys)
            .map(|(found, key)| {
                let found = Arc::new(found?);
                self.insert_here(key, found.clone());
                Some(found)
            })
            .collect()
    }

    /// Gives the upstream's answers to L2 (written behind; nothing without L2).
    pub fn share<'a>(
        &self,
        scope: u128,
        answered: impl Iterator<Item = (u128, &'a Arc<Embedded>)>,
    ) {
        if let Some(tier) = self.shared.get() {
            tier.store(
                answered.map(|(h, e)| ((scope, h), e.clone())).collect(),
                self.ttl,
            );
        }
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<Embedded>> {
        let cache = self.inner.as_ref()?;
        let entry = cache.get(key)?;
        if entry.expires <= Instant::now() {
            cache.remove(key);
            return None;
        }
        Some(entry.embedded)
    }

    pub fn insert(&self, key: CacheKey, value: Arc<Embedded>) {
        self.insert_here(key, value);
    }

    /// Into L1 only.
    fn insert_here(&self, key: CacheKey, value: Arc<Embedded>) {
        if let Some(c) = &self.inner {
            c.insert(
                key,
                Entry {
                    embedded: value,
                    expires: Instant::now() + self.ttl,
                },
            );
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Entries and weighted bytes now, for metrics and tests.
    pub fn usage(&self) -> (u64, u64) {
        match &self.inner {
            Some(c) => (c.len() as u64, c.weight()),
            None => (0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(dims: usize) -> Arc<Embedded> {
        Arc::new(Embedded {
            vector: vec![0.5; dims].into_boxed_slice(),
            tokens: 1,
            model: "m".into(),
        })
    }

    #[test]
    fn the_cache_is_bounded_in_bytes() {
        let cache = VectorCache::new(&CacheConfig {
            enabled: true,
            max_bytes: 100 * (1536 * 4 + 96),
            ttl: Duration::from_secs(60),
            share_across_credentials: false,
        });
        for i in 0..1000u128 {
            cache.insert((1, i), entry(1536));
        }
        let (_, bytes) = cache.usage();
        assert!(bytes <= 100 * (1536 * 4 + 96), "{bytes}");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let cache = VectorCache::new(&CacheConfig {
            enabled: true,
            max_bytes: 1 << 20,
            ttl: Duration::from_secs(60),
            share_across_credentials: false,
        });
        cache.insert((1, 1), entry(4));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(cache.get(&(1, 1)).is_some(), "gone before the TTL");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cache.get(&(1, 1)).is_none(), "kept past the TTL");
        assert_eq!(cache.usage(), (0, 0), "a stale entry found is removed");
    }

    #[test]
    fn hot_entries_survive_a_scan_of_one_off_inputs() {
        let cache = VectorCache::new(&CacheConfig {
            enabled: true,
            max_bytes: 100 * (16 + 96),
            ttl: Duration::from_secs(60),
            share_across_credentials: false,
        });
        for i in 0..10u128 {
            cache.insert((1, i), entry(4));
        }
        for _ in 0..3 {
            for i in 0..10u128 {
                assert!(cache.get(&(1, i)).is_some());
            }
        }
        for i in 1000..3000u128 {
            cache.insert((1, i), entry(4));
        }
        let kept = (0..10u128)
            .filter(|i| cache.get(&(1, *i)).is_some())
            .count();
        assert!(kept >= 8, "only {kept} of 10 hot entries kept");
    }

    #[test]
    fn a_disabled_cache_holds_nothing() {
        let cache = VectorCache::new(&CacheConfig {
            enabled: false,
            ..CacheConfig::default()
        });
        cache.insert((1, 1), entry(4));
        assert!(cache.get(&(1, 1)).is_none());
    }
}

//! The in-process cache of vectors: bounded in bytes, entries expire after a TTL, and the hot
//! inputs stay (moka's TinyLFU admission), so a burst of one-off inputs cannot flush them.
//!
//! Keys are (cache scope, input hash): the scope separates tenants unless the operator lets
//! them share (see `keys.rs`). An entry holds what a later caller needs to answer exactly as a
//! miss would: the vector, the input's token count and the model name the upstream gave.

use std::sync::Arc;

use crate::config::CacheConfig;

/// What the engine knows about one input once the upstream has answered for it.
#[derive(Debug)]
pub struct Embedded {
    pub vector: Box<[f32]>,
    /// This input's tokens: exact for known tokenizers, else its share of the call's total.
    pub tokens: u64,
    /// The model as the upstream named it in its reply.
    pub model: Arc<str>,
}

/// Fixed bytes charged per entry on top of the vector: key, Arc, moka's bookkeeping.
const ENTRY_OVERHEAD_BYTES: u32 = 96;

pub type CacheKey = (u128, u128);

pub struct VectorCache {
    inner: Option<moka::sync::Cache<CacheKey, Arc<Embedded>>>,
}

impl VectorCache {
    pub fn new(config: &CacheConfig) -> Self {
        let inner = config.enabled.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.max_bytes)
                .weigher(|_k: &CacheKey, v: &Arc<Embedded>| {
                    let bytes = v.vector.len().saturating_mul(4);
                    u32::try_from(bytes)
                        .unwrap_or(u32::MAX)
                        .saturating_add(ENTRY_OVERHEAD_BYTES)
                })
                .time_to_live(config.ttl)
                .build()
        });
        Self { inner }
    }

    pub fn get(&self, key: &CacheKey) -> Option<Arc<Embedded>> {
        self.inner.as_ref()?.get(key)
    }

    pub fn insert(&self, key: CacheKey, value: Arc<Embedded>) {
        if let Some(c) = &self.inner {
            c.insert(key, value);
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Entries and weighted bytes now (after pending maintenance), for metrics and tests.
    pub fn usage(&self) -> (u64, u64) {
        match &self.inner {
            Some(c) => {
                c.run_pending_tasks();
                (c.entry_count(), c.weighted_size())
            }
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

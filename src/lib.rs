//! embedcar: a sidecar reverse proxy for the OpenAI API that pools connections, bounds
//! concurrency and deadlines, and (for embeddings) coalesces callers' requests.
//!
//! The binary (`src/main.rs`) only parses flags, sets up logging and calls [`run`]. Tests and
//! embedders use [`start`], which runs the same thing in the background on the configured
//! (possibly port-0) addresses.

pub mod config;
pub mod embeddings;
pub(crate) mod http;
pub mod metrics;
pub(crate) mod passthrough;
pub(crate) mod resilience;
pub(crate) mod server;
pub mod shared_tier;
pub(crate) mod upstream;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub use crate::config::{durations, Config};

/// Request and reply bodies, as tests and embedders build them.
pub mod body {
    pub use crate::http::body::{empty, full, BoxError, ProxyBody};
}

/// The error embedcar answers with, and the header that marks its own error replies.
pub mod errors {
    pub use crate::http::errors::{ProxyError, ERROR_HEADER};
}

/// The learnt concurrency limit, which the engine benchmark drives on its own.
pub mod adaptive_limit {
    pub use crate::resilience::adaptive_limit::{AdaptiveLimit, Signal};
}

use crate::{
    embeddings::Engine,
    metrics::Metrics,
    passthrough::{Proxy, ProxySettings},
    upstream::Upstream,
};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Everything the request path shares, built once at start.
pub struct AppState {
    pub config: Config,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) proxy: Arc<Proxy>,
    /// The embeddings engine, unless `embeddings.enabled` is off.
    pub engine: Option<Arc<Engine>>,
    /// The tier shared with other replicas through Redis, if `redis.url` is set.
    pub(crate) shared: Option<Arc<shared_tier::SharedTier>>,
    /// Kept here for the key file's watcher, which [`run`] starts and stops with the listeners.
    upstream: Arc<Upstream>,
    draining: AtomicBool,
}

impl AppState {
    pub fn new(config: Config) -> Result<Arc<AppState>, Error> {
        let metrics = Arc::new(Metrics::new());
        let upstream = Upstream::new(&config)?;
        let outbound = upstream::outbound::Parts::new(&config, metrics.clone());
        let shared =
            shared_tier::SharedTier::new(&config.redis, config.cache.enabled, metrics.clone())?;
        if let Some(tier) = &shared {
            outbound.gates.attach_shared(tier.clone());
        }
        let proxy = Arc::new(Proxy::new(
            upstream.clone(),
            &outbound,
            metrics.clone(),
            ProxySettings {
                body_idle_timeout: config.upstream.body_idle_timeout,
                request_timeout: config.limits.request_timeout,
                max_buffered_body: config.retry.max_buffered_body,
                should_retry_header: config.retry.should_retry_header,
            },
        ));
        let engine = config.embeddings.enabled.then(|| {
            Arc::new(Engine::new(
                &config,
                upstream.clone(),
                &outbound,
                metrics.clone(),
                proxy.clone(),
            ))
        });
        if let (Some(tier), Some(engine)) = (&shared, &engine) {
            engine.cache().attach_shared(tier.clone());
        }
        Ok(Arc::new(AppState {
            config,
            metrics,
            proxy,
            engine,
            shared,
            upstream,
            draining: AtomicBool::new(false),
        }))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Binds the traffic and admin listeners named in the config.
pub async fn bind(config: &Config) -> Result<(TcpListener, TcpListener), Error> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.admin_listen))?;
    Ok((listener, admin))
}

/// Serves until `shutdown` resolves, then drains: readiness turns 503, the listener closes, and
/// in-flight requests get the grace period to finish.
pub async fn run(
    state: Arc<AppState>,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let base = &config::base_url::BaseUrl::mask_userinfo(&state.config.upstream.url);
    for warning in state.config.warnings() {
        tracing::warn!("{warning}");
    }
    tracing::info!(%addr, %admin_addr, upstream = %base, "listening");
    if state.engine.is_some() {
        embeddings::tokens::preload();
    }

    let (admin_stop_tx, admin_stop_rx) = oneshot::channel::<()>();
    let admin = tokio::spawn(server::admin::serve(admin_listener, state.clone(), async {
        let _ = admin_stop_rx.await;
    }));
    // Watched until the drain is over: calls made during the grace period use the newest key too.
    let (watch_stop_tx, watch_stop_rx) = oneshot::channel::<()>();
    let reload_interval = state.config.credentials.reload_interval;
    let key_watch = (!reload_interval.is_zero()).then(|| {
        tokio::spawn(upstream::credential::watch_key_file(
            state.upstream.clone(),
            reload_interval,
            async {
                let _ = watch_stop_rx.await;
            },
        ))
    });

    // Announced until the drain is over, then leaves the replica set at once.
    let (beat_stop_tx, beat_stop_rx) = oneshot::channel::<()>();
    let heartbeat = state.shared.clone().map(|tier| {
        tokio::spawn(tier.heartbeat(async {
            let _ = beat_stop_rx.await;
        }))
    });

    let drain_state = state.clone();
    let shutdown = async move {
        shutdown.await;
        drain_state.draining.store(true, Ordering::Relaxed);
        tracing::info!("shutdown requested; no longer ready");
    };
    let settings = server::ServerSettings {
        max_connections: state.config.server.max_connections,
        header_read_timeout: state.config.server.header_read_timeout,
        shutdown_grace: state.config.server.shutdown_grace,
    };
    server::serve(
        listener,
        http::stack::build(&state),
        settings,
        state.metrics.clone(),
        shutdown,
    )
    .await;

    let _ = admin_stop_tx.send(());
    let _ = watch_stop_tx.send(());
    let _ = beat_stop_tx.send(());
    let _ = admin.await;
    if let Some(heartbeat) = heartbeat {
        let _ = heartbeat.await;
    }
    if let Some(watch) = key_watch {
        let _ = watch.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// A running embedcar in the background of this process.
pub struct Handle {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

/// Binds the configured addresses (port 0 picks free ones) and runs embedcar in a task.
pub async fn start(config: Config) -> Result<Handle, Error> {
    let (listener, admin) = bind(&config).await?;
    let state = AppState::new(config)?;
    let addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run(state, listener, admin, async {
        let _ = rx.await;
    }));
    Ok(Handle {
        addr,
        admin_addr,
        shutdown: Some(tx),
        task,
    })
}

impl Handle {
    /// `http://ADDR`, the base for requests (append `/v1/...`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Asks for a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down gracefully and waits until embedcar has stopped.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.begin_shutdown();
        (&mut self.task).await?
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

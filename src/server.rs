//! The accept loop: a cap on open connections, a deadline for a silent client's first bytes,
//! HTTP/1.1 and cleartext HTTP/2 on one port, and a graceful drain.

use std::{future::Future, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{metrics::Metrics, stack::HttpService};

/// How long to back off when accept fails (out of file descriptors, typically) before trying
/// again, so the loop does not spin while the condition lasts. Both listeners (traffic and
/// admin) go through [`accept_with_backoff`], so both back off alike.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts the next connection, retrying failed accepts after [`ACCEPT_ERROR_BACKOFF`]: a
/// failure such as EMFILE lasts until some connection closes, and retrying at once would spin a
/// core and flood the log while it does. `what` names the listener in the warning.
pub async fn accept_with_backoff<T, F, Fut>(what: &'static str, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// HTTP/2 PING interval: finds dead HTTP/2 client connections (which header_read_timeout, an
/// HTTP/1 notion, does not cover).
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

pub struct ServerSettings {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// Serves `listener` until `shutdown` resolves; then stops accepting, lets open connections
/// finish their in-flight requests (streams included) for up to the grace period, and returns.
/// Returns whether every connection finished within the grace period.
pub async fn serve(
    listener: TcpListener,
    service: HttpService,
    settings: ServerSettings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL);

    let connection_slots = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        // Take a connection slot before accepting: at the cap, new connections wait in the
        // kernel's backlog instead of being accepted and starved.
        let slot = tokio::select! {
            slot = connection_slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = accept_with_backoff("traffic", || listener.accept()) => accepted,
            () = &mut shutdown => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        metrics.connections.inc();
        metrics.open_connections.inc();

        let header_read_timeout = settings.header_read_timeout;
        let hyper_service = TowerToHyperService::new(service.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // hyper's header timeout starts once the protocol is known; a client that connects
            // and sends nothing at all is cut off here instead.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, stream.peek(&mut first)).await {
                Ok(Ok(_)) => {
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), hyper_service)
                        .into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "connection failed"),
                Err(_) => tracing::debug!(%peer, "client sent nothing; closing"),
            }
            metrics.open_connections.dec();
            drop(slot);
        });
    }

    drop(listener);
    let open = graceful.count();
    tracing::info!(open_connections = open, grace = ?settings.shutdown_grace, "draining");
    tokio::select! {
        () = graceful.shutdown() => {
            tracing::info!("all connections drained");
            true
        }
        () = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!("grace period over; closing the remaining connections");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_failed_accept_is_retried_after_the_backoff_not_at_once() {
        let mut failures_left = 2;
        let started = Instant::now();
        let accepted = accept_with_backoff("test", || {
            let result = if failures_left > 0 {
                failures_left -= 1;
                Err(std::io::Error::from_raw_os_error(24)) // EMFILE
            } else {
                Ok("connection")
            };
            async move { result }
        })
        .await;
        assert_eq!(accepted, "connection");
        assert_eq!(started.elapsed(), 2 * ACCEPT_ERROR_BACKOFF);
    }
}

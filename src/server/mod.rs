//! The accept loop: a cap on open connections, a deadline for a silent client's first bytes,
//! HTTP/1.1 and cleartext HTTP/2 on one port, and a graceful drain.
//!
//! This folder is where a request enters and where an operator looks in: the traffic listener
//! (here), the admin listener (`admin`: health, readiness, metrics) and the status page it serves
//! (`status`, `status.html`). Each accepted connection is handed to the inbound stack in
//! `crate::http`; nothing here knows about routes or the upstream.

pub mod admin;
pub mod status;

use std::{
    cell::RefCell,
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use futures_util::future::Either;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use pin_project_lite::pin_project;
use tokio::{
    net::TcpListener,
    sync::{watch, Notify, Semaphore},
    time::Instant,
};
use tower::{util::Oneshot, Service, ServiceExt as _};

use crate::{
    http::{
        body::{Guarded, ProxyBody},
        stack::HttpService,
    },
    metrics::Metrics,
};

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

/// How often at most the warning about running at `server.max_connections` is logged (each
/// reclaimed connection is logged at debug): at the cap it could otherwise come per connection.
const AT_CAP_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `listener` until `shutdown` resolves; then stops accepting, lets open connections
/// finish their in-flight requests (streams included) for up to the grace period, and returns.
/// Returns whether every connection finished within the grace period.
///
/// At `max_connections`, a new client is accepted and held while room is made for it: the
/// oldest idle connection (no request in progress) is asked to close, as nginx reuses its idle
/// keep-alive connections. A connection with a request in flight is never cut; when every
/// connection is busy, the new one waits until one goes idle or closes. So at most one
/// connection beyond the cap is open at a time, and the rest wait in the kernel's backlog.
pub async fn serve(
    listener: TcpListener,
    service: HttpService,
    settings: ServerSettings,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let builder = connection_builder(&settings);
    let connection_slots = Arc::new(Semaphore::new(settings.max_connections));
    let connections = Connections::default();
    // Every connection task holds a receiver: a value sent asks them all to finish, and the
    // sender sees when the last one is gone.
    let (drain_tx, drain_rx) = watch::channel(());
    let mut at_cap_log = AtCapLog::default();
    tokio::pin!(shutdown);

    loop {
        let slot = connection_slots.clone().try_acquire_owned().ok();
        let (stream, peer) = tokio::select! {
            accepted = accept_with_backoff("traffic", || listener.accept()) => accepted,
            () = &mut shutdown => break,
        };
        let slot = match slot {
            Some(slot) => slot,
            None => {
                // At the cap with a client waiting: make room for it.
                let room = make_room(
                    &connections,
                    &connection_slots,
                    &mut at_cap_log,
                    &metrics,
                    settings.max_connections,
                    peer,
                    &mut shutdown,
                );
                match room.await {
                    Some(slot) => slot,
                    None => break,
                }
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        metrics.requests.connections.inc();
        metrics.requests.open_connections.inc();

        let (id, conn) = connections.register();
        let header_read_timeout = settings.header_read_timeout;
        let hyper_service = Tracked {
            inner: RefCell::new(service.clone()),
            conn: conn.clone(),
        };
        let builder = builder.clone();
        let mut drain = drain_rx.clone();
        let metrics = metrics.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            serve_connection(
                stream,
                peer,
                builder,
                hyper_service,
                &conn,
                header_read_timeout,
                &mut drain,
            )
            .await;
            connections.remove(id);
            metrics.requests.open_connections.dec();
            drop(slot);
            drop(drain);
        });
    }

    drop(listener);
    drop(drain_rx);
    drain_connections(drain_tx, settings.shutdown_grace).await
}

/// hyper's settings for every client connection, HTTP/1.1 and HTTP/2 alike.
fn connection_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
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
    builder
}

/// At `max_connections` with a client accepted: asks the oldest idle connection to close (or
/// waits for one to go idle) until a slot is free; `None` when shutdown came first.
async fn make_room(
    connections: &Connections,
    connection_slots: &Arc<Semaphore>,
    at_cap_log: &mut AtCapLog,
    metrics: &Metrics,
    max_connections: usize,
    peer: std::net::SocketAddr,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    connections.idle.waiting.store(true, Ordering::Relaxed);
    let slot = loop {
        if connections.closing_idle() == 0 {
            if connections.reclaim_oldest_idle() {
                metrics.requests.connections_reclaimed.inc();
                tracing::debug!(%peer, "at max_connections: closing the oldest idle connection for a new client");
                at_cap_log.reclaimed(max_connections);
            } else {
                at_cap_log.all_busy(max_connections);
            }
        }
        tokio::select! {
            slot = connection_slots.clone().acquire_owned() => break slot.ok(),
            () = connections.idle.became_idle.notified() => {}
            () = &mut *shutdown => break None,
        }
    };
    connections.idle.waiting.store(false, Ordering::Relaxed);
    slot
}

/// Serves one client connection until it ends: cut off if it sends nothing within
/// `header_read_timeout`, closed gracefully when asked to (to make room, or to drain).
async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    builder: auto::Builder<TokioExecutor>,
    hyper_service: Tracked,
    conn: &ConnectionState,
    header_read_timeout: Duration,
    drain: &mut watch::Receiver<()>,
) {
    // hyper's header timeout starts once the protocol is known; a client that connects
    // and sends nothing at all is cut off here instead (or closed at once to make room
    // or to drain: it has nothing in progress).
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        peeked = tokio::time::timeout(header_read_timeout, stream.peek(&mut first)) => Some(peeked),
        () = conn.close.notified() => None,
        _ = drain.changed() => None,
    };
    match peeked {
        Some(Ok(Ok(_))) => {
            let connection = builder
                .serve_connection(TokioIo::new(stream), hyper_service)
                .into_owned();
            let mut connection = std::pin::pin!(connection);
            let mut asked = false;
            // Asked to close (drain, or to make room): HTTP/1.1 closes now if idle or
            // after the response in progress; HTTP/2 sends GOAWAY and finishes its
            // streams.
            let served = loop {
                tokio::select! {
                    served = connection.as_mut() => break served,
                    _ = drain.changed(), if !asked => {}
                    () = conn.close.notified(), if !asked => {}
                }
                asked = true;
                connection.as_mut().graceful_shutdown();
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        Some(Ok(Err(e))) => tracing::debug!(%peer, error = %e, "connection failed"),
        Some(Err(_)) => tracing::debug!(%peer, "client sent nothing; closing"),
        None => tracing::debug!(%peer, "closing a connection that sent nothing yet"),
    }
}

/// After the listener closed: asks every connection to finish and waits for them, up to the
/// grace period; whether they all finished in time.
async fn drain_connections(drain_tx: watch::Sender<()>, grace: Duration) -> bool {
    let open = drain_tx.receiver_count();
    tracing::info!(open_connections = open, grace = ?grace, "draining");
    let _ = drain_tx.send(());
    tokio::select! {
        () = drain_tx.closed() => {
            tracing::info!("all connections drained");
            true
        }
        () = tokio::time::sleep(grace) => {
            tracing::warn!("grace period over; closing the remaining connections");
            false
        }
    }
}

/// The open connections, for finding the oldest idle one at the cap.
#[derive(Clone, Default)]
struct Connections {
    inner: Arc<ConnectionsInner>,
    idle: Arc<IdleSignal>,
}

#[derive(Default)]
struct ConnectionsInner {
    next_id: AtomicU64,
    epoch: OnceLock<Instant>,
    // Locked once per connection opened or closed, and at the cap; never per request.
    open: Mutex<HashMap<u64, Arc<ConnectionState>>>,
}

/// Wakes the accept loop when a connection goes idle while a new client waits at the cap.
#[derive(Default)]
struct IdleSignal {
    waiting: AtomicBool,
    became_idle: Notify,
}

/// One connection, as its requests and the accept loop see it.
struct ConnectionState {
    in_flight: AtomicUsize,
    /// When its last request ended (or it was accepted), in nanoseconds since the epoch.
    last_active: AtomicU64,
    closing: AtomicBool,
    close: Notify,
    epoch: Instant,
    idle: Arc<IdleSignal>,
}

impl ConnectionState {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

impl Connections {
    fn register(&self) -> (u64, Arc<ConnectionState>) {
        let epoch = *self.inner.epoch.get_or_init(Instant::now);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnectionState {
            in_flight: AtomicUsize::new(0),
            last_active: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            close: Notify::new(),
            epoch,
            idle: self.idle.clone(),
        });
        state.last_active.store(state.now(), Ordering::Relaxed);
        self.lock().insert(id, state.clone());
        (id, state)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnectionState>>> {
        // A panic while holding it leaves the map consistent (single inserts and removes).
        self.inner.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections asked to close that are still closing with nothing in flight: room is on
    /// its way, so no other is asked.
    fn closing_idle(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| {
                c.closing.load(Ordering::Relaxed) && c.in_flight.load(Ordering::Relaxed) == 0
            })
            .count()
    }

    /// Asks the connection idle the longest to close; false if every one is busy.
    fn reclaim_oldest_idle(&self) -> bool {
        let open = self.lock();
        let oldest = open
            .values()
            .filter(|c| {
                !c.closing.load(Ordering::Relaxed) && c.in_flight.load(Ordering::Relaxed) == 0
            })
            .min_by_key(|c| c.last_active.load(Ordering::Relaxed));
        match oldest {
            Some(c) => {
                c.closing.store(true, Ordering::Relaxed);
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Rate-limits the warnings about the connection cap to one per [`AT_CAP_WARN_INTERVAL`].
#[derive(Default)]
struct AtCapLog {
    last: Option<Instant>,
    reclaimed: u64,
}

impl AtCapLog {
    fn due(&mut self) -> bool {
        let due = self
            .last
            .is_none_or(|t| t.elapsed() >= AT_CAP_WARN_INTERVAL);
        if due {
            self.last = Some(Instant::now());
        }
        due
    }

    fn reclaimed(&mut self, max_connections: usize) {
        self.reclaimed += 1;
        if self.due() {
            tracing::warn!(
                max_connections,
                reclaimed = self.reclaimed,
                "at server.max_connections: closing idle keep-alive connections to admit new clients"
            );
            self.reclaimed = 0;
        }
    }

    fn all_busy(&mut self, max_connections: usize) {
        if self.due() {
            tracing::warn!(
                max_connections,
                "at server.max_connections with every connection busy: new clients wait"
            );
        }
    }
}

/// The connection's service: counts its requests in progress (until the response body ends or
/// is dropped), so that the accept loop knows which connections are idle.
///
/// A hyper service (`call(&self)`) over the tower stack (`call(&mut self)`), without the glue's
/// copy of the whole stack per request (hyper-util's `TowerToHyperService` clones the service
/// for every call, a boxed copy and a reference count per layer): the connection's one copy is
/// borrowed for the call, which is synchronous and never re-entered. Every layer of the stack
/// is always ready; were one not, the request would get a copy of its own and wait on it.
struct Tracked {
    inner: RefCell<HttpService>,
    conn: Arc<ConnectionState>,
}

type StackFuture = <HttpService as Service<Request<Incoming>>>::Future;

/// One request in progress on a connection.
struct Busy(Arc<ConnectionState>);

impl Busy {
    fn new(conn: &Arc<ConnectionState>) -> Busy {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(conn.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let conn = &self.0;
        if conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            conn.last_active.store(conn.now(), Ordering::Relaxed);
            if conn.idle.waiting.load(Ordering::Relaxed) {
                conn.idle.became_idle.notify_one();
            }
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Guarded<ProxyBody, Option<Busy>>>;
    type Error = Infallible;
    type Future = TrackedFuture<Either<StackFuture, Oneshot<HttpService, Request<Incoming>>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(&self.conn);
        let mut service = self.inner.borrow_mut();
        let inner = match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(service.call(req)),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => Either::Right(service.clone().oneshot(req)),
        };
        TrackedFuture {
            inner,
            busy: Some(busy),
        }
    }
}

pin_project! {
    /// The handler's future, holding the connection busy until its response body is done.
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        busy: Option<Busy>,
    }
}

impl<F> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<Guarded<ProxyBody, Option<Busy>>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        let busy = this.busy.take();
        Poll::Ready(Ok(response.map(|body| Guarded::new(body, busy))))
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

//! The running fake: its handle ([`FakeUpstream`]), the state its connections share, the request
//! log ([`Recorded`]), the accept loop, and the response body that counts a request in flight
//! until its last byte is written.

use std::collections::{HashMap, VecDeque};
use std::error::Error as StdError;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::handler::handle;
use crate::{Behavior, FakeOptions, Rule};

pub(crate) type InnerBody = UnsyncBoxBody<Bytes, FakeError>;

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path and query exactly as received (origin form, the same for HTTP/1.1 and HTTP/2: the
    /// HTTP/2 `:authority` is in `authority`, an HTTP/1.1 host in the `host` header).
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The full body once received. While a body is still arriving (or if the client gave up)
    /// this holds what arrived so far and `body_complete` is false.
    pub body: Bytes,
    pub version: Version,
    /// Whether `body` is the whole body.
    pub body_complete: bool,
    /// The authority of the request target when the request carried one (HTTP/2 `:authority`,
    /// or an absolute-form HTTP/1.1 target); `None` for an ordinary HTTP/1.1 request.
    pub authority: Option<http::uri::Authority>,
}

impl Recorded {
    /// The request path, without the query.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// A header as a string, if present and valid UTF-8/ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

// ---------------------------------------------------------------------------------------------
// The server handle
// ---------------------------------------------------------------------------------------------

/// A running fake upstream. Dropping it stops accepting, closes every connection and ends every
/// pending handler (hanging, delayed or held ones included).
pub struct FakeUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl fmt::Debug for FakeUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // Every connection task and every waiting handler selects on this channel.
        self.shutdown.send_replace(true);
        self.accept.abort();
    }
}

impl FakeUpstream {
    /// Starts on `127.0.0.1:0` with default options.
    pub async fn start() -> FakeUpstream {
        Self::start_with(FakeOptions::default()).await
    }

    /// Starts on `127.0.0.1:0` with `opts`.
    pub async fn start_with(opts: FakeOptions) -> FakeUpstream {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), opts)
            .await
            .expect("bind fake upstream on 127.0.0.1:0")
    }

    /// Starts on a given address (the binary uses this for `--host`/`--port`).
    pub async fn bind(addr: SocketAddr, opts: FakeOptions) -> std::io::Result<FakeUpstream> {
        // The billing tokenizer's tables load once per process, in about a second: here, off
        // the runtime's workers, rather than inside the first billed reply, where the stall
        // would be taken for a slow upstream (and trip a test's short first-byte timeout).
        let _ = tokio::task::spawn_blocking(tiktoken_rs::cl100k_base_singleton).await;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (streams, _) = watch::channel(StreamGate::default());
        let limit = opts.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        let workers = opts.capacity.map(|n| Arc::new(Semaphore::new(n)));
        let shared = Arc::new(Shared {
            opts,
            behavior: Mutex::new(Behavior::Normal),
            rules: Mutex::new(VecDeque::new()),
            records: Mutex::new(Records::default()),
            keyed: Mutex::new(HashMap::new()),
            request_count: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            body_bytes: AtomicU64::new(0),
            embedding_calls: AtomicUsize::new(0),
            embedding_inputs: AtomicUsize::new(0),
            over_capacity_refused: AtomicUsize::new(0),
            over_capacity_queued: AtomicUsize::new(0),
            workers,
            draw: AtomicU64::new(0x2545_F491_4F6C_DD1D),
            next_id: AtomicU64::new(0),
            streams,
            shutdown: shutdown_rx,
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let accept = tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            limit,
            Arc::new(builder),
        ));
        Ok(FakeUpstream {
            shared,
            addr,
            shutdown,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash, no `/v1`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The behaviour for requests that no header override or rule claims, from now on.
    pub fn set_behavior(&self, b: Behavior) {
        *lock(&self.shared.behavior) = b;
    }

    /// Queues a limited override (see [`Rule`]).
    pub fn push_rule(&self, r: Rule) {
        if r.times > 0 {
            lock(&self.shared.rules).push_back(r);
        }
    }

    /// Removes every queued rule.
    pub fn clear_rules(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Rules not yet used up (e.g. to assert that a retry consumed them).
    pub fn pending_rules(&self) -> Vec<Rule> {
        lock(&self.shared.rules).iter().cloned().collect()
    }

    /// Every request received (except the control plane), in order of arrival of the head.
    /// Empty when `record_requests` is off.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.records).list.clone()
    }

    /// Requests received since start or the last [`reset_stats`](Self::reset_stats), counted
    /// even when recording is off.
    pub fn request_count(&self) -> usize {
        self.shared.request_count.load(Ordering::SeqCst)
    }

    /// The most requests that were in flight at once: from the moment a request head is
    /// received until its response body has been written (or the exchange was abandoned).
    pub fn peak_concurrency(&self) -> usize {
        self.shared.peak.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Request body bytes received so far, summed over all requests, updated per body frame as
    /// it arrives (not when the body ends), so a test can tell that a proxy streams a request
    /// body instead of buffering it.
    pub fn body_bytes_received(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::SeqCst)
    }

    /// Embeddings calls refused (429) for want of capacity.
    pub fn over_capacity_refused(&self) -> usize {
        self.shared.over_capacity_refused.load(Ordering::SeqCst)
    }

    /// Embeddings calls that had to queue for a worker.
    pub fn over_capacity_queued(&self) -> usize {
        self.shared.over_capacity_queued.load(Ordering::SeqCst)
    }

    /// Embeddings requests answered with real embeddings (2xx). Errors, forced statuses,
    /// malformed replies, hangs and drops do not count.
    pub fn embedding_calls(&self) -> usize {
        self.shared.embedding_calls.load(Ordering::SeqCst)
    }

    /// Total inputs across the calls counted by [`embedding_calls`](Self::embedding_calls).
    pub fn embedding_inputs(&self) -> usize {
        self.shared.embedding_inputs.load(Ordering::SeqCst)
    }

    /// While true, a streamed chat reply sends every chunk but the last and then waits for
    /// [`release_streams`](Self::release_streams) (or for `hold_streams(false)`). Lets a test
    /// catch a proxy mid-stream: e.g. check that the first chunks already reached the client.
    pub fn hold_streams(&self, hold: bool) {
        self.shared.streams.send_modify(|g| g.hold = hold);
    }

    /// Releases every held stream that started before this call, including streams that have
    /// not reached their last chunk yet (so there is no race between a test's release and a
    /// slow stream). Streams that start afterwards are held again while `hold_streams` is true.
    pub fn release_streams(&self) {
        self.shared.streams.send_modify(|g| g.generation += 1);
    }

    /// Zeroes the counters and clears the request log. `peak_concurrency` restarts from the
    /// current `in_flight`. Behaviour, rules and held streams are left alone.
    pub fn reset_stats(&self) {
        self.shared.reset_stats();
    }

    /// Polls `cond` every millisecond until it holds or `timeout` passes; returns whether it
    /// held. Handy for "wait until the proxy has sent N requests". The timeout is measured in
    /// real time, not tokio's clock: under paused time tokio would skip ahead while the network
    /// is busy and give up early (the polling sleeps then return at once, so it spins; fine for
    /// a test).
    pub async fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

pub(crate) struct Shared {
    pub(crate) opts: FakeOptions,
    pub(crate) behavior: Mutex<Behavior>,
    pub(crate) rules: Mutex<VecDeque<Rule>>,
    records: Mutex<Records>,
    /// `x-fake-key` -> how many times its overrides were applied.
    pub(crate) keyed: Mutex<HashMap<String, usize>>,
    pub(crate) request_count: AtomicUsize,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) peak: AtomicUsize,
    pub(crate) body_bytes: AtomicU64,
    pub(crate) embedding_calls: AtomicUsize,
    pub(crate) embedding_inputs: AtomicUsize,
    /// Embeddings calls refused or queued for want of capacity.
    pub(crate) over_capacity_refused: AtomicUsize,
    pub(crate) over_capacity_queued: AtomicUsize,
    /// Workers for `capacity`.
    pub(crate) workers: Option<Arc<Semaphore>>,
    /// State of the fault draw (xorshift).
    pub(crate) draw: AtomicU64,
    pub(crate) next_id: AtomicU64,
    pub(crate) streams: watch::Sender<StreamGate>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct StreamGate {
    pub(crate) hold: bool,
    pub(crate) generation: u64,
}

/// The request log. `epoch` changes on reset so that a body arriving after a reset does not
/// land in the wrong slot.
#[derive(Default)]
struct Records {
    epoch: u64,
    list: Vec<Recorded>,
}

#[derive(Clone, Copy)]
pub(crate) struct Slot {
    epoch: u64,
    index: usize,
}

/// The path-and-query part of a request target, as a `Uri`.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if uri.scheme().is_some() || uri.authority().is_some() => Uri::from(pq.clone()),
        _ => uri.clone(),
    }
}

/// A poisoned lock only means another test thread panicked; the data is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn reset_stats(&self) {
        {
            let mut r = lock(&self.records);
            r.epoch += 1;
            r.list.clear();
        }
        self.request_count.store(0, Ordering::SeqCst);
        self.body_bytes.store(0, Ordering::SeqCst);
        self.embedding_calls.store(0, Ordering::SeqCst);
        self.embedding_inputs.store(0, Ordering::SeqCst);
        self.over_capacity_refused.store(0, Ordering::SeqCst);
        self.over_capacity_queued.store(0, Ordering::SeqCst);
        self.peak
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
        lock(&self.keyed).clear();
    }

    pub(crate) fn record_head(&self, parts: &http::request::Parts) -> Option<Slot> {
        if !self.opts.record_requests {
            return None;
        }
        let rec = Recorded {
            method: parts.method.clone(),
            uri: origin_form(&parts.uri),
            headers: parts.headers.clone(),
            body: Bytes::new(),
            version: parts.version,
            body_complete: false,
            authority: parts.uri.authority().cloned(),
        };
        let mut r = lock(&self.records);
        r.list.push(rec);
        Some(Slot {
            epoch: r.epoch,
            index: r.list.len() - 1,
        })
    }

    pub(crate) fn record_body(&self, slot: Option<Slot>, body: Bytes, complete: bool) {
        let Some(slot) = slot else { return };
        let mut r = lock(&self.records);
        if r.epoch == slot.epoch {
            if let Some(rec) = r.list.get_mut(slot.index) {
                rec.body = body;
                rec.body_complete = complete;
            }
        }
    }

    pub(crate) fn count_body_bytes(&self, n: usize) {
        self.body_bytes.fetch_add(n as u64, Ordering::SeqCst);
    }

    pub(crate) fn next_request_id(&self) -> String {
        format!(
            "req_fake_{}",
            self.next_id.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// Resolves when the fake shuts down (or its handle is gone).
    pub(crate) async fn shutdown(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Accept loop and connections
// ---------------------------------------------------------------------------------------------

type AutoBuilder = hyper_util::server::conn::auto::Builder<TokioExecutor>;

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Option<Arc<Semaphore>>,
    builder: Arc<AutoBuilder>,
) {
    loop {
        // Permit first, accept second: connections beyond the cap stay in the kernel backlog.
        let permit = match &limit {
            Some(sem) => match sem.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => return,
            },
            None => None,
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // EMFILE and friends under benchmark load: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut shutdown = shared.shutdown.clone();
            let svc_shared = shared.clone();
            let service = hyper::service::service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { handle(shared, req).await }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // Dropping the connection future closes the socket: that is "abort connections".
                _ = shutdown.wait_for(|s| *s) => {}
            }
        });
    }
}

/// The one error type of handlers and bodies. Returning it from a handler makes hyper close the
/// connection (HTTP/2: reset the stream) without writing a response, which is how `Drop`, and
/// shutdown during `Hang`, are implemented. A concrete type rather than a boxed `dyn Error`
/// because hyper's `Into<Box<dyn Error + Send + Sync>>` bound must hold for every lifetime.
#[derive(Debug)]
pub(crate) struct FakeError(String);

impl FakeError {
    pub(crate) fn new(what: impl Into<String>) -> FakeError {
        FakeError(what.into())
    }
}

impl fmt::Display for FakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fake upstream: {}", self.0)
    }
}

impl StdError for FakeError {}

impl From<hyper::Error> for FakeError {
    fn from(e: hyper::Error) -> Self {
        FakeError(e.to_string())
    }
}

/// Counts a request as in flight until dropped.
pub(crate) struct InFlight(Arc<Shared>);

impl InFlight {
    pub(crate) fn enter(shared: Arc<Shared>) -> InFlight {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The response body type: any body, plus the in-flight guard, released when the body ends or
/// is dropped (hyper drops it once the last byte is written, or when the client goes away).
pub(crate) struct FakeBody {
    pub(crate) inner: InnerBody,
    pub(crate) guard: Option<InFlight>,
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = FakeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, FakeError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub(crate) fn full(body: impl Into<Bytes>) -> InnerBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> InnerBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

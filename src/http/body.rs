//! Body plumbing shared by every route: one boxed body type, and wrappers that stream a body
//! through unchanged while enforcing a size limit or an idle timeout, or holding a guard (a
//! concurrency permit, a metrics timer) exactly as long as the body is alive.
//!
//! Nothing here buffers: each wrapper forwards frames as they come, which is what lets
//! server-sent events and large uploads pass through chunk by chunk.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response inside embedcar. Unsync because hyper's
/// `Incoming` is all it needs to carry and `Sync` would cost a mutex for nothing.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

/// A request body grew past the configured limit (found while streaming it, for bodies without
/// a Content-Length or lying about it).
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// No frame arrived within the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("body stalled: no data for {}", crate::config::durations::Human(*.0))]
pub struct BodyIdleTimeout(pub Duration);

pin_project! {
    /// Streams `inner`, failing with [`BodyTooLarge`] once more than `limit` bytes have passed.
    pub struct Limited<B> {
        #[pin]
        inner: B,
        remaining: u64,
        limit: u64,
    }
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: u64) -> Self {
        Self {
            inner,
            remaining: limit,
            limit,
        }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *this.remaining {
                        *this.remaining = 0;
                        return Poll::Ready(Some(Err(BodyTooLarge { limit: *this.limit }.into())));
                    }
                    *this.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Streams `inner`, failing with [`BodyIdleTimeout`] when no frame arrives for `idle`.
    /// The timer restarts on every frame, so a slow but moving stream lives as long as it needs.
    ///
    /// The timer is armed only when the body actually waits: a body whose frames are already
    /// there (a small request read with its head, a reply that came in one segment) never
    /// touches the timer wheel, whose registration takes a lock. The idle time runs from the
    /// first wait after a frame, so time our side spends before asking again is not counted.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Option<Sleep>,
        idle: Duration,
        // A frame came since the timer was last armed.
        moved: bool,
    }
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            sleep: None,
            idle,
            moved: false,
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.moved = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let until = || Instant::now() + *this.idle;
                match this.sleep.as_mut().as_pin_mut() {
                    None => this.sleep.set(Some(tokio::time::sleep_until(until()))),
                    Some(sleep) if *this.moved => sleep.reset(until()),
                    Some(_) => {}
                }
                *this.moved = false;
                match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Some(Err(BodyIdleTimeout(*this.idle).into())))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Streams `inner` and drops `guard` as soon as the body ends, fails or is dropped, whichever
    /// comes first. The guard's `Drop` does the work: release a concurrency permit, observe a
    /// duration, decrement a gauge.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B, G> Body for Guarded<B, G>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.guard.take();
            }
            _ => {}
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

// ---------------------------------------------------------------------------------------------
// Content-Encoding of request bodies

/// A content coding embedcar can undo (RFC 9110 §8.4.1). `deflate` is the zlib format, as the
/// RFC defines it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }
}

/// What a request's `Content-Encoding` says about its body.
#[derive(Debug, PartialEq, Eq)]
pub enum ContentCodings {
    /// No coding (or only `identity`): the bytes are the content.
    Identity,
    /// Codings embedcar can undo, in the order they were applied.
    Known(Vec<Coding>),
    /// A coding embedcar does not know: the bytes cannot be read, only forwarded as they are.
    Unknown,
}

/// Reads every `Content-Encoding` field (a list, in the order the codings were applied).
pub fn content_codings(headers: &http::HeaderMap) -> ContentCodings {
    let mut codings = Vec::new();
    for value in headers.get_all(http::header::CONTENT_ENCODING) {
        let Ok(value) = value.to_str() else {
            return ContentCodings::Unknown;
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let coding = match name.to_ascii_lowercase().as_str() {
                "identity" => continue,
                "gzip" | "x-gzip" => Coding::Gzip,
                "deflate" => Coding::Deflate,
                "br" => Coding::Brotli,
                "zstd" => Coding::Zstd,
                _ => return ContentCodings::Unknown,
            };
            codings.push(coding);
        }
    }
    if codings.is_empty() {
        ContentCodings::Identity
    } else {
        ContentCodings::Known(codings)
    }
}

/// Why a coded body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the request body is not valid {0} data, as its Content-Encoding says it is")]
    Invalid(&'static str),
    #[error("the decoded request body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
}

/// Undoes `codings` (last applied, first undone), never producing more than `limit` bytes at
/// any step: the limit on bodies is a limit on what embedcar holds and parses, so a small body that inflates
/// past it (a "zip bomb") is refused as soon as it does, not after it has been inflated.
pub fn decode(mut bytes: Bytes, codings: &[Coding], limit: u64) -> Result<Bytes, DecodeError> {
    use std::io::Read;
    for &coding in codings.iter().rev() {
        let source = &bytes[..];
        let reader: Box<dyn Read + '_> = match coding {
            Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(source)),
            Coding::Deflate => Box::new(flate2::read::ZlibDecoder::new(source)),
            Coding::Brotli => Box::new(brotli_decompressor::Decompressor::new(source, 4096)),
            Coding::Zstd => Box::new(
                ruzstd::decoding::StreamingDecoder::new(source)
                    .map_err(|_| DecodeError::Invalid(coding.as_str()))?,
            ),
        };
        let mut out = Vec::with_capacity(bytes.len().saturating_mul(4).min(limit as usize));
        reader
            .take(limit.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|_| DecodeError::Invalid(coding.as_str()))?;
        if out.len() as u64 > limit {
            return Err(DecodeError::TooLarge { limit });
        }
        bytes = Bytes::from(out);
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// The budget of buffered request bodies

/// How long a caller refused for want of buffer space is asked to wait: bodies are held for
/// about one upstream call, so room comes back within about a second under normal load.
pub const BUFFERS_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A bound on the request bytes embedcar holds in memory at once (bodies it must read whole:
/// the engine's, and pass-through bodies kept for a retry). Each body's bytes are reserved
/// before they are held, by its declared length when it has one and as they arrive when not,
/// and given back when the holder drops its [`Reservation`], on every path out.
pub struct BufferBudget {
    capacity: u64,
    used: std::sync::atomic::AtomicU64,
    gauge: prometheus::IntGauge,
}

/// Why bytes could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not now: other bodies hold the budget.
    Full,
    /// Never: the body alone is larger than the whole budget.
    TooLarge { capacity: u64 },
}

impl BufferBudget {
    /// `gauge` shows the bytes reserved now.
    pub fn new(capacity: u64, gauge: prometheus::IntGauge) -> std::sync::Arc<BufferBudget> {
        std::sync::Arc::new(BufferBudget {
            capacity,
            used: std::sync::atomic::AtomicU64::new(0),
            gauge,
        })
    }

    /// Bytes reserved now.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reserves `bytes` (0 for a body of unknown length, grown as it arrives).
    pub fn reserve(self: &std::sync::Arc<Self>, bytes: u64) -> Result<Reservation, Refused> {
        let mut r = Reservation {
            budget: self.clone(),
            bytes: 0,
        };
        r.grow(bytes)?;
        Ok(r)
    }

    fn take(&self, bytes: u64) -> Result<(), Refused> {
        use std::sync::atomic::Ordering;
        if bytes > self.capacity {
            return Err(Refused::TooLarge {
                capacity: self.capacity,
            });
        }
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes)
                    .filter(|&total| total <= self.capacity)
            })
            .map_err(|_| Refused::Full)?;
        self.gauge.add(bytes as i64);
        Ok(())
    }
}

/// Bytes held against a [`BufferBudget`], given back on drop.
pub struct Reservation {
    budget: std::sync::Arc<BufferBudget>,
    bytes: u64,
}

impl Reservation {
    /// Reserves `more` bytes on top of what is held (a body that grew past its first
    /// reservation, or a decoded copy of it).
    pub fn grow(&mut self, more: u64) -> Result<(), Refused> {
        if more == 0 {
            return Ok(());
        }
        if self.bytes.saturating_add(more) > self.budget.capacity {
            return Err(Refused::TooLarge {
                capacity: self.budget.capacity,
            });
        }
        self.budget.take(more)?;
        self.bytes += more;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget
                .used
                .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
            self.budget.gauge.sub(self.bytes as i64);
        }
    }
}

/// Reads `body` whole, reserving its bytes from `budget` first (its declared length) or as they
/// arrive (no declared length, or more than declared), so a body that finds no room is refused
/// before it is held rather than after. The reservation is returned with the bytes: the caller
/// keeps it for as long as it keeps them.
pub async fn collect_reserved(
    body: ProxyBody,
    budget: &std::sync::Arc<BufferBudget>,
) -> Result<(Bytes, Reservation), CollectError> {
    use http_body_util::BodyExt;
    let declared = body.size_hint().exact().unwrap_or(0);
    let mut reservation = budget.reserve(declared).map_err(CollectError::Refused)?;
    let mut body = std::pin::pin!(body);
    let mut buf = bytes::BytesMut::with_capacity(declared as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(CollectError::Body)?;
        if let Ok(data) = frame.into_data() {
            let held = (buf.len() + data.len()) as u64;
            if held > reservation.bytes() {
                reservation
                    .grow(held - reservation.bytes())
                    .map_err(CollectError::Refused)?;
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((buf.freeze(), reservation))
}

/// The bounds on a request's body, put in its extensions by the request-body layer for the
/// handlers that read a body whole: the size limit (which a decoded body must keep too) and
/// the shared buffer budget.
#[derive(Clone)]
pub struct BodyBounds {
    pub max_bytes: u64,
    pub budget: std::sync::Arc<BufferBudget>,
}

/// Why [`collect_reserved`] gave up.
#[derive(Debug)]
pub enum CollectError {
    Refused(Refused),
    Body(BoxError),
}

/// Finds an error of type `E` anywhere in `err`'s source chain. hyper wraps body errors in its
/// own, so a [`BodyTooLarge`] raised while streaming a request comes back as the cause of a
/// client error.
pub fn find_cause<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(parts: &[&'static str]) -> impl Body<Data = Bytes, Error = BoxError> {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn limited_passes_bodies_up_to_the_limit_and_fails_beyond_it() {
        let ok = Limited::new(chunks(&["ab", "cd"]), 4)
            .collect()
            .await
            .unwrap();
        assert_eq!(ok.to_bytes(), "abcd");
        let err = Limited::new(chunks(&["ab", "cde"]), 4)
            .collect()
            .await
            .unwrap_err();
        assert!(find_cause::<BodyTooLarge>(&*err).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires_only_when_the_stream_stops_moving() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut body = std::pin::pin!(IdleTimeout::new(
            StreamBody::new(stream),
            Duration::from_secs(5)
        ));
        // Frames every 4 s keep a 5 s idle timer from firing, however long the stream lasts.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .await
                .unwrap();
            assert!(body.frame().await.unwrap().is_ok());
        }
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.downcast_ref::<BodyIdleTimeout>().is_some());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[test]
    fn the_buffer_budget_refuses_past_its_capacity_and_gets_every_byte_back_on_drop() {
        let gauge = prometheus::IntGauge::new("t", "t").unwrap();
        let budget = BufferBudget::new(100, gauge.clone());
        let mut a = budget.reserve(60).unwrap();
        assert_eq!(budget.reserve(50).err(), Some(Refused::Full));
        assert_eq!(
            budget.reserve(101).err(),
            Some(Refused::TooLarge { capacity: 100 })
        );
        a.grow(40).unwrap();
        assert_eq!(a.grow(1), Err(Refused::TooLarge { capacity: 100 }));
        assert_eq!((budget.used(), gauge.get()), (100, 100));
        drop(a);
        assert_eq!((budget.used(), gauge.get()), (0, 0));
    }

    #[test]
    fn decoding_undoes_codings_last_first_and_stops_at_the_limit() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all("hello".repeat(100).as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let mut both = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        both.write_all(&gz).unwrap();
        let both = Bytes::from(both.finish().unwrap());
        assert_eq!(
            decode(both.clone(), &[Coding::Gzip, Coding::Deflate], 500).unwrap(),
            "hello".repeat(100)
        );
        assert!(matches!(
            decode(both, &[Coding::Gzip, Coding::Deflate], 499),
            Err(DecodeError::TooLarge { limit: 499 })
        ));
        assert!(matches!(
            decode(Bytes::from_static(b"hello"), &[Coding::Brotli], 100),
            Err(DecodeError::Invalid("br"))
        ));
        let mut h = http::HeaderMap::new();
        h.append("content-encoding", "gzip, identity".parse().unwrap());
        h.append("content-encoding", "BR".parse().unwrap());
        assert_eq!(
            content_codings(&h),
            ContentCodings::Known(vec![Coding::Gzip, Coding::Brotli])
        );
        h.insert("content-encoding", "compress".parse().unwrap());
        assert_eq!(content_codings(&h), ContentCodings::Unknown);
    }

    #[tokio::test]
    async fn guard_is_released_when_the_body_ends() {
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        struct OnDrop(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.take().map(|t| t.send(()));
            }
        }
        let body = Guarded::new(chunks(&["a", "b"]), OnDrop(Some(tx)));
        let mut body = std::pin::pin!(body);
        body.frame().await.unwrap().unwrap();
        assert!(rx.try_recv().is_err(), "released too early");
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        assert!(rx.try_recv().is_ok(), "not released at the end");
    }
}

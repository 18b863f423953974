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
#[error("body stalled: no data for {0:?}")]
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

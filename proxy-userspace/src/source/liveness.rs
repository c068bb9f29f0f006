//! Watch liveness: a watch whose response shows nothing, not even a bookmark, for the liveness
//! window is ended with a [`Silent`] error, so the watcher drops its connection and watches
//! again from its last resourceVersion.
//!
//! This has to sit below kube-rs's watcher, on the HTTP response: the watcher swallows
//! bookmarks, so above it a quiet but healthy watch (bookmarks once a minute, no changes for
//! hours) looks the same as a half-dead one. Its own idle timeout is the server-side watch
//! timeout plus five seconds (295 s by default), which is how long a half-dead connection
//! would otherwise keep every change from this node.

use std::{
    error::Error as StdError,
    future::Future as _,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt as _, TryFutureExt as _, future::BoxFuture};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Layer, Service};

/// What ends a watch that has shown nothing for the liveness window.
#[derive(Debug, thiserror::Error)]
#[error("watch silent for {}s", .0.as_secs())]
pub(crate) struct Silent(pub Duration);

/// How long a watch was silent, if `error` (from the watcher) is the liveness check ending it.
pub(crate) fn silent_for(error: &(dyn StdError + 'static)) -> Option<Duration> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(silent) = e.downcast_ref::<Silent>() {
            return Some(silent.0);
        }
        next = e.source();
    }
    None
}

/// Puts every watch response of a client under the liveness check.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LivenessLayer(pub Duration);

impl<S> Layer<S> for LivenessLayer {
    type Service = Liveness<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Liveness {
            inner,
            window: self.0,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Liveness<S> {
    inner: S,
    window: Duration,
}

fn is_watch<B>(request: &Request<B>) -> bool {
    request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

impl<S, ReqBody, B> Service<Request<ReqBody>> for Liveness<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<Watched<B>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let window = is_watch(&request).then_some(self.window);
        self.inner
            .call(request)
            .map_ok(move |response| response.map(|body| Watched::new(body, window)))
            .boxed()
    }
}

/// A response body; for a watch, one that fails with [`Silent`] when no frame arrives for the
/// window, and then ends.
pub(crate) struct Watched<B> {
    inner: B,
    /// The window and the deadline its last frame set; `None` for anything but a watch.
    watchdog: Option<(Duration, Pin<Box<Sleep>>)>,
    silent: bool,
}

impl<B> Watched<B> {
    fn new(inner: B, window: Option<Duration>) -> Self {
        Self {
            inner,
            watchdog: window.map(|w| (w, Box::pin(tokio::time::sleep(w)))),
            silent: false,
        }
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.silent {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some((window, deadline)) = &mut this.watchdog {
                deadline.as_mut().reset(Instant::now() + *window);
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some((window, deadline)) = &mut this.watchdog
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.silent = true;
            return Poll::Ready(Some(Err(Box::new(Silent(*window)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.silent || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use http_body_util::{BodyExt as _, StreamBody};
    use k8s_openapi::api::core::v1::Service as K8sService;
    use kube::runtime::watcher;
    use tokio::sync::mpsc;

    use super::*;

    type Chunks = StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, BoxError>>>;

    /// A body fed line by line through the returned sender.
    fn fed() -> (mpsc::UnboundedSender<&'static str>, Chunks) {
        let (tx, rx) = mpsc::unbounded_channel::<&'static str>();
        let frames = futures::stream::unfold(rx, |mut rx| async move {
            let line = rx.recv().await?;
            Some((Ok(Frame::data(Bytes::from(line))), rx))
        });
        (tx, StreamBody::new(frames.boxed()))
    }

    const WINDOW: Duration = Duration::from_secs(90);

    #[tokio::test(start_paused = true)]
    async fn a_watch_with_a_frame_inside_every_window_stays_up() {
        let (tx, body) = fed();
        let mut body = Watched::new(body, Some(WINDOW));
        for _ in 0..5 {
            tokio::time::sleep(WINDOW.saturating_sub(Duration::from_secs(1))).await;
            tx.send("bookmark\n").unwrap();
            let frame = body.frame().await.expect("a frame").expect("not silent");
            assert_eq!(frame.into_data().unwrap(), "bookmark\n");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_silent_for_the_window_fails_once_then_ends() {
        let (_tx, body) = fed();
        let started = Instant::now();
        let mut body = Watched::new(body, Some(WINDOW));
        let error = body.frame().await.expect("an error").unwrap_err();
        assert!((WINDOW..WINDOW + Duration::from_secs(1)).contains(&started.elapsed()));
        assert_eq!(error.to_string(), "watch silent for 90s");
        assert!(body.frame().await.is_none(), "the body ends after the error");
    }

    #[tokio::test(start_paused = true)]
    async fn anything_but_a_watch_may_take_as_long_as_it_takes() {
        let (tx, body) = fed();
        let mut body = Watched::new(body, None);
        tokio::time::sleep(10 * WINDOW).await;
        tx.send("{}").unwrap();
        assert!(body.frame().await.expect("a frame").is_ok());
    }

    /// A stand-in API server: lists are empty, watches answer and then send nothing.
    async fn half_dead(request: Request<kube::client::Body>) -> Result<Response<Chunks>, BoxError> {
        let (tx, body) = fed();
        if is_watch(&request) {
            // Held open, never written to.
            std::mem::forget(tx);
        } else {
            tx.send(
                r#"{"apiVersion":"v1","kind":"ServiceList","metadata":{"resourceVersion":"7"},"items":[]}"#,
            )
            .unwrap();
        }
        Ok(Response::new(body))
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_reports_a_half_dead_watch_as_silent_and_watches_again() {
        let service = LivenessLayer(WINDOW).layer(tower::service_fn(half_dead));
        let client = kube::Client::new(service, "default");
        let mut events = watcher(kube::Api::<K8sService>::all(client), watcher::Config::default()).boxed();
        assert!(matches!(events.next().await, Some(Ok(watcher::Event::Init))));
        assert!(matches!(events.next().await, Some(Ok(watcher::Event::InitDone))));
        let started = Instant::now();
        for _ in 0..2 {
            let error = events.next().await.expect("the watcher goes on").unwrap_err();
            assert_eq!(silent_for(&error), Some(WINDOW), "{error}");
        }
        assert!(
            (2 * WINDOW..2 * WINDOW + Duration::from_secs(1)).contains(&started.elapsed()),
            "each new watch gets a window of its own, without a relist"
        );
    }

    #[test]
    fn other_errors_are_not_silence() {
        let error = std::io::Error::other("connection refused");
        assert_eq!(silent_for(&error), None);
    }

    #[test]
    fn only_watch_requests_are_watched() {
        let request = |uri: &str| Request::get(uri).body(()).unwrap();
        assert!(is_watch(&request(
            "/api/v1/services?&watch=true&timeoutSeconds=290"
        )));
        assert!(!is_watch(&request("/api/v1/services?labelSelector=a&limit=500")));
        assert!(!is_watch(&request("/api/v1/services")));
    }
}

//! The connection loop: hyper's HTTP/1.1 server on every accepted connection, in front of the
//! [`Edge`] and the router, with the bounds of the contract's "Connections" section.
//!
//! - **Header-read timeout:** a connection must send a complete request head within it of
//!   connecting or of its first byte after an idle spell; else it is closed.
//! - **Idle timeout:** a keep-alive connection with no request in flight is closed after it.
//! - **Body-read timeout:** a request body must arrive whole within it of the head; else the
//!   handler's read fails and the client gets 408 `request_timeout` and `Connection: close`.
//! - **Write timeout:** a response write that makes no progress for this long (the client stopped
//!   reading) ends the connection.
//! - **`--max-connections`:** at the limit, one accepted client waits for a place, and the ones
//!   after it in the listen backlog, while the connection idle the longest is closed to make room
//!   (busy ones are never cut: like nginx reusing idle keep-alive connections). The limit is
//!   capped by the file-descriptor limit (its soft value raised to the hard one at start), so the
//!   server never runs out of descriptors below it.
//!
//! hyper's own header-read timer is not used: it restarts the moment a response is written, so
//! it would close an idle keep-alive connection after the header timeout rather than the idle
//! one. A small per-connection [`Tracker`] knows which phase the connection is in instead.
//!
//! Not `axum::serve`: that one negotiates HTTP/2 and has none of these bounds.

use super::edge::Edge;
use crate::config::ConnectionLimits;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Sleep;
use tower::ServiceExt;

/// The service every connection calls: the edge around the router.
pub type App = Edge<Router>;

/// The largest request head read (and hyper's read and write buffer).
const MAX_HEAD: usize = 64 * 1024;

/// How long connections may take to finish once the listener is closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// At the connection limit, how often another idle connection is looked for while none closes.
const SHED_RETRY: Duration = Duration::from_millis(500);

/// Accepts connections on `listener` until `stop` resolves; then closes the listener, asks every
/// connection to close after its current response, and waits (up to a few seconds) for them.
pub async fn serve(
    listener: TcpListener,
    app: App,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let capacity = connection_capacity(limits.max_connections);
    let permits = Arc::new(Semaphore::new(capacity));
    let open = Arc::new(OpenConnections::default());
    let limits = Arc::new(limits);
    // Dropping `close_tx` tells the connections to finish; each holds a `closed_rx` until it has.
    let (close_tx, close_rx) = watch::channel(());
    let (closed_tx, closed_rx) = watch::channel(());
    let mut failures = AcceptFailures::default();
    let mut stop = pin!(stop);
    'accept: loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors (another part of the process holds more than its
                    // share) and the like: make room, wait, never spin.
                    open.shed_one_idle();
                    let wait = failures.record(&e);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => continue,
                        () = &mut stop => break,
                    }
                }
            },
            () = &mut stop => break,
        };
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            // At the limit: this client waits for a place (the next ones in the listen backlog)
            // while the connection idle the longest makes room; busy ones are never cut.
            Err(_) => loop {
                open.shed_one_idle();
                tokio::select! {
                    permit = Arc::clone(&permits).acquire_owned() => match permit {
                        Ok(permit) => break permit,
                        Err(_) => break 'accept,
                    },
                    () = tokio::time::sleep(SHED_RETRY) => {}
                    () = &mut stop => break 'accept,
                }
            },
        };
        failures.reset();
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let (id, tracker) = open.register();
        let service = ConnectionService {
            app: app.clone(),
            peer,
            tracker: Arc::clone(&tracker),
            body_read_timeout: limits.body_read_timeout,
        };
        let io = WatchedIo {
            stream,
            tracker: Arc::clone(&tracker),
            write_timeout: limits.write_timeout,
            write_stall: None,
        };
        let close = close_rx.clone();
        let closed = closed_rx.clone();
        let open = Arc::clone(&open);
        let limits = Arc::clone(&limits);
        tokio::spawn(async move {
            // Held until the connection is done, however it ends.
            let (_permit, _closed) = (permit, closed);
            drive(io, service, &tracker, &limits, close).await;
            open.remove(id);
        });
    }
    drop(listener);
    drop(close_tx);
    drop(closed_rx);
    if tokio::time::timeout(CLOSE_GRACE, closed_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period are dropped");
    }
    Ok(())
}

/// Serves one connection until it ends, the client overstays a timeout, the limit needs its
/// place, or the server closes (then after the response in flight).
async fn drive(
    io: WatchedIo,
    service: ConnectionService,
    tracker: &Tracker,
    limits: &ConnectionLimits,
    mut close: watch::Receiver<()>,
) {
    let conn = http1::Builder::new()
        // A client that shuts down its sending side after the request still gets the answer.
        .half_close(true)
        // hyper's default (~400 KiB) lets each half-sent head hold that much; no request to
        // this API needs a head near 64 KiB (a larger one gets hyper's 431).
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = pin!(conn);
    loop {
        let wake = match tracker.deadline(limits) {
            Some(deadline) if deadline <= now_ms() => {
                tracing::debug!("connection closed: header-read or idle timeout");
                return;
            }
            Some(deadline) => epoch() + Duration::from_millis(deadline),
            // A request in flight is bounded by the body and write timeouts; look again later.
            None => Instant::now() + limits.header_read_timeout.min(limits.idle_timeout),
        };
        tokio::select! {
            result = conn.as_mut() => return log_end(result),
            _ = close.changed() => {
                conn.as_mut().graceful_shutdown();
                return log_end(conn.await);
            }
            () = tracker.shed.notified() => {
                if tracker.busy.load(Ordering::Acquire) == 0 {
                    tracing::debug!("idle connection closed to make room at the connection limit");
                    return;
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

fn log_end(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Milliseconds since the first call, plus one (so that 0 can mean "not set").
fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Where one connection is: serving a request, reading a head, or idle; in [`now_ms`] times.
/// Written by the connection's own task; read by it and by the accept loop (to pick whom to shed).
struct Tracker {
    /// Requests being served (until their response body is written or dropped).
    busy: AtomicUsize,
    /// When the head being read began to arrive (the connection's start for the first); 0: none.
    head_since: AtomicU64,
    /// When the last response finished (the connection's start before the first).
    idle_since: AtomicU64,
    /// Close now if idle: the connection limit needs the place.
    shed: Notify,
}

impl Tracker {
    fn new() -> Tracker {
        let now = now_ms();
        Tracker {
            busy: AtomicUsize::new(0),
            head_since: AtomicU64::new(now),
            idle_since: AtomicU64::new(now),
            shed: Notify::new(),
        }
    }

    /// When the connection must have made progress by, or `None` while a request is served.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<u64> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let millis = |d: Duration| d.as_millis() as u64;
        match self.head_since.load(Ordering::Acquire) {
            0 => Some(self.idle_since.load(Ordering::Acquire) + millis(limits.idle_timeout)),
            head => Some(head + millis(limits.header_read_timeout)),
        }
    }

    /// Bytes came in: between requests, the next head has begun.
    fn bytes_arrived(&self) {
        if self.busy.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Acquire) == 0 {
            self.head_since.store(now_ms(), Ordering::Release);
        }
    }
}

/// A request being served; dropped when its response body is done (or the request is dropped).
struct Busy(Arc<Tracker>);

impl Busy {
    fn new(tracker: Arc<Tracker>) -> Busy {
        tracker.busy.fetch_add(1, Ordering::AcqRel);
        tracker.head_since.store(0, Ordering::Release);
        Busy(tracker)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.idle_since.store(now_ms(), Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The open connections, for the accept loop to pick an idle one to close at the limit.
#[derive(Default)]
struct OpenConnections {
    next_id: AtomicU64,
    trackers: Mutex<HashMap<u64, Arc<Tracker>>>,
}

impl OpenConnections {
    fn register(&self) -> (u64, Arc<Tracker>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracker = Arc::new(Tracker::new());
        if let Ok(mut trackers) = self.trackers.lock() {
            trackers.insert(id, Arc::clone(&tracker));
        }
        (id, tracker)
    }

    fn remove(&self, id: u64) {
        if let Ok(mut trackers) = self.trackers.lock() {
            trackers.remove(&id);
        }
    }

    /// Asks the connection idle the longest (no request in flight) to close.
    fn shed_one_idle(&self) {
        let Ok(trackers) = self.trackers.lock() else {
            return;
        };
        let idlest = trackers
            .values()
            .filter(|t| t.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|t| t.idle_since.load(Ordering::Acquire));
        if let Some(tracker) = idlest {
            tracker.shed.notify_one();
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (once, at start).
pub fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(hard)) = (limit.current, limit.maximum) {
        if current < hard {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::warn!(error = %e, soft = current, hard, "the file descriptor limit was not raised");
            }
        }
    }
}

/// How many connections fit in the file-descriptor limit beside the descriptors already open
/// and a reserve for the store, Redis, image files and outgoing calls: `wanted`, or fewer (with
/// a warning) when the limit is too low for it.
fn connection_capacity(wanted: usize) -> usize {
    let Some(soft) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current else {
        return wanted;
    };
    let open = std::fs::read_dir("/proc/self/fd").map_or(64, Iterator::count) as u64;
    let budget = soft.saturating_sub(open);
    let reserve = (budget / 4).max(64);
    let fit = usize::try_from(budget.saturating_sub(reserve).max(1)).unwrap_or(usize::MAX);
    if fit < wanted {
        tracing::warn!(
            max_connections = wanted,
            serving_at_most = fit,
            file_descriptor_limit = soft,
            "the file descriptor limit holds fewer connections than --max-connections; raise `ulimit -n` for more"
        );
    }
    fit.min(wanted)
}

/// Failed accepts: an increasing wait, and a warning at most every ten seconds.
#[derive(Default)]
struct AcceptFailures {
    wait: Duration,
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl AcceptFailures {
    const FIRST_WAIT: Duration = Duration::from_millis(50);
    const LONGEST_WAIT: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    fn record(&mut self, error: &io::Error) -> Duration {
        self.wait = (self.wait * 2).clamp(Self::FIRST_WAIT, Self::LONGEST_WAIT);
        self.unlogged += 1;
        if self
            .logged_at
            .is_none_or(|at| at.elapsed() >= Self::LOG_EVERY)
        {
            tracing::warn!(error = %error, failures = self.unlogged, "accept failed; waiting before accepting again");
            self.unlogged = 0;
            self.logged_at = Some(Instant::now());
        }
        self.wait
    }

    fn reset(&mut self) {
        self.wait = Duration::ZERO;
    }
}

/// The socket, watched: bytes read mark the start of a head for the [`Tracker`]; a write that
/// makes no progress for the write timeout fails.
struct WatchedIo {
    stream: TcpStream,
    tracker: Arc<Tracker>,
    write_timeout: Duration,
    /// Running while writes are blocked on a client that does not read.
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl WatchedIo {
    fn bound_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.write_stall = None;
            return polled;
        }
        let timeout = self.write_timeout;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.write_stall = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client did not read the response within the write timeout",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.tracker.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.bound_write(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.bound_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.bound_write(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.bound_write(cx, polled)
    }
}

/// The request body did not arrive within `--body-read-timeout` (found by
/// `extract::body_fault`, which answers 408).
#[derive(Debug)]
pub struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive within the body-read timeout")
    }
}

impl std::error::Error for BodyTimedOut {}

/// A request body that fails with [`BodyTimedOut`] once its deadline passes.
struct DeadlineBody {
    body: Incoming,
    deadline: Pin<Box<Sleep>>,
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|frame| frame.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that holds its request's [`Busy`] until it is written.
pub struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// One client connection's requests, with the peer's address (the dashboard's sign-in limit
/// counts by it).
struct ConnectionService {
    app: App,
    peer: SocketAddr,
    tracker: Arc<Tracker>,
    body_read_timeout: Duration,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let busy = Busy::new(Arc::clone(&self.tracker));
        let timeout = self.body_read_timeout;
        let mut req = req.map(|body| {
            if hyper::body::Body::is_end_stream(&body) {
                Body::new(body)
            } else {
                Body::new(DeadlineBody {
                    body,
                    deadline: Box::pin(tokio::time::sleep(timeout)),
                })
            }
        });
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let app = self.app.clone();
        Box::pin(async move {
            let response: Response = match app.oneshot(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok(response.map(|body| TrackedBody { body, _busy: busy }))
        })
    }
}

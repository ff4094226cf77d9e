//! The connection loop: every request to the [`Gateway`], read first by the fast
//! [`lane`] and, from the first request the lane does not take, by hyper (HTTP/1.1).
//!
//! Not `axum::serve`: that one negotiates HTTP/2 and upgrades, which this API does not use, and
//! leaves Nagle's algorithm on; a response here is one write, so `TCP_NODELAY` sends it at once.

use super::gateway::Gateway;
use super::lane::{self, LaneEnd, Rewind};
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long connections may take to finish once the listener is closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Accepts connections on `listener` until `stop` resolves; then closes the listener, asks every
/// connection to close after its current response, and waits (up to a few seconds) for them.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    stop: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    // Dropping `close_tx` tells the connections to finish; each holds a `closed_rx` until it has.
    let (close_tx, close_rx) = watch::channel(());
    let (closed_tx, closed_rx) = watch::channel(());
    let mut stop = pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let connection = Connection {
            gateway: Arc::clone(&gateway),
            peer,
        };
        let mut close = close_rx.clone();
        let closed = closed_rx.clone();
        tokio::spawn(async move {
            // Held until the connection is done, however it ends (see `closed_rx` below).
            let _closed = closed;
            let mut stream = stream;
            let prefix = match lane::run(&mut stream, &connection.gateway, peer, &mut close).await {
                LaneEnd::Closed => return,
                LaneEnd::HandOff(prefix) => prefix,
            };
            let io = TokioIo::new(Rewind::new(prefix, stream));
            let conn = http1::Builder::new().serve_connection(io, connection);
            let mut conn = pin!(conn);
            tokio::select! {
                result = conn.as_mut() => log_end(result),
                _ = close.changed() => {
                    conn.as_mut().graceful_shutdown();
                    log_end(conn.await);
                }
            }
        });
    }
    drop(listener);
    drop(close_tx);
    drop(closed_rx);
    let all_closed = closed_tx.closed();
    if tokio::time::timeout(CLOSE_GRACE, all_closed).await.is_err() {
        tracing::warn!("connections still open after the grace period are dropped");
    }
    Ok(())
}

fn log_end(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// One client connection: its requests, with the peer's address (the dashboard's sign-in
/// limit counts by it).
struct Connection {
    gateway: Arc<Gateway>,
    peer: SocketAddr,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Connection {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let gateway = Arc::clone(&self.gateway);
        Box::pin(async move { Ok(gateway.serve(req).await) })
    }
}

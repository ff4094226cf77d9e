//! The fast lane: the API's plain `GET`s read and answered on the connection, without hyper.
//!
//! Why: a poll of a task, a 401 and a 429 are the requests a gateway sees most and does least
//! for, and for them hyper's own machinery per request (its dispatcher, buffered IO, incoming
//! body and encoder) cost more instructions than tollgate's work and as much as nginx spends on
//! a whole request (bench/README.md has the counts). The lane reads the request head with
//! `httparse` (the parser hyper itself uses) and writes the response in one buffer.
//!
//! What it takes: an HTTP/1.1 `GET` of an API route other than an image, with the whole head
//! in hand, no body, no `Expect`, `Upgrade` or `Transfer-Encoding`, and no `Connection` other
//! than `keep-alive`. Everything else, malformed or not, and everything after it on the same
//! connection, is hyper's: the bytes read so far are handed to it first ([`Rewind`]).
//!
//! What it does not change: the request goes through the very same gateway calls as one from
//! hyper ([`Gateway::screen`], then [`Gateway::read_task`] or [`Gateway::serve_passed`]: request
//! id, drain gate, key, limit, router, envelope, metrics, log), so the answers are the same; only
//! the bytes on the wire are written here. A refusal and the task poll come back as an [`Answer`]
//! and are written without a `Request` or `Response`. A test sends the same requests both ways
//! and compares them.

use super::gateway::{Answer, Gateway, Head, Onward, Screened};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tollgate_contract::headers as h;

/// More headers than this and the request is hyper's (which has its own, higher limit).
const MAX_HEADERS: usize = 32;
/// A head longer than this without its end is hyper's too (it answers 431 when it must).
const MAX_HEAD: usize = 16 * 1024;

/// How the lane left a connection.
pub enum LaneEnd {
    /// The connection is finished (closed by the client, failed, or asked to close).
    Closed,
    /// A request the lane does not take: the bytes already read, for hyper to start from.
    HandOff(Bytes),
}

/// Serves requests on `stream` while they are the lane's; returns when one is not, or the
/// connection ends. `close` changes (or is dropped) when the server shuts down: the lane then
/// stops between requests.
pub async fn run(
    stream: &mut TcpStream,
    gateway: &Gateway,
    peer: SocketAddr,
    close: &mut watch::Receiver<()>,
) -> LaneEnd {
    let mut input = BytesMut::with_capacity(4096);
    let mut output = Vec::with_capacity(1024);
    let mut body = Vec::with_capacity(512);
    // One wait for the whole connection, not a new one for every read.
    let mut closing = std::pin::pin!(close.changed());
    loop {
        // Every complete request read so far, in order; their responses go out in one write.
        let mut end = None;
        loop {
            let served = match next_request(&input) {
                Next::Request(head, len) => {
                    match answer(gateway, &head, peer, &mut output, &mut body).await {
                        Ok(Some(keep)) => Served::Answered(keep, len),
                        Ok(None) => Served::NotOurs,
                        Err(e) => {
                            // A response body that failed: what was sent cannot be undone.
                            tracing::error!(error = %e, "response body failed; closing the connection");
                            return LaneEnd::Closed;
                        }
                    }
                }
                Next::Incomplete if input.len() < MAX_HEAD => Served::Incomplete,
                Next::Incomplete | Next::NotOurs => Served::NotOurs,
            };
            match served {
                Served::Answered(Keep::Open, len) => input.advance(len),
                Served::Answered(Keep::Close, _) => {
                    end = Some(LaneEnd::Closed);
                    break;
                }
                Served::Incomplete => break,
                Served::NotOurs => {
                    end = Some(LaneEnd::HandOff(input.split().freeze()));
                    break;
                }
            }
        }
        if !output.is_empty() {
            if let Err(e) = stream.write_all(&output).await {
                tracing::debug!(error = %e, "connection ended while writing");
                return LaneEnd::Closed;
            }
            output.clear();
        }
        if let Some(end) = end {
            return end;
        }
        if input.capacity() - input.len() < 1024 {
            input.reserve(4096);
        }
        tokio::select! {
            // Reading first: when bytes are waiting, the shutdown signal is not even polled.
            biased;
            read = stream.read_buf(&mut input) => match read {
                Ok(0) => return LaneEnd::Closed,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "connection ended while reading");
                    return LaneEnd::Closed;
                }
            },
            // Shutting down: a connection between requests is closed, as hyper closes its idle ones.
            _ = &mut closing => return LaneEnd::Closed,
        }
    }
}

/// Appends the gateway's answer to a head the lane took: a refusal or the task read straight
/// from the gateway's [`Answer`], anything else through [`Gateway::serve_passed`]. `Ok(None)`:
/// the request is hyper's after all (see [`LaneHead::request`]); `Err`: a response body failed.
async fn answer(
    gateway: &Gateway,
    head: &LaneHead<'_>,
    peer: SocketAddr,
    output: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<Option<Keep>, axum::Error> {
    let pass = match gateway.screen(&head.head()).await {
        Screened::Refused(refusal) => return Ok(Some(write_answer(&refusal, output, scratch))),
        Screened::Passed(pass) => pass,
    };
    let pass = match pass.onward(&Method::GET, head.path) {
        Onward::TaskRead(read) => {
            let answer = gateway.read_task(read).await;
            return Ok(Some(write_answer(&answer, output, scratch)));
        }
        Onward::Serve(pass) => pass,
    };
    let Some(request) = head.request(peer) else {
        return Ok(None);
    };
    write_response(gateway.serve_passed(request, pass).await, output)
        .await
        .map(Some)
}

/// What became of the next request in the input.
enum Served {
    /// Answered; the request took this many bytes of the input.
    Answered(Keep, usize),
    /// The head is not complete yet.
    Incomplete,
    /// Not a request the lane takes (or not a valid one: hyper gives the 400).
    NotOurs,
}

enum Next<'a> {
    /// A request of the lane's, and how many bytes of the input it took.
    Request(LaneHead<'a>, usize),
    /// The head is not complete yet.
    Incomplete,
    /// Not a request the lane takes (or not a valid one: hyper gives the 400).
    NotOurs,
}

/// The head of a request the lane takes, borrowed from the input: what the gateway reads to
/// refuse it ([`LaneHead::head`]), and the bytes to build the `Request` from when it does not
/// ([`LaneHead::request`]). Only the few headers the gateway reads are kept: a refusal, the
/// common case here, needs no more.
struct LaneHead<'a> {
    bytes: &'a [u8],
    path: &'a str,
    route: &'static str,
    authorization: Option<&'a [u8]>,
    request_id: Option<&'a [u8]>,
    simulate: Option<&'a [u8]>,
}

impl LaneHead<'_> {
    fn head(&self) -> Head<'_> {
        Head {
            method: &Method::GET,
            path: self.path,
            route: Some(self.route),
            authorization: self.authorization,
            request_id: self.request_id,
            simulate: self.simulate,
        }
    }

    /// The `Request` hyper would have made of the head (parsed again, whole). `None` cannot
    /// happen for a head that [`next_request`] took (httparse checks header names and values by
    /// the same rules as `http`, and the target's characters were checked), but is hyper's if it does.
    fn request(&self, peer: SocketAddr) -> Option<Request<Body>> {
        let mut headers = [MaybeUninit::uninit(); MAX_HEADERS];
        let mut head = httparse::Request::new(&mut []);
        head.parse_with_uninit_headers(self.bytes, &mut headers)
            .ok()?;
        let uri = Uri::try_from(head.path?).ok()?;
        let mut request = Request::new(Body::empty());
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        let map = request.headers_mut();
        map.reserve(head.headers.len());
        for h in head.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
            let value = HeaderValue::from_bytes(h.value).ok()?;
            map.append(name, value);
        }
        request.extensions_mut().insert(ConnectInfo(peer));
        Some(request)
    }
}

fn next_request(input: &[u8]) -> Next<'_> {
    let mut headers = [MaybeUninit::uninit(); MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let len = match head.parse_with_uninit_headers(input, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Next::Incomplete,
        Err(_) => return Next::NotOurs,
    };
    let (Some("GET"), Some(1), Some(target)) = (head.method, head.version, head.path) else {
        return Next::NotOurs;
    };
    let path = match target.bytes().position(|b| b == b'?') {
        Some(at) => &target[..at],
        None => target,
    };
    let route = match super::gateway::api_route(&Method::GET, path) {
        Some(route) if route != super::gateway::IMAGE_ROUTE && plain_target(target) => route,
        _ => return Next::NotOurs,
    };
    let mut taken = LaneHead {
        bytes: &input[..len],
        path,
        route,
        authorization: None,
        request_id: None,
        simulate: None,
    };
    for h in head.headers.iter() {
        let name = h.name.as_bytes();
        // By length first: most names are then never compared.
        let is = |known: &[u8]| name.len() == known.len() && name.eq_ignore_ascii_case(known);
        let ours = match name.len() {
            10 if is(b"connection") => h.value.eq_ignore_ascii_case(b"keep-alive"),
            14 if is(b"content-length") => h.value == b"0",
            6 if is(b"expect") => false,
            7 if is(b"upgrade") => false,
            17 if is(b"transfer-encoding") => false,
            _ => true,
        };
        if !ours {
            return Next::NotOurs;
        }
        // The first of each, as `HeaderMap::get` gives it.
        let slot = match name.len() {
            13 if is(b"authorization") => &mut taken.authorization,
            12 if is(h::REQUEST_ID.as_bytes()) => &mut taken.request_id,
            17 if is(h::SIMULATE.as_bytes()) => &mut taken.simulate,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(h.value);
        }
    }
    Next::Request(taken, len)
}

/// Whether a request target has only characters that `http`'s URI parser takes in a path and
/// query (a conservative subset: anything else goes to hyper, which decides).
fn plain_target(target: &str) -> bool {
    target.starts_with('/')
        && target.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'/' | b'?'
                        | b'='
                        | b'&'
                        | b'%'
                        | b'-'
                        | b'.'
                        | b'_'
                        | b'~'
                        | b'+'
                        | b':'
                        | b'@'
                        | b','
                )
        })
}

enum Keep {
    Open,
    Close,
}

/// Appends an answer the gateway made without a `Request` (a refusal, the task read), from its
/// own headers and body: the bytes hyper sends for the same [`Answer`] (a test compares the two).
fn write_answer(answer: &Answer, output: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Keep {
    let body = answer.body(scratch);
    // Room for the head and body at once, so no write below grows the buffer.
    output.reserve(512 + body.len());
    status_line(output, answer.status());
    let mut keep = Keep::Open;
    answer.headers(|name, value| {
        if *name == header::CONNECTION && value.eq_ignore_ascii_case(b"close") {
            keep = Keep::Close;
        }
        header_line(output, name, value);
    });
    end_of_head(output, Some(body.len()), false);
    output.extend_from_slice(body);
    keep
}

/// Appends `response` to `output` as HTTP/1.1, the way hyper writes it: the status line, the
/// headers in order, `content-length`, `date`, the body.
async fn write_response(response: Response, output: &mut Vec<u8>) -> Result<Keep, axum::Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    let status = parts.status;
    status_line(output, status);
    let mut keep = Keep::Open;
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH || *name == header::TRANSFER_ENCODING {
            continue;
        }
        if *name == header::CONNECTION && value.as_bytes().eq_ignore_ascii_case(b"close") {
            keep = Keep::Close;
        }
        has_date |= *name == header::DATE;
        header_line(output, name, value.as_bytes());
    }
    let bodyless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    end_of_head(output, (!bodyless).then_some(body.len()), has_date);
    if !bodyless {
        output.extend_from_slice(&body);
    }
    Ok(keep)
}

fn status_line(output: &mut Vec<u8>, status: StatusCode) {
    // The lines of the refusals, whole: one copy instead of five.
    let line: &[u8] = match status {
        StatusCode::TOO_MANY_REQUESTS => b"HTTP/1.1 429 Too Many Requests\r\n",
        StatusCode::UNAUTHORIZED => b"HTTP/1.1 401 Unauthorized\r\n",
        StatusCode::SERVICE_UNAVAILABLE => b"HTTP/1.1 503 Service Unavailable\r\n",
        StatusCode::OK => b"HTTP/1.1 200 OK\r\n",
        _ => {
            output.extend_from_slice(b"HTTP/1.1 ");
            output.extend_from_slice(status.as_str().as_bytes());
            output.push(b' ');
            output.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
            output.extend_from_slice(b"\r\n");
            return;
        }
    };
    output.extend_from_slice(line);
}

fn header_line(output: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    // The refusals' own names with their separator, whole: one copy, and no lookup in `http`'s
    // table of standard names.
    let start: &[u8] = match name {
        n if *n == header::CONTENT_TYPE => b"content-type: ",
        n if *n == header::RETRY_AFTER => b"retry-after: ",
        n if *n == header::WWW_AUTHENTICATE => b"www-authenticate: ",
        n if n.as_str() == h::RATELIMIT_POLICY => b"ratelimit-policy: ",
        n if n.as_str() == h::RATELIMIT => b"ratelimit: ",
        n if n.as_str() == h::REQUEST_ID => b"x-request-id: ",
        n => {
            output.extend_from_slice(n.as_str().as_bytes());
            b": "
        }
    };
    output.extend_from_slice(start);
    output.extend_from_slice(value);
    output.push(b'\r');
    output.push(b'\n');
}

/// `content-length` (unless the status has no body) and `date` (unless sent already), as hyper
/// adds them, and the blank line.
fn end_of_head(output: &mut Vec<u8>, content_length: Option<usize>, has_date: bool) {
    if let Some(length) = content_length {
        output.extend_from_slice(b"content-length: ");
        output.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
        output.push(b'\r');
        output.push(b'\n');
    }
    if !has_date {
        http_date(output);
    }
    output.extend_from_slice(b"\r\n");
}

/// Appends the `date` header line, made once a second per thread (as hyper makes its date).
fn http_date(output: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(cached_second, line)| {
        if *cached_second != second {
            *line = format!("date: {}\r\n", httpdate::fmt_http_date(now));
            *cached_second = second;
        }
        output.extend_from_slice(line.as_bytes());
    });
}
/// A connection with bytes already read from it put back in front, for hyper.
pub struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl Rewind {
    pub fn new(prefix: Bytes, inner: TcpStream) -> Rewind {
        Rewind { prefix, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    fn taken(input: &str) -> bool {
        matches!(next_request(input.as_bytes()), Next::Request(..))
    }

    #[test]
    fn takes_plain_gets_of_api_routes() {
        assert!(taken(
            "GET /v1/tasks/task_1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer tg_x\r\n\r\n"
        ));
        assert!(taken(
            "GET /v1/tasks?limit=2 HTTP/1.1\r\nConnection: Keep-Alive\r\n\r\n"
        ));
        assert!(taken(
            "GET /v1/account HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        ));
    }

    #[test]
    fn leaves_everything_else_to_hyper() {
        let not_ours = [
            "POST /v1/images/generations HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            "HEAD /v1/account HTTP/1.1\r\n\r\n",
            "GET /v1/account HTTP/1.0\r\n\r\n",
            "GET /v1/tasks/task_1/images/0 HTTP/1.1\r\n\r\n",
            "GET /healthz HTTP/1.1\r\n\r\n",
            "GET /dashboard HTTP/1.1\r\n\r\n",
            "GET /v1/account HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /v1/account HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET /v1/account HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /v1/account HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /v1/account HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET http://example.com/v1/account HTTP/1.1\r\n\r\n",
            "GET /v1/account HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ];
        for input in not_ours {
            assert!(
                matches!(next_request(input.as_bytes()), Next::NotOurs),
                "{input:?}"
            );
        }
    }

    #[test]
    fn waits_for_the_whole_head() {
        let input = b"GET /v1/account HTTP/1.1\r\nAuthorization: Bearer";
        assert!(matches!(next_request(input), Next::Incomplete));
    }

    #[test]
    fn a_request_takes_only_its_own_bytes() {
        let first = "GET /v1/account HTTP/1.1\r\nHost: a\r\n\r\n";
        let both = format!("{first}GET /v1/tasks HTTP/1.1\r\n\r\n");
        match next_request(both.as_bytes()) {
            Next::Request(head, len) => {
                assert_eq!(len, first.len());
                let request = head.request(peer()).unwrap();
                assert_eq!(request.uri().path(), "/v1/account");
                assert_eq!(request.headers()[header::HOST], "a");
            }
            _ => panic!("not taken"),
        }
    }
}

//! HTTP/1.1 on the wire, over raw TCP: answers in order whatever the requests are cut into or
//! packed together; framing that could smuggle a request never does; and the contract's
//! "Connections": timeouts, the connection limit, the file-descriptor limit, half-closed clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Call, TestServer};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response as read off the wire.
#[derive(Debug)]
struct Wire {
    status_line: String,
    /// Lower-case names with their values, in the order sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

struct Client {
    stream: TcpStream,
    buffered: Vec<u8>,
}

impl Client {
    async fn connect(server: &TestServer) -> Client {
        let addr = server.base.trim_start_matches("http://").to_owned();
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            buffered: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .expect("no answer within 10 s")
            .unwrap();
        self.buffered.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next response; `head` when it answers a HEAD (no body follows).
    async fn response(&mut self, head: bool) -> Wire {
        let end = loop {
            if let Some(at) = self.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            assert!(self.fill().await > 0, "connection closed before a response");
        };
        let text = String::from_utf8(self.buffered[..end].to_vec()).unwrap();
        self.buffered.drain(..end + 4);
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap().to_owned();
        let headers: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        let length = if head { 0 } else { length };
        while self.buffered.len() < length {
            assert!(self.fill().await > 0, "connection closed inside a body");
        }
        let body = self.buffered.drain(..length).collect();
        Wire {
            status_line,
            headers,
            body,
        }
    }

    /// The next response, or `None` when the connection closes (or says nothing for `quiet`)
    /// before one begins.
    async fn next(&mut self, quiet: Duration) -> Option<Wire> {
        while self.buffered.is_empty() {
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(quiet, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buffered.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
        Some(self.response(false).await)
    }

    /// How long until the server closes the connection (it must within `within`); fails on
    /// any byte the server sends meanwhile.
    async fn closed_within(&mut self, within: Duration) -> Duration {
        let started = std::time::Instant::now();
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(within, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => started.elapsed(),
            Ok(Ok(n)) => panic!(
                "unexpected bytes: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Err(_) => panic!("still open after {within:?}"),
        }
    }

    /// Whether the server closed the connection (after everything sent was read).
    async fn closed(&mut self) -> bool {
        assert!(
            self.buffered.is_empty(),
            "unread bytes: {:?}",
            self.buffered
        );
        self.fill().await == 0
    }
}

fn get(path: &str, key: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\n\r\n")
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    let before = server.balance(&acct.key).await;
    let body = r#"{"prompt":"a lighthouse","seed":7}"#;
    let post = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        acct.key,
        body.len()
    );
    // Two GETs, a POST, and two more GETs, in one write.
    let all = [
        get("/v1/account", &acct.key),
        get("/v1/account", "tg_wrong"),
        post,
        get("/v1/account", &acct.key),
        get("/v1/tasks", &acct.key),
    ]
    .concat();
    let mut client = Client::connect(&server).await;
    client.send(all.as_bytes()).await;
    let first = client.response(false).await;
    assert!(first.status_line.ends_with("200 OK"), "{first:?}");
    assert_eq!(first.json()["credits"], json!(before));
    let second = client.response(false).await;
    assert!(second.status_line.contains(" 401 "), "{second:?}");
    let third = client.response(false).await;
    assert!(third.status_line.contains(" 202 "), "{third:?}");
    let charged = third.json()["cost"].as_u64().unwrap();
    let fourth = client.response(false).await;
    assert_eq!(fourth.json()["credits"], json!(before - charged));
    let fifth = client.response(false).await;
    assert_eq!(fifth.json()["data"][0]["id"], third.json()["id"]);
}

#[tokio::test]
async fn a_request_cut_into_pieces_is_read_whole() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    let request = get("/v1/account", &acct.key);
    let mut client = Client::connect(&server).await;
    for piece in request.as_bytes().chunks(7) {
        client.send(piece).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let response = client.response(false).await;
    assert!(response.status_line.ends_with("200 OK"), "{response:?}");
    assert_eq!(response.json()["id"], json!(acct.id));
    // And the connection goes on.
    client.send(get("/v1/account", &acct.key).as_bytes()).await;
    assert!(client.response(false).await.status_line.ends_with("200 OK"));
}

#[tokio::test]
async fn head_close_and_malformed_requests() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;

    let mut client = Client::connect(&server).await;
    client
        .send(
            format!(
                "HEAD /v1/account HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n",
                acct.key
            )
            .as_bytes(),
        )
        .await;
    let head = client.response(true).await;
    assert!(head.status_line.ends_with("200 OK"), "{head:?}");
    assert!(head.body.is_empty());

    // `Connection: close`: answered, then closed.
    let mut client = Client::connect(&server).await;
    client
        .send(format!("GET /v1/account HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n", acct.key).as_bytes())
        .await;
    let response = client.response(false).await;
    assert!(response.status_line.ends_with("200 OK"), "{response:?}");
    assert_eq!(response.header("connection"), Some("close"));
    assert!(client.closed().await);

    // Not HTTP: hyper's own 400 (no envelope: see the README), then the connection is closed.
    let mut client = Client::connect(&server).await;
    client
        .send(b"GET /v1/account HTTP/1.1\r\nBad Header: x\r\n\r\n")
        .await;
    let response = client.response(false).await;
    assert!(response.status_line.contains(" 400 "), "{response:?}");

    // A head above 64 KiB: hyper's 431, or (when the kernel resets the connection on the
    // unread rest before the answer is read) just the end of the connection; never served.
    let mut client = Client::connect(&server).await;
    let big = format!(
        "GET /v1/account HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nX-Big: {}\r\n\r\n",
        acct.key,
        "a".repeat(256 * 1024)
    );
    let _ = client.stream.write_all(big.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        client.stream.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431 "),
        "{answer}"
    );
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";

/// What a connection does after a request whose framing is in doubt.
#[derive(Debug, Clone, Copy)]
enum After {
    /// Answers it (400, or 401 and no keep-alive), then closes: nothing after it is read.
    Closed,
    /// Reads it as framed (the hidden request is its body) and answers the next request.
    GoesOn,
}

/// Requests whose framing a second parser could read differently from the first (the classic
/// request-smuggling shapes), each followed by `GET /healthz` on the same connection: the
/// request hidden in a body is never answered, and the connection either answers the follow-up
/// correctly or is closed.
#[tokio::test]
async fn framing_that_could_smuggle_a_request_never_does() {
    let (_tmp, server) = TestServer::start(&[]);
    let post = "POST /v1/images/generations HTTP/1.1\r\nHost: t\r\n";
    let hidden_chunked = format!("0\r\n\r\n{SMUGGLED}");
    let cases: Vec<(&str, String, After)> = vec![
        // CL.TE and TE.CL: chunked wins, and the connection closes after the answer.
        (
            "content-length and chunked",
            format!("{post}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{hidden_chunked}"),
            After::Closed,
        ),
        (
            "chunked and content-length",
            format!(
                "{post}Transfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{hidden_chunked}",
                hidden_chunked.len()
            ),
            After::Closed,
        ),
        (
            "two different content-lengths",
            format!("{post}Content-Length: 0\r\nContent-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
            After::Closed,
        ),
        (
            "a signed content-length",
            format!("{post}Content-Length: +{}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
            After::Closed,
        ),
        (
            "a transfer-encoding that does not end in chunked",
            format!("{post}Transfer-Encoding: chunked, identity\r\n\r\n{hidden_chunked}"),
            After::Closed,
        ),
        (
            "an unknown transfer-encoding",
            format!("{post}Transfer-Encoding: xchunked\r\n\r\n{hidden_chunked}"),
            After::Closed,
        ),
        (
            "a space before the colon",
            format!("{post}Transfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n{hidden_chunked}"),
            After::Closed,
        ),
        (
            "an obs-folded header",
            format!("{post}Content-Length: 0\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\n\r\n{hidden_chunked}"),
            After::Closed,
        ),
        (
            "a chunk size that overflows",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n{SMUGGLED}"),
            After::Closed,
        ),
        (
            "bare line feeds",
            format!("POST /v1/images/generations HTTP/1.1\nHost: t\nContent-Length: {}\n\n{SMUGGLED}", SMUGGLED.len()),
            After::GoesOn,
        ),
        (
            "an absolute-form target",
            format!("POST http://t/v1/images/generations HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
            After::GoesOn,
        ),
        (
            "a header without a colon",
            format!("{post}Content-Length {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
            After::Closed,
        ),
    ];
    for (name, request, after) in cases {
        let mut client = Client::connect(&server).await;
        client.send(request.as_bytes()).await;
        client.send(HEALTHZ).await;
        let mut answers = Vec::new();
        while let Some(wire) = client.next(Duration::from_secs(3)).await {
            let body = String::from_utf8_lossy(&wire.body).into_owned();
            assert!(
                !body.contains("smuggled"),
                "{name}: the hidden request was answered: {wire:?}"
            );
            answers.push((wire.status_line.clone(), body));
            if answers.len() > 2 {
                panic!("{name}: more answers than requests: {answers:?}");
            }
        }
        // The first answer is to the POST: a 401 (it has no key) when its framing is read,
        // hyper's 400 when it is refused.
        let first = answers.first().map(|(status, _)| status.as_str());
        match after {
            After::Closed => {
                assert_eq!(answers.len(), 1, "{name}: {answers:?}");
                assert!(client.closed().await, "{name}: still open");
            }
            After::GoesOn => {
                assert!(
                    first.is_some_and(|s| s.contains(" 401 ")),
                    "{name}: {answers:?}"
                );
                let (status, body) = &answers[1];
                assert!(
                    status.ends_with("200 OK") && body.contains("ok"),
                    "{name}: {answers:?}"
                );
            }
        }
    }
    // The server is whole after all of it.
    let health = server.http.get(server.url("/healthz")).call().await;
    assert_eq!(health.status(), 200);
}

/// The contract's timeouts, short: a connection that sends nothing, or half a head, is closed
/// after the header-read timeout; an idle keep-alive connection lasts until the idle timeout (not
/// the header one); a body that stops half-way gets 408 in the envelope. Other clients are
/// served throughout.
#[tokio::test]
async fn timeouts_close_what_overstays_and_nothing_else() {
    let (_tmp, server) = TestServer::start(&[
        "--header-read-timeout",
        "1s",
        "--idle-timeout",
        "4s",
        "--body-read-timeout",
        "1s",
    ]);
    let acct = server.account(100).await;
    let before = server.balance(&acct.key).await;

    let mut silent = Client::connect(&server).await;
    let mut partial = Client::connect(&server).await;
    partial
        .send(b"GET /v1/account HTTP/1.1\r\nHost: t\r\nAuthori")
        .await;
    let mut slow_body = Client::connect(&server).await;
    slow_body
        .send(
            format!(
                "POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\":",
                acct.key
            )
            .as_bytes(),
        )
        .await;
    let mut keep_alive = Client::connect(&server).await;
    keep_alive.send(HEALTHZ).await;
    assert!(keep_alive
        .response(false)
        .await
        .status_line
        .ends_with("200 OK"));

    // Meanwhile, an ordinary client is answered.
    let health = server.http.get(server.url("/healthz")).call().await;
    assert_eq!(health.status(), 200);

    let waited = silent.closed_within(Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(700),
        "closed after {waited:?}"
    );
    partial.closed_within(Duration::from_secs(5)).await;

    let timed_out = slow_body.response(false).await;
    assert!(timed_out.status_line.contains(" 408 "), "{timed_out:?}");
    assert_eq!(timed_out.header("connection"), Some("close"));
    let request_id = timed_out.header("x-request-id").unwrap().to_owned();
    let error = &timed_out.json()["error"];
    assert_eq!(error["code"], json!("request_timeout"));
    assert_eq!(error["type"], json!("invalid_request_error"));
    assert_eq!(error["request_id"], json!(request_id));
    assert!(slow_body.closed().await);
    assert_eq!(
        server.balance(&acct.key).await,
        before,
        "a request never read was charged"
    );

    // Past the header timeout but inside the idle one, the keep-alive connection still serves.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    keep_alive.send(HEALTHZ).await;
    assert!(keep_alive
        .response(false)
        .await
        .status_line
        .ends_with("200 OK"));
    // Then, left idle, it is closed by the idle timeout.
    let idle = keep_alive.closed_within(Duration::from_secs(10)).await;
    assert!(
        idle >= Duration::from_secs(3),
        "closed after {idle:?}, before the idle timeout"
    );
}

/// A client that shuts down its sending side right after its request still gets the answer,
/// and what it was charged is what the answers say.
#[tokio::test]
async fn a_client_that_half_closes_still_gets_its_answer() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(1000).await;
    let before = server.balance(&acct.key).await;
    let body = r#"{"prompt":"a lighthouse"}"#;
    let mut charged = 0;
    for _ in 0..8 {
        let mut client = Client::connect(&server).await;
        client
            .send(
                format!(
                    "POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    acct.key,
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        client.stream.shutdown().await.unwrap();
        let response = client.response(false).await;
        assert!(response.status_line.contains(" 202 "), "{response:?}");
        charged += response.json()["cost"].as_u64().unwrap();
        assert!(client.closed().await);
    }
    assert_eq!(server.balance(&acct.key).await, before - charged);
}

/// The soft file-descriptor limit is raised to the hard one at start.
#[tokio::test]
async fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
    let (_tmp, server) = TestServer::start_with_ulimit("-S -n 256", &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "{line}");
    assert_ne!(numbers[0], "256", "{line}");
}

/// With 256 descriptors in all, 300 idle sockets (more than fit) do not lock anyone out: the
/// limit is kept below the descriptors, idle connections make room for new ones, and the log
/// does not fill with accept failures.
#[tokio::test]
async fn idle_sockets_beyond_the_descriptor_limit_lock_nobody_out() {
    let (_tmp, server) = TestServer::start_with_ulimit("-n 256", &["--header-read-timeout", "60s"]);
    let acct = server.account(100).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let health = server.http.get(server.url("/healthz")).call().await;
        assert_eq!(health.status(), 200);
        let account = server.get(&acct.key, "/v1/account").call().await;
        assert_eq!(account.status(), 200);
    }
    let logs = server
        .wait_for_log("fewer connections than --max-connections")
        .await;
    let failures = logs.matches("accept failed").count();
    assert!(failures <= 2, "{failures} accept failures logged");
    drop(idle);
}

/// `--max-connections`: beyond it a connection waits (in the backlog) while every connection
/// is busy, and is served as soon as one finishes; an idle connection makes room at once.
#[tokio::test]
async fn at_the_connection_limit_new_clients_wait_for_busy_ones_and_displace_idle_ones() {
    let (_tmp, server) = TestServer::start(&["--max-connections", "2"]);
    let acct = server.account(100).await;
    let body = r#"{"prompt":"a lighthouse"}"#;
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        acct.key,
        body.len()
    );
    // Two requests in flight, their bodies not sent yet: `100 Continue` says the handler is
    // reading the body.
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut client = Client::connect(&server).await;
        client.send(head.as_bytes()).await;
        let go_on = client.response(false).await;
        assert!(go_on.status_line.contains(" 100 "), "{go_on:?}");
        busy.push(client);
    }
    let mut waiting = Client::connect(&server).await;
    waiting.send(HEALTHZ).await;
    assert!(
        waiting.next(Duration::from_millis(1500)).await.is_none(),
        "served beyond --max-connections"
    );
    // One finishes, and its connection, idle now, makes room: the waiting client is served.
    let mut first = busy.remove(0);
    first.send(body.as_bytes()).await;
    assert!(first.response(false).await.status_line.contains(" 202 "));
    let answer = waiting.response(false).await;
    assert!(answer.status_line.ends_with("200 OK"), "{answer:?}");
    // Now `waiting` is an idle keep-alive connection and the other is still busy: a new client
    // displaces the idle one, and the busy one is left alone.
    let mut newcomer = Client::connect(&server).await;
    newcomer.send(HEALTHZ).await;
    let answer = newcomer.response(false).await;
    assert!(answer.status_line.ends_with("200 OK"), "{answer:?}");
    let mut other = busy.remove(0);
    other.send(body.as_bytes()).await;
    assert!(other.response(false).await.status_line.contains(" 202 "));
}

/// A client that sends requests and stops reading the answers: once the response writes make no
/// progress for `--write-timeout`, the connection is closed (and its memory freed), while other
/// clients are served.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_after_the_write_timeout() {
    let (_tmp, server) = TestServer::start(&["--write-timeout", "1s"]);
    let one = server
        .http
        .get(server.url("/openapi.json"))
        .call()
        .await
        .bytes()
        .await
        .unwrap()
        .len();
    // Far more than the loopback socket buffers hold, so the server's writes stall.
    let requests = (64 * 1024 * 1024 / one).max(100);
    let mut client = Client::connect(&server).await;
    let request = "GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n".repeat(requests);
    client.send(request.as_bytes()).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Served meanwhile.
    let health = server.http.get(server.url("/healthz")).call().await;
    assert_eq!(health.status(), 200);
    // Now read: what was written before the stall, then the end of the connection (a reset
    // counts too), well before every answer arrived.
    let mut received = 0usize;
    let mut chunk = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match client.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "still open after 20 s; {received} bytes read"
    );
    assert!(
        received < requests * one / 2,
        "{received} bytes of {} arrived: the connection was not cut off",
        requests * one
    );
}

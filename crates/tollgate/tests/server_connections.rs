//! HTTP/1.1 on the wire, over raw TCP: the fast lane (plain API `GET`s answered without hyper)
//! and hyper (everything else, and everything after it on a connection) must be one server to a
//! client: the same answers, in order, whatever the requests are cut into or packed together.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestServer;
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

/// A response with what differs from request to request taken out: the request id and the date.
fn comparable(wire: &Wire) -> (String, Vec<(String, String)>, Value) {
    let headers = wire
        .headers
        .iter()
        .filter(|(n, _)| n != "x-request-id" && n != "date")
        .cloned()
        .collect();
    let mut body = wire.json();
    if let Some(error) = body.get_mut("error").and_then(Value::as_object_mut) {
        error.remove("request_id");
    }
    (wire.status_line.clone(), headers, body)
}

#[tokio::test]
async fn plain_gets_are_answered_alike_by_the_lane_and_by_hyper() {
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(100).await;
    let task = server
        .create_task(&acct.key, json!({"prompt": "a lighthouse", "seed": 1}))
        .await;
    let id = task["id"].as_str().unwrap();
    server.wait_task(&acct.key, id).await;
    // Spent for the next minute: each of its requests below is a 429, from the lane and hyper alike.
    let spent = server.account_with_limit(100, 1, 1).await;
    assert_eq!(server.status(&spent.key, "/v1/account").await, 200);
    let requests = [
        get(&format!("/v1/tasks/{id}"), &acct.key),
        get("/v1/account", &spent.key),
        get(&format!("/v1/tasks/{id}"), &spent.key),
        format!(
            "GET /v1/account HTTP/1.1\r\nHost: t\r\nX-Request-Id: trace-1\r\nAuthorization: Bearer {}\r\n\r\n",
            spent.key
        ),
        get("/v1/tasks/task_nothing", &acct.key),
        get("/v1/account", "tg_wrong"),
        get("/v1/account", "not-even-a-key"),
        "GET /v1/account HTTP/1.1\r\nHost: t\r\n\r\n".to_owned(),
        "GET /v1/tasks?limit=1 HTTP/1.1\r\nHost: t\r\nAuthorization: Basic eDp5\r\n\r\n".to_owned(),
    ];
    // The first connection stays in the lane; the second is handed to hyper by a request the
    // lane does not take (`/healthz`), and hyper answers everything after it.
    let mut lane = Client::connect(&server).await;
    let mut hyper = Client::connect(&server).await;
    hyper
        .send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    assert!(hyper.response(false).await.status_line.ends_with("200 OK"));
    for request in &requests {
        lane.send(request.as_bytes()).await;
        let from_lane = lane.response(false).await;
        hyper.send(request.as_bytes()).await;
        let from_hyper = hyper.response(false).await;
        // Limits count down between the two; the rest must be the same bytes.
        let strip = |(status, headers, body): (String, Vec<(String, String)>, Value)| {
            let headers: Vec<_> = headers
                .into_iter()
                .map(|(n, v)| {
                    if n == "ratelimit" {
                        (n, String::new())
                    } else {
                        (n, v)
                    }
                })
                .collect();
            (status, headers, body)
        };
        assert_eq!(
            strip(comparable(&from_lane)),
            strip(comparable(&from_hyper)),
            "{request:?}"
        );
        assert!(from_lane.header("date").is_some());
        let request_id = from_lane.header("x-request-id").unwrap();
        if request.contains("X-Request-Id: trace-1") {
            // A caller's own id carries through, in the header and in the envelope.
            assert_eq!(request_id, "trace-1");
            assert_eq!(from_hyper.header("x-request-id"), Some("trace-1"));
            assert_eq!(from_lane.json()["error"]["request_id"], json!("trace-1"));
        } else {
            assert!(request_id.starts_with("req_"), "{request_id}");
        }
        if from_lane.status_line.contains(" 429 ") {
            // The exact wait, not a fixed one: under a minute for a spent 1/min limit.
            let wait: u64 = from_lane.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=60).contains(&wait), "{wait}");
            assert!(from_lane.header("ratelimit-policy").is_some());
        }
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_hand_off() {
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
    // Two lane requests, a POST (hyper's from here on), and two more GETs, in one write.
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
async fn head_close_and_malformed_requests_are_hypers() {
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

    // Not HTTP: hyper's 400, then the connection is closed.
    let mut client = Client::connect(&server).await;
    client
        .send(b"GET /v1/account HTTP/1.1\r\nBad Header: x\r\n\r\n")
        .await;
    let response = client.response(false).await;
    assert!(response.status_line.contains(" 400 "), "{response:?}");
}

//! `/openai/v1` driven by the official OpenAI SDKs, unchanged, against the real binary: the
//! `openai` package from PyPI and from npm (`scripts/test` installs both in target/test-tools).
//! Images generated as links and as base64 and paid with the account's credits; each error as
//! the SDK's own exception class with our `code` and `param`; the SDKs' retries following our
//! `x-should-retry` and `retry-after-ms` (a 503 retried after its wait, a 504 `timeout` not
//! retried, so its task is made and charged once).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{skip, TestServer};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

fn python() -> Option<PathBuf> {
    common::test_python("the OpenAI Python SDK tests")
}

fn node_modules() -> Option<PathBuf> {
    let modules = std::env::var_os("TOLLGATE_TEST_NODE_MODULES").map(PathBuf::from);
    if modules.is_none() {
        skip("the OpenAI Node SDK tests: TOLLGATE_TEST_NODE_MODULES is not set (scripts/test sets it)");
    }
    modules
}

/// Runs `script` with `program` (and `env`), and reads the one JSON object it prints last.
async fn run(program: PathBuf, args: Vec<String>, env: Vec<(&'static str, String)>) -> Value {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(program).args(args).envs(env).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

const PYTHON: &str = r#"
import base64, json, os, sys, time
import openai
from openai import OpenAI

base = os.environ["BASE"] + "/openai/v1"
client = OpenAI(base_url=base, api_key=os.environ["KEY"], max_retries=2)
out = {}

r = client.images.generate(prompt="a lighthouse at dusk", n=2, size="256x256", quality="standard", user="u-1")
out["urls"] = [d.url for d in r.data]
out["created"] = r.created
r = client.images.generate(model="sketch", prompt="a fox", size="512x512", response_format="b64_json", style="vivid")
out["png"] = base64.b64decode(r.data[0].b64_json)[:8].hex()
out["models"] = [m.id for m in client.models.list().data]
out["model"] = client.models.retrieve("sketch").id

def failure(call):
    try:
        call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"class": type(e).__name__, "status": e.status_code, "code": e.code, "param": e.param,
                "type": e.type, "request_id": e.request_id, "message": body.get("message")}
    return None

out["bad_n"] = failure(lambda: client.images.generate(prompt="x", n=9, size="256x256"))
out["bad_size"] = failure(lambda: client.images.generate(prompt="x", size="1792x1024"))
out["bad_model"] = failure(lambda: client.images.generate(prompt="x", model="dall-e-3"))
out["no_model"] = failure(lambda: client.models.retrieve("dall-e-3"))
out["bad_key"] = failure(lambda: OpenAI(base_url=base, api_key="tg_wrong", max_retries=0).images.generate(prompt="x"))
out["broke"] = failure(lambda: OpenAI(base_url=base, api_key=os.environ["POOR_KEY"], max_retries=0).images.generate(prompt="x", size="1024x1024"))

# A 503 with Retry-After: the SDK waits what retry-after-ms says, twice, then raises.
started = time.monotonic()
out["unavailable"] = failure(lambda: client.images.generate(prompt="x", size="256x256",
    extra_headers={"Tollgate-Simulate": "503"}))
out["unavailable_secs"] = time.monotonic() - started

# The rate limit: 429 is a RateLimitError (no retries here, to see it).
limited = OpenAI(base_url=base, api_key=os.environ["LIMITED_KEY"], max_retries=0)
limited.models.list()
out["limited"] = failure(lambda: limited.models.list())

print(json.dumps(out))
"#;

const NODE: &str = r#"
const OpenAI = require('openai');
const base = process.env.BASE + '/openai/v1';
(async () => {
  const client = new OpenAI({ baseURL: base, apiKey: process.env.KEY, maxRetries: 2 });
  const out = {};
  let r = await client.images.generate({ prompt: 'a lighthouse', size: '256x256', n: 1 });
  out.urls = r.data.map((d) => d.url);
  r = await client.images.generate({ prompt: 'a fox', size: '256x256', response_format: 'b64_json' });
  out.png = Buffer.from(r.data[0].b64_json, 'base64').subarray(0, 8).toString('hex');
  out.models = (await client.models.list()).data.map((m) => m.id);
  const failure = async (call) => {
    try { await call(); } catch (e) {
      return { class: e.constructor.name, status: e.status, code: e.code, param: e.param, type: e.type };
    }
    return null;
  };
  out.bad_n = await failure(() => client.images.generate({ prompt: 'x', n: 9, size: '256x256' }));
  out.bad_key = await failure(() => new OpenAI({ baseURL: base, apiKey: 'tg_wrong', maxRetries: 0 }).images.generate({ prompt: 'x' }));
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

const CATALOGUE: &str = r#"
default = "builtin"

[models.builtin]
backend = "builtin"
prices = { "256x256" = 1, "512x512" = 2, "1024x1024" = 4 }
max_n = 4

[models.sketch]
backend = "builtin"
prices = { "512x512" = 3 }
max_n = 1
"#;

#[tokio::test]
async fn the_python_sdk_generates_pays_and_raises_the_right_errors() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models.toml");
    std::fs::write(&models, CATALOGUE).unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, PYTHON).unwrap();
    let (_tmp, server) =
        TestServer::start(&["--models", models.to_str().unwrap(), "--simulate-errors"]);
    let acct = server.account(20).await;
    let poor = server.account(1).await;
    let limited = server.account_with_limit(10, 1, 1).await;
    let out = run(
        python,
        vec![script.to_str().unwrap().to_owned()],
        vec![
            ("BASE", server.base.clone()),
            ("KEY", acct.key.clone()),
            ("POOR_KEY", poor.key.clone()),
            ("LIMITED_KEY", limited.key.clone()),
        ],
    )
    .await;

    // Two links that work without the key, one PNG inline; 2 × 1 + 1 × 3 credits.
    let urls = out["urls"].as_array().unwrap();
    assert_eq!(urls.len(), 2);
    for url in urls {
        let png = reqwest::get(url.as_str().unwrap()).await.unwrap();
        assert_eq!(png.status(), 200);
        assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));
    }
    assert_eq!(out["png"], "89504e470d0a1a0a");
    assert_eq!(server.balance(&acct.key).await, 15);
    assert_eq!(out["models"], json!(["builtin", "sketch"]));
    assert_eq!(out["model"], "sketch");

    let failure = |name: &str, class: &str, status: u16, code: &str| {
        let e = &out[name];
        assert_eq!(
            (&e["class"], &e["status"], &e["code"]),
            (&json!(class), &json!(status), &json!(code)),
            "{name}: {e}"
        );
        assert!(e["request_id"].is_string(), "{name}: {e}");
        e.clone()
    };
    assert_eq!(
        failure("bad_n", "BadRequestError", 400, "invalid_value")["param"],
        "n"
    );
    assert_eq!(
        failure("bad_size", "BadRequestError", 400, "invalid_value")["param"],
        "size"
    );
    assert_eq!(
        failure("bad_model", "BadRequestError", 400, "invalid_value")["param"],
        "model"
    );
    failure("no_model", "NotFoundError", 404, "resource_not_found");
    failure("bad_key", "AuthenticationError", 401, "invalid_api_key");
    let broke = failure("broke", "APIStatusError", 402, "insufficient_credits");
    assert!(
        broke["message"]
            .as_str()
            .unwrap()
            .contains("costs 4 credits"),
        "{broke}"
    );
    assert_eq!(server.balance(&poor.key).await, 1, "nothing charged");
    failure(
        "unavailable",
        "InternalServerError",
        503,
        "service_unavailable",
    );
    // Two retries, each after the 1 s `retry-after-ms` asks for.
    let waited = out["unavailable_secs"].as_f64().unwrap();
    assert!(waited >= 2.0, "the SDK waited {waited} s in all");
    failure("limited", "RateLimitError", 429, "rate_limit_exceeded");
}

#[tokio::test]
async fn a_504_timeout_is_not_retried_so_its_task_is_made_once() {
    let Some(python) = python() else { return };
    // No workers: the task is queued and waits; the sync wait gives up after 1 s.
    let (_tmp, server) = TestServer::start(&["--workers", "0", "--sync-timeout", "1s"]);
    let acct = server.account(10).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(
        &script,
        r#"
import json, os, openai
client = openai.OpenAI(base_url=os.environ["BASE"] + "/openai/v1", api_key=os.environ["KEY"], max_retries=3)
try:
    client.images.generate(prompt="a lighthouse", size="256x256")
    print(json.dumps({"raised": None}))
except openai.APIStatusError as e:
    print(json.dumps({"raised": type(e).__name__, "status": e.status_code, "code": e.code, "message": e.message}))
"#,
    )
    .unwrap();
    let out = run(
        python,
        vec![script.to_str().unwrap().to_owned()],
        vec![("BASE", server.base.clone()), ("KEY", acct.key.clone())],
    )
    .await;
    assert_eq!(
        (&out["raised"], &out["status"], &out["code"]),
        (
            &json!("InternalServerError"),
            &json!(504),
            &json!("timeout")
        ),
        "{out}"
    );
    let tasks = server.get_json(&acct.key, "/v1/tasks").await;
    let data = tasks["data"].as_array().unwrap();
    assert_eq!(data.len(), 1, "retried: {tasks}");
    let id = data[0]["id"].as_str().unwrap();
    assert!(out["message"].as_str().unwrap().contains(id), "{out}");
    assert_eq!(server.balance(&acct.key).await, 9);
}

#[tokio::test]
async fn the_node_sdk_generates_and_raises_the_right_errors() {
    let Some(modules) = node_modules() else {
        return;
    };
    let (_tmp, server) = TestServer::start(&[]);
    let acct = server.account(10).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.js");
    std::fs::write(&script, NODE).unwrap();
    let out = run(
        PathBuf::from("node"),
        vec![script.to_str().unwrap().to_owned()],
        vec![
            ("BASE", server.base.clone()),
            ("KEY", acct.key.clone()),
            ("NODE_PATH", modules.to_str().unwrap().to_owned()),
        ],
    )
    .await;
    let url = out["urls"][0].as_str().unwrap();
    assert_eq!(reqwest::get(url).await.unwrap().status(), 200);
    assert_eq!(out["png"], "89504e470d0a1a0a");
    assert_eq!(server.balance(&acct.key).await, 8);
    assert_eq!(out["models"], json!(["builtin"]));
    assert_eq!(
        (
            &out["bad_n"]["class"],
            &out["bad_n"]["status"],
            &out["bad_n"]["param"]
        ),
        (&json!("BadRequestError"), &json!(400), &json!("n")),
        "{out}"
    );
    assert_eq!(
        (&out["bad_key"]["class"], &out["bad_key"]["code"]),
        (&json!("AuthenticationError"), &json!("invalid_api_key")),
        "{out}"
    );
}

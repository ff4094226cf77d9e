// Webhook signatures with Web Crypto: the scheme of tollgate_contract::webhook, refusal by refusal.
import { test } from "node:test";
import assert from "node:assert/strict";
import { signWebhook, verifyWebhook, parseWebhook, WebhookVerificationError } from "../dist/index.js";

const SECRET = "whsec_0123456789abcdef0123456789abcdef";
const T = 1_700_000_000;

async function reason(params) {
  try {
    await verifyWebhook(params);
    return "ok";
  } catch (e) {
    assert.ok(e instanceof WebhookVerificationError);
    return e.reason;
  }
}

test("a known vector: the same bytes the Rust contract crate signs", async () => {
  assert.equal(
    await signWebhook(SECRET, T, '{"id":"task_1"}'),
    "t=1700000000,v1=9b775d95cb3671abdb5b9e3198d3426d961bac5e419c09a18aea7fea41f3a61d",
  );
});

test("round trip, and each refusal", async () => {
  const body = '{"id":"task_1","status":"succeeded"}';
  const header = await signWebhook(SECRET, T, body);
  const now = T + 30;
  assert.equal(await reason({ secret: SECRET, header, body, nowSeconds: now }), "ok");
  assert.equal(await reason({ secret: SECRET, header, body: new TextEncoder().encode(body), nowSeconds: now }), "ok");
  assert.equal(await reason({ secret: SECRET, header, body: '{"id":"task_1","status":"failed"}', nowSeconds: now }), "mismatch");
  assert.equal(await reason({ secret: SECRET, header, body: '{"id":"task_1", "status":"succeeded"}', nowSeconds: now }), "mismatch");
  assert.equal(await reason({ secret: "whsec_other", header, body, nowSeconds: now }), "mismatch");
  assert.equal(await reason({ secret: SECRET, header, body, nowSeconds: T + 301 }), "stale");
  assert.equal(await reason({ secret: SECRET, header, body, nowSeconds: T - 1000 }), "stale");
  assert.equal(await reason({ secret: SECRET, header, body, nowSeconds: T + 3000, toleranceSeconds: 3600 }), "ok");
  assert.equal(await reason({ secret: SECRET, header: header.replace(`t=${T}`, `t=${T + 20}`), body, nowSeconds: now }), "mismatch");
  const task = await parseWebhook({ secret: SECRET, header, body, nowSeconds: now });
  assert.equal(task.status, "succeeded");
});

test("several signatures (a rotation) and unknown schemes", async () => {
  const good = await signWebhook(SECRET, T, "{}");
  const v1 = good.split(",v1=")[1];
  const header = `t=${T},v0=abc,v1=${"00".repeat(32)},v1=${v1}`;
  assert.equal(await reason({ secret: SECRET, header, body: "{}", nowSeconds: T }), "ok");
});

test("malformed headers", async () => {
  for (const header of ["", "v1=00", `t=${T}`, "t=abc,v1=00", `t=${T},v1=zz`, `t=${T},v1=0`, "t=1,t=2,v1=00", "nonsense", null, undefined]) {
    assert.equal(await reason({ secret: SECRET, header, body: "{}", nowSeconds: T }), "malformed", String(header));
  }
  const e = new WebhookVerificationError("malformed");
  assert.match(e.message, /Tollgate-Signature/);
});

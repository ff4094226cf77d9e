// The SDK against the real server (`tollgate serve` on 127.0.0.1, a port of its own, a temporary
// data dir): generate with wait, 402, 404, 410 after a short retention, 429 with its real
// Retry-After, simulated 500/503, a 409 in use, a POST whose answer was lost retried with the
// same Idempotency-Key and charged once, the operator's routes, and a signed webhook delivery.
// The server binary: TOLLGATE_BIN, default ../../target/debug/tollgate. Without it the suite is
// skipped, or fails when CI is set.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import {
  TollgateClient,
  TollgateAdmin,
  InsufficientCreditsError,
  NotFoundError,
  GoneError,
  RateLimitError,
  InternalServerError,
  ServiceUnavailableError,
  IdempotencyKeyInUseError,
  AuthenticationError,
  BadRequestError,
  verifyWebhook,
} from "../dist/index.js";
import { startServer, skipUnlessServer, ADMIN_TOKEN } from "../test-support/server.mjs";

const skip = skipUnlessServer();
if (skip) console.log(`# ${skip}`);

/** The seed's policy, 20× faster; Retry-After stays what the server says. */
const FAST = { baseDelayMs: 50, maxBackoffMs: 1500, maxJitterMs: 50 };
const PNG = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

let server;
before(async () => {
  if (!skip) server = await startServer(["--simulate-errors"]);
});
after(async () => {
  await server?.stop();
});

function admin(base = server.base) {
  return new TollgateAdmin({ baseURL: base, adminToken: ADMIN_TOKEN, retry: FAST });
}

/** A new account with `credits` and a rate limit the tests do not meet (unless given one). */
async function account(credits, rateLimit = { requests_per_minute: 6000, burst: 200 }, base = server.base) {
  const created = await admin(base).createAccount({ name: "ts-e2e", credits, rate_limit: rateLimit });
  return { id: created.account.id, key: created.api_key };
}

function client(key, options = {}, base = server.base) {
  return new TollgateClient({ baseURL: base, apiKey: key, retry: FAST, ...options });
}

/** A fetch that records each request's headers and each response's, and can rewrite attempts. */
function recordingFetch(rewrite = () => undefined) {
  const log = [];
  const f = async (url, init) => {
    const entry = { url, method: init.method, headers: { ...init.headers }, at: Date.now() };
    log.push(entry);
    const replaced = await rewrite(entry, log.length, init);
    if (replaced !== undefined) return replaced;
    const response = await fetch(url, init);
    entry.status = response.status;
    entry.replayed = response.headers.get("idempotent-replayed");
    entry.retryAfterMs = response.headers.get("retry-after-ms");
    return response;
  };
  return { fetch: f, log };
}

test("generate with wait: the finished task, its PNGs (bytes and signed URL), the charge on the ledger", { skip }, async () => {
  const acct = await account(10);
  const c = client(acct.key);
  const models = await c.models();
  assert.ok(models.data.some((m) => m.id === "builtin"));
  const seen = [];
  const task = await c.generate({ prompt: "a lighthouse", n: 2, size: "256x256", wait: true, images: "bytes", onUpdate: (t) => seen.push(t.status) });
  assert.equal(task.status, "succeeded");
  assert.equal(task.cost, 2);
  assert.equal(task.images.length, 2);
  for (const image of task.images) {
    assert.deepEqual(Array.from(image.data.slice(0, 8)), PNG);
    assert.match(image.url, /^http:\/\/127\.0\.0\.1:\d+\//);
  }
  assert.equal(seen.at(-1), "succeeded");
  // The signed link works without the key.
  const linked = await new TollgateClient({ baseURL: server.base }).fetchImageURL(task.images[0].url);
  assert.deepEqual(Array.from(linked.slice(0, 8)), PNG);
  const me = await c.account();
  assert.equal(me.credits, 8);
  const ledger = await c.ledger({ limit: 1 });
  assert.equal(ledger.data[0].kind, "charge");
  assert.equal(ledger.data[0].delta, -2);
  assert.equal(ledger.has_more, true);
  const all = [];
  for await (const entry of c.iterateLedger({ limit: 1 })) all.push(entry.kind);
  assert.deepEqual(all, ["charge", "grant"]);
  const again = await c.getTask(task.id, { wait: 1 });
  assert.equal(again.status, "succeeded");
  const tasks = await c.listTasks();
  assert.deepEqual(tasks.data.map((t) => t.id), [task.id]);
});

test("402 insufficient_credits: not retried, nothing created or charged", { skip }, async () => {
  const acct = await account(1);
  const c = client(acct.key);
  const e = await c.generate({ prompt: "x", n: 4, size: "1024x1024" }).catch((x) => x);
  assert.ok(e instanceof InsufficientCreditsError, e.message);
  assert.deepEqual([e.status, e.type, e.code, e.attempts, e.stopReason], [402, "billing_error", "insufficient_credits", 1, "not_retryable"]);
  assert.ok(typeof e.requestId === "string" && e.requestId.length > 0);
  assert.equal((await c.account()).credits, 1);
  assert.equal((await c.listTasks()).data.length, 0);
  // 400 with param, not retried either.
  const bad = await c.createGeneration({ prompt: "x", size: "300x300" }).catch((x) => x);
  assert.ok(bad instanceof BadRequestError);
  assert.equal(bad.param, "size");
  assert.equal(bad.attempts, 1);
});

test("404 for a task that never existed, not retried", { skip }, async () => {
  const acct = await account(1);
  const e = await client(acct.key).getTask("task_doesnotexist").catch((x) => x);
  assert.ok(e instanceof NotFoundError);
  assert.deepEqual([e.status, e.code, e.attempts], [404, "resource_not_found", 1]);
});

test("410 after a short retention, on every route that names the task; 404 stays 404", { skip }, async () => {
  const short = await startServer(["--retention", "2s"]);
  try {
    const acct = await account(10, undefined, short.base);
    const c = client(acct.key, {}, short.base);
    const task = await c.generate({ prompt: "short-lived", size: "256x256" });
    assert.equal(task.status, "succeeded");
    await new Promise((r) => setTimeout(r, 2500));
    for (const call of [() => c.getTask(task.id), () => c.getImage(task.id, 0), () => c.cancelTask(task.id)]) {
      const e = await call().catch((x) => x);
      assert.ok(e instanceof GoneError, e.message);
      assert.deepEqual([e.status, e.type, e.code, e.attempts], [410, "gone_error", "resource_expired", 1]);
    }
    const never = await c.getTask("task_ffffffffffffffffffffffff").catch((x) => x);
    assert.ok(never instanceof NotFoundError);
  } finally {
    await short.stop();
  }
});

test("429 with the server's real Retry-After: waited for (as a floor), then the call succeeds", { skip }, async () => {
  const acct = await account(10, { requests_per_minute: 60, burst: 1 });
  const c = client(acct.key, { retry: { ...FAST, maxJitterMs: 1000 } });
  await c.account();
  // Without retries: the error says how long to wait, from the real headers.
  const once = await client(acct.key, { maxRetries: 0 }).account().catch((x) => x);
  assert.ok(once instanceof RateLimitError);
  assert.equal(once.code, "rate_limit_exceeded");
  assert.ok(once.retryAfterMs > 0 && once.retryAfterMs <= 1000, `retryAfterMs ${once.retryAfterMs}`);
  assert.match(once.headers["retry-after"], /^\d+$/);
  assert.ok(Number(once.headers["retry-after"]) >= 1);
  assert.equal(once.headers["x-should-retry"], "true");
  // With retries: the call meets the limit, waits at least what it was told, and succeeds.
  const rec = recordingFetch();
  const waiting = client(acct.key, { fetch: rec.fetch, retry: { ...FAST, maxJitterMs: 1000 } });
  const started = Date.now();
  const me = await waiting.account();
  assert.equal(me.id, acct.id);
  const statuses = rec.log.map((e) => e.status);
  assert.equal(statuses[0], 429, JSON.stringify(statuses));
  assert.deepEqual(statuses, [429, 200], "retry-after-ms was long enough: the first retry went through");
  // Every retry after a 429 left at least the retry-after-ms it was given after the 429.
  for (let i = 1; i < rec.log.length; i++) {
    const prev = rec.log[i - 1];
    if (prev.status !== 429) continue;
    assert.ok(Number(prev.retryAfterMs) > 0, "the 429 carries retry-after-ms");
    assert.ok(rec.log[i].at - prev.at >= Number(prev.retryAfterMs), `gap ${rec.log[i].at - prev.at} < ${prev.retryAfterMs}`);
  }
  assert.ok(Date.now() - started >= Number(rec.log[0].retryAfterMs));
});

test("simulated 503 with Retry-After: 1 — each retry waits at least a second; 500 uses backoff; nothing charged", { skip }, async () => {
  const acct = await account(10);
  const c = client(acct.key, { headers: { "Tollgate-Simulate": "503" }, maxRetries: 2 });
  const started = Date.now();
  const e = await c.createGeneration({ prompt: "a cat" }).catch((x) => x);
  assert.ok(Date.now() - started >= 2000);
  assert.ok(e instanceof ServiceUnavailableError);
  assert.deepEqual([e.status, e.code, e.attempts, e.stopReason], [503, "service_unavailable", 3, "retries_exhausted"]);
  assert.ok(e.history.slice(1).every((a) => a.waited?.source.kind === "retry_after" && a.waited.ms >= 1000), JSON.stringify(e.history));
  assert.equal(new Set(e.history.map((a) => a.requestId)).size, 3, "each attempt is its own request");
  const e500 = await client(acct.key, { headers: { "Tollgate-Simulate": "500" } }).account().catch((x) => x);
  assert.ok(e500 instanceof InternalServerError);
  assert.equal(e500.attempts, 6);
  assert.ok(e500.history.slice(1).every((a) => a.waited?.source.kind === "backoff"));
  const plain = client(acct.key);
  assert.equal((await plain.account()).credits, 10);
  assert.equal((await plain.listTasks()).data.length, 0);
});

test("a POST that got a simulated 500 is retried with the same Idempotency-Key and charged once", { skip }, async () => {
  const acct = await account(10);
  // The first attempt asks the server for a 500 (nothing done); the retry goes through.
  const first = recordingFetch((entry, n, init) => {
    if (n === 1) init.headers["tollgate-simulate"] = "500";
    return undefined;
  });
  const c = client(acct.key, { fetch: first.fetch });
  const task = await c.createGeneration({ prompt: "a fox", size: "512x512" });
  assert.deepEqual(first.log.map((e) => e.status), [500, 202]);
  assert.equal(first.log[0].headers["idempotency-key"], first.log[1].headers["idempotency-key"]);
  // The server does the work, but the answer is lost and a 500 comes back instead (a proxy
  // failing after the upstream answered): the retry is answered from the idempotency store.
  const lossy = recordingFetch(async (entry, n, init) => {
    if (n !== 1) return undefined;
    const real = await fetch(entry.url, init);
    entry.status = real.status;
    await real.arrayBuffer();
    return new Response(JSON.stringify({ error: { message: "Upstream lost.", type: "server_error", code: "internal_error" } }), {
      status: 500,
      headers: { "content-type": "application/json", "x-should-retry": "true" },
    });
  });
  const l = client(acct.key, { fetch: lossy.fetch });
  const replayed = await l.createGeneration({ prompt: "a hen", n: 2, size: "512x512" });
  assert.equal(lossy.log.length, 2);
  assert.equal(lossy.log[0].status, 202, "the server accepted the first attempt");
  assert.equal(lossy.log[1].replayed, "true", "the retry's answer is the stored one");
  assert.equal(lossy.log[0].headers["idempotency-key"], lossy.log[1].headers["idempotency-key"]);
  assert.equal(replayed.cost, 4);
  const tasks = await c.listTasks();
  assert.deepEqual(new Set(tasks.data.map((t) => t.id)), new Set([task.id, replayed.id]));
  assert.equal(tasks.data.length, 2, "one task per call");
  assert.equal((await c.account()).credits, 10 - 2 - 4, "each charged once");
  // The same key with another body is refused, not replayed.
  const key = lossy.log[0].headers["idempotency-key"];
  const reused = await c.createGeneration({ prompt: "different" }, { idempotencyKey: key }).catch((x) => x);
  assert.ok(reused instanceof BadRequestError);
  assert.equal(reused.code, "idempotency_key_reused");
});

test("a 409 idempotency_key_in_use is retried until the first request answers, then replayed", { skip }, async () => {
  const acct = await account(10);
  const body = { prompt: "a slow cat", size: "256x256" };
  const slow = client(acct.key, { headers: { "Tollgate-Simulate-Delay-Ms": "1500" } });
  const first = slow.createGeneration(body, { idempotencyKey: "order-1" });
  await new Promise((r) => setTimeout(r, 300));
  const once = await client(acct.key, { maxRetries: 0 }).createGeneration(body, { idempotencyKey: "order-1" }).catch((x) => x);
  assert.ok(once instanceof IdempotencyKeyInUseError);
  assert.equal(once.retryable, true);
  const second = await client(acct.key, { retry: { ...FAST, baseDelayMs: 400 } }).createGeneration(body, { idempotencyKey: "order-1" });
  const original = await first;
  assert.equal(second.id, original.id);
  const c = client(acct.key);
  assert.equal((await c.account()).credits, 9);
  assert.equal((await c.listTasks()).data.length, 1);
});

test("the operator's routes, and a revoked key refused at once without leaking it", { skip }, async () => {
  const a = admin();
  const created = await a.createAccount({ name: "ops", credits: 5 });
  const id = created.account.id;
  assert.match(created.api_key, /^tg_/);
  assert.equal((await a.getAccount(id)).credits, 5);
  assert.ok((await a.listAccounts()).data.some((x) => x.id === id));
  assert.equal((await a.addCredits(id, { amount: 7, note: "top-up" })).credits, 12);
  const renamed = await a.updateAccount(id, { name: "ops-2", rate_limit: { requests_per_minute: 1200, burst: 30 } });
  assert.deepEqual([renamed.name, renamed.rate_limit.burst], ["ops-2", 30]);
  const entries = await a.ledger(id, { limit: 10 });
  assert.equal(entries.data.length, 2);
  assert.deepEqual([entries.data[0].delta, entries.data[0].note, entries.data[0].balance_after], [7, "top-up", 12]);
  const voucher = await a.createVoucher({ credits: 3, note: "welcome" });
  assert.match(voucher.code, /^tgv_/);
  assert.ok((await a.listVouchers({ limit: 5 })).data.some((v) => v.id === voucher.voucher.id));
  const c = client(created.api_key);
  assert.equal((await c.redeemVoucher(voucher.code)).credits, 15);
  const extra = await a.createKey(id, { spend_limit: { credits: 2, period: "day" } });
  const keys = await a.listKeys(id);
  assert.equal(keys.data.length, 2);
  assert.ok(keys.data.every((k) => !JSON.stringify(k).includes(extra.api_key)), "listed keys never carry the key");
  const other = client(extra.api_key);
  await other.account();
  await a.revokeKey(extra.id);
  const e = await other.account().catch((x) => x);
  assert.ok(e instanceof AuthenticationError);
  assert.deepEqual([e.status, e.code, e.attempts], [401, "invalid_api_key", 1]);
  assert.ok(!e.message.includes(extra.api_key) && !JSON.stringify(e).includes(extra.api_key));
  const secret = await c.webhookSecret();
  assert.match(secret.secret, /^whsec_/);
  const purchases = await a.listPurchases(id);
  assert.deepEqual(purchases.data, []);
  assert.equal((await c.health()).status, "ok");
  assert.equal((await c.ready()).status, "ready");
});

test("a webhook delivery verifies with the account's secret (Web Crypto)", { skip }, async () => {
  const hooked = await startServer(["--allow-private-webhooks"]);
  const got = [];
  const receiver = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      got.push({ headers: req.headers, body: Buffer.concat(chunks) });
      res.writeHead(200).end("ok");
    });
  });
  await new Promise((r) => receiver.listen(0, "127.0.0.1", r));
  try {
    const acct = await account(5, undefined, hooked.base);
    const c = client(acct.key, {}, hooked.base);
    const { secret } = await c.webhookSecret();
    const url = `http://127.0.0.1:${receiver.address().port}/hook`;
    const task = await c.generate({ prompt: "a heron", size: "256x256", webhook_url: url });
    for (let i = 0; i < 100 && got.length === 0; i++) await new Promise((r) => setTimeout(r, 100));
    assert.equal(got.length, 1);
    const delivery = got[0];
    assert.equal(delivery.headers["tollgate-webhook-id"], task.id);
    await verifyWebhook({ secret, header: delivery.headers["tollgate-signature"], body: new Uint8Array(delivery.body) });
    await assert.rejects(
      verifyWebhook({ secret, header: delivery.headers["tollgate-signature"], body: delivery.body.toString("utf8") + " " }),
      /no signature matches/,
    );
    assert.equal(JSON.parse(delivery.body.toString("utf8")).id, task.id);
  } finally {
    receiver.close();
    await hooked.stop();
  }
});

test("the README's examples run against the server", { skip }, async () => {
  const { execFile } = await import("node:child_process");
  const { mkdtempSync, readdirSync, rmSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const { join } = await import("node:path");
  const run = (file, args, env) =>
    new Promise((resolve, reject) =>
      execFile(process.execPath, [file, ...args], { env: { ...process.env, ...env }, cwd: new URL("..", import.meta.url).pathname, timeout: 60_000 }, (error, stdout, stderr) =>
        error ? reject(new Error(`${file}: ${error.message}\n${stdout}\n${stderr}`)) : resolve(stdout),
      ),
    );
  const acct = await account(3);
  const env = { TOLLGATE_BASE_URL: server.base, TOLLGATE_API_KEY: acct.key };
  const out = mkdtempSync(join(tmpdir(), "tollgate-ts-example-"));
  try {
    const generated = await run("examples/generate.mjs", ["a heron", out], env);
    assert.match(generated, /cost 1 credits; 2 left/);
    assert.equal(readdirSync(out).filter((f) => f.endsWith(".png")).length, 1);
    const errors = await run("examples/errors.mjs", [], env);
    assert.match(errors, /404 not_found_error resource_not_found, request id \S+, 1 attempt/);
    assert.match(errors, /not enough credits: /);
    assert.ok(!generated.includes(acct.key) && !errors.includes(acct.key));
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
  // The webhook handler, fed a delivery signed as the server signs it.
  const { handleWebhook } = await import("../examples/webhook.mjs");
  const { signWebhook } = await import("../dist/index.js");
  const secret = "whsec_example";
  const body = JSON.stringify({ id: "task_1", object: "task", status: "succeeded" });
  const header = await signWebhook(secret, Math.floor(Date.now() / 1000), body);
  const good = await handleWebhook(new Request("http://x/hook", { method: "POST", body, headers: { "tollgate-signature": header } }), secret);
  assert.equal(good.status, 200);
  const bad = await handleWebhook(new Request("http://x/hook", { method: "POST", body: body + " ", headers: { "tollgate-signature": header } }), secret);
  assert.equal(bad.status, 400);
});

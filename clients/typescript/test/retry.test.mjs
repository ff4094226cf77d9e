// The retry loop through the real client, on a virtual clock with a scripted fetch: every row of
// the retry table, the backoff bounds, both forms of Retry-After, the too-long wait, the budget in
// an outage, the host pause, the deadline and the caller's AbortSignal.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  TollgateClient,
  TollgateAdmin,
  RetryBudget,
  HostPause,
  RateLimitError,
  InsufficientCreditsError,
  BadRequestError,
  AuthenticationError,
  NotFoundError,
  MethodNotAllowedError,
  GoneError,
  PayloadTooLargeError,
  ConflictError,
  IdempotencyKeyInUseError,
  InternalServerError,
  ServiceUnavailableError,
  ServerError,
  ConnectionError,
  ConnectionTimeoutError,
  DecodeError,
  PausedError,
  UserAbortError,
  ConfigError,
  TollgateError,
  APIError,
} from "../dist/index.js";
import { VirtualClock, scripted, err, ok, KEY, START, settle } from "../test-support/helpers.mjs";

function client(s, clock, options = {}) {
  return new TollgateClient({ baseURL: "http://h:1", apiKey: KEY, fetch: s.fetch, clock, random: () => 0, budget: false, ...options });
}

const BACKOFF = [1000, 2000, 4000, 8000, 16000];

// The table, row by row: [what the server does, class, retried?]
const NOT_RETRIED = [
  [400, "invalid_value", BadRequestError],
  [401, "invalid_api_key", AuthenticationError],
  [402, "insufficient_credits", InsufficientCreditsError],
  [404, "resource_not_found", NotFoundError],
  [405, "method_not_allowed", MethodNotAllowedError],
  [409, "task_not_cancelable", ConflictError],
  [409, "voucher_already_redeemed", ConflictError],
  [410, "resource_expired", GoneError],
  [413, "body_too_large", PayloadTooLargeError],
  [504, "timeout", ServerError],
];
const RETRIED = [
  [429, "rate_limit_exceeded", RateLimitError],
  [500, "internal_error", InternalServerError],
  [502, "generation_failed", ServerError],
  [503, "service_unavailable", ServiceUnavailableError],
  [409, "idempotency_key_in_use", IdempotencyKeyInUseError],
];

for (const [status, code, Class] of NOT_RETRIED) {
  test(`table: ${status} ${code} is not retried`, async () => {
    const clock = new VirtualClock();
    const s = scripted(clock, [err(status, { code })]);
    const e = await clock.driveError(client(s, clock).account());
    assert.equal(s.count(), 1);
    assert.ok(e instanceof Class, e.name);
    assert.ok(e instanceof APIError && e instanceof TollgateError);
    assert.equal(e.status, status);
    assert.equal(e.code, code);
    assert.equal(e.stopReason, "not_retryable");
    assert.equal(e.retryable, false);
    assert.equal(e.attempts, 1);
    assert.equal(clock.now(), START, "no time waited");
  });
}

for (const [status, code, Class] of RETRIED) {
  test(`table: ${status} ${code} is retried 5 times with min(1000·2^k, 30000) backoff`, async () => {
    const clock = new VirtualClock();
    const s = scripted(clock, [], err(status, { code }));
    const e = await clock.driveError(client(s, clock).account());
    assert.equal(s.count(), 6);
    assert.deepEqual(s.gaps(), BACKOFF);
    assert.ok(e instanceof Class, e.name);
    assert.equal(e.code, code);
    assert.equal(e.stopReason, "retries_exhausted");
    assert.equal(e.retryable, true);
    assert.equal(e.attempts, 6);
    assert.deepEqual(
      e.history.map((a) => a.waited?.source.kind ?? null),
      [null, "backoff", "backoff", "backoff", "backoff", "backoff"],
    );
    assert.deepEqual(e.history.map((a) => a.requestId), ["req_1", "req_2", "req_3", "req_4", "req_5", "req_6"]);
  });
}

for (const [step, Class, kind] of [
  ["reset", ConnectionError, "other"],
  ["refused", ConnectionError, "connect"],
]) {
  test(`table: a transport failure (${step}) is retried`, async () => {
    const clock = new VirtualClock();
    const s = scripted(clock, [], step);
    const e = await clock.driveError(client(s, clock).account());
    assert.equal(s.count(), 6);
    assert.deepEqual(s.gaps(), BACKOFF);
    assert.ok(e instanceof Class);
    assert.equal(e.kind, kind);
    assert.equal(e.status, undefined);
    assert.ok(e.history.every((a) => a.status === undefined && typeof a.cause === "string"));
  });
}

test("table: an attempt that hangs times out (30 s by default) and is retried", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, ["hang", ok({ id: "acct_1" })]);
  const account = await clock.drive(client(s, clock).account());
  assert.equal(account.id, "acct_1");
  assert.deepEqual(s.gaps(), [31000]); // 30 s timeout + 1 s backoff
  const s2 = scripted(clock, [], "hang");
  const e = await clock.driveError(client(s2, clock, { maxRetries: 1, attemptTimeoutMs: 2000 }).account());
  assert.ok(e instanceof ConnectionTimeoutError);
  assert.equal(e.kind, "timeout");
  assert.match(e.message, /no response within 2000 ms/);
});

test("a 5xx without the envelope is retried and ends as a DecodeError; a bad 2xx body is not retried", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [], { status: 502, body: "<html>bad gateway</html>" });
  const e = await clock.driveError(client(s, clock, { maxRetries: 2 }).account());
  assert.equal(s.count(), 3);
  assert.ok(e instanceof DecodeError);
  assert.equal(e.status, 502);
  assert.equal(e.retryable, true);
  const s2 = scripted(clock, [{ status: 200, body: "not json" }]);
  const e2 = await clock.driveError(client(s2, clock).account());
  assert.equal(s2.count(), 1);
  assert.ok(e2 instanceof DecodeError);
  assert.equal(e2.retryable, false);
  assert.equal(e2.attempts, 1);
});

test("the backoff stays within [min(1000·2^k, 30000), +1000) with random jitter", async () => {
  for (const unit of [0, 0.5, 0.999999]) {
    const clock = new VirtualClock();
    const s = scripted(clock, [], err(500));
    await clock.driveError(client(s, clock, { random: () => unit, retry: { maxRetries: 7 } }).account());
    const gaps = s.gaps();
    const floors = [1000, 2000, 4000, 8000, 16000, 30000, 30000];
    assert.equal(gaps.length, 7);
    gaps.forEach((g, k) => {
      assert.ok(g >= floors[k] && g < floors[k] + 1000, `k=${k} gap=${g} unit=${unit}`);
      assert.ok(Math.abs(g - (floors[k] + unit * 1000)) < 1e-3);
    });
  }
  // With the platform's Math.random: always in bounds.
  const clock = new VirtualClock();
  const s = scripted(clock, [], err(503));
  await clock.driveError(client(s, clock, { random: Math.random }).account());
  s.gaps().forEach((g, k) => assert.ok(g >= BACKOFF[k] && g < BACKOFF[k] + 1000, `k=${k} gap=${g}`));
});

test("Retry-After in seconds is a floor plus jitter, whatever the attempt number", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [err(500), err(500), err(429, { headers: { "retry-after": "3" } }), ok({ id: "a" })]);
  await clock.drive(client(s, clock, { random: () => 0.25 }).account());
  assert.deepEqual(s.gaps(), [1250, 2250, 3250]);
});

test("Retry-After as an HTTP-date (and one in the past)", async () => {
  const clock = new VirtualClock();
  const at = new Date(START + 7000).toUTCString();
  const past = new Date(START - 60000).toUTCString();
  const s = scripted(clock, [
    err(503, { headers: { "retry-after": at } }),
    err(503, { headers: { "retry-after": past } }),
    ok({ id: "a" }),
  ]);
  await clock.drive(client(s, clock, { random: () => 0.1 }).account());
  assert.deepEqual(s.gaps(), [7100, 100]);
});

test("retry-after-ms is a floor plus jitter too, and preferred to Retry-After", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [
    err(429, { headers: { "retry-after-ms": "1500" } }),
    err(503, { headers: { "retry-after": "2", "retry-after-ms": "1200" } }),
    ok({ id: "a" }),
  ]);
  const c = client(s, clock);
  await clock.drive(c.account());
  assert.deepEqual(s.gaps(), [1500, 1200]);
});

test("a Retry-After beyond the limit (60 s) fails at once with when to come back", async () => {
  for (const headers of [{ "retry-after": "61" }, { "retry-after-ms": "60001" }, { "retry-after": new Date(START + 90000).toUTCString() }]) {
    const clock = new VirtualClock();
    const s = scripted(clock, [err(429, { headers }), ok()]);
    const e = await clock.driveError(client(s, clock).account());
    assert.equal(s.count(), 1, JSON.stringify(headers));
    assert.equal(clock.now(), START, "nothing slept");
    assert.ok(e instanceof RateLimitError);
    assert.equal(e.stopReason, "retry_after_too_long");
    assert.ok(e.retryAt instanceof Date);
    assert.ok(e.retryAt.getTime() >= START + 60001);
    assert.match(e.message, /longer than this client waits/);
  }
  // Exactly the limit is slept on; a configured limit is obeyed.
  const clock = new VirtualClock();
  const s = scripted(clock, [err(503, { headers: { "retry-after": "60" } }), ok()]);
  await clock.drive(client(s, clock).account());
  assert.deepEqual(s.gaps(), [60000]);
  const s2 = scripted(clock, [err(503, { headers: { "retry-after": "6" } }), ok()]);
  const e2 = await clock.driveError(client(s2, clock, { retry: { maxRetryAfterMs: 5000 } }).account());
  assert.equal(e2.stopReason, "retry_after_too_long");
});

test("x-should-retry is obeyed both ways (and can be ignored)", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [err(500, { shouldRetry: false })]);
  const e = await clock.driveError(client(s, clock).account());
  assert.equal(s.count(), 1);
  assert.equal(e.stopReason, "not_retryable");
  assert.equal(e.retryable, false);
  const s2 = scripted(clock, [err(400, { shouldRetry: true }), ok({ id: "a" })]);
  await clock.drive(client(s2, clock).account());
  assert.equal(s2.count(), 2);
  const s3 = scripted(clock, [err(500, { shouldRetry: false }), ok({ id: "a" })]);
  await clock.drive(client(s3, clock, { retry: { respectShouldRetry: false } }).account());
  assert.equal(s3.count(), 2);
});

test("per-code overrides and maxRetries are configurable per client and per call", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [err(402), ok({ id: "a" })]);
  await clock.drive(client(s, clock, { retry: { codeOverrides: { insufficient_credits: true } } }).account());
  assert.equal(s.count(), 2);
  const s2 = scripted(clock, [], err(500));
  const c = client(s2, clock, { maxRetries: 2 });
  await clock.driveError(c.account());
  assert.equal(s2.count(), 3);
  await clock.driveError(c.account({ retry: { maxRetries: 0 } }));
  assert.equal(s2.count(), 4);
});

test("every POST carries an Idempotency-Key, the same on every retry; GETs carry none", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [err(500), "reset", err(429, { headers: { "retry-after": "1" } }), ok({ id: "task_1" }, 202)]);
  const c = client(s, clock);
  await clock.drive(c.createGeneration({ prompt: "a cat" }));
  const keys = s.requests.map((r) => r.headers["idempotency-key"]);
  assert.equal(keys.length, 4);
  assert.match(keys[0], /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.ok(keys.every((k) => k === keys[0]));
  assert.ok(s.requests.every((r) => r.body === '{"prompt":"a cat"}'));
  // Another call, another key; the caller's key is used as given.
  const s2 = scripted(clock, [ok({}, 202), err(503), ok({}, 202), ok({ id: "a" })]);
  const c2 = client(s2, clock);
  await clock.drive(c2.createGeneration({ prompt: "x" }));
  await clock.drive(c2.createGeneration({ prompt: "x" }, { idempotencyKey: "order-42" }));
  await clock.drive(c2.account());
  assert.notEqual(s2.requests[0].headers["idempotency-key"], keys[0]);
  assert.deepEqual([s2.requests[1].headers["idempotency-key"], s2.requests[2].headers["idempotency-key"]], ["order-42", "order-42"]);
  assert.equal(s2.requests[3].headers["idempotency-key"], undefined);
  // cancel (a POST without a body) is keyed too; admin POSTs are keyed.
  const s3 = scripted(clock, [ok({}), ok({}, 201)]);
  await clock.drive(client(s3, clock).cancelTask("task_1"));
  await clock.drive(new TollgateAdmin({ baseURL: "http://h:1", adminToken: "adm", fetch: s3.fetch, clock }).createAccount({ name: "a" }));
  assert.ok(s3.requests.every((r) => typeof r.headers["idempotency-key"] === "string"));
  // A bad key is refused before anything is sent.
  for (const bad of ["", "é", "a\nb", "k".repeat(256), " padded "]) {
    const e = await clock.driveError(c2.createGeneration({ prompt: "x" }, { idempotencyKey: bad }));
    assert.ok(e instanceof ConfigError, JSON.stringify(bad));
  }
  assert.equal(s2.count(), 4);
});

test("the retry budget: a lone failure gets all its retries, a full outage costs ≤ 1.2 requests per call", async () => {
  const clock = new VirtualClock();
  const outage = scripted(clock, [], err(503));
  const c = client(outage, clock, { budget: {}, random: Math.random });
  const e = await clock.driveError(c.account());
  assert.equal(outage.count(), 6, "the first call of a fresh client gets its 5 retries");
  assert.equal(e.stopReason, "retries_exhausted");
  // The Rust SDK's measurement (examples/amplification.rs): 1000 logical calls from 20 workers.
  const calls = 1000;
  let next = 1;
  let budgetStops = 0;
  const worker = async () => {
    while (next++ < calls) {
      const failure = await c.account().then(
        () => assert.fail("the outage answered"),
        (x) => x,
      );
      if (failure.stopReason === "budget_exhausted") budgetStops++;
    }
  };
  await clock.run(...Array.from({ length: 20 }, worker));
  const perCall = outage.count() / calls;
  assert.ok(perCall <= 1.2, `requests per call ${perCall}`);
  assert.ok(budgetStops > calls / 2, `budget stops ${budgetStops}`);
  // Sequential calls, one at a time, over a long outage: the same bound.
  const clock3 = new VirtualClock();
  const outage3 = scripted(clock3, [], "refused");
  const c3 = client(outage3, clock3, { budget: {}, random: Math.random });
  for (let i = 0; i < calls; i++) await clock3.driveError(c3.account());
  assert.ok(outage3.count() / calls <= 1.2, `sequential requests per call ${outage3.count() / calls}`);
  // The same outage, all calls at once.
  const clock2 = new VirtualClock();
  const outage2 = scripted(clock2, [], err(500));
  const c2 = client(outage2, clock2, { budget: {}, random: Math.random });
  const results = await clock2.run(...Array.from({ length: 100 }, () => c2.account()));
  assert.ok(results.every((r) => !r.ok));
  assert.ok(outage2.count() / 100 <= 1.2, `concurrent requests per call ${outage2.count() / 100}`);
  const stopped = results.find((r) => r.error.stopReason === "budget_exhausted");
  assert.match(stopped.error.message, /retry budget exhausted/);
});

test("the budget's numbers: capacity, deposits, refill; shared by one client across calls", async () => {
  const clock = new VirtualClock();
  const b = new RetryBudget({ capacity: 5, extraLoad: 0.1, refillPerSec: 0 }, clock);
  for (let i = 0; i < 5; i++) assert.ok(b.tryWithdraw());
  assert.ok(!b.tryWithdraw());
  for (let i = 0; i < 10; i++) b.deposit();
  assert.ok(b.tryWithdraw(), "ten calls earn one retry");
  assert.ok(!b.tryWithdraw());
  const r = new RetryBudget({ capacity: 2, extraLoad: 0, refillPerSec: 0.5 }, clock);
  assert.ok(r.tryWithdraw() && r.tryWithdraw() && !r.tryWithdraw());
  await clock.advance(1999);
  assert.ok(!r.tryWithdraw());
  await clock.advance(1);
  assert.ok(r.tryWithdraw());
  await clock.advance(3_600_000);
  assert.ok(Math.abs(r.tokens - 2) < 1e-9);
  const d = new RetryBudget({}, clock);
  assert.deepEqual([d.capacity, d.extraLoad, d.refillPerSec], [10, 0.1, 0.1]);
  // Two calls of one client: the second finds what the first left.
  const shared = new RetryBudget({ capacity: 7, extraLoad: 0, refillPerSec: 0 }, clock);
  const s = scripted(clock, [], err(503));
  const c = client(s, clock, { budget: shared });
  await clock.driveError(c.account());
  assert.equal(s.count(), 6);
  const before = s.count();
  const e = await clock.driveError(c.ledger());
  assert.equal(s.count() - before, 3, "two tokens were left");
  assert.equal(e.stopReason, "budget_exhausted");
});

test("one 429 with Retry-After pauses the client's other calls to that host", async () => {
  const clock = new VirtualClock();
  const limited = scripted(clock, [err(429, { headers: { "retry-after": "10" } }), ok({ id: "a" })]);
  const others = scripted(clock, [], ok({ id: "b" }));
  const pause = new HostPause(clock);
  const a = client(limited, clock, { hostPause: pause });
  const b = client(others, clock, { hostPause: pause });
  const first = a.account();
  await settle();
  assert.equal(limited.count(), 1);
  await clock.advance(1000);
  const second = b.account();
  const [r1, r2] = await clock.run(first, second);
  assert.ok(r1.ok && r2.ok);
  assert.deepEqual(limited.gaps(), [10000]);
  assert.equal(others.requests[0].at - START, 10000, "the other call waited for the pause, not a request of its own");
  // A different host is not paused.
  pause.pause("h:1", clock.now() + 30000);
  const elsewhere = scripted(clock, [ok({ id: "c" })]);
  const before = clock.now();
  await clock.drive(client(elsewhere, clock, { baseURL: "http://other:2", hostPause: pause }).account());
  assert.equal(elsewhere.requests[0].at, before);
  // A 429 without Retry-After does not pause; the pause is per client by default.
  const p2 = new TollgateClient({ baseURL: "http://h:1", fetch: others.fetch, clock, random: () => 0 });
  assert.notEqual(p2.retrier.pause, pause);
});

test("the host pause within one client: concurrent calls wait, with jitter, and the history says so", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [err(429, { headers: { "retry-after": "5" } }), ok({ id: "x" }), ok({ id: "y" })]);
  const c = client(s, clock, { random: () => 0.5 });
  const one = c.account();
  await settle();
  const two = c.ledger();
  const [r1, r2] = await clock.run(one, two);
  assert.ok(r1.ok && r2.ok);
  assert.deepEqual(s.requests.map((r) => r.at - START), [0, 5500, 5500]);
});

test("a host pause longer than the deadline, or than the limit, fails at once without a request", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [ok()]);
  const c = client(s, clock);
  c.retrier.pause.pause("h:1", clock.now() + 10000);
  const e = await clock.driveError(c.account({ timeoutMs: 3000 }));
  assert.ok(e instanceof PausedError);
  assert.equal(e.stopReason, "deadline");
  assert.equal(e.attempts, 0);
  assert.equal(e.retryable, true);
  assert.ok(e.retryAt instanceof Date);
  c.retrier.pause.pause("h:1", clock.now() + 120000);
  const e2 = await clock.driveError(c.account());
  assert.ok(e2 instanceof PausedError);
  assert.equal(e2.stopReason, "retry_after_too_long");
  assert.equal(s.count(), 0);
});

test("the overall deadline: no wait that does not fit, and a hanging attempt is cut at it", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [], err(500));
  const e = await clock.driveError(client(s, clock).account({ timeoutMs: 5000 }));
  // Attempts at 0, 1000, 3000; the next wait (4000) would end at 7000 > 5000.
  assert.deepEqual(s.requests.map((r) => r.at - START), [0, 1000, 3000]);
  assert.equal(e.stopReason, "deadline");
  assert.ok(e.retryAt.getTime() === START + 7000);
  assert.equal(clock.now(), START + 3000, "gave up at once, not at the deadline");
  const s2 = scripted(clock, [], "hang");
  const t0 = clock.now();
  const e2 = await clock.driveError(client(s2, clock, { timeoutMs: 2000 }).account());
  assert.equal(clock.now() - t0, 2000);
  assert.ok(e2 instanceof ConnectionTimeoutError);
  assert.equal(e2.stopReason, "deadline");
  assert.equal(s2.count(), 1);
});

test("the caller's AbortSignal stops the call at once, during a wait or a request", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [], err(500));
  const controller = new AbortController();
  const call = client(s, clock).account({ signal: controller.signal });
  await settle();
  await clock.advance(1000); // the retry after 1 s has been made; now waiting 2 s
  assert.equal(s.count(), 2);
  controller.abort();
  const e = await clock.driveError(call);
  assert.ok(e instanceof UserAbortError);
  assert.equal(e.stopReason, "aborted");
  assert.equal(e.attempts, 2);
  await clock.advance(120000);
  assert.equal(s.count(), 2, "nothing more was sent");
  // During a request: the fetch gets the abort.
  const s2 = scripted(clock, [], "hang");
  const c2 = new AbortController();
  const call2 = client(s2, clock).account({ signal: c2.signal });
  await settle();
  c2.abort();
  const e2 = await clock.driveError(call2);
  assert.ok(e2 instanceof UserAbortError);
  assert.equal(s2.requests[0].signal.aborted, true);
  // Already aborted: nothing is sent.
  const s3 = scripted(clock, [ok()]);
  const e3 = await clock.driveError(client(s3, clock).account({ signal: AbortSignal.abort() }));
  assert.ok(e3 instanceof UserAbortError);
  assert.equal(s3.count(), 0);
});

test("the history records status, code, request id and each wait's source", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [err(500), err(429, { headers: { "retry-after": "3" } }), "reset", ok()]);
  const e = await clock.driveError(client(s, clock, { maxRetries: 2 }).account());
  const h = e.history;
  assert.equal(h.length, 3);
  assert.deepEqual([h[0].number, h[0].status, h[0].code, h[0].requestId, h[0].waited], [1, 500, "internal_error", "req_1", undefined]);
  assert.deepEqual(h[1].waited, { ms: 1000, source: { kind: "backoff", backoffMs: 1000 } });
  assert.equal(h[1].code, "rate_limit_exceeded");
  assert.deepEqual(h[2].waited, { ms: 3000, source: { kind: "retry_after", retryAfterMs: 3000 } });
  assert.match(h[2].cause, /ECONNRESET/);
  assert.ok(e instanceof ConnectionError);
  assert.equal(e.stopReason, "retries_exhausted");
  assert.match(e.message, /3 attempts: retries exhausted/);
});

test("retries are logged, without the key", async () => {
  const clock = new VirtualClock();
  const lines = [];
  const logger = { info: (m, f) => lines.push(`${m} ${JSON.stringify(f)}`), warn: (m, f) => lines.push(`${m} ${JSON.stringify(f)}`) };
  const s = scripted(clock, [err(503, { headers: { "retry-after": "1" } }), ok()]);
  await clock.drive(client(s, clock, { logger }).account());
  assert.equal(lines.length, 1);
  assert.match(lines[0], /retrying .*"status":503.*"delayMs":1000.*"source":"retry_after"/);
  assert.ok(!lines.join("\n").includes(KEY));
});

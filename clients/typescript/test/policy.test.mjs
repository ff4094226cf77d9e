// The retry policy as arithmetic: the seed's numbers, the table, Retry-After in both forms.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  RetryPolicy,
  isRetryableStatus,
  parseRetryAfter,
  parseRetryAfterMs,
  parseHttpDate,
  retryAfterFromHeaders,
  shouldRetryFromHeaders,
  ERROR_CODES,
} from "../dist/index.js";

const NOW = Date.UTC(2026, 0, 1, 12, 0, 0);

test("the seed's backoff schedule: min(1000·2^k, 30000)", () => {
  const p = new RetryPolicy();
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map((k) => p.backoff(k)), [1000, 2000, 4000, 8000, 16000, 30000, 30000]);
  assert.equal(p.backoff(200), 30000);
  assert.equal(p.maxRetries, 5);
  assert.equal(p.maxJitterMs, 1000);
  assert.equal(p.maxRetryAfterMs, 60000);
});

test("jitter is uniform in [0, 1000) and never reaches the top", () => {
  const p = new RetryPolicy();
  assert.equal(p.jitterFromUnit(0), 0);
  assert.ok(p.jitterFromUnit(1) < 1000);
  assert.ok(p.jitterFromUnit(0.999999999) < 1000);
  assert.equal(p.jitterFromUnit(Number.NaN), 0);
  assert.equal(p.jitterFromUnit(-5), 0);
  for (let i = 0; i < 1000; i++) {
    const j = p.jitterFromUnit(Math.random());
    assert.ok(j >= 0 && j < 1000);
  }
});

test("never retries 400, 401, 402, 404, 405, 410, 413; retries 429, 5xx, 409 in use and transport failures up to 5 times", () => {
  const p = new RetryPolicy();
  for (const status of [400, 401, 402, 404, 405, 408, 410, 413]) {
    assert.deepEqual(p.decide(0, { kind: "response", status }, 0), { action: "give_up", reason: "not_retryable" }, `${status}`);
  }
  const retried = [
    { kind: "response", status: 429 },
    { kind: "response", status: 500 },
    { kind: "response", status: 502 },
    { kind: "response", status: 503 },
    { kind: "response", status: 504 },
    { kind: "response", status: 409, code: "idempotency_key_in_use" },
    { kind: "transport" },
  ];
  for (const o of retried) {
    for (let k = 0; k < 5; k++) assert.equal(p.decide(k, o, 0).action, "retry", JSON.stringify(o));
    assert.deepEqual(p.decide(5, o, 0), { action: "give_up", reason: "retries_exhausted" });
  }
  assert.equal(p.decide(0, { kind: "response", status: 409, code: "task_not_cancelable" }, 0).action, "give_up");
  assert.equal(p.decide(0, { kind: "response", status: 504, code: "timeout" }, 0).action, "give_up");
});

test("the code table agrees with the retry rule for every code", () => {
  for (const [code, row] of Object.entries(ERROR_CODES)) {
    assert.equal(row.retryable, isRetryableStatus(row.status, code), code);
    assert.ok(row.hint.endsWith("."), code);
  }
  assert.equal(ERROR_CODES.rate_limit_exceeded.status, 429);
  assert.equal(ERROR_CODES.insufficient_credits.type, "billing_error");
  assert.equal(ERROR_CODES.idempotency_key_in_use.retryable, true);
  assert.equal(ERROR_CODES.voucher_already_redeemed.retryable, false);
});

test("Retry-After is a floor plus jitter, and a wait beyond the limit gives up", () => {
  const p = new RetryPolicy();
  assert.deepEqual(p.decide(4, { kind: "response", status: 429, retryAfterMs: 3000 }, 250), {
    action: "retry",
    delayMs: 3250,
    source: { kind: "retry_after", retryAfterMs: 3000 },
  });
  assert.deepEqual(p.decide(0, { kind: "response", status: 503, retryAfterMs: 61000 }, 0), {
    action: "give_up",
    reason: "retry_after_too_long",
    waitMs: 61000,
  });
  assert.equal(p.decide(0, { kind: "response", status: 503, retryAfterMs: 60000 }, 0).action, "retry");
  // A Retry-After on a non-retryable answer changes nothing.
  assert.equal(p.decide(0, { kind: "response", status: 400, retryAfterMs: 1000 }, 0).action, "give_up");
});

test("overrides: code, then type, then status, then x-should-retry, then the table", () => {
  const p = new RetryPolicy({
    typeOverrides: { billing_error: true },
    statusOverrides: { 402: false, 418: true },
    codeOverrides: { internal_error: false },
  });
  assert.equal(p.classify(402, "billing_error", "insufficient_credits"), true);
  assert.equal(p.classify(402), false);
  assert.equal(p.classify(418), true);
  assert.equal(p.classify(500, "server_error", "internal_error"), false);
  assert.equal(p.classify(500, "server_error", "something_new"), true);
  const d = new RetryPolicy();
  assert.equal(d.classify(500, "server_error", "internal_error", false), false, "x-should-retry: false wins over the table");
  assert.equal(d.classify(400, "invalid_request_error", "invalid_value", true), true, "x-should-retry: true wins over the table");
  const deaf = new RetryPolicy({ respectShouldRetry: false });
  assert.equal(deaf.classify(500, "server_error", "internal_error", false), true);
  assert.equal(new RetryPolicy({ codeOverrides: { internal_error: true } }).classify(500, undefined, "internal_error", false), true);
  assert.equal(new RetryPolicy({ retryTransportFailures: false }).isRetryable({ kind: "transport" }), false);
});

test("every number is configurable", () => {
  const p = new RetryPolicy({ maxRetries: 2, baseDelayMs: 50, maxBackoffMs: 150, maxJitterMs: 10, maxRetryAfterMs: 5000 });
  assert.deepEqual([0, 1, 2, 3].map((k) => p.backoff(k)), [50, 100, 150, 150]);
  assert.equal(p.decide(2, { kind: "transport" }, 0).action, "give_up");
  assert.equal(p.decide(0, { kind: "response", status: 429, retryAfterMs: 5001 }, 0).reason, "retry_after_too_long");
  assert.equal(p.with({ maxRetries: 7 }).maxRetries, 7);
  assert.equal(p.with({ maxRetries: 7 }).baseDelayMs, 50);
  assert.equal(new RetryPolicy({ maxRetries: -1 }).maxRetries, 5, "nonsense falls back to the default");
});

test("Retry-After: delay-seconds and the three HTTP-date forms", () => {
  assert.equal(parseRetryAfter("7", NOW), 7000);
  assert.equal(parseRetryAfter(" 0 ", NOW), 0);
  assert.equal(parseRetryAfter("Thu, 01 Jan 2026 12:00:30 GMT", NOW), 30000);
  assert.equal(parseRetryAfter("Thursday, 01-Jan-26 12:00:30 GMT", NOW), 30000);
  assert.equal(parseRetryAfter("Thu Jan  1 12:00:30 2026", NOW), 30000);
  assert.equal(parseRetryAfter(new Date(NOW + 45000).toUTCString(), NOW), 45000);
  assert.equal(parseRetryAfter("Thu, 01 Jan 2026 11:59:30 GMT", NOW), 0, "a date in the past is no wait");
  for (const bad of ["soon", "-3", "", "1.5", "3 s", "Thu, 01 Jan 2026 12:00:30", null, undefined]) {
    assert.equal(parseRetryAfter(bad, NOW), undefined, String(bad));
  }
  assert.equal(parseHttpDate("Sun, 06 Nov 1994 08:49:37 GMT"), Date.UTC(1994, 10, 6, 8, 49, 37));
  assert.equal(parseRetryAfterMs("1500"), 1500);
  assert.equal(parseRetryAfterMs("1500.5"), 1500.5);
  assert.equal(parseRetryAfterMs("-1"), undefined);
  assert.equal(parseRetryAfterMs("soon"), undefined);
});

test("retry-after-ms is preferred (exact), Retry-After otherwise; x-should-retry read strictly", () => {
  const h = (o) => new Headers(o);
  assert.equal(retryAfterFromHeaders(h({ "retry-after": "2", "retry-after-ms": "1500" }), NOW), 1500);
  assert.equal(retryAfterFromHeaders(h({ "retry-after": "2" }), NOW), 2000);
  assert.equal(retryAfterFromHeaders(h({ "retry-after": "2", "retry-after-ms": "junk" }), NOW), 2000);
  assert.equal(retryAfterFromHeaders(h({}), NOW), undefined);
  assert.equal(shouldRetryFromHeaders(h({ "x-should-retry": "true" })), true);
  assert.equal(shouldRetryFromHeaders(h({ "x-should-retry": "FALSE" })), false);
  assert.equal(shouldRetryFromHeaders(h({ "x-should-retry": "maybe" })), undefined);
  assert.equal(shouldRetryFromHeaders(h({})), undefined);
});

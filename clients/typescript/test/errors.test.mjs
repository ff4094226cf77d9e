// Typed errors: the envelope's fields, one line of text, and the API key nowhere in an error,
// its properties, its JSON, its inspection, the history or the client's own printing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { inspect } from "node:util";
import {
  TollgateClient,
  TollgateAdmin,
  APIError,
  TollgateError,
  InsufficientCreditsError,
  BillingError,
  SpendLimitError,
  RateLimitError,
  BadRequestError,
  ConnectionError,
  ConfigError,
  apiErrorFor,
} from "../dist/index.js";
import { VirtualClock, scripted, err, ok, KEY } from "../test-support/helpers.mjs";

function client(s, clock, options = {}) {
  return new TollgateClient({ baseURL: "http://h:1", apiKey: KEY, fetch: s.fetch, clock, random: () => 0, budget: false, ...options });
}

test("an error keeps the server's envelope: status, type, code, param, request id, attempts", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [err(400, { code: "invalid_value", extra: { param: "size", request_id: "req_env" } })]);
  const e = await clock.driveError(client(s, clock).createGeneration({ prompt: "x", size: "300x300" }));
  assert.ok(e instanceof BadRequestError && e instanceof APIError && e instanceof TollgateError && e instanceof Error);
  assert.deepEqual(
    [e.status, e.type, e.code, e.param, e.requestId, e.attempts, e.retryable],
    [400, "invalid_request_error", "invalid_value", "size", "req_env", 1, false],
  );
  assert.equal(e.rawMessage, "Scripted invalid_value.");
  assert.equal(e.message, "Scripted invalid_value. [400 invalid_value, param size, request id req_env, 1 attempt] Check the request body format and required fields.");
  assert.ok(!e.message.includes("\n"));
  assert.equal(e.headers["x-should-retry"], "false");
  assert.equal(e.codeInfo.status, 400);
  const json = e.toJSON();
  assert.equal(json.code, "invalid_value");
  assert.equal(json.status, 400);
});

test("402 insufficient_credits is an InsufficientCreditsError; the code picks the class", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [err(402)]);
  const e = await clock.driveError(client(s, clock).createGeneration({ prompt: "x" }));
  assert.ok(e instanceof InsufficientCreditsError && e instanceof BillingError);
  assert.match(e.message, /Add credits, then retry\.$/);
  const spend = apiErrorFor({ message: "m", status: 402, type: "billing_error", code: "key_spend_limit_reached" });
  assert.ok(spend instanceof SpendLimitError);
  const r = apiErrorFor({ message: "Rate limit exceeded. Please slow down.", status: 429, type: "rate_limit_error", code: "rate_limit_exceeded", retryAfterMs: 2000 });
  assert.ok(r instanceof RateLimitError);
  assert.equal(r.retryAfterMs, 2000);
  assert.equal(r.name, "RateLimitError");
  const unknown = apiErrorFor({ message: "m", status: 418, type: "teapot_error", code: "teapot" });
  assert.ok(unknown instanceof APIError);
  assert.match(unknown.message, /Check the request against the API contract\.$/);
});

function assertNoKey(value, where) {
  const text = typeof value === "string" ? value : inspect(value, { depth: 10, showHidden: true });
  assert.ok(!text.includes(KEY), `the key leaked into ${where}: ${text}`);
  assert.ok(!text.includes("supersecret"), `part of the key leaked into ${where}`);
}

test("the API key never appears in an error, its properties, JSON, inspect, toString or history", async () => {
  const clock = new VirtualClock();
  // A transport failure whose text quotes the request (as a proxy or a buggy fetch might).
  const leaky = async (_url, init) => {
    throw new TypeError(`fetch failed: headers ${JSON.stringify(init.headers)}`, { cause: new Error(`Authorization: Bearer ${KEY}`) });
  };
  const s = scripted(clock, [err(401), err(500), err(500), err(429, { headers: { "retry-after": "99" } })]);
  const errors = [];
  errors.push(await clock.driveError(client(s, clock).account()));
  errors.push(await clock.driveError(client(s, clock, { maxRetries: 2 }).account()));
  errors.push(await clock.driveError(client({ fetch: leaky }, clock, { maxRetries: 1 }).account()));
  errors.push(await clock.driveError(client(s, clock).createGeneration({ prompt: "x" }, { idempotencyKey: "é" })));
  const c = client(s, clock);
  for (const e of errors) {
    assert.ok(e instanceof TollgateError);
    assertNoKey(e.message, "message");
    assertNoKey(String(e), "toString");
    assertNoKey(e.stack ?? "", "stack");
    assertNoKey(JSON.stringify(e), "JSON");
    assertNoKey(inspect(e, { depth: 10, showHidden: true }), "inspect");
    assertNoKey(JSON.stringify(e.history), "history");
    for (const key of Object.getOwnPropertyNames(e)) assertNoKey(inspect(e[key], { depth: 10 }), `property ${key}`);
  }
  assert.ok(errors[2] instanceof ConnectionError);
  assert.match(errors[2].message, /\[redacted\]/, "the quoted key is redacted");
  assert.ok(errors[3] instanceof ConfigError);
  assertNoKey(inspect(c, { depth: 10, showHidden: true }), "inspect(client)");
  assertNoKey(String(c), "String(client)");
  assertNoKey(JSON.stringify(c), "JSON(client)");
  assertNoKey(Object.keys(c).map((k) => inspect(c[k], { depth: 6, showHidden: true })).join(), "client properties");
  assert.match(inspect(c), /credential: \[redacted\]/);
  const admin = new TollgateAdmin({ baseURL: "http://h:1", adminToken: KEY, fetch: s.fetch, clock });
  assertNoKey(inspect(admin, { depth: 10, showHidden: true }), "inspect(admin)");
  // It is sent, though, where it belongs.
  assert.equal(s.requests[0].headers.authorization, `Bearer ${KEY}`);
});

test("bad options are refused before anything is sent", () => {
  assert.throws(() => new TollgateClient({ baseURL: "ftp://x" }), ConfigError);
  assert.throws(() => new TollgateClient({ baseURL: "not a url" }), ConfigError);
  assert.throws(() => new TollgateClient({ baseURL: "http://h:1/?q" }), ConfigError);
  assert.throws(() => new TollgateClient({ baseURL: "http://user:pw@h:1" }), ConfigError);
  assert.throws(() => new TollgateClient({ baseURL: "http://h:1", apiKey: "tg_bad key\n" }), ConfigError);
  assert.throws(() => new TollgateClient({ baseURL: "http://h:1", headers: { Authorization: "x" } }), ConfigError);
  const c = new TollgateClient({ baseURL: "http://127.0.0.1:9/", apiKey: KEY });
  assert.equal(c.baseURL, "http://127.0.0.1:9");
});

test("a path segment cannot change the route", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [ok({}), ok({})]);
  const c = client(s, clock);
  await clock.drive(c.getTask("../admin/accounts?x=1"));
  await clock.drive(c.getTask(".."));
  assert.equal(s.requests[0].url, "http://h:1/v1/tasks/..%2Fadmin%2Faccounts%3Fx%3D1");
  assert.equal(s.requests[1].url, "http://h:1/v1/tasks/%2E%2E");
  await assert.rejects(c.getTask(""), ConfigError);
});

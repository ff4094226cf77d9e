// The typed routes against a scripted fetch: each method's method, path, query and body;
// generate (create, long poll, images); pagination; and the default clock under node's mock.timers.
import { test, mock } from "node:test";
import assert from "node:assert/strict";
import { TollgateClient, TollgateAdmin, TaskFailedError, TaskNotFinishedError } from "../dist/index.js";
import { VirtualClock, scripted, ok, task, KEY, settle } from "../test-support/helpers.mjs";

const BASE = "http://h:1";

function client(s, clock, options = {}) {
  return new TollgateClient({ baseURL: BASE, apiKey: KEY, fetch: s.fetch, clock, random: () => 0, budget: false, ...options });
}

const png = () => new Response(new Uint8Array([0x89, 0x50, 0x4e, 0x47, 1, 2, 3]), { status: 200, headers: { "content-type": "image/png" } });

test("every API-key route: method, path, query, body", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [], ok({ object: "list", data: [], has_more: false }));
  const c = client(s, clock);
  const calls = [
    [() => c.createGeneration({ prompt: "p", n: 2, size: "256x256", seed: 7, model: "builtin" }), "POST", "/v1/images/generations", { prompt: "p", n: 2, size: "256x256", seed: 7, model: "builtin" }],
    [() => c.getTask("task_1"), "GET", "/v1/tasks/task_1"],
    [() => c.getTask("task_1", { wait: 10 }), "GET", "/v1/tasks/task_1?wait=10"],
    [() => c.listTasks({ limit: 5, after: "task_9" }), "GET", "/v1/tasks?limit=5&after=task_9"],
    [() => c.listTasks(), "GET", "/v1/tasks"],
    [() => c.cancelTask("task_1"), "POST", "/v1/tasks/task_1/cancel"],
    [() => c.getImage("task_1", 2), "GET", "/v1/tasks/task_1/images/2"],
    [() => c.account(), "GET", "/v1/account"],
    [() => c.ledger({ limit: 2, after: 41 }), "GET", "/v1/account/ledger?limit=2&after=41"],
    [() => c.models(), "GET", "/v1/models"],
    [() => c.webhookSecret(), "GET", "/v1/account/webhook-secret"],
    [() => c.rotateWebhookSecret(), "POST", "/v1/account/webhook-secret"],
    [() => c.redeemVoucher("tgv_abc"), "POST", "/v1/vouchers/redeem", { code: "tgv_abc" }],
    [() => c.creditPacks(), "GET", "/v1/billing/packs"],
    [() => c.createCheckout({ pack: 500 }), "POST", "/v1/billing/checkout", { pack: 500 }],
    [() => c.health(), "GET", "/healthz"],
    [() => c.ready(), "GET", "/readyz"],
  ];
  for (const [i, [call, method, path, body]] of calls.entries()) {
    await clock.drive(call());
    const r = s.requests[i];
    assert.equal(r.method, method, path);
    assert.equal(r.url, BASE + path);
    assert.equal(r.headers.authorization, `Bearer ${KEY}`);
    if (body === undefined) assert.equal(r.body, undefined, path);
    else {
      assert.deepEqual(JSON.parse(r.body), body);
      assert.equal(r.headers["content-type"], "application/json");
    }
    assert.equal(typeof r.headers["idempotency-key"], method === "POST" ? "string" : "undefined", path);
  }
});

test("every operator route, on its own client with the admin token", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [], ok({ object: "list", data: [], has_more: false }));
  const a = new TollgateAdmin({ baseURL: BASE, adminToken: "adm_token", fetch: s.fetch, clock, random: () => 0 });
  const calls = [
    [() => a.createAccount({ name: "acme", credits: 100, rate_limit: { requests_per_minute: 600, burst: 20 } }), "POST", "/admin/accounts", { name: "acme", credits: 100, rate_limit: { requests_per_minute: 600, burst: 20 } }],
    [() => a.listAccounts(), "GET", "/admin/accounts"],
    [() => a.getAccount("acct_1"), "GET", "/admin/accounts/acct_1"],
    [() => a.updateAccount("acct_1", { low_balance: null }), "PATCH", "/admin/accounts/acct_1", { low_balance: null }],
    [() => a.createKey("acct_1", { spend_limit: { credits: 100, period: "day" } }), "POST", "/admin/accounts/acct_1/keys", { spend_limit: { credits: 100, period: "day" } }],
    [() => a.listKeys("acct_1"), "GET", "/admin/accounts/acct_1/keys"],
    [() => a.revokeKey("key_1"), "DELETE", "/admin/keys/key_1"],
    [() => a.addCredits("acct_1", { amount: 50, note: "top-up" }), "POST", "/admin/accounts/acct_1/credits", { amount: 50, note: "top-up" }],
    [() => a.ledger("acct_1", { limit: 10 }), "GET", "/admin/accounts/acct_1/ledger?limit=10"],
    [() => a.listPurchases("acct_1"), "GET", "/admin/accounts/acct_1/purchases"],
    [() => a.createVoucher({ credits: 5 }), "POST", "/admin/vouchers", { credits: 5 }],
    [() => a.listVouchers({ limit: 3 }), "GET", "/admin/vouchers?limit=3"],
  ];
  for (const [i, [call, method, path, body]] of calls.entries()) {
    await clock.drive(call());
    const r = s.requests[i];
    assert.equal(r.method, method, path);
    assert.equal(r.url, BASE + path);
    assert.equal(r.headers.authorization, "Bearer adm_token");
    if (body !== undefined) assert.deepEqual(JSON.parse(r.body), body);
  }
  assert.equal(typeof a.generate, "undefined", "the admin client has no API-key routes");
  assert.equal(typeof client(s, clock).createAccount, "undefined", "nor the reverse");
});

test("generate: creates, long-polls with ?wait, returns the succeeded task with its images' URLs or bytes", async () => {
  const clock = new VirtualClock();
  const done = task({ status: "succeeded", n: 2, images: [{ url: "http://h:1/v1/links/task_1/0.png?sig=a" }, { url: "http://h:1/v1/links/task_1/1.png?sig=b" }] });
  const s = scripted(clock, [ok(task(), 202), ok(task({ status: "running" })), ok(done), png, png]);
  const seen = [];
  const result = await clock.drive(client(s, clock).generate({ prompt: "a lighthouse", n: 2, size: "256x256", wait: true, images: "bytes", onUpdate: (t) => seen.push(t.status) }));
  assert.equal(result.status, "succeeded");
  assert.deepEqual(result.images.map((i) => [i.index, i.url, Array.from(i.data.slice(0, 4))]), [
    [0, done.images[0].url, [0x89, 0x50, 0x4e, 0x47]],
    [1, done.images[1].url, [0x89, 0x50, 0x4e, 0x47]],
  ]);
  assert.deepEqual(seen, ["queued", "running", "succeeded"]);
  assert.deepEqual(s.requests.map((r) => `${r.method} ${r.url.slice(BASE.length)}`), [
    "POST /v1/images/generations",
    "GET /v1/tasks/task_1?wait=25",
    "GET /v1/tasks/task_1?wait=25",
    "GET /v1/tasks/task_1/images/0",
    "GET /v1/tasks/task_1/images/1",
  ]);
  assert.deepEqual(JSON.parse(s.requests[0].body), { prompt: "a lighthouse", n: 2, size: "256x256" }, "only the create body is sent");
  // URLs only by default; wait: false returns the queued task.
  const s2 = scripted(clock, [ok(task(), 202), ok(done), ok(task(), 202)]);
  const urls = await clock.drive(client(s2, clock).generate({ prompt: "x" }));
  assert.equal(urls.images[1].data, undefined);
  assert.equal(s2.count(), 2);
  const queued = await clock.drive(client(s2, clock).generate({ prompt: "x", wait: false }));
  assert.equal(queued.status, "queued");
});

test("generate: a failed task throws TaskFailedError; a deadline before the end throws TaskNotFinishedError", async () => {
  const clock = new VirtualClock();
  const failed = task({ status: "failed", error: { code: "provider_error", message: "The provider refused." } });
  const s = scripted(clock, [ok(task(), 202), ok(failed)]);
  const e = await clock.driveError(client(s, clock).generate({ prompt: "x" }));
  assert.ok(e instanceof TaskFailedError);
  assert.equal(e.task.status, "failed");
  assert.equal(e.code, "provider_error");
  // A server that answers at once (no long poll): polls every pollIntervalMs until the deadline.
  const s2 = scripted(clock, [ok(task(), 202)], ok(task({ status: "running" })));
  const t0 = clock.now();
  const e2 = await clock.driveError(client(s2, clock).generate({ prompt: "x", pollIntervalMs: 1000 }, { timeoutMs: 4500 }));
  assert.ok(e2 instanceof TaskNotFinishedError);
  assert.equal(e2.task.status, "running");
  assert.ok(clock.now() - t0 <= 4500);
  assert.ok(!s2.requests[1].url.includes("wait="), "a deadline under 6 s leaves no room for a long poll");
});

test("waitForTask shortens its long poll to fit the attempt timeout", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [ok(task({ status: "succeeded" }))]);
  await clock.drive(client(s, clock, { attemptTimeoutMs: 12000 }).waitForTask("task_1"));
  assert.ok(s.requests[0].url.endsWith("?wait=7"));
});

test("iterateTasks and iterateLedger walk every page with after=<last id>", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [
    ok({ object: "list", data: [{ id: "task_3" }, { id: "task_2" }], has_more: true }),
    ok({ object: "list", data: [{ id: "task_1" }], has_more: false }),
    ok({ object: "list", data: [{ id: 9 }, { id: 8 }], has_more: true }),
    ok({ object: "list", data: [], has_more: false }),
  ]);
  const c = client(s, clock);
  const collect = async (it) => {
    const out = [];
    for await (const x of it) out.push(x.id);
    return out;
  };
  assert.deepEqual(await clock.drive(collect(c.iterateTasks({ limit: 2 }))), ["task_3", "task_2", "task_1"]);
  assert.deepEqual(await clock.drive(collect(c.iterateLedger({ limit: 2 }))), [9, 8]);
  assert.deepEqual(s.requests.map((r) => r.url.slice(BASE.length)), [
    "/v1/tasks?limit=2",
    "/v1/tasks?limit=2&after=task_2",
    "/v1/account/ledger?limit=2",
    "/v1/account/ledger?limit=2&after=8",
  ]);
});

test("extra headers per client and per call; a signed link is fetched without the key", async () => {
  const clock = new VirtualClock();
  const s = scripted(clock, [ok({}), png]);
  const c = client(s, clock, { headers: { "Tollgate-Simulate-Delay-Ms": "10" } });
  await clock.drive(c.account({ headers: { "X-Trace": "t1" } }));
  assert.equal(s.requests[0].headers["tollgate-simulate-delay-ms"], "10");
  assert.equal(s.requests[0].headers["x-trace"], "t1");
  const bytes = await clock.drive(c.fetchImageURL("http://cdn:8/v1/links/task_1/0.png?sig=x"));
  assert.equal(bytes[0], 0x89);
  assert.equal(s.requests[1].url, "http://cdn:8/v1/links/task_1/0.png?sig=x");
  assert.equal(s.requests[1].headers.authorization, undefined);
});

test("the default clock is setTimeout and Date.now: node's mock.timers drives it", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const s = scripted({ now: () => Date.now() }, [{ status: 500 }, { status: 503, headers: { "retry-after": "2" } }, ok({ id: "acct_1" })]);
  const c = new TollgateClient({ baseURL: BASE, apiKey: KEY, fetch: s.fetch, random: () => 0, budget: false });
  let done = false;
  const call = c.account().then((a) => {
    done = true;
    return a;
  });
  await settle();
  assert.equal(s.count(), 1);
  t.mock.timers.tick(999);
  await settle();
  assert.equal(s.count(), 1, "not before the 1 s backoff");
  t.mock.timers.tick(1);
  await settle();
  assert.equal(s.count(), 2);
  t.mock.timers.tick(1999);
  await settle();
  assert.equal(s.count(), 2, "not before the 2 s Retry-After");
  t.mock.timers.tick(1);
  await settle();
  assert.equal(s.count(), 3);
  assert.ok(done);
  assert.equal((await call).id, "acct_1");
  assert.deepEqual(s.gaps(), [1000, 2000]);
  mock.timers.reset();
});

test("a real connection refused is a retried ConnectionError of kind connect", async () => {
  const { createServer } = await import("node:net");
  const port = await new Promise((resolve) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const p = srv.address().port;
      srv.close(() => resolve(p));
    });
  });
  const c = new TollgateClient({ baseURL: `http://127.0.0.1:${port}`, apiKey: KEY, retry: { maxRetries: 2, baseDelayMs: 10, maxJitterMs: 5 } });
  const e = await c.account().catch((x) => x);
  assert.equal(e.name, "ConnectionError");
  assert.equal(e.kind, "connect");
  assert.equal(e.attempts, 3);
  assert.match(e.message, /^could not connect to the server: .*ECONNREFUSED/);
  assert.ok(!e.message.includes(KEY));
});

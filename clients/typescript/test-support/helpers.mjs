// Test helpers: a virtual clock that jumps to the next timer once nothing else can run, and a
// scripted `fetch` that answers steps in order and records the virtual time of every request.

import { ERROR_CODES } from "../dist/index.js";

export const START = Date.UTC(2026, 0, 1, 12, 0, 0); // a whole second, so HTTP-dates are exact

/** Lets every pending microtask and a few macrotask rounds run. */
export async function settle(rounds = 12) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}

/** A clock whose time moves only when every task is waiting for a timer. */
export class VirtualClock {
  constructor(start = START) {
    this.t = start;
    this.timers = [];
    this.seq = 0;
  }
  now() {
    return this.t;
  }
  sleep(ms, signal) {
    return new Promise((resolve, reject) => {
      if (signal?.aborted) {
        reject(signal.reason);
        return;
      }
      const timer = { at: this.t + Math.max(0, ms), seq: this.seq++, resolve };
      const onAbort = () => {
        this.timers = this.timers.filter((x) => x !== timer);
        reject(signal.reason);
      };
      timer.cleanup = () => signal?.removeEventListener("abort", onAbort);
      signal?.addEventListener("abort", onAbort, { once: true });
      this.timers.push(timer);
    });
  }
  /** Fires the earliest timer (moving time to it); false when there is none. */
  step() {
    if (this.timers.length === 0) return false;
    this.timers.sort((a, b) => a.at - b.at || a.seq - b.seq);
    const next = this.timers.shift();
    this.t = Math.max(this.t, next.at);
    next.cleanup();
    next.resolve();
    return true;
  }
  /** Moves time forward by `ms`, firing the timers due on the way. */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await settle();
      this.timers.sort((a, b) => a.at - b.at || a.seq - b.seq);
      const next = this.timers[0];
      if (next === undefined || next.at > end) break;
      this.step();
    }
    this.t = end;
    await settle();
  }
  /** Drives virtual time until every promise given has settled; returns their outcomes. */
  async run(...promises) {
    const state = promises.map(() => ({ done: false }));
    promises.forEach((p, i) =>
      p.then(
        (value) => Object.assign(state[i], { done: true, ok: true, value }),
        (error) => Object.assign(state[i], { done: true, ok: false, error }),
      ),
    );
    for (;;) {
      await settle();
      if (state.every((s) => s.done)) break;
      if (!this.step()) throw new Error("deadlock: a promise waits for something other than a timer");
    }
    return state;
  }
  /** Drives one promise to its end: its value, or throws its error. */
  async drive(promise) {
    const [s] = await this.run(promise);
    if (!s.ok) throw s.error;
    return s.value;
  }
  /** Drives one promise that must reject: its error. */
  async driveError(promise) {
    const [s] = await this.run(promise);
    if (s.ok) throw new Error(`expected a rejection, got ${JSON.stringify(s.value)}`);
    return s.error;
  }
}

function envelope(code, extra = {}) {
  const row = ERROR_CODES[code];
  return { error: { message: `Scripted ${code}.`, type: row ? row.type : "server_error", code, ...extra } };
}

const DEFAULT_CODES = {
  400: "invalid_value",
  401: "invalid_api_key",
  402: "insufficient_credits",
  404: "resource_not_found",
  405: "method_not_allowed",
  409: "idempotency_key_in_use",
  410: "resource_expired",
  413: "body_too_large",
  429: "rate_limit_exceeded",
  500: "internal_error",
  502: "generation_failed",
  503: "service_unavailable",
  504: "timeout",
};

/** A step: an error status with the server's envelope and its x-should-retry, like the real server. */
export function err(status, options = {}) {
  return { status, ...options };
}

/** A 2xx step with a JSON body. */
export function ok(body = {}, status = 200, headers = {}) {
  return { status, json: body, headers };
}

function transportError(code, message) {
  const cause = Object.assign(new Error(message), { code });
  return new TypeError("fetch failed", { cause });
}

/**
 * A scripted `fetch`. Steps: `{status, code?, headers?, json?, body?, shouldRetry?}`, `"reset"`,
 * `"refused"`, `"hang"`, or a function `(request) => Response | Promise<Response>`. When the script
 * runs out, `fallback` answers (default: 503 without Retry-After).
 */
export function scripted(clock, steps = [], fallback = err(500)) {
  const queue = [...steps];
  const requests = [];
  const fetch = async (url, init = {}) => {
    const headers = Object.fromEntries(Object.entries(init.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));
    const request = { url, method: init.method ?? "GET", headers, body: init.body, at: clock.now(), signal: init.signal };
    requests.push(request);
    const step = queue.length > 0 ? queue.shift() : fallback;
    const n = requests.length;
    if (typeof step === "function") return step(request);
    if (step === "reset") throw transportError("ECONNRESET", "read ECONNRESET");
    if (step === "refused") throw transportError("ECONNREFUSED", "connect ECONNREFUSED 127.0.0.1:9");
    if (step === "hang") {
      return new Promise((_, reject) => {
        init.signal?.addEventListener("abort", () => reject(init.signal.reason), { once: true });
      });
    }
    const h = new Headers({ "x-request-id": `req_${n}`, ...(step.headers ?? {}) });
    if (step.json !== undefined || (step.status >= 200 && step.status < 300 && step.body === undefined)) {
      h.set("content-type", "application/json");
      return new Response(step.status === 204 ? null : JSON.stringify(step.json ?? {}), { status: step.status, headers: h });
    }
    if (step.body !== undefined) return new Response(step.body, { status: step.status, headers: h });
    const code = step.code ?? DEFAULT_CODES[step.status] ?? "internal_error";
    const row = ERROR_CODES[code];
    const should = step.shouldRetry === undefined ? (row ? row.retryable : undefined) : step.shouldRetry;
    if (should !== undefined && should !== null && !h.has("x-should-retry")) h.set("x-should-retry", String(should));
    h.set("content-type", "application/json");
    return new Response(JSON.stringify(envelope(code, step.extra ?? {})), { status: step.status, headers: h });
  };
  return {
    fetch,
    requests,
    count: () => requests.length,
    /** Gaps between consecutive requests, in virtual ms. */
    gaps: () => requests.slice(1).map((r, i) => r.at - requests[i].at),
    remaining: () => queue.length,
  };
}

export const KEY = "tg_supersecretkey_0123456789abcdef";

/** A task as the server sends it. */
export function task(overrides = {}) {
  return {
    id: "task_1",
    object: "task",
    status: "queued",
    model: "builtin",
    prompt: "a lighthouse",
    n: 1,
    size: "256x256",
    seed: 42,
    cost: 1,
    created_at: "2026-01-01T12:00:00Z",
    completed_at: null,
    expires_at: "2026-01-31T12:00:00Z",
    images: [],
    error: null,
    ...overrides,
  };
}

/**
 * The HTTP plumbing every call shares: options, the base URL, the credential, the
 * `Idempotency-Key` of every POST, the retry loop and the decoding of answers.
 *
 * {@link BaseClient} is the common ground of {@link TollgateClient} (API key) and
 * {@link TollgateAdmin} (operator token); they are separate types so that one cannot call the
 * other's routes by mistake. One instance owns one retry budget and one host pause, shared by
 * all its calls: that is what makes the budget "per client".
 *
 * The credential lives in a private field. It is sent as `Authorization: Bearer …` and nowhere
 * else; it is not a property, not in `inspect`/`JSON.stringify` output, and any transport
 * failure text that might quote it is redacted.
 *
 * @module
 */

import { RetryBudget, type RetryBudgetOptions } from "./budget.js";
import { systemClock, type Clock, type RandomSource } from "./clock.js";
import { randomUUID } from "./crypto.js";
import { ConfigError, DecodeError } from "./errors.js";
import { HostPause } from "./pause.js";
import { RetryPolicy, type RetryOptions } from "./policy.js";
import { Retrier, type Logger, type RawResponse } from "./retry.js";

/** Where the SDK looks for the server when no base URL is given (nor `TOLLGATE_BASE_URL`). */
export const DEFAULT_BASE_URL = "http://127.0.0.1:8080";

/** The platform's `fetch`, or one of the caller's with the same shape. */
export type FetchLike = (input: string, init: RequestInit) => Promise<Response>;

/** Settings shared by both clients; every one has the seed's default. */
export interface CommonOptions {
  /** The server, e.g. `https://images.example.com`. Default `TOLLGATE_BASE_URL`, else `http://127.0.0.1:8080`. */
  baseURL?: string;
  /** The retry strategy (a `RetryPolicy`, or its options). Default: the seed's. */
  retry?: RetryPolicy | RetryOptions;
  /** Shortcut for `retry.maxRetries` (default 5; 0 disables retries). */
  maxRetries?: number;
  /**
   * The retry budget shared by all calls of this client: its numbers, an instance to share
   * with other clients, or `false` for none (not recommended: in an outage each call becomes
   * `maxRetries + 1` requests). Default 10 tokens, 10 % extra load, 0.1 token/s.
   */
  budget?: RetryBudgetOptions | RetryBudget | false;
  /** A host pause to share with other clients (default: one of this client's own). */
  hostPause?: HostPause;
  /** The default overall deadline of each call in ms, retries and waits included. Default none. */
  timeoutMs?: number;
  /** The longest one attempt may take before it counts as a retryable timeout. Default 30000; `null` for none. */
  attemptTimeoutMs?: number | null;
  /** Headers added to every request (never `Authorization`, which the SDK sets). */
  headers?: Readonly<Record<string, string>>;
  /** The `fetch` to use. Default `globalThis.fetch`. */
  fetch?: FetchLike;
  /** Where retries are reported. Default: nowhere. */
  logger?: Logger;
  /** Makes each POST's `Idempotency-Key` when the caller gives none. Default: a random UUID v4. */
  idempotencyKey?: () => string | Promise<string>;
  /** Time source for the retry loop (tests pass a virtual one). */
  clock?: Clock;
  /** Jitter source, uniform in `[0, 1)` (tests pin it). Default `Math.random`. */
  random?: RandomSource;
}

/** Per-call settings. */
export interface RequestOptions {
  /** Aborting it stops the call at once, sleeps included (a `UserAbortError`). */
  signal?: AbortSignal;
  /** The overall deadline of this call in ms, retries and waits included. */
  timeoutMs?: number;
  /** The `Idempotency-Key` of a POST (1–255 printable ASCII); default: one made for the call. */
  idempotencyKey?: string;
  /** Extra headers of this call. */
  headers?: Readonly<Record<string, string>>;
  /** Retry options of this call only, over the client's. */
  retry?: RetryOptions;
}

/** What {@link BaseClient.request} takes. */
export interface RequestSpec {
  method: "GET" | "POST" | "PATCH" | "DELETE";
  path: string;
  query?: Readonly<Record<string, string | number | undefined>>;
  body?: unknown;
  /** An absolute URL to call instead of `baseURL + path` (signed image links), without the credential. */
  absoluteURL?: string;
}

/** Internal per-call state: a deadline computed once for calls made of several requests. */
export interface CallOptions extends RequestOptions {
  deadlineAt?: number;
}

function readEnv(name: string): string | undefined {
  const env = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process?.env;
  const value = env?.[name];
  return value === undefined || value === "" ? undefined : value;
}

/** An `Idempotency-Key` must be 1–255 printable ASCII characters (the contract). */
export function validateIdempotencyKey(key: string): string {
  if (key.length >= 1 && key.length <= 255 && /^[\x20-\x7e]+$/.test(key) && key.trim() === key) return key;
  throw new ConfigError("an Idempotency-Key must be 1 to 255 printable ASCII characters, without leading or trailing spaces");
}

/** A path segment, percent-encoded so that an id cannot change the route. */
export function segment(value: string | number, what: string): string {
  const text = String(value);
  if (text.length === 0) throw new ConfigError(`the ${what} must not be empty`);
  if (text === "." || text === "..") return text.replace(/\./g, "%2E");
  return encodeURIComponent(text);
}

interface Parsed {
  base: string;
  host: string;
}

function parseBaseURL(raw: string): Parsed {
  let url: URL;
  try {
    url = new URL(raw.trim());
  } catch {
    throw new ConfigError(`invalid base URL ${JSON.stringify(raw)}`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new ConfigError(`the base URL must be http:// or https://, not ${JSON.stringify(raw)}`);
  }
  if (url.search !== "" || url.hash !== "" || raw.includes("?") || raw.includes("#")) {
    throw new ConfigError("the base URL must not have a query or a fragment");
  }
  if (url.username !== "" || url.password !== "") {
    throw new ConfigError("the base URL must not carry credentials; pass the key as an option");
  }
  return { base: url.href.replace(/\/+$/, ""), host: hostKey(url) };
}

/** `host:port` of a URL: the key of the host pause. */
function hostKey(url: URL): string {
  const port = url.port !== "" ? url.port : url.protocol === "https:" ? "443" : "80";
  return `${url.hostname}:${port}`;
}

const INSPECT = Symbol.for("nodejs.util.inspect.custom");

/** The plumbing shared by {@link TollgateClient} and {@link TollgateAdmin}. */
export abstract class BaseClient {
  /** The base URL, without a trailing slash. */
  readonly baseURL: string;
  /** The retry loop, with its policy, budget and host pause. */
  readonly retrier: Retrier;
  readonly #host: string;
  readonly #credential: string | undefined;
  readonly #fetch: FetchLike;
  readonly #headers: Readonly<Record<string, string>>;
  readonly #timeoutMs: number | undefined;
  readonly #makeKey: () => string | Promise<string>;

  protected constructor(credential: string | undefined, options: CommonOptions) {
    const { base, host } = parseBaseURL(options.baseURL ?? readEnv("TOLLGATE_BASE_URL") ?? DEFAULT_BASE_URL);
    this.baseURL = base;
    this.#host = host;
    if (credential !== undefined && !/^[\x21-\x7e]+$/.test(credential)) {
      throw new ConfigError("the API key or admin token contains characters a header cannot carry");
    }
    this.#credential = credential;
    const clock = options.clock ?? systemClock;
    let policy = options.retry instanceof RetryPolicy ? options.retry : new RetryPolicy(options.retry ?? {});
    if (options.maxRetries !== undefined) policy = policy.with({ maxRetries: options.maxRetries });
    const budget =
      options.budget === false ? null : options.budget instanceof RetryBudget ? options.budget : new RetryBudget(options.budget ?? {}, clock);
    this.retrier = new Retrier({
      policy,
      budget,
      pause: options.hostPause ?? new HostPause(clock),
      attemptTimeoutMs: options.attemptTimeoutMs === undefined ? 30_000 : options.attemptTimeoutMs,
      clock,
      ...(options.random !== undefined ? { random: options.random } : {}),
      ...(options.logger !== undefined ? { logger: options.logger } : {}),
      redact: (text) => this.#redact(text),
    });
    const f = options.fetch ?? (globalThis as { fetch?: FetchLike }).fetch;
    if (f === undefined) throw new ConfigError("no fetch on this platform: pass one as the `fetch` option");
    // A bare `fetch` must be called on the global object in some browsers.
    this.#fetch = options.fetch ?? ((input, init) => (f as FetchLike).call(globalThis, input, init));
    for (const name of Object.keys(options.headers ?? {})) {
      if (name.toLowerCase() === "authorization") throw new ConfigError("set the credential with its option, not as a header");
    }
    this.#headers = Object.freeze({ ...(options.headers ?? {}) });
    this.#timeoutMs = options.timeoutMs;
    this.#makeKey = options.idempotencyKey ?? randomUUID;
  }

  /** The text with every occurrence of the credential replaced. */
  #redact(text: string): string {
    const c = this.#credential;
    return c === undefined || c.length === 0 ? text : text.split(c).join("[redacted]");
  }

  /** The instant a call that starts now must end by, if any (epoch ms on the retry clock). */
  protected deadlineFor(options: CallOptions): number | undefined {
    if (options.deadlineAt !== undefined) return options.deadlineAt;
    const ms = options.timeoutMs ?? this.#timeoutMs;
    return ms === undefined ? undefined : this.retrier.clock.now() + ms;
  }

  /** Sends one call through the retry loop; every POST carries an `Idempotency-Key`, the same on every attempt. */
  protected async request(spec: RequestSpec, options: CallOptions = {}): Promise<RawResponse> {
    let key: string | undefined;
    if (options.idempotencyKey !== undefined) key = validateIdempotencyKey(options.idempotencyKey);
    else if (spec.method === "POST") key = validateIdempotencyKey(await this.#makeKey());
    let url: string;
    let host = this.#host;
    if (spec.absoluteURL !== undefined) {
      const parsed = new URL(spec.absoluteURL, this.baseURL + "/");
      url = parsed.href;
      host = hostKey(parsed);
    } else {
      url = this.baseURL + spec.path;
      const query = new URLSearchParams();
      for (const [name, value] of Object.entries(spec.query ?? {})) {
        if (value !== undefined) query.set(name, String(value));
      }
      const qs = query.toString();
      if (qs !== "") url += `?${qs}`;
    }
    const headers: Record<string, string> = { accept: "application/json, image/png;q=0.9, */*;q=0.1" };
    for (const [name, value] of Object.entries({ ...this.#headers, ...(options.headers ?? {}) })) {
      if (name.toLowerCase() === "authorization") throw new ConfigError("set the credential with its option, not as a header");
      headers[name.toLowerCase()] = value;
    }
    if (this.#credential !== undefined && spec.absoluteURL === undefined) headers.authorization = `Bearer ${this.#credential}`;
    if (key !== undefined) headers["idempotency-key"] = key;
    let body: string | undefined;
    if (spec.body !== undefined) {
      body = JSON.stringify(spec.body);
      headers["content-type"] = "application/json";
    }
    const deadlineAt = this.deadlineFor(options);
    const policy = options.retry !== undefined ? this.retrier.policy.with(options.retry) : undefined;
    return this.retrier.run(
      {
        host,
        label: `${spec.method} ${spec.absoluteURL !== undefined ? "(signed link)" : spec.path}`,
        ...(deadlineAt !== undefined ? { deadlineAt } : {}),
        ...(options.signal !== undefined ? { signal: options.signal } : {}),
        ...(policy !== undefined ? { policy } : {}),
      },
      // A fresh headers object per attempt: a fetch that changes one cannot change the retries.
      (_n, signal) => this.#fetch(url, { method: spec.method, headers: { ...headers }, ...(body !== undefined ? { body } : {}), signal, redirect: "follow" }),
    );
  }

  /** {@link BaseClient.request}, decoding the 2xx body as JSON. */
  protected async json<T>(spec: RequestSpec, options: CallOptions = {}): Promise<T> {
    const response = await this.request(spec, options);
    return decodeJSON<T>(response);
  }

  /** The client without its credential, for `console.log` and `util.inspect`. */
  [INSPECT](): string {
    return `${this.constructor.name} { baseURL: ${JSON.stringify(this.baseURL)}, credential: ${this.#credential === undefined ? "none" : "[redacted]"} }`;
  }

  toJSON(): Record<string, unknown> {
    return { baseURL: this.baseURL, credential: this.#credential === undefined ? null : "[redacted]" };
  }

  toString(): string {
    return this[INSPECT]();
  }
}

/** Decodes a 2xx body as JSON; a body that is not JSON is a {@link DecodeError} with the call's history. */
export function decodeJSON<T>(response: RawResponse): T {
  const text = new TextDecoder().decode(response.body);
  try {
    return JSON.parse(text) as T;
  } catch {
    const requestId = response.headers.get("x-request-id") ?? undefined;
    throw new DecodeError({
      message: "the body is not JSON",
      status: response.status,
      ...(requestId !== undefined ? { requestId } : {}),
      history: response.history,
    });
  }
}

export { readEnv };

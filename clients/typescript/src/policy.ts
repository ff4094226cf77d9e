/**
 * The client's retry strategy of `CONTRACT.md` (from the seed), as plain data and arithmetic.
 *
 * {@link RetryPolicy.decide} classifies the outcome of one attempt and computes the wait before
 * the next. It does no I/O and reads no clock; the jitter is passed in, so tests can pin it.
 * Defaults are the seed's numbers: 5 retries, `min(1000·2^k, 30000)` ms plus a uniform jitter
 * in `[0, 1000)` ms, `Retry-After` as a floor, and a 60 s ceiling on how long a `Retry-After`
 * may ask us to sleep before the error is handed back instead. It mirrors
 * `tollgate_contract::retry`.
 *
 * @module
 */

import { isRetryableStatus } from "./errors.js";

/** The knobs of the retry strategy; every one has the seed's default. */
export interface RetryOptions {
  /** Retries after the first attempt (so at most `maxRetries + 1` requests). Default 5; 0 disables retries. */
  maxRetries?: number;
  /** Backoff of retry 0 in ms; retry `k` waits `baseDelayMs · 2^k`, capped. Default 1000. */
  baseDelayMs?: number;
  /** Upper bound of the exponential part in ms. Default 30000. */
  maxBackoffMs?: number;
  /** Jitter is uniform in `[0, maxJitterMs)`. Default 1000. */
  maxJitterMs?: number;
  /** A `Retry-After` above this (ms) is not slept on: the error is returned at once. Default 60000. */
  maxRetryAfterMs?: number;
  /** Obey the server's `x-should-retry: true|false` (after the overrides below). Default true. */
  respectShouldRetry?: boolean;
  /** Per-code overrides of retryability (`error.code` → retry or not), consulted first. */
  codeOverrides?: Readonly<Record<string, boolean>>;
  /** Per-type overrides (`error.type`), consulted when no code override applies. */
  typeOverrides?: Readonly<Record<string, boolean>>;
  /** Per-status overrides, consulted when neither the code nor the type has one. */
  statusOverrides?: Readonly<Record<number, boolean>>;
  /** Whether transport failures (refused, reset, timeout) are retried. Default true. */
  retryTransportFailures?: boolean;
}

/** What one attempt came to, as far as the retry decision is concerned. */
export type Outcome =
  | {
      readonly kind: "response";
      readonly status: number;
      /** The envelope's `error.type`, when the body had one. */
      readonly type?: string;
      /** The envelope's `error.code`, when the body had one. */
      readonly code?: string;
      /** The parsed `retry-after-ms` / `Retry-After`, in ms. */
      readonly retryAfterMs?: number;
      /** The server's `x-should-retry`, when it sent one. */
      readonly shouldRetry?: boolean;
    }
  /** No response: connection refused or reset, or a timeout. */
  | { readonly kind: "transport" };

/** What to do after an attempt. */
export type Decision =
  | {
      readonly action: "retry";
      /** The whole wait, jitter included. */
      readonly delayMs: number;
      readonly source: { readonly kind: "retry_after"; readonly retryAfterMs: number } | { readonly kind: "backoff"; readonly backoffMs: number };
    }
  | { readonly action: "give_up"; readonly reason: "not_retryable" | "retries_exhausted" }
  | { readonly action: "give_up"; readonly reason: "retry_after_too_long"; readonly waitMs: number };

function nonNegative(value: number | undefined, fallback: number): number {
  return typeof value === "number" && Number.isFinite(value) && value >= 0 ? value : fallback;
}

/** The retry strategy; `new RetryPolicy()` is the seed's. Immutable. */
export class RetryPolicy {
  readonly maxRetries: number;
  readonly baseDelayMs: number;
  readonly maxBackoffMs: number;
  readonly maxJitterMs: number;
  readonly maxRetryAfterMs: number;
  readonly respectShouldRetry: boolean;
  readonly retryTransportFailures: boolean;
  readonly codeOverrides: Readonly<Record<string, boolean>>;
  readonly typeOverrides: Readonly<Record<string, boolean>>;
  readonly statusOverrides: Readonly<Record<number, boolean>>;

  constructor(options: RetryOptions = {}) {
    this.maxRetries = Math.floor(nonNegative(options.maxRetries, 5));
    this.baseDelayMs = nonNegative(options.baseDelayMs, 1000);
    this.maxBackoffMs = nonNegative(options.maxBackoffMs, 30_000);
    this.maxJitterMs = nonNegative(options.maxJitterMs, 1000);
    this.maxRetryAfterMs = nonNegative(options.maxRetryAfterMs, 60_000);
    this.respectShouldRetry = options.respectShouldRetry ?? true;
    this.retryTransportFailures = options.retryTransportFailures ?? true;
    this.codeOverrides = Object.freeze({ ...(options.codeOverrides ?? {}) });
    this.typeOverrides = Object.freeze({ ...(options.typeOverrides ?? {}) });
    this.statusOverrides = Object.freeze({ ...(options.statusOverrides ?? {}) });
    Object.freeze(this);
  }

  /** The same policy with some options changed. */
  with(options: RetryOptions): RetryPolicy {
    return new RetryPolicy({ ...this.options(), ...options });
  }

  /** The options this policy was made of. */
  options(): Required<RetryOptions> {
    return {
      maxRetries: this.maxRetries,
      baseDelayMs: this.baseDelayMs,
      maxBackoffMs: this.maxBackoffMs,
      maxJitterMs: this.maxJitterMs,
      maxRetryAfterMs: this.maxRetryAfterMs,
      respectShouldRetry: this.respectShouldRetry,
      retryTransportFailures: this.retryTransportFailures,
      codeOverrides: this.codeOverrides,
      typeOverrides: this.typeOverrides,
      statusOverrides: this.statusOverrides,
    };
  }

  /**
   * Whether an error response may be retried: the most specific of the caller's overrides wins
   * (code, then type, then status), then the server's `x-should-retry`, then the contract's rule.
   */
  classify(status: number, type?: string, code?: string, shouldRetry?: boolean): boolean {
    const own = (table: Readonly<Record<string | number, boolean>>, key: string | number | undefined): boolean | undefined =>
      key !== undefined && Object.prototype.hasOwnProperty.call(table, key) ? table[key] : undefined;
    const override = own(this.codeOverrides, code) ?? own(this.typeOverrides, type) ?? own(this.statusOverrides, status);
    if (override !== undefined) return override;
    if (this.respectShouldRetry && shouldRetry !== undefined) return shouldRetry;
    return isRetryableStatus(status, code);
  }

  /** Whether the outcome may be retried at all, whatever the attempt count. */
  isRetryable(outcome: Outcome): boolean {
    if (outcome.kind === "transport") return this.retryTransportFailures;
    return this.classify(outcome.status, outcome.type, outcome.code, outcome.shouldRetry);
  }

  /** The capped exponential part of retry `k`'s wait: `min(baseDelayMs · 2^k, maxBackoffMs)`. */
  backoff(k: number): number {
    return Math.min(this.baseDelayMs * 2 ** Math.max(0, k), this.maxBackoffMs);
  }

  /** A uniform jitter in `[0, maxJitterMs)` from a number in `[0, 1)`. */
  jitterFromUnit(unit: number): number {
    const u = Number.isFinite(unit) ? Math.min(Math.max(unit, 0), 1) : 0;
    const jitter = this.maxJitterMs * u;
    // `unit` < 1 keeps us below the maximum; a caller's 1.0 must not reach it either.
    return jitter >= this.maxJitterMs && this.maxJitterMs > 0 ? Math.max(0, this.maxJitterMs - 1e-6) : jitter;
  }

  /**
   * What follows attempt number `k` (0 for the first request) that came to `outcome`;
   * `jitterMs` comes from {@link RetryPolicy.jitterFromUnit}.
   */
  decide(k: number, outcome: Outcome, jitterMs: number): Decision {
    if (!this.isRetryable(outcome)) return { action: "give_up", reason: "not_retryable" };
    if (k >= this.maxRetries) return { action: "give_up", reason: "retries_exhausted" };
    if (outcome.kind === "response" && outcome.retryAfterMs !== undefined) {
      const wait = outcome.retryAfterMs;
      if (wait > this.maxRetryAfterMs) return { action: "give_up", reason: "retry_after_too_long", waitMs: wait };
      return { action: "retry", delayMs: wait + jitterMs, source: { kind: "retry_after", retryAfterMs: wait } };
    }
    const backoff = this.backoff(k);
    return { action: "retry", delayMs: backoff + jitterMs, source: { kind: "backoff", backoffMs: backoff } };
  }
}

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const IMF_FIXDATE = /^[A-Za-z]{3}, (\d{2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT$/;
const RFC850 = /^[A-Za-z]{6,9}, (\d{2})-([A-Za-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) GMT$/;
const ASCTIME = /^[A-Za-z]{3} ([A-Za-z]{3}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})$/;

/** An HTTP-date (RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms) in epoch ms. */
export function parseHttpDate(value: string): number | undefined {
  const text = value.trim();
  let day: number, month: number, year: number, h: number, m: number, s: number;
  let match = IMF_FIXDATE.exec(text);
  if (match) {
    [day, month, year] = [Number(match[1]), MONTHS.indexOf(match[2] ?? ""), Number(match[3])];
    [h, m, s] = [Number(match[4]), Number(match[5]), Number(match[6])];
  } else if ((match = RFC850.exec(text))) {
    const yy = Number(match[3]);
    [day, month, year] = [Number(match[1]), MONTHS.indexOf(match[2] ?? ""), yy < 70 ? 2000 + yy : 1900 + yy];
    [h, m, s] = [Number(match[4]), Number(match[5]), Number(match[6])];
  } else if ((match = ASCTIME.exec(text))) {
    [month, day, year] = [MONTHS.indexOf(match[1] ?? ""), Number((match[2] ?? "").trim()), Number(match[6])];
    [h, m, s] = [Number(match[3]), Number(match[4]), Number(match[5])];
  } else {
    return undefined;
  }
  if (month < 0 || day < 1 || day > 31 || h > 23 || m > 59 || s > 60) return undefined;
  return Date.UTC(year, month, day, h, m, Math.min(s, 59));
}

/**
 * Parses a `Retry-After` value (delay-seconds or HTTP-date) relative to `nowMs`, in ms; a date
 * in the past is a zero wait. `undefined` for a value that is neither form.
 */
export function parseRetryAfter(value: string | null | undefined, nowMs: number): number | undefined {
  if (value === null || value === undefined) return undefined;
  const text = value.trim();
  if (/^\d+$/.test(text)) {
    const secs = Number(text);
    return Number.isSafeInteger(secs) ? secs * 1000 : undefined;
  }
  const at = parseHttpDate(text);
  return at === undefined ? undefined : Math.max(0, at - nowMs);
}

/** Parses `retry-after-ms` (a non-negative number of milliseconds, fractions allowed). */
export function parseRetryAfterMs(value: string | null | undefined): number | undefined {
  if (value === null || value === undefined) return undefined;
  const text = value.trim();
  if (!/^\d+(\.\d+)?$/.test(text)) return undefined;
  const ms = Number(text);
  return Number.isFinite(ms) ? ms : undefined;
}

/** A minimal view of response headers (the platform's `Headers` fits). */
export interface HeaderGetter {
  get(name: string): string | null;
}

/**
 * The wait a response asks for, in ms: `retry-after-ms` when present and valid (it is exact and
 * never shorter than the true wait), else `Retry-After` in either form; `undefined` without one.
 */
export function retryAfterFromHeaders(headers: HeaderGetter, nowMs: number): number | undefined {
  return parseRetryAfterMs(headers.get("retry-after-ms")) ?? parseRetryAfter(headers.get("retry-after"), nowMs);
}

/** The server's `x-should-retry`: `true`, `false`, or `undefined` when absent or unreadable. */
export function shouldRetryFromHeaders(headers: HeaderGetter): boolean | undefined {
  const v = headers.get("x-should-retry")?.trim().toLowerCase();
  return v === "true" ? true : v === "false" ? false : undefined;
}

/**
 * The retry loop: the contract's policy applied to real attempts, with a budget, a host pause,
 * a deadline, the caller's `AbortSignal` and an attempt history. Mirrors
 * `tollgate_client::retry`.
 *
 * {@link RetryPolicy} is pure arithmetic; {@link Retrier} is the loop around it, and the only
 * place in the SDK that sleeps:
 *
 * 1. before every attempt, the first included, it waits out a pause of the host set by another
 *    request's 429 with `Retry-After` ({@link HostPause}), plus its own jitter;
 * 2. it sends the attempt under the per-attempt timeout, the call's deadline and the caller's
 *    signal, and reads the whole body inside them (a body cut off is a transport failure);
 * 3. a 2xx is returned; anything else is read (status, envelope `type`/`code`, `retry-after-ms`
 *    or `Retry-After`, `x-should-retry`, request id), recorded in the history, and handed to the
 *    policy;
 * 4. a retry happens only if its wait fits in the call's deadline and the client's
 *    {@link RetryBudget} has a token; each retry is a log event (never a header, never the key).
 *
 * The loop knows nothing of routes: an attempt is any function that returns a `Response`, so a
 * test can script one.
 *
 * @module
 */

import { RetryBudget } from "./budget.js";
import { systemClock, type Clock, type RandomSource } from "./clock.js";
import {
  apiErrorFor,
  ConnectionError,
  ConnectionTimeoutError,
  DecodeError,
  PausedError,
  UserAbortError,
  type APIErrorInit,
  type AttemptRecord,
  type Delay,
  type StopReason,
  type TollgateError,
  type TransportKind,
} from "./errors.js";
import { HostPause } from "./pause.js";
import { RetryPolicy, retryAfterFromHeaders, shouldRetryFromHeaders, type Outcome } from "./policy.js";

/** A complete HTTP response, as the loop hands it back. */
export interface RawResponse {
  readonly status: number;
  readonly headers: Headers;
  readonly body: Uint8Array;
  /** Every request of the call; the 2xx is the last entry. */
  readonly history: readonly AttemptRecord[];
}

/** Where the SDK reports what it does (each retry, a budget refusal). Never given a credential. */
export interface Logger {
  debug?(message: string, fields?: Record<string, unknown>): void;
  info?(message: string, fields?: Record<string, unknown>): void;
  warn?(message: string, fields?: Record<string, unknown>): void;
}

/** What the loop needs to know about a call besides its attempts. */
export interface CallInfo {
  /** The host the call goes to (`host:port`): the key of the host pause. */
  readonly host: string;
  /** For the log events, e.g. `"POST /v1/images/generations"`. Never a credential. */
  readonly label: string;
  /** The instant (epoch ms, on the loop's clock) after which the call must have returned. */
  readonly deadlineAt?: number;
  /** The caller's signal: aborting it stops the call at once, sleeps included. */
  readonly signal?: AbortSignal;
  /** A policy for this call only (the client's otherwise). */
  readonly policy?: RetryPolicy;
}

/** Sends attempt `number` (1 for the first); must send the same request every time. */
export type SendAttempt = (number: number, signal: AbortSignal) => Promise<Response>;

/** Configuration of a {@link Retrier}. */
export interface RetrierOptions {
  policy?: RetryPolicy;
  /** `null` retries without a budget. Default: a fresh `RetryBudget` with the default numbers. */
  budget?: RetryBudget | null;
  pause?: HostPause;
  /** The longest one attempt may take before it counts as a (retryable) timeout; default 30000; `null` for none. */
  attemptTimeoutMs?: number | null;
  clock?: Clock;
  random?: RandomSource;
  logger?: Logger;
  /** Removes secrets from a transport failure's text before it is kept anywhere. */
  redact?: (text: string) => string;
}

/** The failure of an attempt, before it becomes an error. */
type Failure =
  | { readonly kind: "api"; readonly init: APIErrorInit }
  | { readonly kind: "decode"; readonly status: number; readonly requestId?: string; readonly message: string }
  | { readonly kind: "transport"; readonly transport: TransportKind; readonly message: string };

/** Fixed facts of the error to build when the call stops. */
interface StopFacts {
  readonly retryable: boolean;
  readonly stopReason: StopReason;
  readonly history: readonly AttemptRecord[];
  readonly retryAt?: Date;
  readonly waitMs?: number;
}

/** The response headers an {@link APIError} keeps for the caller (never `set-cookie`). */
const KEPT_HEADERS = [
  "retry-after",
  "retry-after-ms",
  "x-should-retry",
  "x-request-id",
  "ratelimit",
  "ratelimit-policy",
  "www-authenticate",
  "allow",
  "idempotent-replayed",
];

function toError(failure: Failure, facts: StopFacts): TollgateError {
  switch (failure.kind) {
    case "api":
      return apiErrorFor({ ...failure.init, ...facts });
    case "decode":
      return new DecodeError({
        message: failure.message,
        status: failure.status,
        ...(failure.requestId !== undefined ? { requestId: failure.requestId } : {}),
        ...facts,
      });
    case "transport": {
      const init = { message: failure.message, kind: failure.transport, ...facts };
      return failure.transport === "timeout" ? new ConnectionTimeoutError(init) : new ConnectionError(init);
    }
  }
}

/** A marker reason for the aborts the loop makes itself (attempt timeout, deadline). */
class AttemptTimeout extends Error {
  constructor(readonly byDeadline: boolean) {
    super("attempt timed out");
  }
}

/** The retry loop with its shared state: policy, budget, host pause. */
export class Retrier {
  readonly policy: RetryPolicy;
  readonly budget: RetryBudget | null;
  readonly pause: HostPause;
  readonly attemptTimeoutMs: number | null;
  readonly clock: Clock;
  readonly #random: RandomSource;
  readonly #logger: Logger | undefined;
  readonly #redact: (text: string) => string;

  constructor(options: RetrierOptions = {}) {
    this.clock = options.clock ?? systemClock;
    this.policy = options.policy ?? new RetryPolicy();
    this.budget = options.budget === undefined ? new RetryBudget({}, this.clock) : options.budget;
    this.pause = options.pause ?? new HostPause(this.clock);
    this.attemptTimeoutMs = options.attemptTimeoutMs === undefined ? 30_000 : options.attemptTimeoutMs;
    this.#random = options.random ?? Math.random;
    this.#logger = options.logger;
    this.#redact = options.redact ?? ((t) => t);
  }

  #jitter(policy: RetryPolicy): number {
    return policy.jitterFromUnit(this.#random());
  }

  /**
   * Runs a call: returns the first 2xx response (its body read), or throws the error of the
   * last attempt with the whole history.
   */
  async run(call: CallInfo, send: SendAttempt): Promise<RawResponse> {
    const { clock } = this;
    const policy = call.policy ?? this.policy;
    this.budget?.deposit();
    const history: AttemptRecord[] = [];
    let last: { failure: Failure; retryable: boolean } | undefined;
    let nextWait: Delay | undefined;
    const aborted = (): UserAbortError => new UserAbortError({ history: [...history], retryable: last?.retryable ?? false });
    if (call.signal?.aborted) throw aborted();

    for (let k = 0; ; k++) {
      const number = k + 1;
      let waited = nextWait;
      nextWait = undefined;
      try {
        if (waited !== undefined) await clock.sleep(waited.ms, call.signal);
        // Another request may have paused the host while we slept: wait that out too.
        for (let until = this.pause.pausedUntil(call.host); until !== undefined; until = this.pause.pausedUntil(call.host)) {
          const now = clock.now();
          const remaining = until - now;
          const wake = until + this.#jitter(policy);
          const wait = wake - now;
          let stop: StopReason | undefined;
          if (remaining > policy.maxRetryAfterMs) stop = "retry_after_too_long";
          else if (call.deadlineAt !== undefined && wake > call.deadlineAt) stop = "deadline";
          if (stop !== undefined) {
            const facts: StopFacts = {
              retryable: last?.retryable ?? true,
              stopReason: stop,
              history: [...history],
              retryAt: new Date(now + wait),
              ...(stop === "retry_after_too_long" ? { waitMs: remaining } : {}),
            };
            throw last !== undefined ? toError(last.failure, facts) : new PausedError(facts);
          }
          waited = { ms: (waited?.ms ?? 0) + wait, source: { kind: "host_pause" } };
          await clock.sleep(wait, call.signal);
        }
      } catch (e) {
        if (call.signal?.aborted) throw aborted();
        throw e;
      }

      const result = await this.#attempt(call, number, send);
      if (result.kind === "aborted") throw aborted();
      let failure: Failure;
      let outcome: Outcome;
      let record: AttemptRecord;
      let retryAfterMs: number | undefined;
      if (result.kind === "response") {
        const { status, headers, body } = result;
        const requestId = headers.get("x-request-id") ?? undefined;
        if (status >= 200 && status < 300) {
          history.push({ number, ...(waited ? { waited } : {}), status, ...(requestId !== undefined ? { requestId } : {}) });
          return { status, headers, body, history };
        }
        retryAfterMs = retryAfterFromHeaders(headers, clock.now());
        const shouldRetry = shouldRetryFromHeaders(headers);
        const envelope = readEnvelope(body);
        if (envelope !== undefined) {
          const kept: Record<string, string> = {};
          for (const name of KEPT_HEADERS) {
            const v = headers.get(name);
            if (v !== null) kept[name] = v;
          }
          const id = envelope.request_id ?? requestId;
          failure = {
            kind: "api",
            init: {
              message: envelope.message,
              status,
              type: envelope.type,
              code: envelope.code,
              ...(envelope.param !== undefined ? { param: envelope.param } : {}),
              ...(id !== undefined ? { requestId: id } : {}),
              ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
              headers: kept,
            },
          };
          outcome = {
            kind: "response",
            status,
            type: envelope.type,
            code: envelope.code,
            ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
            ...(shouldRetry !== undefined ? { shouldRetry } : {}),
          };
          record = { number, ...(waited ? { waited } : {}), status, code: envelope.code, ...(id !== undefined ? { requestId: id } : {}) };
        } else {
          failure = {
            kind: "decode",
            status,
            ...(requestId !== undefined ? { requestId } : {}),
            message: `HTTP ${status} without the error envelope`,
          };
          outcome = {
            kind: "response",
            status,
            ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
            ...(shouldRetry !== undefined ? { shouldRetry } : {}),
          };
          record = { number, ...(waited ? { waited } : {}), status, ...(requestId !== undefined ? { requestId } : {}) };
        }
      } else {
        failure = { kind: "transport", transport: result.transport, message: result.message };
        outcome = { kind: "transport" };
        record = { number, ...(waited ? { waited } : {}), cause: result.message };
      }

      const retryable = policy.isRetryable(outcome);
      const decision = policy.decide(k, outcome, this.#jitter(policy));
      const attemptNow = clock.now();
      if (record.status === 429 && retryAfterMs !== undefined) {
        // The limit is the account's: every request of this client would meet it.
        this.pause.pause(call.host, attemptNow + retryAfterMs);
      }
      history.push(record);
      const stop = (stopReason: StopReason, extra: { retryAt?: Date; waitMs?: number } = {}): TollgateError =>
        toError(failure, { retryable, stopReason, history: [...history], ...extra });

      if (result.kind === "transport" && result.byDeadline) throw stop("deadline");
      if (decision.action === "give_up") {
        if (decision.reason === "retry_after_too_long") {
          throw stop("retry_after_too_long", { retryAt: new Date(attemptNow + decision.waitMs), waitMs: decision.waitMs });
        }
        throw stop(decision.reason);
      }
      if (call.deadlineAt !== undefined && attemptNow + decision.delayMs > call.deadlineAt) {
        throw stop("deadline", { retryAt: new Date(attemptNow + decision.delayMs) });
      }
      const fields = {
        call: call.label,
        attempt: number,
        status: record.status,
        code: record.code,
        cause: record.cause,
      };
      if (this.budget !== null && !this.budget.tryWithdraw()) {
        this.#logger?.info?.("retry budget exhausted; not retrying", fields);
        throw stop("budget_exhausted");
      }
      const source =
        decision.source.kind === "retry_after"
          ? ({ kind: "retry_after", retryAfterMs: decision.source.retryAfterMs } as const)
          : ({ kind: "backoff", backoffMs: decision.source.backoffMs } as const);
      this.#logger?.info?.("retrying", { ...fields, delayMs: Math.round(decision.delayMs), source: source.kind });
      last = { failure, retryable };
      nextWait = { ms: decision.delayMs, source };
    }
  }

  /** Sends one attempt and reads its body, under the attempt timeout, the deadline and the signal. */
  async #attempt(
    call: CallInfo,
    number: number,
    send: SendAttempt,
  ): Promise<
    | { kind: "response"; status: number; headers: Headers; body: Uint8Array }
    | { kind: "transport"; transport: TransportKind; message: string; byDeadline: boolean }
    | { kind: "aborted" }
  > {
    const { clock } = this;
    const now = clock.now();
    const perAttempt = this.attemptTimeoutMs === null ? undefined : now + this.attemptTimeoutMs;
    const limit =
      perAttempt === undefined ? call.deadlineAt : call.deadlineAt === undefined ? perAttempt : Math.min(perAttempt, call.deadlineAt);
    const byDeadline = call.deadlineAt !== undefined && limit !== undefined && call.deadlineAt <= limit;
    const controller = new AbortController();
    const timer = new AbortController();
    const onAbort = (): void => controller.abort(call.signal?.reason);
    call.signal?.addEventListener("abort", onAbort, { once: true });
    if (limit !== undefined) {
      clock.sleep(Math.max(0, limit - now), timer.signal).then(
        () => controller.abort(new AttemptTimeout(byDeadline)),
        () => undefined,
      );
    }
    try {
      const response = await raceAbort(send(number, controller.signal), controller.signal);
      const body = new Uint8Array(await raceAbort(response.arrayBuffer(), controller.signal));
      return { kind: "response", status: response.status, headers: response.headers, body };
    } catch (e) {
      if (call.signal?.aborted) return { kind: "aborted" };
      const reason: unknown = controller.signal.aborted ? controller.signal.reason : undefined;
      if (reason instanceof AttemptTimeout) {
        const message = reason.byDeadline
          ? "the call's deadline passed while waiting for the response"
          : `no response within ${this.attemptTimeoutMs ?? 0} ms`;
        return { kind: "transport", transport: "timeout", message, byDeadline: reason.byDeadline };
      }
      const { transport, message } = describeTransportFailure(e);
      return { kind: "transport", transport, message: this.#redact(message), byDeadline: false };
    } finally {
      timer.abort();
      call.signal?.removeEventListener("abort", onAbort);
    }
  }
}

/** Rejects as soon as `signal` aborts, whether or not `promise` honours it. */
function raceAbort<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    promise.catch(() => undefined);
    return Promise.reject(signal.reason);
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (v) => {
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(e);
      },
    );
  });
}

const CONNECT_CODES = new Set(["ECONNREFUSED", "ENOTFOUND", "EHOSTUNREACH", "ENETUNREACH", "EAI_AGAIN", "UND_ERR_CONNECT_TIMEOUT", "ConnectionRefused"]);
const TIMEOUT_CODES = new Set(["ETIMEDOUT", "UND_ERR_HEADERS_TIMEOUT", "UND_ERR_BODY_TIMEOUT", "TimeoutError"]);

/** The kind and text of a `fetch` failure, from its cause chain (codes and messages, never a request). */
export function describeTransportFailure(error: unknown): { transport: TransportKind; message: string } {
  const parts: string[] = [];
  let transport: TransportKind = "other";
  let current: unknown = error;
  for (let depth = 0; depth < 5 && current !== undefined && current !== null; depth++) {
    if (typeof current === "object") {
      const { message, code, name } = current as { message?: unknown; code?: unknown; name?: unknown };
      const c = typeof code === "string" ? code : typeof name === "string" ? name : undefined;
      if (c !== undefined && transport === "other") {
        if (CONNECT_CODES.has(c)) transport = "connect";
        else if (TIMEOUT_CODES.has(c)) transport = "timeout";
      }
      if (typeof message === "string" && message.length > 0 && !parts.some((p) => p.includes(message))) parts.push(message);
      current = (current as { cause?: unknown }).cause;
    } else {
      parts.push(String(current));
      break;
    }
  }
  return { transport, message: parts.join(": ") || "request failed" };
}

interface Envelope {
  message: string;
  type: string;
  code: string;
  param?: string;
  request_id?: string;
}

/** The error envelope of a body, or `undefined` when the body is not one. */
function readEnvelope(body: Uint8Array): Envelope | undefined {
  let parsed: unknown;
  try {
    parsed = JSON.parse(new TextDecoder().decode(body));
  } catch {
    return undefined;
  }
  if (typeof parsed !== "object" || parsed === null) return undefined;
  const error = (parsed as { error?: unknown }).error;
  if (typeof error !== "object" || error === null) return undefined;
  const { message, type, code, param, request_id } = error as Record<string, unknown>;
  if (typeof message !== "string" || typeof type !== "string" || typeof code !== "string") return undefined;
  return {
    message,
    type,
    code,
    ...(typeof param === "string" ? { param } : {}),
    ...(typeof request_id === "string" ? { request_id } : {}),
  };
}

/**
 * The SDK's errors: the contract's code table, one class per kind of failure, and the attempt
 * history every failure of a call carries.
 *
 * Every error the SDK throws is a {@link TollgateError}. An error response of the server is an
 * {@link APIError} subclass chosen by its status and code ({@link RateLimitError},
 * {@link InsufficientCreditsError}, …) and keeps the server's envelope: `status`, `type`, `code`,
 * `message`, `param`, `requestId`. No response at all is a {@link ConnectionError}; a response this
 * client cannot read is a {@link DecodeError}. Each says how many requests were made
 * (`attempts`), what each one got (`history`), why the SDK stopped (`stopReason`) and, when it
 * gave up because a wait was too long, when to come back (`retryAt`).
 *
 * No error holds a request header, so the API key can never reach a message, a property, a
 * `JSON.stringify` or an `inspect` of one.
 *
 * @module
 */

/** The `type` of an error: its broad class. */
export type ErrorType =
  | "invalid_request_error"
  | "authentication_error"
  | "billing_error"
  | "not_found_error"
  | "conflict_error"
  | "gone_error"
  | "rate_limit_error"
  | "server_error";

/** One row of the contract's error table. */
export interface ErrorCodeInfo {
  readonly status: number;
  readonly type: ErrorType;
  readonly retryable: boolean;
  /** What a caller should do about it (the seed's "How to Fix" column). */
  readonly hint: string;
}

const BODY = "Check the request body format and required fields.";
const AUTH = "Check that your API key (or admin token) is valid and included in the Authorization header.";
const NOT_FOUND = "Check the endpoint URL and any resource IDs.";
const CONFLICT = "The resource's current state does not allow this; check it before trying again.";
const SLOW_DOWN = "Slow down requests and implement backoff; wait for the Retry-After duration.";
const SERVER = "Retry after a moment; contact the operator with the request id if the issue persists.";

function row(status: number, type: ErrorType, retryable: boolean, hint: string): ErrorCodeInfo {
  return Object.freeze({ status, type, retryable, hint });
}

/**
 * Every `code` the server sends, with its status, type and retryability: the table of
 * `tollgate_contract::ErrorCode`, the single source the server builds its errors from.
 */
export const ERROR_CODES = Object.freeze({
  invalid_json: row(400, "invalid_request_error", false, BODY),
  missing_field: row(400, "invalid_request_error", false, BODY),
  invalid_value: row(400, "invalid_request_error", false, BODY),
  unknown_field: row(400, "invalid_request_error", false, BODY),
  idempotency_key_reused: row(400, "invalid_request_error", false, "Use a new Idempotency-Key for a request that differs from the first one."),
  invalid_signature: row(400, "invalid_request_error", false, "Sign the event with the endpoint's webhook secret and send it within 5 minutes."),
  missing_api_key: row(401, "authentication_error", false, AUTH),
  invalid_api_key: row(401, "authentication_error", false, AUTH),
  insufficient_credits: row(402, "billing_error", false, "Add credits, then retry."),
  key_spend_limit_reached: row(402, "billing_error", false, "Wait for the key's spend period to reset, or ask the operator to raise its limit."),
  csrf_token_invalid: row(403, "invalid_request_error", false, "Check that the credential is allowed to do this."),
  unknown_endpoint: row(404, "not_found_error", false, NOT_FOUND),
  resource_not_found: row(404, "not_found_error", false, NOT_FOUND),
  billing_not_configured: row(404, "not_found_error", false, "Ask the operator for credits; this server takes no payments."),
  voucher_not_found: row(404, "not_found_error", false, NOT_FOUND),
  method_not_allowed: row(405, "invalid_request_error", false, "Use a method the route allows (see the Allow header)."),
  idempotency_key_in_use: row(409, "conflict_error", true, "A request with the same Idempotency-Key is still running; retry once it has finished."),
  task_not_cancelable: row(409, "conflict_error", false, CONFLICT),
  voucher_already_redeemed: row(409, "conflict_error", false, CONFLICT),
  balance_out_of_range: row(409, "conflict_error", false, "Check the account's balance and send an amount it can take."),
  resource_expired: row(410, "gone_error", false, "The resource has expired (older than the server's retention) and is permanently gone."),
  url_expired: row(410, "gone_error", false, "The link has expired; get the task again for a fresh link."),
  voucher_expired: row(410, "gone_error", false, "The resource is permanently gone."),
  request_timeout: row(408, "invalid_request_error", false, "The request body arrived too slowly and nothing was done; send the request again."),
  body_too_large: row(413, "invalid_request_error", false, "Send a request body under 1 MiB."),
  unsupported_media_type: row(415, "invalid_request_error", false, "Send the body as JSON, with `Content-Type: application/json`."),
  generation_rejected: row(400, "invalid_request_error", false, "Change the prompt or the model; the credits were refunded."),
  rate_limit_exceeded: row(429, "rate_limit_error", true, SLOW_DOWN),
  internal_error: row(500, "server_error", true, SERVER),
  generation_failed: row(502, "server_error", true, SERVER),
  service_unavailable: row(503, "server_error", true, SERVER),
  timeout: row(504, "server_error", false, "The task goes on: fetch it by the id in the message rather than retrying."),
} satisfies Record<string, ErrorCodeInfo>);

/** A code of the contract's table. */
export type ErrorCode = keyof typeof ERROR_CODES;

/** The table's row for `code`; `undefined` for a code newer than this SDK. */
export function errorCodeInfo(code: string | undefined): ErrorCodeInfo | undefined {
  if (code === undefined || !Object.prototype.hasOwnProperty.call(ERROR_CODES, code)) return undefined;
  return ERROR_CODES[code as ErrorCode];
}

/**
 * The contract's rule: whether a response with this status and (optional) code may be retried
 * unchanged. 429, every 5xx, and 409 `idempotency_key_in_use`; nothing else. The one exception
 * is the 504 `timeout` of the OpenAI-compatible route, whose task goes on.
 */
export function isRetryableStatus(status: number, code?: string): boolean {
  if (status === 429) return true;
  if (status === 504 && code === "timeout") return false;
  if (status >= 500 && status <= 599) return true;
  if (status === 409) return code === "idempotency_key_in_use";
  return false;
}

/** Where a wait before an attempt came from. */
export type DelaySource =
  /** The previous response's `Retry-After` / `retry-after-ms` (the value asked for) plus jitter. */
  | { readonly kind: "retry_after"; readonly retryAfterMs: number }
  /** Exponential backoff (the capped exponential part) plus jitter. */
  | { readonly kind: "backoff"; readonly backoffMs: number }
  /** Another request of this client got a 429 with `Retry-After`: the host was paused. */
  | { readonly kind: "host_pause" };

/** A wait before an attempt. */
export interface Delay {
  /** The whole wait in milliseconds, jitter included. */
  readonly ms: number;
  readonly source: DelaySource;
}

/** One request of a call, as the final error (or the response) remembers it. */
export interface AttemptRecord {
  /** 1 for the first request, 2 for the first retry, … */
  readonly number: number;
  /** What was waited before this request was sent, and why; absent when it went at once. */
  readonly waited?: Delay;
  /** The response's status; absent for a transport failure. */
  readonly status?: number;
  /** The envelope's code, when there was one. */
  readonly code?: string;
  /** The response's request id, when there was one. */
  readonly requestId?: string;
  /** The transport failure, when there was no response. */
  readonly cause?: string;
}

/** Why the SDK stopped retrying and handed the error back. */
export type StopReason =
  /** The outcome is never retried (400, 401, 402, 404, 405, 410, 413, a decode failure, …). */
  | "not_retryable"
  /** `maxRetries` retries were made. */
  | "retries_exhausted"
  /** The server asked for a wait longer than `maxRetryAfterMs`. */
  | "retry_after_too_long"
  /** The client's retry budget had no token left: the service looks degraded. */
  | "budget_exhausted"
  /** The next wait would not fit in the call's deadline (or the deadline passed mid-request). */
  | "deadline"
  /** The caller's `AbortSignal` fired. */
  | "aborted";

/** The broad cause of a {@link ConnectionError}. */
export type TransportKind = "connect" | "timeout" | "other";

/** What every {@link TollgateError} is built from (internal; exported for custom transports). */
export interface ErrorInit {
  message: string;
  retryable?: boolean;
  stopReason?: StopReason;
  history?: readonly AttemptRecord[];
  retryAt?: Date;
  /** The wait the server asked for, when it was too long for this client. */
  waitMs?: number;
}

function plural(n: number): string {
  return n === 1 ? "" : "s";
}

function describeStop(stop: StopReason, waitMs: number | undefined): string | undefined {
  switch (stop) {
    case "not_retryable":
      return undefined;
    case "retries_exhausted":
      return "retries exhausted";
    case "retry_after_too_long":
      return `the server asked to wait ${Math.max(1, Math.ceil((waitMs ?? 0) / 1000))} s, longer than this client waits`;
    case "budget_exhausted":
      return "retry budget exhausted: too many recent failures";
    case "deadline":
      return "the call's deadline leaves no time for another attempt";
    case "aborted":
      return "aborted by the caller";
  }
}

/** Any failure of an SDK call. */
export class TollgateError extends Error {
  override name = "TollgateError";
  /** Whether sending the same request again later may succeed, by the client's retry table. */
  readonly retryable: boolean;
  /** Why the SDK stopped retrying. */
  readonly stopReason: StopReason;
  /** Every request of the call, in order. */
  readonly history: readonly AttemptRecord[];
  /** When the caller could try again: set when a wait was too long for the limit or the deadline. */
  readonly retryAt: Date | undefined;
  /** The server's (or the SDK's) sentence, without the bracketed facts and the hint. */
  readonly rawMessage: string;
  /** The wait asked for when the SDK gave up because it was too long. */
  readonly waitMs: number | undefined;

  constructor(init: ErrorInit) {
    super(init.message);
    this.rawMessage = init.message;
    this.retryable = init.retryable ?? false;
    this.stopReason = init.stopReason ?? "not_retryable";
    this.history = Object.freeze([...(init.history ?? [])]);
    this.retryAt = init.retryAt;
    this.waitMs = init.waitMs;
  }

  /** How many requests the call sent (0 when nothing was sent). */
  get attempts(): number {
    return this.history.length;
  }

  /** The HTTP status of the last response, if there was one. */
  get status(): number | undefined {
    return undefined;
  }

  /** The request id of the last response, to quote to the operator. */
  get requestId(): string | undefined {
    return undefined;
  }

  /** What the caller should do, after the seed's "How to Fix" column. */
  get hint(): string {
    return "Check the request against the API contract.";
  }

  /** The facts in brackets of the one-line message. */
  protected facts(): string[] {
    return [];
  }

  /** Recomputes `message`: the sentence, the facts in brackets, then what to do. One line. */
  protected finish(): void {
    const facts = this.facts();
    const id = this.requestId;
    if (id !== undefined) facts.push(`request id ${id}`);
    if (this.attempts > 0) {
      let a = `${this.attempts} attempt${plural(this.attempts)}`;
      const why = describeStop(this.stopReason, this.waitMs);
      if (why !== undefined) a += `: ${why}`;
      facts.push(a);
    }
    if (this.retryAt !== undefined) facts.push(`retry at ${this.retryAt.toISOString()}`);
    let text = this.rawMessage.trim();
    if (facts.length > 0) text += ` [${facts.join(", ")}]`;
    text += ` ${this.hint}`;
    this.message = text.replace(/[\r\n]+/g, " ");
  }

  /** A plain object for logs: what the error says, nothing of the request. */
  toJSON(): Record<string, unknown> {
    return {
      name: this.name,
      message: this.message,
      status: this.status,
      requestId: this.requestId,
      retryable: this.retryable,
      stopReason: this.stopReason,
      attempts: this.attempts,
      history: this.history,
      retryAt: this.retryAt?.toISOString(),
    };
  }
}

/** The server's error envelope, with the response facts around it. */
export interface APIErrorInit extends ErrorInit {
  status: number;
  type: string;
  code: string;
  param?: string;
  requestId?: string;
  /** The response's `Retry-After` / `retry-after-ms`, parsed, in milliseconds. */
  retryAfterMs?: number;
  /** The response's headers that matter for the caller (never request headers). */
  headers?: Readonly<Record<string, string>>;
}

/** The server answered with its error envelope. */
export class APIError extends TollgateError {
  override name = "APIError";
  readonly #status: number;
  /** The envelope's `type`, e.g. `rate_limit_error`. */
  readonly type: string;
  /** The envelope's `code`, e.g. `rate_limit_exceeded`. */
  readonly code: string;
  /** The offending field, for 400s. */
  readonly param: string | undefined;
  readonly #requestId: string | undefined;
  /** The response's `Retry-After` (or `retry-after-ms`), in milliseconds. */
  readonly retryAfterMs: number | undefined;
  /** Selected response headers (`retry-after`, `x-should-retry`, rate-limit headers, …). */
  readonly headers: Readonly<Record<string, string>>;

  constructor(init: APIErrorInit) {
    super(init);
    this.#status = init.status;
    this.type = init.type;
    this.code = init.code;
    this.param = init.param;
    this.#requestId = init.requestId;
    this.retryAfterMs = init.retryAfterMs;
    this.headers = Object.freeze({ ...(init.headers ?? {}) });
    this.finish();
  }

  override get status(): number {
    return this.#status;
  }

  override get requestId(): string | undefined {
    return this.#requestId;
  }

  /** The code's row of the contract's table; `undefined` for a code newer than this SDK. */
  get codeInfo(): ErrorCodeInfo | undefined {
    return errorCodeInfo(this.code);
  }

  override get hint(): string {
    return errorCodeInfo(this.code)?.hint ?? hintForStatus(this.#status);
  }

  protected override facts(): string[] {
    const facts = [`${this.#status} ${this.code}`];
    if (this.param !== undefined) facts.push(`param ${this.param}`);
    return facts;
  }

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), type: this.type, code: this.code, param: this.param, retryAfterMs: this.retryAfterMs };
  }
}

function hintForStatus(status: number): string {
  if (status === 400 || status === 422) return BODY;
  if (status === 401) return "Check that your API key is valid and included in the Authorization header.";
  if (status === 402) return "Add credits, then retry.";
  if (status === 403) return "Check that the credential is allowed to do this.";
  if (status === 404) return NOT_FOUND;
  if (status === 409) return CONFLICT;
  if (status === 410) return "The resource is permanently gone.";
  if (status === 429) return SLOW_DOWN;
  if (status >= 500 && status <= 599) return SERVER;
  return "Check the request against the API contract.";
}

/** 400 (and 405, 408, 413, 415: the `invalid_request_error` family). */
export class BadRequestError extends APIError {
  override name = "BadRequestError";
}
/** 401: a missing, unknown or revoked key (or admin token). */
export class AuthenticationError extends APIError {
  override name = "AuthenticationError";
}
/** 402: something about money; nothing was created or charged. */
export class BillingError extends APIError {
  override name = "BillingError";
}
/** 402 `insufficient_credits`: the balance does not cover the cost. */
export class InsufficientCreditsError extends BillingError {
  override name = "InsufficientCreditsError";
}
/** 402 `key_spend_limit_reached`: the key's spend limit for the period would be passed. */
export class SpendLimitError extends BillingError {
  override name = "SpendLimitError";
}
/** 403. */
export class PermissionDeniedError extends APIError {
  override name = "PermissionDeniedError";
}
/** 404: no such route or resource (another account's task is 404 too). */
export class NotFoundError extends APIError {
  override name = "NotFoundError";
}
/** 405: the route exists, not with this method. */
export class MethodNotAllowedError extends BadRequestError {
  override name = "MethodNotAllowedError";
}
/** 409: the resource's state refuses the request. */
export class ConflictError extends APIError {
  override name = "ConflictError";
}
/** 409 `idempotency_key_in_use`: a request with the same key is still running (retryable). */
export class IdempotencyKeyInUseError extends ConflictError {
  override name = "IdempotencyKeyInUseError";
}
/** 410: the task (or its image, link or voucher) is older than the retention, permanently gone. */
export class GoneError extends APIError {
  override name = "GoneError";
}
/** 413: the request body is above 1 MiB. */
export class PayloadTooLargeError extends BadRequestError {
  override name = "PayloadTooLargeError";
}
/** 429: the account's rate limit; `retryAfterMs` says how long the server asked to wait. */
export class RateLimitError extends APIError {
  override name = "RateLimitError";
}
/** 5xx. */
export class ServerError extends APIError {
  override name = "ServerError";
}
/** 500 `internal_error`. */
export class InternalServerError extends ServerError {
  override name = "InternalServerError";
}
/** 503 `service_unavailable`: overload, shutdown, or a store that cannot commit. */
export class ServiceUnavailableError extends ServerError {
  override name = "ServiceUnavailableError";
}

/** The {@link APIError} subclass for a status and code. */
export function apiErrorFor(init: APIErrorInit): APIError {
  const { status, code } = init;
  if (status === 400) return new BadRequestError(init);
  if (status === 401) return new AuthenticationError(init);
  if (status === 402) {
    if (code === "insufficient_credits") return new InsufficientCreditsError(init);
    if (code === "key_spend_limit_reached") return new SpendLimitError(init);
    return new BillingError(init);
  }
  if (status === 403) return new PermissionDeniedError(init);
  if (status === 404) return new NotFoundError(init);
  if (status === 405) return new MethodNotAllowedError(init);
  if (status === 409) {
    return code === "idempotency_key_in_use" ? new IdempotencyKeyInUseError(init) : new ConflictError(init);
  }
  if (status === 410) return new GoneError(init);
  if (status === 413) return new PayloadTooLargeError(init);
  if (status === 429) return new RateLimitError(init);
  if (status === 500) return new InternalServerError(init);
  if (status === 503) return new ServiceUnavailableError(init);
  if (status >= 500 && status <= 599) return new ServerError(init);
  if (status >= 400 && status <= 499 && init.type === "invalid_request_error") return new BadRequestError(init);
  return new APIError(init);
}

/** No (complete) response: connection refused or reset, or a timeout. */
export class ConnectionError extends TollgateError {
  override name = "ConnectionError";
  readonly kind: TransportKind;

  constructor(init: ErrorInit & { kind: TransportKind }) {
    super(init);
    this.kind = init.kind;
    this.finish();
  }

  override get hint(): string {
    return "Check the base URL and that the server is running and reachable, then retry.";
  }

  protected override finish(): void {
    const lead =
      this.kind === "connect"
        ? "could not connect to the server"
        : this.kind === "timeout"
          ? "the server did not answer in time"
          : "the connection to the server failed";
    // The lead sentence replaces the raw one; the cause follows it.
    const raw = this.rawMessage;
    (this as { rawMessage: string }).rawMessage = raw.length > 0 ? `${lead}: ${raw}` : lead;
    super.finish();
  }

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), kind: this.kind };
  }
}

/** A {@link ConnectionError} of kind `timeout`: an attempt or the call's deadline ran out. */
export class ConnectionTimeoutError extends ConnectionError {
  override name = "ConnectionTimeoutError";
}

/** A response this client cannot read: not the envelope on an error status, or a bad 2xx body. */
export class DecodeError extends TollgateError {
  override name = "DecodeError";
  readonly #status: number;
  readonly #requestId: string | undefined;

  constructor(init: ErrorInit & { status: number; requestId?: string }) {
    super(init);
    this.#status = init.status;
    this.#requestId = init.requestId;
    (this as { rawMessage: string }).rawMessage = `unexpected response from the server: ${init.message}`;
    this.finish();
  }

  override get status(): number {
    return this.#status;
  }

  override get requestId(): string | undefined {
    return this.#requestId;
  }

  override get hint(): string {
    return this.#status >= 500
      ? "Retry after a moment; contact the operator if the issue persists."
      : "Check that the base URL points at a tollgate server of a compatible version.";
  }

  protected override facts(): string[] {
    return [`HTTP ${this.#status}`];
  }
}

const PAUSED = "requests to the server are paused by its rate limit for longer than this call may wait";

/**
 * Nothing was sent: requests to the host are paused (another request of this client got a 429
 * with `Retry-After`) for longer than this call may wait. `retryAt` says until when.
 */
export class PausedError extends TollgateError {
  override name = "PausedError";
  constructor(init: Omit<ErrorInit, "message">) {
    super({ ...init, message: PAUSED, retryable: true });
    this.finish();
  }
  override get hint(): string {
    return "Slow down requests; retry at the time given, or allow the call a longer deadline.";
  }
}

/** The caller's `AbortSignal` fired; a request in flight may still have been handled. */
export class UserAbortError extends TollgateError {
  override name = "UserAbortError";
  constructor(init: Omit<ErrorInit, "message"> & { message?: string }) {
    super({ ...init, message: init.message ?? "the call was aborted", stopReason: "aborted" });
    this.finish();
  }
  override get hint(): string {
    return "A POST that was in flight may have been handled: retry it with the same Idempotency-Key.";
  }
}

/** The call could not be made as asked (bad base URL, invalid `Idempotency-Key`, …). Nothing was sent. */
export class ConfigError extends TollgateError {
  override name = "ConfigError";
  constructor(message: string) {
    super({ message });
    this.finish();
  }
  override get hint(): string {
    return "Fix the client's configuration or arguments.";
  }
}

/** `generate` waited for a task that failed or was cancelled (it was refunded). */
export class TaskFailedError extends TollgateError {
  override name = "TaskFailedError";
  /** The task as last seen. */
  readonly task: import("./types.js").Task;
  constructor(task: import("./types.js").Task) {
    super({
      message:
        task.status === "canceled"
          ? `task ${task.id} was canceled`
          : `task ${task.id} failed${task.error ? `: ${task.error.message}` : ""}`,
    });
    this.task = task;
    this.finish();
  }
  /** The task's error code (e.g. the provider's reason), when it has one. */
  get code(): string | undefined {
    return this.task.error?.code;
  }
  override get hint(): string {
    return "The task was refunded; change the prompt or the model, or try again later.";
  }
}

/** `generate` stopped waiting (its deadline passed) before the task finished; the task goes on. */
export class TaskNotFinishedError extends TollgateError {
  override name = "TaskNotFinishedError";
  /** The task as last seen (queued or running). */
  readonly task: import("./types.js").Task;
  constructor(task: import("./types.js").Task) {
    super({ message: `task ${task.id} is still ${task.status}`, retryable: true, stopReason: "deadline" });
    this.task = task;
    this.finish();
  }
  override get hint(): string {
    return "The task goes on: wait for it again with waitForTask(task.id), or allow a longer deadline.";
  }
}

/**
 * `@tollgate/sdk`: the TypeScript client of tollgate, on the platform's `fetch`.
 *
 * - {@link TollgateClient}: the API-key routes, and `generate` (create, wait, images).
 * - {@link TollgateAdmin}: the operator's routes.
 * - The retry strategy of the contract: {@link RetryPolicy}, {@link RetryBudget}, {@link HostPause}.
 * - Typed errors ({@link RateLimitError}, {@link InsufficientCreditsError}, …) with the attempt history.
 * - {@link verifyWebhook}: webhook signatures, with Web Crypto.
 *
 * @module
 */

export { TollgateClient, paginate } from "./client.js";
export type {
  ClientOptions,
  FinishedTask,
  FinishedTaskWithBytes,
  GenerateParams,
  GeneratedImage,
  ImageDelivery,
  WaitOptions,
} from "./client.js";
export { TollgateAdmin } from "./admin.js";
export type { AdminOptions } from "./admin.js";
export { BaseClient, DEFAULT_BASE_URL, validateIdempotencyKey } from "./transport.js";
export type { CommonOptions, FetchLike, RequestOptions } from "./transport.js";
export { RetryPolicy, parseRetryAfter, parseRetryAfterMs, parseHttpDate, retryAfterFromHeaders, shouldRetryFromHeaders } from "./policy.js";
export type { Decision, Outcome, RetryOptions, HeaderGetter } from "./policy.js";
export { Retrier, describeTransportFailure } from "./retry.js";
export type { CallInfo, Logger, RawResponse, RetrierOptions, SendAttempt } from "./retry.js";
export { RetryBudget } from "./budget.js";
export type { RetryBudgetOptions } from "./budget.js";
export { HostPause } from "./pause.js";
export { systemClock } from "./clock.js";
export type { Clock, RandomSource } from "./clock.js";
export {
  APIError,
  AuthenticationError,
  BadRequestError,
  BillingError,
  ConfigError,
  ConflictError,
  ConnectionError,
  ConnectionTimeoutError,
  DecodeError,
  ERROR_CODES,
  GoneError,
  IdempotencyKeyInUseError,
  InsufficientCreditsError,
  InternalServerError,
  MethodNotAllowedError,
  NotFoundError,
  PausedError,
  PayloadTooLargeError,
  PermissionDeniedError,
  RateLimitError,
  ServerError,
  ServiceUnavailableError,
  SpendLimitError,
  TaskFailedError,
  TaskNotFinishedError,
  TollgateError,
  UserAbortError,
  apiErrorFor,
  errorCodeInfo,
  isRetryableStatus,
} from "./errors.js";
export type {
  APIErrorInit,
  AttemptRecord,
  Delay,
  DelaySource,
  ErrorCode,
  ErrorCodeInfo,
  ErrorInit,
  ErrorType,
  StopReason,
  TransportKind,
} from "./errors.js";
export {
  DEFAULT_TOLERANCE_SECONDS,
  SECRET_PREFIX,
  SIGNATURE_HEADER,
  WEBHOOK_ATTEMPT_HEADER,
  WEBHOOK_ID_HEADER,
  WebhookVerificationError,
  parseWebhook,
  signWebhook,
  verifyWebhook,
} from "./webhook.js";
export type { VerifyWebhookParams, WebhookErrorReason } from "./webhook.js";
export { TERMINAL_STATUSES, isTerminal } from "./types.js";
export type * from "./types.js";

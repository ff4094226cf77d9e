/**
 * The wire types of the contract (`CONTRACT.md`), as the server sends and takes them.
 *
 * Field names are the wire's (snake_case), so a body can be compared with the OpenAPI document
 * (`GET /openapi.json`) line by line. Times are RFC 3339 strings in UTC; credits are integers
 * (the server keeps every balance at or below 2^53 − 1, so a `number` is exact).
 *
 * @module
 */

/** The sizes the built-in generator renders; a model catalogue may price a subset. */
export type ImageSize = "256x256" | "512x512" | "1024x1024";

/** Where a task is in its life. */
export type TaskStatus = "queued" | "running" | "succeeded" | "failed" | "canceled";

/** The statuses after which a task does not change any more. */
export const TERMINAL_STATUSES: readonly TaskStatus[] = ["succeeded", "failed", "canceled"];

/** Whether a task will not change any more. */
export function isTerminal(status: TaskStatus): boolean {
  return status === "succeeded" || status === "failed" || status === "canceled";
}

/** `POST /v1/images/generations`. */
export interface CreateGenerationRequest {
  /** 1–4000 characters. */
  prompt: string;
  /** 1–4 images (at most the model's `max_n`); default 1. */
  n?: number;
  /** Default `512x512` (or what the model prices). */
  size?: ImageSize;
  /** Makes the image reproducible; the server picks one when absent and reports it on the task. */
  seed?: number;
  /** The model (`GET /v1/models`); default: the catalogue's default. */
  model?: string;
  /** Extension: an `http(s)://` URL that receives the finished task, signed (see `verifyWebhook`). */
  webhook_url?: string;
}

/** One generated image: an absolute signed URL once the task has succeeded. */
export interface ImageRef {
  /** Works without the API key until it expires (`--image-url-ttl`, default 1 h). */
  url: string;
}

/** Why a task failed. */
export interface TaskError {
  code: string;
  message: string;
}

/** Where a task's webhook stands (extension). */
export type WebhookState = "pending" | "delivered" | "failed";

/** One delivery attempt of a webhook. */
export interface WebhookAttempt {
  at: string;
  status?: number;
  error?: string;
}

/** The webhook of a task (extension). */
export interface TaskWebhook {
  url: string;
  state: WebhookState;
  delivered_at?: string | null;
  next_attempt_at?: string | null;
  attempts: WebhookAttempt[];
}

/** An image-generation task. */
export interface Task {
  /** `task_…` */
  id: string;
  object: "task";
  status: TaskStatus;
  /** The model the task was sold as (`builtin` without a catalogue). */
  model: string;
  prompt: string;
  n: number;
  size: ImageSize;
  seed: number;
  /** Credits charged when the task was accepted. */
  cost: number;
  created_at: string;
  completed_at: string | null;
  /** After this instant every route that names the task answers 410. */
  expires_at: string;
  /** One entry per image once the task has succeeded; empty before. */
  images: ImageRef[];
  error: TaskError | null;
  /** Present only when the task was created with a `webhook_url`. */
  webhook?: TaskWebhook;
}

/** A page of a list, newest first. */
export interface List<T> {
  object: "list";
  data: T[];
  /** Whether a next page exists: ask again with `after` set to the last item's id. */
  has_more: boolean;
}

/** Parameters of the paged list routes. */
export interface ListParams {
  /** Page size, 1–100 (the server's default when absent). */
  limit?: number;
  /** The id of the last item of the previous page. */
  after?: string | number;
}

/** A per-account rate limit: a sustained rate and a burst. */
export interface RateLimit {
  requests_per_minute: number;
  burst: number;
}

/** Credits of the balance that lapse at `expires_at`. */
export interface ExpiringCredits {
  credits: number;
  expires_at: string;
}

/** A low-balance alert (extension). */
export interface LowBalance {
  threshold: number;
  notify_url: string;
}

/** An account as its holder and the operator see it. */
export interface Account {
  /** `acct_…` */
  id: string;
  name: string;
  credits: number;
  rate_limit: RateLimit;
  /** Credits of `credits` that expire, soonest first. */
  expiring?: ExpiringCredits[];
  low_balance?: LowBalance;
}

/** Ledger entry kinds; a newer server may add more. */
export type LedgerKind =
  | "grant"
  | "charge"
  | "refund"
  | "adjust"
  | "voucher"
  | "purchase"
  | "purchase_refund"
  | "expiry"
  | (string & {});

/** One change of an account's balance. */
export interface LedgerEntry {
  id: number;
  object: "ledger_entry";
  /** Credits added (positive) or taken (negative). */
  delta: number;
  balance_after: number;
  kind: LedgerKind;
  task_id: string | null;
  note: string | null;
  purchase_id?: string;
  created_at: string;
}

/** A model for sale (`GET /v1/models`). */
export interface Model {
  id: string;
  object: "model";
  name: string;
  /** Credits per image, by size: the sizes the model accepts. */
  prices: Partial<Record<ImageSize, number>>;
  max_n: number;
}

/** `GET|POST /v1/account/webhook-secret` (extension). */
export interface WebhookSecret {
  object: "webhook_secret";
  /** `whsec_…`: what `verifyWebhook` takes. */
  secret: string;
}

/** `GET /healthz`, `GET /readyz`. */
export interface Health {
  status: string;
}

/** A credit pack for sale (`GET /v1/billing/packs`, extension). */
export interface CreditPack {
  credits: number;
  /** In the currency's minor unit (cents). */
  amount: number;
  currency: string;
}

/** `POST /v1/billing/checkout`. */
export interface CheckoutRequest {
  /** The pack to buy, by its credits. */
  pack: number;
}

/** `201` answer of `POST /v1/billing/checkout`: where to send the buyer. */
export interface CheckoutSession {
  /** Stripe's Checkout URL. */
  url: string;
  /** Stripe's session id (`cs_…`). */
  id: string;
}

/** How often a key's spend limit starts again. */
export type SpendPeriod = "day" | "week" | "month" | "total";

/** The most a key may spend per period. */
export interface SpendLimit {
  credits: number;
  period: SpendPeriod;
}

/** A key's spend limit as it stands. */
export interface KeySpend extends SpendLimit {
  spent: number;
  resets_at: string | null;
}

/** An API key as listed: never the key itself. */
export interface KeyInfo {
  /** `key_…` */
  id: string;
  prefix: string;
  created_at: string;
  revoked_at: string | null;
  spend_limit?: KeySpend;
}

/** `POST /admin/accounts`. */
export interface CreateAccountRequest {
  /** 1–200 characters. */
  name: string;
  /** Opening balance; default 0. */
  credits?: number;
  rate_limit?: RateLimit;
}

/** `201` answer of `POST /admin/accounts`: the key is shown this once. */
export interface CreatedAccount {
  account: Account;
  api_key: string;
}

/** `POST /admin/accounts/{id}/keys` (the body is optional). */
export interface CreateKeyRequest {
  spend_limit?: SpendLimit;
}

/** `201` answer of `POST /admin/accounts/{id}/keys`: the key is shown this once. */
export interface CreatedKey {
  id: string;
  api_key: string;
}

/** `POST /admin/accounts/{id}/credits`. */
export interface AddCreditsRequest {
  /** Credits to add; negative for a correction. */
  amount: number;
  note?: string;
  /** When the granted credits lapse (RFC 3339); default never. */
  expires_at?: string;
}

/** `PATCH /admin/accounts/{id}` (extension). */
export interface UpdateAccountRequest {
  name?: string;
  rate_limit?: RateLimit;
  /** `null` turns the alert off. */
  low_balance?: LowBalance | null;
}

/** `POST /admin/vouchers` (extension). */
export interface CreateVoucherRequest {
  credits: number;
  expires_at?: string;
  note?: string;
}

/** A voucher as listed: never its code. */
export interface Voucher {
  id: string;
  object: "voucher";
  prefix: string;
  credits: number;
  note: string | null;
  created_at: string;
  expires_at: string | null;
  redeemed_at: string | null;
  redeemed_by: string | null;
}

/** `201` answer of `POST /admin/vouchers`: the code is shown this once. */
export interface CreatedVoucher {
  voucher: Voucher;
  /** `tgv_…` */
  code: string;
}

/** A purchase through Stripe Checkout (the operator's `GET /admin/accounts/{id}/purchases`). */
export interface Purchase {
  id: string;
  account_id: string;
  credits: number;
  amount: number;
  currency: string;
  status: "open" | "paid" | (string & {});
  refunded_amount: number;
  refunded_credits: number;
  shortfall: number;
  created_at: string;
  paid_at: string | null;
}

/** The error envelope of every error response. */
export interface ErrorBody {
  error: {
    message: string;
    type: string;
    code: string;
    param?: string;
    request_id?: string;
  };
}

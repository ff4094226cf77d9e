/**
 * {@link TollgateClient}: typed calls for the API-key routes, and `generate`, which makes a task,
 * waits for it and hands back its images.
 *
 * ```ts
 * const tollgate = new TollgateClient({ apiKey: process.env.TOLLGATE_API_KEY });
 * const task = await tollgate.generate({ prompt: "a lighthouse at dusk", size: "512x512", wait: true });
 * console.log(task.images[0]?.url);
 * ```
 *
 * Every call goes through the retry loop (see `retry.ts`); every POST carries an
 * `Idempotency-Key`, the caller's or one made for the call, the same on every retry, so a retry
 * never charges twice.
 *
 * @module
 */

import { TaskFailedError, TaskNotFinishedError, UserAbortError } from "./errors.js";
import { BaseClient, readEnv, segment, type CallOptions, type CommonOptions, type RequestOptions } from "./transport.js";
import {
  isTerminal,
  type Account,
  type CheckoutRequest,
  type CheckoutSession,
  type CreateGenerationRequest,
  type CreditPack,
  type Health,
  type LedgerEntry,
  type List,
  type ListParams,
  type Model,
  type Task,
  type WebhookSecret,
} from "./types.js";

/** Options of a {@link TollgateClient}. */
export interface ClientOptions extends CommonOptions {
  /** The API key (`tg_…`). Default `TOLLGATE_API_KEY`; without one the server answers 401. */
  apiKey?: string;
}

/** Options of {@link TollgateClient.waitForTask}. */
export interface WaitOptions extends RequestOptions {
  /** Least time between two asks in ms (against a server that answers at once). Default 500. */
  pollIntervalMs?: number;
  /** Called with each state seen. */
  onUpdate?: (task: Task) => void;
}

/** How `generate` hands back images: their signed URLs only, or their bytes too. */
export type ImageDelivery = "url" | "bytes";

/** What {@link TollgateClient.generate} takes: the create body plus how to wait. */
export interface GenerateParams extends CreateGenerationRequest {
  /** Wait for the task to finish (default `true`); `false` returns the queued task. */
  wait?: boolean;
  /** With `"bytes"`, each image's PNG is fetched too. Default `"url"`. */
  images?: ImageDelivery;
  /** See {@link WaitOptions.pollIntervalMs}. */
  pollIntervalMs?: number;
  /** See {@link WaitOptions.onUpdate}. */
  onUpdate?: (task: Task) => void;
}

/** One image of a finished task. */
export interface GeneratedImage {
  index: number;
  /** The absolute signed URL (works without the key until it expires). */
  url: string;
  /** The PNG bytes, with `images: "bytes"`. */
  data?: Uint8Array;
}

/** A succeeded task with its images. */
export interface FinishedTask extends Omit<Task, "images"> {
  status: "succeeded";
  images: GeneratedImage[];
}

/** A succeeded task with the bytes of its images. */
export interface FinishedTaskWithBytes extends FinishedTask {
  images: (GeneratedImage & { data: Uint8Array })[];
}

/** How long each ask of `waitForTask` asks the server to hold the answer, in seconds. */
const LONG_POLL_S = 25;
/** What a long poll leaves of the attempt timeout and the deadline for the answer to travel. */
const LONG_POLL_MARGIN_MS = 5000;

/** The SDK for the API-key routes. */
export class TollgateClient extends BaseClient {
  constructor(options: ClientOptions = {}) {
    super(options.apiKey ?? readEnv("TOLLGATE_API_KEY"), options);
  }

  /**
   * `POST /v1/images/generations`: queues a task and charges its cost (202). Safe to retry:
   * the SDK makes one `Idempotency-Key` for the call and sends it with every attempt.
   */
  async createGeneration(body: CreateGenerationRequest, options: RequestOptions = {}): Promise<Task> {
    return this.json<Task>({ method: "POST", path: "/v1/images/generations", body }, options);
  }

  /**
   * Makes a task and (by default) waits for it: the succeeded task with its images, their
   * signed URLs and, with `images: "bytes"`, their PNG bytes. A task that fails or is
   * cancelled throws a {@link TaskFailedError} (it was refunded). `options.timeoutMs` bounds
   * the whole of it.
   */
  generate(params: GenerateParams & { wait: false }, options?: RequestOptions): Promise<Task>;
  generate(params: GenerateParams & { images: "bytes" }, options?: RequestOptions): Promise<FinishedTaskWithBytes>;
  generate(params: GenerateParams, options?: RequestOptions): Promise<FinishedTask>;
  async generate(params: GenerateParams, options: RequestOptions = {}): Promise<Task | FinishedTask> {
    const { wait = true, images = "url", pollIntervalMs, onUpdate, ...body } = params;
    const deadlineAt = this.deadlineFor(options);
    const call: CallOptions = { ...options, ...(deadlineAt !== undefined ? { deadlineAt } : {}) };
    const created = await this.createGeneration(body, call);
    if (!wait) return created;
    onUpdate?.(created);
    const { idempotencyKey: _key, ...rest } = call;
    const task = isTerminal(created.status)
      ? created
      : await this.#waitFor(created.id, {
          ...rest,
          ...(pollIntervalMs !== undefined ? { pollIntervalMs } : {}),
          ...(onUpdate !== undefined ? { onUpdate } : {}),
        });
    if (!isTerminal(task.status)) throw new TaskNotFinishedError(task);
    if (task.status !== "succeeded") throw new TaskFailedError(task);
    const finished: GeneratedImage[] = [];
    for (const [index, image] of task.images.entries()) {
      const entry: GeneratedImage = { index, url: image.url };
      if (images === "bytes") entry.data = await this.getImage(task.id, index, rest);
      finished.push(entry);
    }
    return { ...task, status: "succeeded", images: finished };
  }

  /** `GET /v1/tasks/{id}`; with `wait` (seconds, ≤ 60) the server answers as soon as the task finishes. */
  async getTask(id: string, options: RequestOptions & { wait?: number } = {}): Promise<Task> {
    const { wait, ...rest } = options;
    return this.json<Task>({ method: "GET", path: `/v1/tasks/${segment(id, "task id")}`, query: { wait } }, rest);
  }

  /**
   * Waits until the task is succeeded, failed or canceled. Each ask is
   * `GET /v1/tasks/{id}?wait=N`, which the server holds until the task finishes (up to 25 s,
   * less when the attempt timeout or the deadline is shorter), so the end is seen at once with
   * one request per 25 s. Each ask is a call with its own retries.
   */
  async waitForTask(id: string, options: WaitOptions = {}): Promise<Task> {
    const deadlineAt = this.deadlineFor(options);
    return this.#waitFor(id, { ...options, ...(deadlineAt !== undefined ? { deadlineAt } : {}) });
  }

  async #waitFor(id: string, options: WaitOptions & CallOptions): Promise<Task> {
    const { pollIntervalMs = 500, onUpdate, ...call } = options;
    const clock = this.retrier.clock;
    for (;;) {
      const asked = clock.now();
      const hold = this.#longPoll(call.deadlineAt);
      const task = await this.getTask(id, { ...call, ...(hold !== undefined ? { wait: hold } : {}) });
      onUpdate?.(task);
      if (isTerminal(task.status)) return task;
      if (call.deadlineAt !== undefined && clock.now() >= call.deadlineAt) return task;
      const rest = pollIntervalMs - (clock.now() - asked);
      if (rest > 0) {
        // No time for another ask: the task as it stands.
        if (call.deadlineAt !== undefined && clock.now() + rest > call.deadlineAt) return task;
        try {
          await clock.sleep(rest, call.signal);
        } catch {
          throw new UserAbortError({});
        }
      }
    }
  }

  /** Seconds each ask of `waitForTask` may be held; `undefined` when the limits leave too little. */
  #longPoll(deadlineAt: number | undefined): number | undefined {
    let holdMs = LONG_POLL_S * 1000;
    const attempt = this.retrier.attemptTimeoutMs;
    if (attempt !== null) holdMs = Math.min(holdMs, attempt - LONG_POLL_MARGIN_MS);
    if (deadlineAt !== undefined) holdMs = Math.min(holdMs, deadlineAt - this.retrier.clock.now() - LONG_POLL_MARGIN_MS);
    const secs = Math.floor(holdMs / 1000);
    return secs >= 1 ? secs : undefined;
  }

  /** `GET /v1/tasks?limit=&after=`: a page of the account's tasks, newest first. */
  async listTasks(params: ListParams = {}, options: RequestOptions = {}): Promise<List<Task>> {
    return this.json<List<Task>>({ method: "GET", path: "/v1/tasks", query: { limit: params.limit, after: params.after } }, options);
  }

  /** Every task of the account, newest first, page after page. */
  iterateTasks(params: ListParams = {}, options: RequestOptions = {}): AsyncGenerator<Task, void, undefined> {
    return paginate((p) => this.listTasks(p, options), params, (t) => t.id);
  }

  /** `POST /v1/tasks/{id}/cancel`: cancels a queued task and refunds it. */
  async cancelTask(id: string, options: RequestOptions = {}): Promise<Task> {
    return this.json<Task>({ method: "POST", path: `/v1/tasks/${segment(id, "task id")}/cancel` }, options);
  }

  /** `GET /v1/tasks/{id}/images/{index}`: the PNG bytes of one image. */
  async getImage(taskId: string, index: number, options: RequestOptions = {}): Promise<Uint8Array> {
    const path = `/v1/tasks/${segment(taskId, "task id")}/images/${segment(index, "image index")}`;
    return (await this.request({ method: "GET", path }, options)).body;
  }

  /** The bytes behind a signed image URL (`images[].url`), fetched without the API key. */
  async fetchImageURL(url: string, options: RequestOptions = {}): Promise<Uint8Array> {
    return (await this.request({ method: "GET", path: "", absoluteURL: url }, options)).body;
  }

  /** `GET /v1/account`: name, balance, rate limit and expiring credits of the key's account. */
  async account(options: RequestOptions = {}): Promise<Account> {
    return this.json<Account>({ method: "GET", path: "/v1/account" }, options);
  }

  /** `GET /v1/account/ledger?limit=&after=`: a page of the balance's changes, newest first. */
  async ledger(params: ListParams = {}, options: RequestOptions = {}): Promise<List<LedgerEntry>> {
    return this.json<List<LedgerEntry>>(
      { method: "GET", path: "/v1/account/ledger", query: { limit: params.limit, after: params.after } },
      options,
    );
  }

  /** The whole ledger, newest first, page after page. */
  iterateLedger(params: ListParams = {}, options: RequestOptions = {}): AsyncGenerator<LedgerEntry, void, undefined> {
    return paginate((p) => this.ledger(p, options), params, (e) => e.id);
  }

  /** `GET /v1/models`: the models for sale, with their prices per size and `max_n`. */
  async models(options: RequestOptions = {}): Promise<List<Model>> {
    return this.json<List<Model>>({ method: "GET", path: "/v1/models" }, options);
  }

  /** `GET /v1/account/webhook-secret` (extension): the secret that signs this account's webhooks. */
  async webhookSecret(options: RequestOptions = {}): Promise<WebhookSecret> {
    return this.json<WebhookSecret>({ method: "GET", path: "/v1/account/webhook-secret" }, options);
  }

  /** `POST /v1/account/webhook-secret` (extension): replaces the webhook secret. */
  async rotateWebhookSecret(options: RequestOptions = {}): Promise<WebhookSecret> {
    return this.json<WebhookSecret>({ method: "POST", path: "/v1/account/webhook-secret" }, options);
  }

  /** `POST /v1/vouchers/redeem` (extension): redeems a `tgv_…` code; the account with its new balance. */
  async redeemVoucher(code: string, options: RequestOptions = {}): Promise<Account> {
    return this.json<Account>({ method: "POST", path: "/v1/vouchers/redeem", body: { code } }, options);
  }

  /** `GET /v1/billing/packs` (extension): the credit packs for sale. */
  async creditPacks(options: RequestOptions = {}): Promise<List<CreditPack>> {
    return this.json<List<CreditPack>>({ method: "GET", path: "/v1/billing/packs" }, options);
  }

  /** `POST /v1/billing/checkout`: a Stripe Checkout session for a credit pack (201). */
  async createCheckout(body: CheckoutRequest, options: RequestOptions = {}): Promise<CheckoutSession> {
    return this.json<CheckoutSession>({ method: "POST", path: "/v1/billing/checkout", body }, options);
  }

  /** `GET /healthz`: `ok`, or `draining` during shutdown. */
  async health(options: RequestOptions = {}): Promise<Health> {
    return this.json<Health>({ method: "GET", path: "/healthz" }, options);
  }

  /** `GET /readyz`: `ready` while the store can commit (else a 503 `ServiceUnavailableError`). */
  async ready(options: RequestOptions = {}): Promise<Health> {
    return this.json<Health>({ method: "GET", path: "/readyz" }, options);
  }
}

/** Walks a paged list route: pages of `params.limit` until `has_more` is false. */
export async function* paginate<T>(
  page: (params: ListParams) => Promise<List<T>>,
  params: ListParams,
  idOf: (item: T) => string | number,
): AsyncGenerator<T, void, undefined> {
  let after = params.after;
  for (;;) {
    const list = await page({ ...params, ...(after !== undefined ? { after } : {}) });
    for (const item of list.data) yield item;
    const last = list.data[list.data.length - 1];
    if (!list.has_more || last === undefined) return;
    after = idOf(last);
  }
}

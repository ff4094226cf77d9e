/**
 * {@link TollgateAdmin}: typed calls for the operator's routes (`/admin/...`, admin token).
 *
 * It has the same plumbing as {@link TollgateClient} (retries, idempotency keys, budget, errors)
 * but is a separate type, so that an API-key client cannot call an admin route by mistake, nor
 * the reverse.
 *
 * @module
 */

import { BaseClient, readEnv, segment, type CommonOptions, type RequestOptions } from "./transport.js";
import type {
  Account,
  AddCreditsRequest,
  CreateAccountRequest,
  CreatedAccount,
  CreatedKey,
  CreatedVoucher,
  CreateKeyRequest,
  CreateVoucherRequest,
  KeyInfo,
  LedgerEntry,
  List,
  ListParams,
  Purchase,
  UpdateAccountRequest,
  Voucher,
} from "./types.js";
import { paginate } from "./client.js";

/** Options of a {@link TollgateAdmin}. */
export interface AdminOptions extends CommonOptions {
  /** The operator's token. Default `TOLLGATE_ADMIN_TOKEN`. */
  adminToken?: string;
}

/** The SDK for the operator's routes. */
export class TollgateAdmin extends BaseClient {
  constructor(options: AdminOptions = {}) {
    super(options.adminToken ?? readEnv("TOLLGATE_ADMIN_TOKEN"), options);
  }

  /** `POST /admin/accounts`: the account and its first API key, shown this once (201). */
  async createAccount(body: CreateAccountRequest, options: RequestOptions = {}): Promise<CreatedAccount> {
    return this.json<CreatedAccount>({ method: "POST", path: "/admin/accounts", body }, options);
  }

  /** `GET /admin/accounts`: every account. */
  async listAccounts(options: RequestOptions = {}): Promise<List<Account>> {
    return this.json<List<Account>>({ method: "GET", path: "/admin/accounts" }, options);
  }

  /** `GET /admin/accounts/{id}`. */
  async getAccount(id: string, options: RequestOptions = {}): Promise<Account> {
    return this.json<Account>({ method: "GET", path: `/admin/accounts/${segment(id, "account id")}` }, options);
  }

  /** `PATCH /admin/accounts/{id}` (extension): rename, change the rate limit, set the low-balance alert. */
  async updateAccount(id: string, body: UpdateAccountRequest, options: RequestOptions = {}): Promise<Account> {
    return this.json<Account>({ method: "PATCH", path: `/admin/accounts/${segment(id, "account id")}`, body }, options);
  }

  /** `POST /admin/accounts/{id}/keys`: a new API key (optionally with a spend limit), shown this once (201). */
  async createKey(accountId: string, body: CreateKeyRequest = {}, options: RequestOptions = {}): Promise<CreatedKey> {
    return this.json<CreatedKey>({ method: "POST", path: `/admin/accounts/${segment(accountId, "account id")}/keys`, body }, options);
  }

  /** `GET /admin/accounts/{id}/keys` (extension): the account's keys, without the secrets. */
  async listKeys(accountId: string, options: RequestOptions = {}): Promise<List<KeyInfo>> {
    return this.json<List<KeyInfo>>({ method: "GET", path: `/admin/accounts/${segment(accountId, "account id")}/keys` }, options);
  }

  /** `DELETE /admin/keys/{key_id}`: revokes a key at once. */
  async revokeKey(keyId: string, options: RequestOptions = {}): Promise<void> {
    await this.request({ method: "DELETE", path: `/admin/keys/${segment(keyId, "key id")}` }, options);
  }

  /** `POST /admin/accounts/{id}/credits`: adds (or, negative, corrects) credits; the account with its new balance. */
  async addCredits(accountId: string, body: AddCreditsRequest, options: RequestOptions = {}): Promise<Account> {
    return this.json<Account>({ method: "POST", path: `/admin/accounts/${segment(accountId, "account id")}/credits`, body }, options);
  }

  /** `GET /admin/accounts/{id}/ledger?limit=&after=`: a page of the account's balance changes, newest first. */
  async ledger(accountId: string, params: ListParams = {}, options: RequestOptions = {}): Promise<List<LedgerEntry>> {
    return this.json<List<LedgerEntry>>(
      { method: "GET", path: `/admin/accounts/${segment(accountId, "account id")}/ledger`, query: { limit: params.limit, after: params.after } },
      options,
    );
  }

  /** The account's whole ledger, newest first, page after page. */
  iterateLedger(accountId: string, params: ListParams = {}, options: RequestOptions = {}): AsyncGenerator<LedgerEntry, void, undefined> {
    return paginate((p) => this.ledger(accountId, p, options), params, (e) => e.id);
  }

  /** `GET /admin/accounts/{id}/purchases` (extension): Stripe Checkout purchases and their refunds. */
  async listPurchases(accountId: string, options: RequestOptions = {}): Promise<List<Purchase>> {
    return this.json<List<Purchase>>({ method: "GET", path: `/admin/accounts/${segment(accountId, "account id")}/purchases` }, options);
  }

  /** `POST /admin/vouchers` (extension): a single-use code worth `credits`, shown this once (201). */
  async createVoucher(body: CreateVoucherRequest, options: RequestOptions = {}): Promise<CreatedVoucher> {
    return this.json<CreatedVoucher>({ method: "POST", path: "/admin/vouchers", body }, options);
  }

  /** `GET /admin/vouchers?limit=` (extension): the latest vouchers, without their codes. */
  async listVouchers(params: { limit?: number } = {}, options: RequestOptions = {}): Promise<List<Voucher>> {
    return this.json<List<Voucher>>({ method: "GET", path: "/admin/vouchers", query: { limit: params.limit } }, options);
  }
}

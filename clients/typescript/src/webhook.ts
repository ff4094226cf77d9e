/**
 * Checking webhook deliveries with Web Crypto (so it runs in Node, Deno, Bun, browsers and
 * edge workers): is this POST really from tollgate, about this body, and recent?
 *
 * tollgate signs every delivery (task webhooks and account events) with the account's webhook
 * secret (`GET /v1/account/webhook-secret`): `Tollgate-Signature: t=<unix seconds>,v1=<hex>`,
 * where the hex is HMAC-SHA256 of `"<t>.<raw body>"`. Several `v1=` entries may appear (a
 * secret rotation); one matching is enough. Unknown schemes are skipped. The same scheme, and
 * the same refusals, as `tollgate_contract::webhook`.
 *
 * ```ts
 * const task = await parseWebhook<Task>({ secret, header: req.headers.get("tollgate-signature"), body: rawBody });
 * ```
 *
 * Verify the raw bytes as received, before any JSON parsing: one byte of whitespace changes the
 * signature. Deliveries are at least once: deduplicate by `Tollgate-Webhook-Id`.
 *
 * @module
 */

import { webCrypto } from "./crypto.js";

/** The header that carries the signature. */
export const SIGNATURE_HEADER = "Tollgate-Signature";
/** The id of what a delivery reports, the same on every attempt (for deduplication). */
export const WEBHOOK_ID_HEADER = "Tollgate-Webhook-Id";
/** Which attempt a delivery is, from 1. */
export const WEBHOOK_ATTEMPT_HEADER = "Tollgate-Webhook-Attempt";
/** What a receiver should accept by default: five minutes between signing and checking. */
export const DEFAULT_TOLERANCE_SECONDS = 300;
/** The prefix of every webhook secret. */
export const SECRET_PREFIX = "whsec_";

/** Why a delivery was refused. */
export type WebhookErrorReason = "malformed" | "stale" | "mismatch";

const REASONS: Record<WebhookErrorReason, string> = {
  malformed: "the Tollgate-Signature header is not of the form t=<seconds>,v1=<hex>",
  stale: "the signature's timestamp is outside the tolerance",
  mismatch: "no signature matches the body under this secret",
};

/** A delivery that is not from tollgate, not about this body, or too old. */
export class WebhookVerificationError extends Error {
  override name = "WebhookVerificationError";
  constructor(readonly reason: WebhookErrorReason) {
    super(REASONS[reason]);
  }
}

/** What {@link verifyWebhook} takes. */
export interface VerifyWebhookParams {
  /** The account's webhook secret (`whsec_…`). */
  secret: string;
  /** The `Tollgate-Signature` header's value. */
  header: string | null | undefined;
  /** The raw body, exactly as received (a string is taken as its UTF-8 bytes). */
  body: string | Uint8Array | ArrayBuffer;
  /** How far the signed timestamp may be from now, in seconds. Default 300. */
  toleranceSeconds?: number;
  /** Now, in Unix seconds (tests pin it). Default the platform's clock. */
  nowSeconds?: number;
}

const encoder = new TextEncoder();

function bytesOf(body: string | Uint8Array | ArrayBuffer): Uint8Array {
  if (typeof body === "string") return encoder.encode(body);
  return body instanceof Uint8Array ? body : new Uint8Array(body);
}

function unhex(text: string): Uint8Array | undefined {
  if (text.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(text)) return undefined;
  const out = new Uint8Array(text.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function hmacKey(secret: string, usage: "sign" | "verify"): Promise<CryptoKey> {
  const crypto = await webCrypto();
  return crypto.subtle.importKey("raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, [usage]);
}

function signedPayload(timestamp: number, body: Uint8Array): Uint8Array {
  const prefix = encoder.encode(`${timestamp}.`);
  const payload = new Uint8Array(prefix.length + body.length);
  payload.set(prefix, 0);
  payload.set(body, prefix.length);
  return payload;
}

/** The `Tollgate-Signature` value for `body` sent at `timestamp` (Unix seconds), as the server makes it. */
export async function signWebhook(secret: string, timestamp: number, body: string | Uint8Array | ArrayBuffer): Promise<string> {
  const crypto = await webCrypto();
  const key = await hmacKey(secret, "sign");
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, signedPayload(timestamp, bytesOf(body))));
  return `t=${timestamp},v1=${hex(mac)}`;
}

/**
 * Checks a delivery; resolves when it is genuine, else rejects with a
 * {@link WebhookVerificationError} saying why. The comparison is Web Crypto's `verify`
 * (constant time).
 */
export async function verifyWebhook(params: VerifyWebhookParams): Promise<void> {
  const header = params.header ?? "";
  let timestamp: number | undefined;
  const signatures: Uint8Array[] = [];
  for (const part of header.split(",")) {
    const piece = part.trim();
    const eq = piece.indexOf("=");
    if (eq < 0) throw new WebhookVerificationError("malformed");
    const name = piece.slice(0, eq);
    const value = piece.slice(eq + 1);
    if (name === "t") {
      if (timestamp !== undefined || !/^\d+$/.test(value)) throw new WebhookVerificationError("malformed");
      timestamp = Number(value);
      if (!Number.isSafeInteger(timestamp)) throw new WebhookVerificationError("malformed");
    } else if (name === "v1") {
      const sig = unhex(value);
      if (sig === undefined) throw new WebhookVerificationError("malformed");
      signatures.push(sig);
    }
    // Schemes this version does not know are skipped, so the server can add one.
  }
  if (timestamp === undefined || signatures.length === 0) throw new WebhookVerificationError("malformed");
  const tolerance = params.toleranceSeconds ?? DEFAULT_TOLERANCE_SECONDS;
  const now = params.nowSeconds ?? Math.floor(Date.now() / 1000);
  if (Math.abs(now - timestamp) > tolerance) throw new WebhookVerificationError("stale");
  const crypto = await webCrypto();
  const key = await hmacKey(params.secret, "verify");
  const payload = signedPayload(timestamp, bytesOf(params.body));
  for (const sig of signatures) {
    if (await crypto.subtle.verify("HMAC", key, sig, payload)) return;
  }
  throw new WebhookVerificationError("mismatch");
}

/** {@link verifyWebhook}, then the body parsed as JSON (a `Task` for task webhooks). */
export async function parseWebhook<T = unknown>(params: VerifyWebhookParams): Promise<T> {
  await verifyWebhook(params);
  return JSON.parse(new TextDecoder().decode(bytesOf(params.body))) as T;
}

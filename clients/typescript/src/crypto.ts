/**
 * The platform's Web Crypto (`globalThis.crypto`: Node 19+, Deno, Bun, browsers), with a
 * fallback to `node:crypto`'s `webcrypto` for Node 18, loaded only when needed.
 *
 * @module
 */

let cached: Promise<Crypto> | undefined;

/** The Web Crypto object of the platform. */
export function webCrypto(): Promise<Crypto> {
  if (cached === undefined) {
    const global = (globalThis as { crypto?: Crypto }).crypto;
    if (global !== undefined && typeof global.getRandomValues === "function" && global.subtle !== undefined) {
      cached = Promise.resolve(global);
    } else {
      // A computed specifier keeps bundlers for browsers from trying to resolve it.
      const specifier = ["node", "crypto"].join(":");
      cached = (import(specifier) as Promise<{ webcrypto?: Crypto }>).then((m) => {
        if (m.webcrypto === undefined) throw new Error("no Web Crypto on this platform");
        return m.webcrypto;
      });
    }
  }
  return cached;
}

/** A random UUID v4: the SDK's default `Idempotency-Key`. */
export async function randomUUID(): Promise<string> {
  const crypto = await webCrypto();
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = ((b[6] ?? 0) & 0x0f) | 0x40;
  b[8] = ((b[8] ?? 0) & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

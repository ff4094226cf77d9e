/**
 * The retry budget: a token bucket shared by every request of one client.
 *
 * Per-call retry limits alone multiply load in an outage: with 5 retries, every call becomes six
 * requests exactly when the server can least afford them. The budget caps retries as a share of
 * the client's own traffic, after gRPC's retry throttling, AWS's retry quota and reqwest's retry
 * budget, with the numbers of the Rust SDK (`tollgate_client::budget`):
 *
 * - every call (its first attempt) deposits `extraLoad` tokens;
 * - every retry withdraws one token, and is not made when less than one is left;
 * - the bucket holds at most `capacity` tokens and starts full, and it refills slowly with time
 *   (`refillPerSec`), so a client that calls rarely still gets full retries for a lone failure.
 *
 * Over any stretch of time, retries ≤ `capacity + extraLoad · calls + refillPerSec · seconds`.
 * With the defaults (10, 0.1, 0.1) a sustained outage costs about 1.1 requests per call instead
 * of 6, while a lone failure (bucket full) still gets its 5 retries.
 *
 * @module
 */

import { systemClock, type Clock } from "./clock.js";

/** The budget's numbers; the defaults are 10 tokens, 10 % extra load, 0.1 token/s. */
export interface RetryBudgetOptions {
  /** The most tokens the bucket holds, and what it starts with. Keep it ≥ `maxRetries`. Default 10. */
  capacity?: number;
  /** Tokens each call deposits: the share of extra load retries may add (0.1 = 10 %). Default 0.1. */
  extraLoad?: number;
  /** Tokens added per second of time, whatever the traffic. Default 0.1. */
  refillPerSec?: number;
}

function finiteNonNegative(x: number | undefined, fallback: number): number {
  if (x === undefined) return fallback;
  return Number.isFinite(x) && x > 0 ? x : 0;
}

/** A token bucket for retries; share one instance between everything that counts as one client. */
export class RetryBudget {
  readonly capacity: number;
  readonly extraLoad: number;
  readonly refillPerSec: number;
  #tokens: number;
  #refilledAt: number;
  readonly #clock: Clock;

  constructor(options: RetryBudgetOptions = {}, clock: Clock = systemClock) {
    this.capacity = finiteNonNegative(options.capacity, 10);
    this.extraLoad = finiteNonNegative(options.extraLoad, 0.1);
    this.refillPerSec = finiteNonNegative(options.refillPerSec, 0.1);
    this.#clock = clock;
    this.#tokens = this.capacity;
    this.#refilledAt = clock.now();
  }

  /** Records a new call: deposits its share. */
  deposit(): void {
    this.#refill();
    this.#tokens = Math.min(this.#tokens + this.extraLoad, this.capacity);
  }

  /** Takes one token for a retry; `false` (and nothing taken) when less than one is left. */
  tryWithdraw(): boolean {
    this.#refill();
    // Deposits are fractions (0.1 ten times is 0.999…); a hair of tolerance makes them add up.
    if (this.#tokens >= 1 - 1e-9) {
      this.#tokens = Math.max(0, this.#tokens - 1);
      return true;
    }
    return false;
  }

  /** Tokens available now. */
  get tokens(): number {
    this.#refill();
    return this.#tokens;
  }

  #refill(): void {
    const now = this.#clock.now();
    const elapsed = Math.max(0, now - this.#refilledAt);
    this.#tokens = Math.min(this.#tokens + (elapsed / 1000) * this.refillPerSec, this.capacity);
    this.#refilledAt = now;
  }
}

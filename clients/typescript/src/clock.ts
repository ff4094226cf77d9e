/**
 * Time and chance, injectable: the retry loop reads the time, sleeps and draws jitter only
 * through a {@link Clock}, so tests can run it on a virtual clock and pin the jitter.
 *
 * The default uses `Date.now()` and `setTimeout`, so `node:test`'s `mock.timers` (with `Date`
 * and `setTimeout` enabled) also controls it.
 *
 * @module
 */

/** What the SDK needs of time. */
export interface Clock {
  /** Milliseconds since the Unix epoch (wall time; HTTP-dates are read against it). */
  now(): number;
  /**
   * Resolves after `ms` milliseconds; rejects with the signal's reason as soon as `signal`
   * aborts (and at once if it already has).
   */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** The platform's clock: `Date.now()` and `setTimeout`. */
export const systemClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) => sleep(ms, signal),
};

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, Math.max(0, ms));
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** A source of numbers uniform in `[0, 1)`, like `Math.random`. */
export type RandomSource = () => number;

/**
 * The host pause: one 429 with `Retry-After` holds back the client's other requests to that host.
 *
 * The rate limit is per account, so when one request of a client learns that the server wants
 * no more requests for 5 s, every other request of that client would learn the same thing the
 * hard way, each spending a request and a retry on it. {@link HostPause} remembers, per host
 * (`host:port`), the instant until which requests wait; the retry loop consults it before every
 * attempt, the first included, and adds its own jitter so the paused requests do not all leave
 * at once. Mirrors `tollgate_client::pause`.
 *
 * @module
 */

import { systemClock, type Clock } from "./clock.js";

/** Per-host "paused until" instants (epoch ms), shared by every request of one client. */
export class HostPause {
  readonly #until = new Map<string, number>();
  readonly #clock: Clock;

  constructor(clock: Clock = systemClock) {
    this.#clock = clock;
  }

  /** Pauses `host` until `untilMs`, unless it is already paused for longer. */
  pause(host: string, untilMs: number): void {
    const current = this.#until.get(host);
    if (current === undefined || current < untilMs) this.#until.set(host, untilMs);
  }

  /** The instant `host` is paused until, if that is still ahead. */
  pausedUntil(host: string): number | undefined {
    const until = this.#until.get(host);
    if (until === undefined) return undefined;
    if (until > this.#clock.now()) return until;
    this.#until.delete(host);
    return undefined;
  }

  /** Forgets every pause. */
  clear(): void {
    this.#until.clear();
  }
}

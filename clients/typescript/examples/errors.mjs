// What a failed call tells you: node examples/errors.mjs
import { TollgateClient, TollgateError, InsufficientCreditsError, NotFoundError, RateLimitError } from "@tollgate/sdk";

const tollgate = new TollgateClient({ maxRetries: 2 });

try {
  await tollgate.getTask("task_doesnotexist");
} catch (e) {
  if (e instanceof NotFoundError) {
    console.log(`${e.status} ${e.type} ${e.code}, request id ${e.requestId}, ${e.attempts} attempt(s)`);
  } else throw e;
}

try {
  await tollgate.generate({ prompt: "a very expensive mural", n: 4, size: "1024x1024" });
} catch (e) {
  if (e instanceof InsufficientCreditsError) {
    console.log(`not enough credits: ${e.message}`);
  } else if (e instanceof RateLimitError) {
    console.log(`rate limited; the server asked for ${e.retryAfterMs} ms`);
  } else if (e instanceof TollgateError) {
    // Every SDK error says why retries stopped and what each attempt got.
    console.log(e.stopReason, e.history.map((a) => `${a.number}:${a.status ?? a.cause}`).join(" "));
  } else throw e;
}

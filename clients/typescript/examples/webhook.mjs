// A webhook receiver as a fetch-style handler (Node 18+, Deno, Bun, Cloudflare Workers):
// verify the raw body against Tollgate-Signature before trusting it.
import { parseWebhook, WebhookVerificationError } from "@tollgate/sdk";

const seen = new Set(); // deliveries are at least once: deduplicate by Tollgate-Webhook-Id

export async function handleWebhook(request, secret) {
  const body = new Uint8Array(await request.arrayBuffer()); // the raw bytes, not re-serialised JSON
  let task;
  try {
    task = await parseWebhook({ secret, header: request.headers.get("tollgate-signature"), body });
  } catch (e) {
    if (e instanceof WebhookVerificationError) return new Response(e.message, { status: 400 });
    throw e;
  }
  const id = request.headers.get("tollgate-webhook-id") ?? task.id;
  if (!seen.has(id)) {
    seen.add(id);
    console.log(`task ${task.id} is ${task.status}`);
  }
  return new Response("ok");
}

// Make an image and save it: node examples/generate.mjs "a lighthouse at dusk" [out-dir]
// Reads TOLLGATE_BASE_URL and TOLLGATE_API_KEY.
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { TollgateClient } from "@tollgate/sdk";

const prompt = process.argv[2] ?? "a lighthouse at dusk";
const outDir = process.argv[3] ?? ".";

const tollgate = new TollgateClient(); // TOLLGATE_BASE_URL, TOLLGATE_API_KEY
const task = await tollgate.generate({ prompt, size: "256x256", wait: true, images: "bytes" });
for (const image of task.images) {
  const file = join(outDir, `${task.id}-${image.index}.png`);
  await writeFile(file, image.data);
  console.log(`${file} (${image.data.length} bytes; link: ${image.url})`);
}
const { credits } = await tollgate.account();
console.log(`task ${task.id} cost ${task.cost} credits; ${credits} left`);

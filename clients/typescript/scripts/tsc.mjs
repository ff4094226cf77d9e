#!/usr/bin/env node
// Runs the TypeScript compiler from wherever it is: $TSC (a path to tsc or to typescript/bin/tsc),
// else this package's node_modules (after `npm install`), else the repository's shared test tools
// (target/test-tools/node, where scripts/test installs it). Arguments are passed through.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, "..");
const candidates = [
  process.env.TSC,
  join(pkg, "node_modules", "typescript", "bin", "tsc"),
  join(pkg, "..", "..", "target", "test-tools", "node", "node_modules", "typescript", "bin", "tsc"),
].filter((p) => typeof p === "string" && p.length > 0);
const tsc = candidates.find((p) => existsSync(p));
if (tsc === undefined) {
  console.error(
    "tsc not found: set TSC, run `npm install` in clients/typescript, or install typescript into target/test-tools/node",
  );
  process.exit(2);
}
// A JS file runs under this node; anything else (a native wrapper, a shell script) runs as is.
const isScript = !tsc.endsWith(".cmd") && !tsc.endsWith(".exe");
const result = isScript
  ? spawnSync(process.execPath, [tsc, ...process.argv.slice(2)], { stdio: "inherit", cwd: process.cwd() })
  : spawnSync(tsc, process.argv.slice(2), { stdio: "inherit", cwd: process.cwd() });
process.exit(result.status ?? 1);

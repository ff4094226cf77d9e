// The README's examples are the files in examples/, byte for byte (the e2e suite runs them).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const root = new URL("../", import.meta.url);

test("every example block of the README is its file in examples/", () => {
  const readme = readFileSync(new URL("README.md", root), "utf8");
  const blocks = [...readme.matchAll(/<!-- example: (\S+) -->\n```js\n([\s\S]*?)```/g)];
  assert.ok(blocks.length >= 3, "the README has its examples");
  for (const [, file, code] of blocks) {
    assert.equal(code, readFileSync(new URL(file, root), "utf8"), file);
  }
});

test("package.json: ESM, types in exports, no runtime dependencies, the test script", () => {
  const pkg = JSON.parse(readFileSync(new URL("package.json", root), "utf8"));
  assert.equal(pkg.type, "module");
  assert.equal(pkg.exports["."].types, "./dist/index.d.ts");
  assert.equal(pkg.dependencies, undefined);
  assert.deepEqual(Object.keys(pkg.devDependencies), ["typescript"]);
  assert.equal(pkg.scripts.build, "tsc -p .");
  assert.equal(pkg.scripts.test, "tsc -p . && node --test test/");
});

test("the public API has no `any`", () => {
  const dts = ["index", "client", "admin", "transport", "policy", "retry", "errors", "types", "webhook", "budget", "pause", "clock"]
    .map((m) => readFileSync(new URL(`dist/${m}.d.ts`, root), "utf8"))
    .join("\n")
    .replace(/\/\*[\s\S]*?\*\//g, "")
    .replace(/\/\/.*$/gm, "");
  assert.doesNotMatch(dts, /\bany\b/);
});

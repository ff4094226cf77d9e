// The real `tollgate serve` for the end-to-end suite: the binary of TOLLGATE_BIN (default
// ../../target/debug/tollgate from clients/typescript), on 127.0.0.1 port 0 (the server picks a
// free port and prints it), a temporary data dir of its own, killed and removed at the end.
// Without the binary the suite is skipped with a message, unless CI is set: then it fails.

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";

export const ADMIN_TOKEN = "test-admin-token-0123456789";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, "..");

/** The server binary, or why there is none. */
export function serverBinary() {
  const bin = process.env.TOLLGATE_BIN ? resolve(process.env.TOLLGATE_BIN) : resolve(pkg, "..", "..", "target", "debug", "tollgate");
  if (existsSync(bin)) return { bin };
  return { missing: `the tollgate server binary is not at ${bin} (build it with \`cargo build -p tollgate\`, or set TOLLGATE_BIN)` };
}

/** `{ skip }` for node:test: a reason to skip when there is no binary (never under CI). */
export function skipUnlessServer() {
  const found = serverBinary();
  if (found.bin) return false;
  if (process.env.CI) return false; // the test runs and fails in startServer, as CI wants
  return `SKIPPED: ${found.missing}`;
}

/** Starts a server with extra flags; resolves once it listens. */
export async function startServer(args = [], env = {}) {
  const found = serverBinary();
  if (!found.bin) throw new Error(`${found.missing}${process.env.CI ? " (CI is set, so this fails rather than skips)" : ""}`);
  const dir = mkdtempSync(join(tmpdir(), "tollgate-ts-e2e-"));
  const logPath = join(dir, "server.log");
  const logFd = openSync(logPath, "w");
  const cleanEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("TOLLGATE_")));
  const child = spawn(found.bin, ["serve", "--addr", "127.0.0.1:0", "--data-dir", join(dir, "data"), ...args], {
    env: { ...cleanEnv, TOLLGATE_ADMIN_TOKEN: ADMIN_TOKEN, TOLLGATE_LOG: "info", RUST_BACKTRACE: "0", ...env },
    stdio: ["ignore", "pipe", logFd],
  });
  closeSync(logFd);
  const exited = new Promise((r) => child.once("exit", (code, signal) => r({ code, signal })));
  const base = await new Promise((resolveBase, reject) => {
    const timer = setTimeout(() => reject(new Error(`the server did not start within 60 s; log:\n${readLog(logPath)}`)), 60_000);
    const lines = createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      if (line.startsWith("listening on ")) {
        clearTimeout(timer);
        resolveBase(line.slice("listening on ".length).trim());
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`the server exited (${code ?? signal}) before listening; log:\n${readLog(logPath)}`));
    });
  });
  return {
    base,
    dir,
    log: () => readLog(logPath),
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        const t = setTimeout(() => child.kill("SIGKILL"), 10_000);
        await exited;
        clearTimeout(t);
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function readLog(path) {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

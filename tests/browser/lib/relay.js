// Starting the real relay binary, the second origin's page server, and reading the SMTP peer's
// Maildir and the outbox folder back.
import { spawn } from "node:child_process";
import { createHash, randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const REPO = resolve(import.meta.dirname, "../../..");

/** The key the tests call with; the relay holds only its SHA-256. */
export const API_KEY = "mr_browser_tests_" + "k".repeat(32);
export const API_KEY_SHA256 = createHash("sha256").update(API_KEY).digest("hex");

/** Whether a missing prerequisite must fail the run (CI) rather than skip it loudly. */
export const CI = !["", "0", "false"].includes((process.env.CI ?? "").trim());

/** The relay binary: MAIL_RELAY_BIN, else the newest of target/{debug,release}/mail-relay. */
export function relayBinary() {
  if (process.env.MAIL_RELAY_BIN) return process.env.MAIL_RELAY_BIN;
  const built = ["debug", "release"]
    .map((profile) => join(REPO, "target", profile, "mail-relay"))
    .filter((path) => existsSync(path))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  if (built.length === 0) throw new Error("no target/*/mail-relay: run `cargo build` first");
  return built[0];
}

/** The SMTP test peer's `peer.env` as an object, or null when the peer is not running. */
export function peerEnv() {
  const dir = process.env.MAIL_RELAY_PEER_DIR || "/tmp/mail-relay-peer";
  const file = join(dir, "peer.env");
  if (!existsSync(file)) return null;
  const env = {};
  for (const line of readFileSync(file, "utf8").split("\n")) {
    const at = line.indexOf("=");
    if (at > 0) env[line.slice(0, at)] = line.slice(at + 1);
  }
  return env;
}

/** A free TCP port on `host`. */
export function freePort(host = "127.0.0.1") {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, host, () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

/**
 * `mail-relay serve` with `yaml` (server.address/port are added) on 127.0.0.1. Returns its base
 * URL (with the base path), its log lines and stop().
 */
export async function startRelay(yaml, { basePath = "" } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "mail-relay-browser-"));
  const port = await freePort();
  const config = join(dir, "relay.yml");
  writeFileSync(config, `server:\n  address: 127.0.0.1\n  port: ${port}\n${yaml}`);
  const env = Object.fromEntries(
    Object.entries(process.env).filter(
      ([name]) => !/^(MAILRELAY_|FEATURESWITCHES_|SERVER_|MAIL_RELAY_)/.test(name) && name !== "RUST_LOG",
    ),
  );
  const child = spawn(relayBinary(), ["serve", "--config", config, "--log-format", "json"], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const logs = [];
  for (const stream of [child.stdout, child.stderr]) {
    let rest = "";
    stream.on("data", (chunk) => {
      const lines = (rest + chunk).split("\n");
      rest = lines.pop();
      logs.push(...lines);
    });
  }
  const origin = `http://127.0.0.1:${port}`;
  const url = origin + basePath;
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`the relay exited: ${logs.join("\n")}`);
    try {
      if ((await fetch(`${url}/health/live`)).ok) break;
    } catch {}
    if (Date.now() > deadline) throw new Error(`the relay did not start: ${logs.join("\n")}`);
    await sleep(50);
  }
  return {
    origin,
    url,
    dir,
    logs,
    /** The relay's request log lines for `method path`. */
    requests(method, path) {
      return logs
        .map((line) => { try { return JSON.parse(line); } catch { return null; } })
        .filter((entry) => entry && JSON.stringify(entry).includes(`"${method}"`) && JSON.stringify(entry).includes(path));
    },
    stop() {
      child.kill("SIGKILL");
    },
  };
}

/**
 * Serves `html` at `/` from a second origin (`host`, a free port): the page that calls the relay.
 * Returns its origin and close().
 */
export async function servePage(host, html) {
  const server = createServer((req, res) => {
    if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
      res.end(html);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((ok) => server.listen(0, host, ok));
  return {
    origin: `http://${host}:${server.address().port}`,
    close: () => new Promise((ok) => server.close(ok)),
  };
}

/** Every file under the Maildir's new/ and cur/, or an outbox folder, holding `needle`. */
export function mailsContaining(folder, needle) {
  const dirs = existsSync(join(folder, "new")) ? [join(folder, "new"), join(folder, "cur")] : [folder];
  const found = [];
  for (const dir of dirs) {
    if (!existsSync(dir)) continue;
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      if (!statSync(path).isFile()) continue;
      const bytes = readFileSync(path);
      if (bytes.includes(needle)) found.push(bytes);
    }
  }
  return found;
}

/** Waits up to `ms` for a mail holding `needle`; returns it, or null. */
export async function waitForMail(folder, needle, ms = 10_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const [mail] = mailsContaining(folder, needle);
    if (mail) return mail;
    if (Date.now() > deadline) return null;
    await sleep(50);
  }
}

export function marker() {
  return `browser-${randomUUID()}`;
}

export function sleep(ms) {
  return new Promise((ok) => setTimeout(ok, ms));
}

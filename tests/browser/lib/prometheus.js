// A real Prometheus on 127.0.0.1: Debian's package unpacked under target/ci-tools (run.sh does it,
// with the libjs-* packages its classic web UI loads), a storage folder of its own, and its HTTP API.
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";

import { freePort, sleep } from "./relay.js";

const REPO = resolve(import.meta.dirname, "../../..");
const ROOT = join(REPO, "target", "ci-tools", "root");

export const PROMETHEUS = process.env.MAIL_RELAY_PROMETHEUS || join(ROOT, "usr", "bin", "prometheus");
/** The classic web UI: templates, and static/ whose links point into the libjs-* packages. */
const ASSETS = join(ROOT, "usr", "share", "prometheus", "web");

/** Why Prometheus cannot run here, or null. */
export function missingPrometheus() {
  if (!existsSync(PROMETHEUS)) return `no ${PROMETHEUS} (tests/browser/run.sh unpacks Debian's prometheus)`;
  // Followed through the links: the package's own files and the libjs-* files they point to.
  for (const file of ["templates/alerts.html", "static/jquery/jquery.min.js", "static/rickshaw/rickshaw.min.js"]) {
    if (!existsSync(join(ASSETS, file))) return `no ${join(ASSETS, file)} (tests/browser/run.sh installs the UI's libjs-* packages)`;
  }
  return null;
}

/**
 * `prometheus` with `yaml` as its configuration, listening on 127.0.0.1 only, in a folder of its
 * own where `links` ({relative path: file}) are: the configuration names them by those paths, and
 * so does the UI. Returns its URL, its log lines, api(path) and stop().
 */
export async function startPrometheus(yaml, { links = {} } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "mail-relay-prometheus-"));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  writeFileSync(join(dir, "prometheus.yml"), yaml);
  for (const [path, file] of Object.entries(links)) {
    mkdirSync(dirname(join(dir, path)), { recursive: true });
    symlinkSync(file, join(dir, path));
  }
  const child = spawn(
    PROMETHEUS,
    [
      // Relative, so that the paths it names stay relative: the UI shows deploy/prometheus/alerts.yml,
      // not a temporary folder.
      "--config.file=prometheus.yml",
      `--storage.tsdb.path=${join(dir, "data")}`,
      `--web.listen-address=127.0.0.1:${port}`,
      // Otherwise the UI's links name the machine's host name.
      `--web.external-url=${url}/`,
      `--web.local-assets=${ASSETS}`,
      `--web.console.templates=${join(ROOT, "etc", "prometheus", "consoles")}`,
      `--web.console.libraries=${join(ROOT, "etc", "prometheus", "console_libraries")}`,
    ],
    { cwd: dir, stdio: ["ignore", "pipe", "pipe"] },
  );
  const logs = [];
  for (const stream of [child.stdout, child.stderr]) {
    let rest = "";
    stream.on("data", (chunk) => {
      const lines = (rest + chunk).split("\n");
      rest = lines.pop();
      logs.push(...lines);
    });
  }
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`prometheus exited: ${logs.join("\n")}`);
    try {
      if ((await fetch(`${url}/-/ready`)).ok) break;
    } catch {}
    if (Date.now() > deadline) throw new Error(`prometheus did not start: ${logs.join("\n")}`);
    await sleep(100);
  }
  return {
    url,
    logs,
    /** GET /api/v1/<path>: its `data`, or an error naming Prometheus's answer. */
    async api(path) {
      const answer = await (await fetch(`${url}/api/v1/${path}`)).json();
      if (answer.status !== "success") throw new Error(`/api/v1/${path}: ${JSON.stringify(answer)}`);
      return answer.data;
    },
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((ok) => child.once("exit", ok));
        child.kill("SIGKILL");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Calls `check` every 200 ms until it returns something truthy (returned); after `ms`, fails naming `what`. */
export async function eventually(what, check, ms = 30_000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`not within ${ms / 1000} s: ${what}${last ? ` (last: ${last.message})` : ""}`);
    }
    await sleep(200);
  }
}

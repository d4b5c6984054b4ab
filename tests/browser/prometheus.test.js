// The operators' view in a real Chromium: a real Prometheus (Debian's, on 127.0.0.1) scrapes a relay
// every second with deploy/prometheus/alerts.yml loaded. Its classic web UI shows the relay's
// target up, lists every alert rule of the file, evaluates them without error, graphs the relay's
// requests once mails were sent, and shows MailRelayDailyQuotaReached firing when the relay answers
// 429 for its daily quota. A screenshot of the alerts page is kept for a person to look at.
import assert from "node:assert/strict";
import { mkdirSync, readFileSync, rmSync } from "node:fs";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";

import { haveChromium, launch } from "./lib/chromium.js";
import { eventually, missingPrometheus, startPrometheus } from "./lib/prometheus.js";
import { API_KEY, API_KEY_SHA256, CI, marker, startRelay } from "./lib/relay.js";

const REPO = resolve(import.meta.dirname, "../..");
const ARTIFACTS = join(REPO, "target", "browser-artifacts");
const RULES = join(REPO, "deploy", "prometheus", "alerts.yml");
/** Every `- alert: Name` of the rules file, as the file spells them. */
const ALERTS = [...readFileSync(RULES, "utf8").matchAll(/^\s*- alert:\s*(\S+)\s*$/gm)].map((m) => m[1]).sort();
/** The rule that fires in this test: the relay's own daily recipient limit refuses mail. */
const FIRING = "MailRelayDailyQuotaReached";

const missing = !haveChromium() ? "no Chromium (apt-get install chromium)" : missingPrometheus();
if (missing && CI) throw new Error(`${missing} and CI is set`);

describe("Prometheus scraping the relay", { skip: missing ? `SKIPPED (${missing})` : false }, () => {
  let relay, prometheus, browser, outbox;

  before(async () => {
    outbox = join(process.env.TMPDIR || "/tmp", `mail-relay-browser-prometheus-${process.pid}`);
    // Two recipients a day for the mailbox: two mails go, the third is refused with 429 mailbox_day.
    relay = await startRelay(
      `mailRelay:
  delivery:
    mode: outbox
    outboxDir: ${outbox}
  auth:
    apiKeys: [{name: operators, sha256: ${API_KEY_SHA256}, allowedFrom: ["*@contoso.com"]}]
  limits:
    maxRecipients: 1
  rateLimits:
    mailboxRecipientsPerDay: 2
    callerRecipientsPerDay: 0
`,
    );
    prometheus = await startPrometheus(
      `global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: mail-relay
    static_configs:
      - targets: ["${new URL(relay.origin).host}"]
`,
      { links: { "deploy/prometheus/alerts.yml": RULES } },
    );
    browser = await launch();
  });

  after(async () => {
    await browser?.close();
    await prometheus?.stop();
    relay?.stop();
    if (outbox) rmSync(outbox, { recursive: true, force: true });
  });

  /** A page of Prometheus's UI, with every request elsewhere refused and every failure noted. */
  async function open(path) {
    const page = await browser.newPage();
    const problems = [];
    await page.route("**/*", (route) => {
      const url = route.request().url();
      if (url.startsWith(prometheus.url + "/")) return route.continue();
      problems.push(`outside request: ${url}`);
      return route.abort();
    });
    page.on("response", (r) => r.status() >= 400 && problems.push(`${r.status()} ${r.url()}`));
    page.on("pageerror", (e) => problems.push(e.message));
    page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
    await page.goto(prometheus.url + path);
    return { page, problems };
  }

  function send(subject) {
    return fetch(`${relay.url}/mail`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: JSON.stringify({ from: "noreply@contoso.com", to: ["alice@contoso.com"], subject, text: "counted" }),
    });
  }

  /** The value of `expr`'s only series now, or undefined. */
  async function value(expr) {
    const { result } = await prometheus.api(`query?query=${encodeURIComponent(expr)}`);
    return result.length === 1 ? Number(result[0].value[1]) : undefined;
  }

  test("the relay's target is up", async () => {
    const scrapeUrl = `${relay.origin}/metrics`;
    const up = await eventually(`Prometheus scraped ${scrapeUrl}`, async () => {
      const { activeTargets } = await prometheus.api("targets");
      return activeTargets.find((t) => t.scrapeUrl === scrapeUrl && t.health === "up");
    });
    assert.equal(up.labels.job, "mail-relay");

    const { page, problems } = await open("/classic/targets");
    const row = page.locator("tr").filter({ has: page.locator(`td.endpoint a[href="${scrapeUrl}"]`) });
    assert.equal(await row.count(), 1, "the targets page has the relay's endpoint");
    assert.equal((await row.locator("td.state").textContent()).trim(), "up");
    assert.equal((await row.locator("td.errors").textContent()).trim(), "", "no scrape error");
    assert.deepEqual(problems, []);
  });

  test("every rule of deploy/prometheus/alerts.yml is loaded and evaluates", async () => {
    assert.ok(ALERTS.length >= 8, `alerts.yml names ${ALERTS.length} alerts`);
    assert.equal(new Set(ALERTS).size, ALERTS.length, "alert names are unique");
    // Evaluated against the relay's series: no rule is in error (a bad expression, a clash of labels).
    const rules = await eventually("every rule was evaluated", async () => {
      const { groups } = await prometheus.api("rules");
      const all = groups.flatMap((g) => g.rules);
      return all.length > 0 && all.every((r) => r.health !== "unknown") && all;
    });
    assert.deepEqual(rules.map((r) => r.name).sort(), ALERTS, "Prometheus loaded exactly the file's alerts");
    assert.deepEqual(rules.filter((r) => r.health !== "ok").map((r) => `${r.name}: ${r.lastError}`), []);

    const alerts = await open("/classic/alerts");
    const listed = (await alerts.page.locator("tr.alert_header b").allTextContents()).map((s) => s.trim()).sort();
    assert.deepEqual(listed, ALERTS, "the alerts page lists every alert of the file");
    assert.deepEqual(alerts.problems, []);

    const rulesPage = await open("/classic/rules");
    const states = await rulesPage.page.locator("td.state").allTextContents();
    assert.equal(states.length, ALERTS.length);
    assert.deepEqual([...new Set(states.map((s) => s.trim()))], ["ok"], "the rules page shows every rule OK");
    for (const name of ALERTS) {
      assert.equal(await rulesPage.page.locator("td.rule_cell", { hasText: `alert: ${name}` }).count(), 1, name);
    }
    assert.deepEqual(rulesPage.problems, []);
  });

  test("the relay's mails are graphed and the daily quota alert fires", async () => {
    for (let i = 0; i < 2; i++) assert.equal((await send(marker())).status, 202);
    await eventually("Prometheus has the two mails sent", async () =>
      (await value('sum(mail_relay_mails_total{outcome="sent"})')) === 2);

    // The daily quota is used up: 429, counted as mailbox_day. A second refusal after a scrape of the
    // first makes the counter's increase visible to the rule (a new series has no increase).
    const refused = await send(marker());
    assert.equal(refused.status, 429);
    assert.equal((await refused.json()).code, "rate_limited");
    await eventually("Prometheus has the first 429", async () =>
      (await value('mail_relay_rate_limited_total{scope="mailbox_day"}')) === 1);
    assert.equal((await send(marker())).status, 429);
    const firing = await eventually(`${FIRING} fires`, async () => {
      const { alerts } = await prometheus.api("alerts");
      return alerts.find((a) => a.labels.alertname === FIRING && a.state === "firing");
    });
    assert.equal(firing.labels.scope, "mailbox_day");
    assert.equal(firing.labels.severity, "critical");

    // The graph of the relay's answers to POST /mail, by status: the 202s and the 429s.
    const expr = 'sum by (status) (mail_relay_http_requests_total{route=~".*/mail"})';
    const graph = await open(`/classic/graph?g0.expr=${encodeURIComponent(expr)}&g0.tab=0&g0.range_input=20s`);
    // A flat line has no height, which playwright calls hidden: wait for the lines to be drawn.
    await graph.page.locator(".graph_area svg path.path").nth(1).waitFor({ state: "attached", timeout: 15_000 });
    const legend = (await graph.page.locator(".legend .line .label").allTextContents()).sort();
    assert.deepEqual(legend, ['{status="202"}', '{status="429"}'], "the graph has a line per answer");
    mkdirSync(ARTIFACTS, { recursive: true });
    await graph.page.screenshot({ path: join(ARTIFACTS, "prometheus-graph.png") });
    assert.deepEqual(graph.problems, []);

    // The alerts page: the firing rule in red, opened, the others green.
    const alerts = await open("/classic/alerts");
    const header = alerts.page.locator("tr.alert_header", { hasText: FIRING });
    assert.match(await header.getAttribute("class"), /alert-danger/);
    assert.equal(await alerts.page.locator("tr.alert_header.alert-success").count(), ALERTS.length - 1,
      "the other rules stay quiet");
    await header.click();
    await alerts.page.locator("div.show-annotations").click();
    await alerts.page.screenshot({ path: join(ARTIFACTS, "prometheus.png"), fullPage: true });
    assert.deepEqual(alerts.problems, []);
  });
});

// The API reference page at /docs in a real Chromium: it works offline (every request that leaves
// the relay is refused), lists every operation of the OpenAPI document, and sends a mail through
// "Authorize" and "Try it out" into the outbox folder. A screenshot is kept for a person to look at.
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { after, before, describe, test } from "node:test";

import { haveChromium, launch } from "./lib/chromium.js";
import { API_KEY, API_KEY_SHA256, CI, marker, startRelay, waitForMail } from "./lib/relay.js";

const REPO = resolve(import.meta.dirname, "../..");
const ARTIFACTS = join(REPO, "target", "browser-artifacts");

const missing = !haveChromium() ? "no Chromium (apt-get install chromium)" : null;
if (missing && CI) throw new Error(`${missing} and CI is set`);

describe("the /docs page", { skip: missing ? `SKIPPED (${missing})` : false }, () => {
  let relay, browser, outbox;

  before(async () => {
    outbox = join(process.env.TMPDIR || "/tmp", `mail-relay-browser-docs-${process.pid}`);
    relay = await startRelay(
      `mailRelay:
  delivery:
    mode: outbox
    outboxDir: ${outbox}
  auth:
    apiKeys: [{name: docs, sha256: ${API_KEY_SHA256}, allowedFrom: ["*@contoso.com"]}]
`,
      { basePath: "" },
    );
    browser = await launch();
  });

  after(async () => {
    await browser?.close();
    relay?.stop();
  });

  test("lists every operation offline and sends a mail with Try it out", async () => {
    const page = await browser.newPage();
    const outside = [];
    // Air-gapped: anything not served by the relay itself fails the test.
    await page.route("**/*", (route) => {
      const url = route.request().url();
      if (url.startsWith(relay.origin + "/")) return route.continue();
      outside.push(url);
      return route.abort();
    });
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    page.on("console", (m) => m.type() === "error" && errors.push(m.text()));

    await page.goto(`${relay.url}/docs`);
    await page.waitForSelector(".opblock", { timeout: 20_000 });
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, "docs.png") });

    const document = await (await fetch(`${relay.url}/openapi.json`)).json();
    const expected = Object.entries(document.paths)
      .flatMap(([path, item]) => Object.keys(item).map((method) => `${method.toUpperCase()} ${path}`))
      .sort();
    const listed = (
      await page.$$eval(".opblock-summary", (blocks) =>
        blocks.map((b) => {
          const method = b.querySelector(".opblock-summary-method")?.textContent.trim();
          const path = b.querySelector(".opblock-summary-path")?.getAttribute("data-path")
            ?? b.querySelector(".opblock-summary-path")?.textContent.trim();
          return `${method} ${path.replace(/\u200b/g, "")}`;
        }),
      )
    ).sort();
    assert.deepEqual(listed, expected, "every operation of the document is on the page");

    // Authorize with the API key (the bearer scheme).
    await page.click(".auth-wrapper .authorize");
    await page.fill(".auth-container input", API_KEY);
    await page.click(".auth-btn-wrapper .modal-btn.authorize");
    await page.click(".auth-btn-wrapper .btn-done");

    // POST /mail: Try it out, with a mail of our own.
    const mark = marker();
    const block = page.locator(".opblock-post").filter({ hasText: "/mail" }).first();
    await block.locator(".opblock-summary").click();
    // The page opens with "Try it out" on (tryItOutEnabled); the button then reads "Cancel".
    const tryOut = block.locator(".try-out__btn");
    if ((await tryOut.textContent()).trim() === "Try it out") await tryOut.click();
    await block.locator("textarea.body-param__text").fill(
      JSON.stringify({ from: "noreply@contoso.com", to: ["alice@contoso.com"], subject: mark, text: "sent from /docs" }),
    );
    await block.locator(".execute").click();
    // The live answer's row (the table's first row is its header, "Code").
    const status = block.locator(".live-responses-table tbody .response-col_status").first();
    await status.waitFor({ timeout: 15_000 });
    assert.match((await status.textContent()).trim(), /^202/);

    const mail = await waitForMail(outbox, mark);
    assert.ok(mail, "the mail sent from the page is in the outbox folder");
    assert.ok(mail.toString().includes("sent from /docs"));

    await status.scrollIntoViewIfNeeded();
    await page.mouse.wheel(0, 250);
    await page.screenshot({ path: join(ARTIFACTS, "docs-try-it-out.png") });

    assert.deepEqual(outside, [], "no request left the relay (no CDN)");
    assert.deepEqual(errors, [], "no script or console errors");
  });
});

// A page on another origin calls the relay with fetch(), in a real Chromium: CORS, credentials,
// Idempotency-Key replays, problem+json and multipart uploads, delivered to the real SMTP peer.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";

import { haveChromium, launch } from "./lib/chromium.js";
import {
  API_KEY, API_KEY_SHA256, CI, mailsContaining, marker, peerEnv, servePage, sleep, startRelay, waitForMail,
} from "./lib/relay.js";

const PAGE = `<!DOCTYPE html><html><head><meta charset="utf-8"><title>caller</title></head>
<body><form><input type="file" id="upload" multiple></form></body></html>`;

const peer = peerEnv();
const missing = !haveChromium() ? "no Chromium (apt-get install chromium)" : !peer ? "no SMTP peer (run tests/peer/start.sh)" : null;
if (missing && CI) throw new Error(`${missing} and CI is set`);

describe("a page on another origin", { skip: missing ? `SKIPPED (${missing})` : false }, () => {
  let allowed, other, relay, limited, browser;

  before(async () => {
    allowed = await servePage("127.0.0.2", PAGE);
    other = await servePage("127.0.0.3", PAGE);
    const cors = `  cors:\n    allowedOrigins: ["${allowed.origin}"]\n`;
    const keys = `  auth:\n    apiKeys: [{name: browser, sha256: ${API_KEY_SHA256}, allowedFrom: ["*@contoso.test"]}]\n`;
    relay = await startRelay(
      `featureSwitches:
  sendEmail:
    smtpServer: localhost
    smtpPort: ${peer.PEER_SUBMISSION_PORT}
    smtpEncryption: TLS
    smtpAuthentication: BASIC
    smtpUsername: ${peer.PEER_BASIC_USER}
    smtpPassword: "${peer.PEER_BASIC_PASSWORD}"
mailRelay:
  smtp:
    caFile: ${peer.PEER_CA}
${keys}${cors}`,
    );
    // One message a minute per caller, so that the second call is refused with 429 and Retry-After.
    limited = await startRelay(
      `mailRelay:\n  delivery:\n    mode: outbox\n    outboxDir: OUTBOX\n${keys}${cors}  rateLimits:\n    callerMessagesPerMinute: 1\n`
        .replace("OUTBOX", `${process.env.TMPDIR || "/tmp"}/mail-relay-browser-limited-${process.pid}`),
    );
    browser = await launch();
  });

  after(async () => {
    await browser?.close();
    relay?.stop();
    limited?.stop();
    await allowed?.close();
    await other?.close();
  });

  async function pageOn(origin) {
    const page = await browser.newPage();
    await page.goto(origin + "/");
    return page;
  }

  function mail(mark, extra = {}) {
    return { from: peer.PEER_BASIC_USER, to: ["alice@contoso.test"], subject: mark, text: `sent from a browser: ${mark}`, ...extra };
  }

  // Runs in the page: POST /mail as JSON with the API key; what the page can see of the answer.
  async function postFromPage(page, url, body, headers = {}, init = {}) {
    return page.evaluate(
      async ({ url, body, headers, init, key }) => {
        try {
          const response = await fetch(url + "/mail", {
            method: "POST",
            headers: { authorization: `Bearer ${key}`, "content-type": "application/json", ...headers },
            body: JSON.stringify(body),
            ...init,
          });
          const seen = {};
          for (const name of ["x-request-id", "retry-after", "idempotent-replayed", "content-type"]) seen[name] = response.headers.get(name);
          return { status: response.status, headers: seen, body: await response.json() };
        } catch (e) {
          return { rejected: `${e.name}: ${e.message}` };
        }
      },
      { url, body, headers, init, key: API_KEY },
    );
  }

  test("an allowed origin passes the preflight and its mail reaches the SMTP peer", async () => {
    const page = await pageOn(allowed.origin);
    const preflights = [];
    page.on("request", (r) => r.method() === "OPTIONS" && preflights.push(r.url()));
    const mark = marker();
    const answer = await postFromPage(page, relay.url, mail(mark));
    assert.equal(answer.rejected, undefined, "the browser refused the call");
    assert.equal(answer.status, 202, JSON.stringify(answer));
    // Authorization and a JSON body make the browser ask first; the answer let it go on.
    assert.match(answer.headers["x-request-id"] ?? "", /^[0-9a-f-]{36}$/);
    const delivered = await waitForMail(peer.PEER_MAILDIR, mark);
    assert.ok(delivered, `no mail with ${mark} in the peer's Maildir`);
    assert.ok(delivered.includes(answer.body.messageId), "the delivered mail has another Message-ID");
    await page.close();
  });

  test("a disallowed origin is blocked by the browser and nothing is sent", async () => {
    const page = await pageOn(other.origin);
    const mark = marker();
    const answer = await postFromPage(page, relay.url, mail(mark));
    assert.match(answer.rejected ?? "", /TypeError/, `the page read the answer: ${JSON.stringify(answer)}`);
    // A form post needs no preflight, so it does reach the relay, but carries no API key.
    const status = await page.evaluate(async ({ url, body }) => {
      const form = new FormData();
      form.append("mail", JSON.stringify(body));
      await fetch(url + "/mail", { method: "POST", mode: "no-cors", body: form });
      return "sent";
    }, { url: relay.url, body: mail(mark) });
    assert.equal(status, "sent");
    await sleep(1500);
    assert.equal(mailsContaining(peer.PEER_MAILDIR, mark).length, 0, "a disallowed origin's mail went out");
    await page.close();
  });

  test("credentialed calls (credentials: include) work for an allowed origin only", async () => {
    // The browser hands a credentialed answer to the page only when the relay names the exact
    // origin and says Access-Control-Allow-Credentials: true (the README's "with credentials").
    const page = await pageOn(allowed.origin);
    const mark = marker();
    const answer = await postFromPage(page, relay.url, mail(mark), {}, { credentials: "include" });
    assert.equal(answer.rejected, undefined, "the browser refused the credentialed call");
    assert.equal(answer.status, 202, JSON.stringify(answer));
    assert.ok(await waitForMail(peer.PEER_MAILDIR, mark), "the credentialed mail was not delivered");

    const stranger = await pageOn(other.origin);
    const strangerMark = marker();
    const refused = await postFromPage(stranger, relay.url, mail(strangerMark), {}, { credentials: "include" });
    assert.match(refused.rejected ?? "", /TypeError/, JSON.stringify(refused));
    await sleep(1000);
    assert.equal(mailsContaining(peer.PEER_MAILDIR, strangerMark).length, 0);
    await page.close();
    await stranger.close();
  });

  test("an Idempotency-Key retry is replayed and the mail goes once", async () => {
    const page = await pageOn(allowed.origin);
    const mark = marker();
    const key = { "idempotency-key": mark };
    const first = await postFromPage(page, relay.url, mail(mark), key);
    const retry = await postFromPage(page, relay.url, mail(mark), key);
    assert.equal(first.status, 202, JSON.stringify(first));
    assert.equal(first.headers["idempotent-replayed"], null);
    assert.equal(retry.status, 202, JSON.stringify(retry));
    assert.equal(retry.headers["idempotent-replayed"], "true", "the page cannot see that the answer was replayed");
    assert.equal(retry.body.messageId, first.body.messageId);
    assert.ok(await waitForMail(peer.PEER_MAILDIR, mark));
    await sleep(1000);
    assert.equal(mailsContaining(peer.PEER_MAILDIR, mark).length, 1, "the retry sent the mail again");
    await page.close();
  });

  test("a problem+json answer, its Retry-After and request id are readable by the page", async () => {
    const page = await pageOn(allowed.origin);
    const first = await postFromPage(page, limited.url, mail(marker()));
    assert.equal(first.status, 202, JSON.stringify(first));
    const refused = await postFromPage(page, limited.url, mail(marker()));
    assert.equal(refused.status, 429, JSON.stringify(refused));
    assert.match(refused.headers["content-type"], /^application\/problem\+json/);
    assert.equal(refused.body.code, "rate_limited");
    assert.match(refused.headers["retry-after"] ?? "", /^[1-9][0-9]*$/, "Retry-After is hidden from the page");
    assert.ok(refused.headers["x-request-id"], "X-Request-Id is hidden from the page");
    assert.equal(refused.body.requestId, refused.headers["x-request-id"]);
    await page.close();
  });

  test("a file chosen in <input type=file> arrives intact at the peer", async () => {
    const page = await pageOn(allowed.origin);
    const mark = marker();
    // Every byte value, and more than one read chunk's worth.
    const content = Buffer.concat([Buffer.from(Array.from({ length: 256 }, (_, i) => i)), randomBytes(300_000)]);
    await page.setInputFiles("#upload", { name: "report.bin", mimeType: "application/octet-stream", buffer: content });
    const answer = await page.evaluate(async ({ url, body, key }) => {
      const form = new FormData();
      form.append("mail", JSON.stringify(body));
      for (const file of document.getElementById("upload").files) form.append("file", file);
      const response = await fetch(url + "/mail", { method: "POST", headers: { authorization: `Bearer ${key}` }, body: form });
      return { status: response.status, body: await response.json() };
    }, { url: relay.url, body: mail(mark), key: API_KEY });
    assert.equal(answer.status, 202, JSON.stringify(answer));
    const delivered = await waitForMail(peer.PEER_MAILDIR, mark);
    assert.ok(delivered, "the upload's mail was not delivered");
    const attachment = attachmentNamed(delivered.toString("latin1"), "report.bin");
    assert.equal(attachment.length, content.length);
    assert.equal(sha256(attachment), sha256(content), "the file changed on its way");
    await page.close();
  });
});

function sha256(bytes) {
  return createHash("sha256").update(bytes).digest("hex");
}

/** The decoded body of the base64 MIME part whose filename is `name` (Maildir files end lines in LF). */
function attachmentNamed(message, name) {
  const at = message.indexOf(`filename="${name}"`);
  assert.ok(at >= 0, `no part named ${name}`);
  const start = message.lastIndexOf("\n--", at);
  const blank = /\r?\n\r?\n/g;
  blank.lastIndex = at;
  const headersEnd = blank.exec(message);
  assert.match(message.slice(start, headersEnd.index), /Content-Transfer-Encoding: base64/i);
  const end = message.indexOf("\n--", headersEnd.index + 1);
  return Buffer.from(message.slice(headersEnd.index, end).replace(/\s+/g, ""), "base64");
}

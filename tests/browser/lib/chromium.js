// Headless Debian Chromium through playwright-core: no downloaded browser, no network beyond loopback.
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.MAIL_RELAY_CHROMIUM || "/usr/bin/chromium";

export function haveChromium() {
  return existsSync(CHROMIUM);
}

/** A fresh browser with a profile of its own; close it with `.close()`. */
export async function launch() {
  const profile = mkdtempSync(join(tmpdir(), "mail-relay-chromium-"));
  // launchPersistentContext is how playwright takes --user-data-dir; it returns the context.
  return chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      // Without these Chromium reaches out to Google's services on its own.
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1280, height: 900 },
  });
}

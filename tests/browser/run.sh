#!/usr/bin/env bash
# The browser tests: Debian's Chromium (installed when missing) driven by the pinned playwright-core
# from npm (never a downloaded browser), and a Prometheus from Debian's package (unpacked, with its
# web UI's libjs-* packages installed when missing). Needs the SMTP peer running (tests/run.sh
# starts it) and a built relay binary (target/debug/mail-relay, or MAIL_RELAY_BIN). Screenshots go
# to target/browser-artifacts/.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x /usr/bin/chromium ]; then
    command -v apt-get >/dev/null || { echo "no Chromium and no apt-get to install it" >&2; exit 1; }
    echo "installing chromium ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium </dev/null >/dev/null 2>&1 ||
        { apt-get update -q </dev/null >/dev/null 2>&1 &&
          apt-get install -y -q --no-install-recommends chromium </dev/null >/dev/null; }
fi
# The Prometheus test's server: Debian's prometheus unpacked under target/ci-tools (where
# .ci/deploy-checks takes promtool from), and the packages its classic web UI loads scripts and
# fonts from.
# shellcheck source=SCRIPTDIR/../prometheus.sh
source ../prometheus.sh
unpack_prometheus ../../target/ci-tools
prometheus_ui_packages ../../target/ci-tools
# playwright-core would otherwise look for a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
[ -d node_modules/playwright-core ] || npm ci --silent --no-audit --no-fund
timeout 300 node --test --test-concurrency=1 --test-timeout=120000 ./*.test.js

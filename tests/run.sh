#!/usr/bin/env bash
# The test command: starts the real SMTP peer (Postfix + Dovecot), the reverse-proxy peer (nginx)
# and the store (a private PostgreSQL), installing them if missing, runs every test, stops them.
# Usage: bash tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/peer/start.sh
trap 'bash tests/peer/stop.sh' EXIT
bash tests/proxy/start.sh
trap 'bash tests/proxy/stop.sh; bash tests/peer/stop.sh' EXIT
bash tests/store/start.sh
trap 'bash tests/store/stop.sh; bash tests/proxy/stop.sh; bash tests/peer/stop.sh' EXIT

# Tests that need the peers or the store fail instead of skipping when one is missing.
export CI="${CI:-true}"
cargo test --locked "$@"

# Real-browser tests (headless Chromium): CORS, uploads, the /docs page and a real Prometheus's view
# of the relay and its alert rules, against the built binary.
cargo build --locked --quiet
bash tests/browser/run.sh
# The TypeScript client generated from openapi/openapi.json, type-checked and run against the relay.
bash tests/client/run.sh

# API fuzzing (schemathesis against /openapi.json, bounded; installs itself into target/fuzz-venv).
bash tests/fuzz/run.sh

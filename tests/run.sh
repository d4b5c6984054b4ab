#!/usr/bin/env bash
# The test command: starts the real SMTP peer (Postfix + Dovecot, installed if missing), runs every test,
# stops the peer. Usage: bash tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/peer/start.sh
trap 'bash tests/peer/stop.sh' EXIT

# Tests that need the peer fail instead of skipping when it is missing.
export CI="${CI:-true}"
cargo test --locked "$@"

# API fuzzing (schemathesis against /openapi.json, bounded; installs itself into target/fuzz-venv).
bash tests/fuzz/run.sh

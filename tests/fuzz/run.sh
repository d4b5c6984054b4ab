#!/usr/bin/env bash
# API fuzzing: schemathesis against a running relay's /openapi.json, with a valid API key.
# Starts a relay (debug build) in outbox mode on a free loopback port, runs schemathesis with a
# bounded number of examples per operation and every check but positive_data_acceptance (the
# schema cannot express cross-field rules such as "contentId needs an html body") and
# ensure_resource_availability (this relay, on the memory store, sends synchronously: a sent mail's
# id has no status to GET, as `GET /mail/{id}` documents; tests/api/queue.rs covers the queued
# ids against real stores), and fails on
# any 5xx, any answer that does not match the OpenAPI document (status, content type, headers,
# body), a schema-violating request that is accepted, or a request without credentials that is.
# Usage: bash tests/fuzz/run.sh   (env: MAIL_RELAY_FUZZ_EXAMPLES=200 per operation,
#        MAIL_RELAY_FUZZ_SEED, MAIL_RELAY_FUZZ_CHECKS=all, MAIL_RELAY_FUZZ_EXCLUDE_CHECKS)
set -euo pipefail
cd "$(dirname "$0")/../.."

examples="${MAIL_RELAY_FUZZ_EXAMPLES:-200}"
seed="${MAIL_RELAY_FUZZ_SEED:-20261126}"
venv="${MAIL_RELAY_FUZZ_VENV:-target/fuzz-venv}"
api_key="mr_fuzz-key-not-a-secret"

if [ ! -x "$venv/bin/st" ]; then
    echo "installing schemathesis into $venv"
    source tests/venv.sh
    make_venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4.3,<5'
fi

cargo build --locked --quiet --bin mail-relay

work="$(mktemp -d)"
relay_pid=""
cleanup() {
    if [ -n "$relay_pid" ]; then
        kill "$relay_pid" 2>/dev/null || true
        wait "$relay_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
sha="$(printf %s "$api_key" | sha256sum | cut -d' ' -f1)"
cat > "$work/fuzz.yml" <<YAML
server:
  address: 127.0.0.1
  port: $port
mailRelay:
  delivery:
    mode: outbox
    outboxDir: $work/outbox
  limits:
    maxBodyBytes: 1048576
  auth:
    apiKeys:
      - name: fuzz
        sha256: $sha
        allowedFrom: ["*@example.com", "*@contoso.com"]
YAML

target/debug/mail-relay --config "$work/fuzz.yml" --log warn serve \
    </dev/null >"$work/relay.log" 2>&1 &
relay_pid=$!
ready() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$port/health/ready" 2>/dev/null
}
for _ in $(seq 1 200); do
    if ready; then break; fi
    sleep 0.05
done
ready || { echo "the relay did not get ready:"; cat "$work/relay.log"; exit 1; }

status=0
venv="$(cd "$venv" && pwd)"
# From the scratch dir: schemathesis keeps a cache (.schemathesis/) in its working directory.
cd "$work"
"$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" \
    --header "Authorization: Bearer $api_key" \
    --checks "${MAIL_RELAY_FUZZ_CHECKS:-all}" \
    --exclude-checks "${MAIL_RELAY_FUZZ_EXCLUDE_CHECKS:-positive_data_acceptance,ensure_resource_availability}" \
    --max-examples "$examples" \
    --seed "$seed" \
    --no-color || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- relay log (last 50 lines)"
    tail -n 50 "$work/relay.log"
    exit "$status"
fi
# Closing line in the form CI reads.
echo "fuzz: 1 passed, 0 failed"

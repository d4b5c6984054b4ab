#!/usr/bin/env bash
# The benchmark: the relay (release build) against direct SMTP to the Postfix + Dovecot test peer.
# Usage: bash bench/run.sh            (BENCH_RUNS=3 BENCH_SECONDS=5 BENCH_CLIENTS=1,8,32,128)
# Prints the results table and writes it to bench/results/latest.{md,json}. Takes about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
    apt-get install -y --no-install-recommends wrk >/dev/null
fi
bash tests/peer/start.sh
peer_env="${MAIL_RELAY_PEER_DIR:-/tmp/mail-relay-peer}/peer.env"

cargo build --release --locked --bin mail-relay --example smtp_direct
python3 bench/run.py "$peer_env"

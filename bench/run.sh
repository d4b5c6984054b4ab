#!/usr/bin/env bash
# The benchmark: the relay (release build) against direct SMTP to the Postfix + Dovecot test peer.
# Usage: bash bench/run.sh            (BENCH_RUNS=5 BENCH_SECONDS=5 BENCH_CLIENTS=1,8,32,128)
# Prints the results table and writes it to bench/results/latest.{md,json}, and a perf profile of the
# relay to bench/results/profile.txt (BENCH_PROFILE=0 to skip). Takes about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
bash tests/peer/start.sh
peer_env="${MAIL_RELAY_PEER_DIR:-/tmp/mail-relay-peer}/peer.env"

# Symbols kept (not stripped) so that perf can name the relay's functions; the code is the same.
CARGO_PROFILE_RELEASE_STRIP=none cargo build --release --locked --bin mail-relay --example smtp_direct
python3 bench/run.py "$peer_env"

#!/usr/bin/env bash
# The benchmark: the relay (release build) against direct SMTP to the Postfix + Dovecot test peer.
# Usage: bash bench/run.sh            (BENCH_RUNS=5 BENCH_SECONDS=5 BENCH_CLIENTS=1,8,32,128 BENCH_SPLIT=1)
#        bash bench/run.sh memory     only the peak RSS for one 25 MB attachment (bench/memory.py)
#        bash bench/run.sh store      then only the store's cost per mail and 2 replicas vs 1 (bench/store.py)
#        bash bench/run.sh queue      then only queued against synchronous delivery (bench/queue.py)
#        bash bench/run.sh graph      then only the Graph transport's cost against a fake (bench/graph.py)
#        bash bench/run.sh identities then only two sending identities against one (bench/identities.py)
# Runs twice: with everything sharing all cores (bench/results/latest.{md,json}, and a perf profile
# of the relay in bench/results/profile.txt; BENCH_PROFILE=0 to skip), then with the SMTP server
# pinned to CPU 0 and the relay and its clients to the others (bench/results/latest-split.*), as in
# production where Exchange runs elsewhere (BENCH_SPLIT=0 to skip). Takes about 10 minutes.
#        bash bench/run.sh --max-cpu-ratio 1.5 [mode]
#                                     also exit 1 when the relay's CPU per mail over the bare client's
#                                     (median, 8 clients and more) exceeds 1.5: the release check
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --max-cpu-ratio ]; then
    export BENCH_MAX_CPU_RATIO="${2:?--max-cpu-ratio needs a number}"
    shift 2
fi

if ! command -v wrk >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
bash tests/peer/start.sh
peer_env="${MAIL_RELAY_PEER_DIR:-/tmp/mail-relay-peer}/peer.env"

# Symbols kept (not stripped) so that perf can name the relay's functions; the code is the same.
CARGO_PROFILE_RELEASE_STRIP=none cargo build --release --locked --bin mail-relay --example smtp_direct --example graph_fake
# Peak RSS for one 25 MB attachment, as JSON and as form data (fresh relays; under a minute).
python3 bench/memory.py "$peer_env"
[ "${1:-}" = memory ] && exit 0
# What the store costs per mail (memory, SQLite, PostgreSQL) and two replicas against one.
if [ "${1:-}" = store ]; then
    python3 bench/store.py "$peer_env"
    exit 0
fi
# Two sending identities on the peer's two mailboxes against one.
if [ "${1:-}" = identities ]; then
    python3 bench/identities.py "$peer_env"
    exit 0
fi
# The Graph transport's own cost per mail, against a fake Graph.
if [ "${1:-}" = graph ]; then
    python3 bench/graph.py "$peer_env"
    exit 0
fi
# Queued delivery against synchronous, per durable store (accept latency, end-to-end throughput).
if [ "${1:-}" = queue ]; then
    python3 bench/queue.py "$peer_env"
    exit 0
fi
python3 bench/run.py "$peer_env"

peer_pids() { pgrep -f 'postfix|dovecot' || true; }
if [ "${BENCH_SPLIT:-1}" = 1 ] && [ "$(nproc)" -ge 2 ]; then
    last=$(($(nproc) - 1))
    # Postfix forks its smtpd, cleanup and delivery processes from its master: they inherit it.
    for pid in $(peer_pids); do taskset -a -cp 0 "$pid" >/dev/null; done
    trap 'for pid in $(peer_pids); do taskset -a -cp "0-$last" "$pid" >/dev/null 2>&1 || true; done' EXIT
    BENCH_LAYOUT=split BENCH_PROFILE=0 taskset -c "1-$last" python3 bench/run.py "$peer_env"
fi

#!/usr/bin/env bash
# Stop the nginx started by tests/proxy/start.sh: no process of it is left. Safe to run twice.
# `--purge` also removes the state dir.
set -uo pipefail

PROXY_DIR="${MAIL_RELAY_PROXY_DIR:-/tmp/mail-relay-proxy}"
PID_FILE="$PROXY_DIR/nginx.pid"

alive() { # pid -> 0 when running (a zombie awaiting its reaper counts as gone: it holds no port)
    local state
    [[ -n "$1" && -r "/proc/$1/stat" ]] || return 1
    state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ "$state" != "Z" && "$state" != "X" ]]
}

children_of() { # pid -> its child pids (the workers)
    local stat
    for stat in /proc/[0-9]*/stat; do
        sed -nE "s/^([0-9]+) \(.*\) [A-Za-z] $1 .*/\1/p" "$stat" 2>/dev/null
    done
}

master=""
[[ -r "$PID_FILE" ]] && master="$(tr -dc '0-9' <"$PID_FILE")"
if alive "$master"; then
    mapfile -t workers < <(children_of "$master")
    kill -QUIT "$master" 2>/dev/null
    for _ in $(seq 1 50); do
        left=0
        for pid in "$master" "${workers[@]}"; do alive "$pid" && left=1; done
        [[ $left == 0 ]] && break
        sleep 0.1
    done
    for pid in "$master" "${workers[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
fi
rm -f "$PID_FILE" "$PROXY_DIR/proxy.env"
if [[ "${1:-}" == "--purge" ]]; then
    rm -rf "$PROXY_DIR"
fi
echo "proxy stopped"

#!/usr/bin/env bash
# Stop the store test peer started by start.sh (fast mode: sessions are cut, nothing is lost).
# Safe to run twice. `--purge` also removes the state dir (data, certificates, logs).
set -uo pipefail

STORE_DIR="${MAIL_RELAY_STORE_DIR:-/tmp/mail-relay-store}"
DATA_DIR="$STORE_DIR/pgdata"

pid_of_server() { # -> the postmaster's pid when postmaster.pid names a live postgres of DATA_DIR
    local pid
    [[ -r "$DATA_DIR/postmaster.pid" ]] || return 1
    pid="$(head -n 1 "$DATA_DIR/postmaster.pid" | tr -dc '0-9')"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-D $DATA_DIR" || return 1
    echo "$pid"
}

find_bin_dir() {
    local dir
    # The one start.sh used, else the newest installed.
    dir="$(sed -n 's/^MAIL_RELAY_STORE_BIN_DIR=//p' "$STORE_DIR/store.env" 2>/dev/null)"
    [[ -n "$dir" && -x "$dir/pg_ctl" ]] && { echo "$dir"; return 0; }
    # shellcheck disable=SC2012
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$dir" && -x "$dir/pg_ctl" ]] && echo "$dir"
}

stop_server() {
    local pid bin
    pid="$(pid_of_server)" || { rm -f "$DATA_DIR/postmaster.pid"; return 0; }
    bin="$(find_bin_dir)"
    if [[ -n "$bin" ]]; then
        if [[ "$(id -u)" == 0 ]]; then
            (cd "$STORE_DIR" && runuser -u "$(stat -c %U "$DATA_DIR")" -- \
                "$bin/pg_ctl" -D "$DATA_DIR" -m fast -w -t 30 stop) </dev/null >/dev/null 2>&1
        else
            "$bin/pg_ctl" -D "$DATA_DIR" -m fast -w -t 30 stop </dev/null >/dev/null 2>&1
        fi
    fi
    # pg_ctl missing or stuck: the postmaster's own fast-shutdown signal, then SIGKILL.
    if pid_of_server >/dev/null; then
        kill -INT "$pid" 2>/dev/null
        for _ in $(seq 1 50); do
            pid_of_server >/dev/null || return 0
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
    fi
    return 0
}

main() {
    # Not while start.sh is starting the server.
    if [[ -d "$STORE_DIR" && -z "${STORE_LOCK_HELD:-}" ]]; then
        STORE_LOCK_HELD=1 exec flock -w 300 -o "$STORE_DIR/start.lock" "$BASH" "$0" "$@"
    fi
    stop_server
    rm -f "$STORE_DIR/store.env" "$STORE_DIR/config.version"
    if [[ "${1:-}" == "--purge" ]]; then
        rm -rf "$STORE_DIR"
        echo "store stopped; $STORE_DIR removed"
    else
        echo "store stopped"
    fi
}

main "$@"

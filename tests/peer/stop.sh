#!/usr/bin/env bash
# Stop the SMTP test peer started by start.sh: no daemon of it is left running. Safe to run twice.
# `--purge` also removes the state dir (certificates, JWT key, Maildir, logs).
set -uo pipefail

PEER_DIR="${MAIL_RELAY_PEER_DIR:-/tmp/mail-relay-peer}"
PF_DIR="$PEER_DIR/postfix"
PF_MASTER_PID="$PEER_DIR/spool/pid/master.pid"
DC_MASTER_PID="$PEER_DIR/dovecot/run/master.pid"

pid_of() { [[ -r "$1" ]] && tr -dc '0-9' <"$1"; }

alive() { # pid -> 0 when running (a zombie awaiting its reaper counts as gone: it holds no port)
    local state
    [[ -n "$1" && -r "/proc/$1/stat" ]] || return 1
    state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ "$state" != "Z" && "$state" != "X" ]]
}

children_of() { # pid -> its child pids
    local stat
    for stat in /proc/[0-9]*/stat; do
        sed -nE "s/^([0-9]+) \(.*\) [A-Za-z] $1 .*/\1/p" "$stat" 2>/dev/null
    done
}

wait_gone() { # pid... -> waits up to 5 s, then SIGKILLs what is left
    local pid left
    for _ in $(seq 1 50); do
        left=0
        for pid in "$@"; do alive "$pid" && left=1; done
        [[ $left == 0 ]] && return 0
        sleep 0.1
    done
    for pid in "$@"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
    return 0
}

stop_postfix() {
    local master kids
    master="$(pid_of "$PF_MASTER_PID")"
    alive "$master" || master=""
    kids=""
    [[ -n "$master" ]] && kids="$(children_of "$master")"
    if [[ -f "$PF_DIR/main.cf" ]]; then
        postfix -c "$PF_DIR" stop </dev/null >/dev/null 2>&1 || true
    fi
    [[ -n "$master" ]] && kill -TERM "$master" 2>/dev/null
    # Stragglers: processes of this instance carry its config dir in their environment.
    local env pid strays=()
    for env in /proc/[0-9]*/environ; do
        if tr '\0' '\n' 2>/dev/null <"$env" | grep -qxF "MAIL_CONFIG=$PF_DIR"; then
            pid="${env#/proc/}"
            pid="${pid%/environ}"
            [[ "$pid" != "$$" ]] && strays+=("$pid")
        fi
    done
    # shellcheck disable=SC2086
    wait_gone $master $kids "${strays[@]}"
}

stop_dovecot() {
    local master kids
    master="$(pid_of "$DC_MASTER_PID")"
    alive "$master" || return 0
    kids="$(children_of "$master")"
    kill -TERM "$master" 2>/dev/null
    # shellcheck disable=SC2086
    wait_gone "$master" $kids
}

main() {
    # Not while start.sh is starting the peer (start.sh itself calls us with the lock held).
    if [[ -d "$PEER_DIR" && -z "${PEER_LOCK_HELD:-}" ]]; then
        PEER_LOCK_HELD=1 exec flock -w 300 -o "$PEER_DIR/start.lock" "$0" "$@"
    fi
    stop_postfix
    stop_dovecot
    rm -f "$PEER_DIR/peer.env" "$PEER_DIR/config.version"
    if [[ "${1:-}" == "--purge" ]]; then
        rm -rf "$PEER_DIR"
        echo "SMTP peer stopped; $PEER_DIR removed"
    else
        echo "SMTP peer stopped"
    fi
}

main "$@"

#!/usr/bin/env bash
# Start the store test peer: a private PostgreSQL (Debian's `postgresql` package) with its own data
# dir, listening on 127.0.0.1 only, for the store tests and the replica tests.
#   - role `mail_relay` (password below, scram-sha-256 over TCP, CREATEDB so that a test can make a
#     database of its own), databases `mail_relay` and `mail_relay_sqltest` owned by it,
#   - TLS on (a test CA signs the server's certificate), so `?sslmode=require` and `verify-full` work,
#   - run as the `postgres` OS user when we are root (initdb refuses root).
# Idempotent: a running server of the same config version is left alone; a stale pid file is
# removed. Installs postgresql when it is missing. Prints the path of store.env on success;
# tests/store/stop.sh stops it. Settings: MAIL_RELAY_STORE_DIR (state dir, default
# /tmp/mail-relay-store), MAIL_RELAY_STORE_PORT (default 15432).
set -euo pipefail

STORE_DIR="${MAIL_RELAY_STORE_DIR:-/tmp/mail-relay-store}"
HOST=127.0.0.1
PORT="${MAIL_RELAY_STORE_PORT:-15432}"
# Bump when the generated configuration changes, so that a running older server is restarted.
CONFIG_VERSION=1
ROLE=mail_relay
PASSWORD=store-test-password
DATABASE=mail_relay
SQLTEST_DATABASE=mail_relay_sqltest

DATA_DIR="$STORE_DIR/pgdata"
RUN_DIR="$STORE_DIR/run"
TLS_DIR="$STORE_DIR/tls"
LOG="$STORE_DIR/postgres.log"
ENV_FILE="$STORE_DIR/store.env"
PASSWORD_FILE="$STORE_DIR/password"

die() {
    echo "store start.sh: $*" >&2
    for f in "$LOG" "$STORE_DIR/start.out"; do
        if [[ -s "$f" ]]; then
            echo "--- last lines of $f:" >&2
            tail -n 20 "$f" >&2
        fi
    done
    exit 1
}

# --- installation (CI may run on a fresh machine) -------------------------------------------------

installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

find_bin_dir() { # -> the newest /usr/lib/postgresql/N/bin that has initdb and pg_ctl
    local dir best="" version best_version=0
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] || continue
        version="${dir#/usr/lib/postgresql/}"
        version="${version%/bin}"
        [[ "$version" =~ ^[0-9]+$ ]] || continue
        if ((version > best_version)); then
            best_version=$version
            best=$dir
        fi
    done
    [[ -n "$best" ]] && echo "$best"
}

ensure_packages() {
    local missing=() pkg
    for pkg in postgresql openssl; do
        installed "$pkg" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]] && find_bin_dir >/dev/null; then
        return 0
    fi
    [[ ${#missing[@]} -eq 0 ]] && missing=(postgresql)
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
    echo "store start.sh: installing ${missing[*]} ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    # A machine's package lists may be stale (the archive moved on): update and try again.
    if ! apt-get install "${apt_opts[@]}" "${missing[@]}" </dev/null >"$STORE_DIR/apt.log" 2>&1; then
        apt-get update -q </dev/null >>"$STORE_DIR/apt.log" 2>&1 || die "apt-get update failed, see $STORE_DIR/apt.log"
        apt-get install "${apt_opts[@]}" "${missing[@]}" </dev/null >>"$STORE_DIR/apt.log" 2>&1 ||
            die "apt-get install ${missing[*]} failed, see $STORE_DIR/apt.log"
    fi
    # The package's scripts may have created and started the system cluster on 5432: only ours runs.
    if command -v pg_lsclusters >/dev/null; then
        local version cluster
        while read -r version cluster _; do
            [[ "$version" =~ ^[0-9]+$ ]] || continue
            pg_ctlcluster "$version" "$cluster" stop </dev/null >/dev/null 2>&1 || true
        done < <(pg_lsclusters --no-header 2>/dev/null || true)
    fi
    find_bin_dir >/dev/null || die "postgresql is installed but no /usr/lib/postgresql/*/bin has initdb and pg_ctl"
}

# --- running as the right OS user -----------------------------------------------------------------

if [[ "$(id -u)" == 0 ]]; then
    OS_USER=postgres
else
    OS_USER="$(id -un)"
fi

as_owner() { # command... -> runs it as the server's OS user, from a directory that user may enter
    if [[ "$(id -u)" == 0 ]]; then
        (cd "$STORE_DIR" && runuser -u "$OS_USER" -- "$@")
    else
        (cd "$STORE_DIR" && "$@")
    fi
}

own() { # path... -> owned by the server's OS user
    [[ "$(id -u)" == 0 ]] && chown -R "$OS_USER:" "$@"
    return 0
}

# --- health ---------------------------------------------------------------------------------------

accepting() { "$BIN_DIR/pg_isready" -q -h "$HOST" -p "$PORT" -t 2 </dev/null >/dev/null 2>&1; }

server_running() { # -> 0 when postmaster.pid names a live postgres of this data dir
    # Not `pg_ctl status`: it trusts any live process with that pid, and a reused pid would then be
    # "stopped" with a signal meant for PostgreSQL.
    local pid
    [[ -r "$DATA_DIR/postmaster.pid" ]] || return 1
    pid="$(head -n 1 "$DATA_DIR/postmaster.pid" | tr -dc '0-9')"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-D $DATA_DIR"
}

healthy() { # running, of this script's configuration, answering, and store.env written
    [[ -s "$ENV_FILE" ]] || return 1
    [[ "$(cat "$STORE_DIR/config.version" 2>/dev/null)" == "$CONFIG_VERSION" ]] || return 1
    server_running && accepting || return 1
    PGPASSWORD="$PASSWORD" "$BIN_DIR/psql" -X -q -t -A -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DATABASE" \
        -c 'select 1' </dev/null >/dev/null 2>&1
}

wait_until_accepting() {
    for _ in $(seq 1 150); do
        accepting && return 0
        sleep 0.2
    done
    return 1
}

# --- configuration --------------------------------------------------------------------------------

make_tls() {
    [[ -s "$TLS_DIR/ca.pem" && -s "$TLS_DIR/server.pem" && -s "$TLS_DIR/server.key" ]] && return 0
    mkdir -p "$TLS_DIR"
    (
        cd "$TLS_DIR"
        # rustls refuses a self-signed certificate as the server's own: a CA signs a CA:FALSE leaf.
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -keyout ca.key -out ca.pem -subj "/CN=mail-relay test store CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout server.key -out server.csr -subj "/CN=localhost"
        printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth" \
            "subjectAltName=DNS:localhost,IP:127.0.0.1" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
            -out server.pem -extfile server.ext
    ) </dev/null >"$STORE_DIR/openssl.log" 2>&1 || die "certificate generation failed, see $STORE_DIR/openssl.log"
    chmod 755 "$TLS_DIR"
    chmod 644 "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem"
    # PostgreSQL refuses a key file that others may read.
    chmod 600 "$TLS_DIR/ca.key" "$TLS_DIR/server.key"
    own "$TLS_DIR"
}

init_cluster() {
    [[ -s "$DATA_DIR/PG_VERSION" ]] && return 0
    rm -rf "$DATA_DIR"
    mkdir -p "$DATA_DIR"
    chmod 700 "$DATA_DIR"
    own "$DATA_DIR"
    # The superuser is the OS user, reachable only through the private socket dir (trust there);
    # over TCP every role needs its password.
    as_owner "$BIN_DIR/initdb" -D "$DATA_DIR" -U "$OS_USER" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 </dev/null >"$STORE_DIR/initdb.log" 2>&1 ||
        { cat "$STORE_DIR/initdb.log" >>"$STORE_DIR/start.out"; die "initdb failed, see $STORE_DIR/initdb.log"; }
    echo "include_if_exists = 'mail-relay.conf'" >>"$DATA_DIR/postgresql.conf"
}

write_config() {
    mkdir -p "$RUN_DIR"
    chmod 700 "$RUN_DIR"
    own "$RUN_DIR"
    cat >"$DATA_DIR/mail-relay.conf" <<EOF
# Generated by tests/store/start.sh (config version $CONFIG_VERSION): a private, loopback-only server.
listen_addresses = '$HOST'
port = $PORT
unix_socket_directories = '$RUN_DIR'
# Three replicas with a pool of 10 each, the tests' own connections, the store's SQL tests.
max_connections = 200
password_encryption = scram-sha-256
ssl = on
ssl_cert_file = '$TLS_DIR/server.pem'
ssl_key_file = '$TLS_DIR/server.key'
ssl_ca_file = '$TLS_DIR/ca.pem'
log_timezone = 'UTC'
timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    cat >"$DATA_DIR/pg_hba.conf" <<EOF
# Generated by tests/store/start.sh.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 trust
host    all       all   127.0.0.1/32  scram-sha-256
EOF
    own "$DATA_DIR/mail-relay.conf" "$DATA_DIR/pg_hba.conf"
    chmod 600 "$DATA_DIR/mail-relay.conf" "$DATA_DIR/pg_hba.conf"
}

clean_stale_pid() { # a postmaster.pid whose process is gone (or is another program now) goes
    local pid_file="$DATA_DIR/postmaster.pid"
    [[ -f "$pid_file" ]] || return 0
    server_running && return 0
    echo "store start.sh: removing stale $pid_file (pid $(head -n 1 "$pid_file" | tr -dc '0-9') is no server of $DATA_DIR)" >&2
    rm -f "$pid_file"
    # The socket's lock file names the same dead server (a zombie nobody reaped still "exists" for
    # PostgreSQL's check); the socket dir is ours alone.
    rm -f "$RUN_DIR"/.s.PGSQL.*
}

superuser_sql() { # sql -> runs it as the superuser through the private socket
    as_owner "$BIN_DIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$RUN_DIR" -p "$PORT" -U "$OS_USER" -d postgres \
        -c "$1" </dev/null >>"$STORE_DIR/start.out" 2>&1
}

ensure_roles() {
    superuser_sql "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$ROLE') THEN
            CREATE ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
        ELSE
            ALTER ROLE $ROLE LOGIN CREATEDB PASSWORD '$PASSWORD';
        END IF;
    END \$\$;" || die "could not create role $ROLE"
    local db
    for db in "$DATABASE" "$SQLTEST_DATABASE"; do
        if ! as_owner "$BIN_DIR/psql" -X -q -t -A -h "$RUN_DIR" -p "$PORT" -U "$OS_USER" -d postgres \
            -c "SELECT 1 FROM pg_database WHERE datname = '$db'" </dev/null | grep -qx 1; then
            superuser_sql "CREATE DATABASE $db OWNER $ROLE" || die "could not create database $db"
        fi
    done
}

write_env() {
    printf '%s' "$PASSWORD" >"$PASSWORD_FILE"
    chmod 644 "$PASSWORD_FILE"
    local tmp="$ENV_FILE.tmp"
    cat >"$tmp" <<EOF
MAIL_RELAY_STORE_URL=postgres://$ROLE@$HOST:$PORT/$DATABASE
MAIL_RELAY_STORE_SQLTEST_URL=postgres://$ROLE@$HOST:$PORT/$SQLTEST_DATABASE
MAIL_RELAY_STORE_HOST=$HOST
MAIL_RELAY_STORE_PORT=$PORT
MAIL_RELAY_STORE_USER=$ROLE
MAIL_RELAY_STORE_DATABASE=$DATABASE
MAIL_RELAY_STORE_SQLTEST_DATABASE=$SQLTEST_DATABASE
MAIL_RELAY_STORE_PASSWORD=$PASSWORD
MAIL_RELAY_STORE_PASSWORD_FILE=$PASSWORD_FILE
MAIL_RELAY_STORE_CA=$TLS_DIR/ca.pem
MAIL_RELAY_STORE_DATA_DIR=$DATA_DIR
MAIL_RELAY_STORE_BIN_DIR=$BIN_DIR
MAIL_RELAY_STORE_OS_USER=$OS_USER
MAIL_RELAY_STORE_SOCKET_DIR=$RUN_DIR
MAIL_RELAY_STORE_LOG=$LOG
MAIL_RELAY_STORE_DIR=$STORE_DIR
EOF
    mv "$tmp" "$ENV_FILE"
    echo "$CONFIG_VERSION" >"$STORE_DIR/config.version"
}

start_server() {
    touch "$LOG"
    own "$LOG"
    as_owner "$BIN_DIR/pg_ctl" -D "$DATA_DIR" -l "$LOG" -w -t 30 start \
        </dev/null >>"$STORE_DIR/start.out" 2>&1 || die "pg_ctl start failed"
}

# --- main -----------------------------------------------------------------------------------------

main() {
    mkdir -p "$STORE_DIR"
    chmod 755 "$STORE_DIR"
    # Several test runs may call start.sh at once: one starts the server, the others wait and reuse
    # it. flock(1) holds the lock in its own process (-o), so the server does not inherit it.
    if [[ -z "${STORE_LOCK_HELD:-}" ]]; then
        STORE_LOCK_HELD=1 exec flock -w 300 -o "$STORE_DIR/start.lock" "$BASH" "$0" "$@"
    fi
    : >"$STORE_DIR/start.out"

    ensure_packages
    BIN_DIR="$(find_bin_dir)"

    if healthy; then
        echo "store already running; settings in $ENV_FILE"
        return 0
    fi

    make_tls
    init_cluster
    write_config
    if server_running; then
        # An older configuration (or a server that lost its role): restart with the current one.
        as_owner "$BIN_DIR/pg_ctl" -D "$DATA_DIR" -m fast -w -t 30 stop </dev/null >>"$STORE_DIR/start.out" 2>&1 ||
            die "could not stop the running server to apply the new configuration"
    fi
    clean_stale_pid
    start_server
    wait_until_accepting || die "PostgreSQL does not accept connections on $HOST:$PORT"
    ensure_roles
    write_env
    healthy || die "PostgreSQL runs but $ROLE cannot log in to $DATABASE over TCP"
    echo "store running; settings in $ENV_FILE"
}

main "$@"

#!/usr/bin/env bash
# Start the SMTP test peer: a private Postfix (submission/STARTTLS, smtps, plain) using a private
# Dovecot as SASL server (XOAUTH2/OAUTHBEARER with locally validated HS256 JWTs, PLAIN/LOGIN user).
# Idempotent: a running, healthy peer of the same config version is left alone (exit 0 at once).
# Prints one line naming peer.env on success; see tests/peer/README.md.
set -euo pipefail

PEER_DIR="${MAIL_RELAY_PEER_DIR:-/tmp/mail-relay-peer}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Bump when the generated configuration changes, so that start.sh restarts an older running peer
# instead of declaring it healthy.
CONFIG_VERSION=3
# The first Debian build whose oauth2 passdb checks `aud` (see /work/shared/PEER-NOTES.md).
MIN_DOVECOT=1:2.3.19.1+dfsg1-2.1+deb12u7

HOST=127.0.0.1
SUBMISSION_PORT="${MAIL_RELAY_PEER_SUBMISSION_PORT:-10587}"
SMTPS_PORT="${MAIL_RELAY_PEER_SMTPS_PORT:-10465}"
PLAIN_PORT="${MAIL_RELAY_PEER_PLAIN_PORT:-10025}"
# Like SUBMISSION_PORT, but the reply to the end of DATA comes SLOW_SECONDS late (timeout tests).
SLOW_PORT="${MAIL_RELAY_PEER_SLOW_PORT:-10588}"
SLOW_SECONDS="${MAIL_RELAY_PEER_SLOW_SECONDS:-5}"
DOMAIN=contoso.test
OAUTH_USER="relay@${DOMAIN}"
BASIC_USER="basic@${DOMAIN}"
BASIC_PASSWORD="peer-basic-password"
SENDAS_DENIED="denied@${DOMAIN}"
# Senders that get Exchange's other after-DATA failures, for retry and classification tests.
SENDER_THROTTLED="throttled@${DOMAIN}"
SENDER_QUOTA="quota@${DOMAIN}"
JWT_ALG=HS256
JWT_KID=mail-relay-peer
# Stands in for the relay's Entra client id: Dovecot requires it in the token's `aud`.
JWT_AUD=11111111-2222-4333-8444-555555555555
JWT_USER_CLAIM=email
# Owner of the catch-all Maildir; the virtual agent refuses uids below virtual_minimum_uid.
MAIL_UID=65534
MAIL_GID=65534

PF_DIR="$PEER_DIR/postfix"
PF_QUEUE="$PEER_DIR/spool"
PF_DATA="$PEER_DIR/data"
DC_DIR="$PEER_DIR/dovecot"
DC_RUN="$DC_DIR/run"
TLS_DIR="$PEER_DIR/tls"
MAILDIR="$PEER_DIR/Maildir"
PF_LOG="$PEER_DIR/postfix.log"
DC_LOG="$PEER_DIR/dovecot.log"
ENV_FILE="$PEER_DIR/peer.env"

die() {
    echo "peer start.sh: $*" >&2
    for f in "$PF_LOG" "$DC_LOG" "$PEER_DIR/start.out"; do
        if [[ -s "$f" ]]; then
            echo "--- last lines of $f:" >&2
            tail -n 15 "$f" >&2
        fi
    done
    exit 1
}

# --- installation (CI may run on a fresh machine) -------------------------------------------------

ensure_packages() {
    local missing=()
    local pkg
    for pkg in postfix dovecot-core openssl; do
        # `dpkg -s` also succeeds for a removed package whose config files remain.
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] ||
            missing+=("$pkg")
    done
    # Older Dovecot builds accept a token for another app: the audience check came with deb12u7.
    local stale=0 installed
    installed="$(dpkg-query -W -f='${Version}' dovecot-core 2>/dev/null || true)"
    if [[ -n "$installed" ]] && ! dpkg --compare-versions "$installed" ge "$MIN_DOVECOT"; then
        stale=1
        missing+=(dovecot-core)
    fi
    [[ ${#missing[@]} -eq 0 ]] && return 0
    INSTALLED=1
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
    echo "peer start.sh: installing ${missing[*]} ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    # Keep the package from configuring a system mailer on port 25.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    # An upgrade needs fresh package lists: without them the install "succeeds" with the old build.
    if [[ $stale -eq 1 ]]; then
        apt-get update -q </dev/null >"$PEER_DIR/apt.log" 2>&1 || die "apt-get update failed, see $PEER_DIR/apt.log"
    fi
    if ! apt-get install "${apt_opts[@]}" "${missing[@]}" </dev/null >>"$PEER_DIR/apt.log" 2>&1; then
        apt-get update -q </dev/null >>"$PEER_DIR/apt.log" 2>&1 || die "apt-get update failed, see $PEER_DIR/apt.log"
        apt-get install "${apt_opts[@]}" "${missing[@]}" </dev/null >>"$PEER_DIR/apt.log" 2>&1 ||
            die "apt-get install ${missing[*]} failed, see $PEER_DIR/apt.log"
    fi
    installed="$(dpkg-query -W -f='${Version}' dovecot-core 2>/dev/null || true)"
    # A machine's package lists may predate the fixed build: then the install took the old one.
    if ! dpkg --compare-versions "$installed" ge "$MIN_DOVECOT"; then
        apt-get update -q </dev/null >>"$PEER_DIR/apt.log" 2>&1 || die "apt-get update failed, see $PEER_DIR/apt.log"
        apt-get install "${apt_opts[@]}" dovecot-core </dev/null >>"$PEER_DIR/apt.log" 2>&1 ||
            die "apt-get install dovecot-core failed, see $PEER_DIR/apt.log"
        installed="$(dpkg-query -W -f='${Version}' dovecot-core 2>/dev/null || true)"
    fi
    dpkg --compare-versions "$installed" ge "$MIN_DOVECOT" ||
        die "dovecot-core $installed is older than $MIN_DOVECOT, which checks a token's audience"
    # The packages' maintainer scripts may have started the system instances: only ours may run.
    postfix stop </dev/null >/dev/null 2>&1 || true
    doveadm stop </dev/null >/dev/null 2>&1 || true
}

# --- health ---------------------------------------------------------------------------------------

pid_alive() { # pidfile -> 0 when the process runs (a zombie counts as dead)
    local pid state
    [[ -r "$1" ]] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [[ -n "$pid" && -r "/proc/$pid/stat" ]] || return 1
    state="$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null)" || return 1
    [[ "$state" != "Z" && "$state" != "X" ]]
}

smtp_banner_ok() { # port -> 0 when it answers 220
    local line
    line="$(timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$1 && head -c 3 <&3" 2>/dev/null)" || return 1
    [[ "$line" == "220" ]]
}

tcp_ok() { # port -> 0 when it accepts a connection
    timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

running() { # both daemons up and the original three listeners answering
    pid_alive "$PF_QUEUE/pid/master.pid" || return 1
    pid_alive "$DC_RUN/master.pid" || return 1
    [[ -S "$DC_RUN/auth-client" ]] || return 1
    smtp_banner_ok "$SUBMISSION_PORT" && smtp_banner_ok "$PLAIN_PORT" && tcp_ok "$SMTPS_PORT"
}

healthy() { # running, with this script's configuration, and peer.env written
    [[ -s "$ENV_FILE" ]] || return 1
    [[ "$(cat "$PEER_DIR/config.version" 2>/dev/null)" == "$CONFIG_VERSION" ]] || return 1
    running && smtp_banner_ok "$SLOW_PORT"
}

dovecot_config_sum() {
    cat "$DC_DIR/dovecot.conf" "$DC_DIR/oauth2.conf.ext" "$DC_DIR/passwd" 2>/dev/null | md5sum
}

# --- configuration --------------------------------------------------------------------------------

make_tls() {
    [[ -s "$TLS_DIR/ca.pem" && -s "$TLS_DIR/server.pem" && -s "$TLS_DIR/server.key" ]] && return 0
    mkdir -p "$TLS_DIR"
    chmod 755 "$TLS_DIR"
    (
        cd "$TLS_DIR"
        # rustls refuses a self-signed certificate as the server's own: a CA signs a CA:FALSE leaf.
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -keyout ca.key -out ca.pem -subj "/CN=mail-relay test peer CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout server.key -out server.csr -subj "/CN=localhost"
        printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth" \
            "subjectAltName=DNS:localhost,IP:127.0.0.1" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
            -out server.pem -extfile server.ext
        chmod 600 ca.key server.key
        chmod 644 ca.pem server.pem
    ) </dev/null >"$PEER_DIR/openssl.log" 2>&1 || die "certificate generation failed, see $PEER_DIR/openssl.log"
}

write_postfix_config() {
    mkdir -p "$PF_DIR" "$PF_QUEUE" "$PF_DATA"
    chown root:root "$PF_QUEUE"
    chmod 755 "$PF_QUEUE"
    chown postfix "$PF_DATA"

    cat >"$PF_DIR/main.cf" <<EOF
# Generated by tests/peer/start.sh (config version $CONFIG_VERSION): a private, loopback-only test peer.
compatibility_level = 3.6
queue_directory = $PF_QUEUE
data_directory = $PF_DATA
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = $PF_LOG
maillog_file_prefixes = /var, /dev/stdout, $PEER_DIR

myhostname = peer.$DOMAIN
mydomain = $DOMAIN
myorigin = $DOMAIN
mydestination =
inet_interfaces = $HOST
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_banner = \$myhostname ESMTP mail-relay test peer
smtpd_peername_lookup = no
smtpd_client_port_logging = yes
biff = no
append_dot_mydomain = no

# Speed and size: long XOAUTH2 lines, no flow-control stalls, many parallel test clients.
line_length_limit = 65536
in_flow_delay = 0
default_process_limit = 200
smtpd_error_sleep_time = 0
smtpd_junk_command_limit = 10000
message_size_limit = 36700160
mailbox_size_limit = 0
virtual_mailbox_limit = 0

# Everything for $DOMAIN goes to one catch-all Maildir; nothing else is accepted or relayed.
virtual_mailbox_domains = $DOMAIN
virtual_mailbox_base = $PEER_DIR
virtual_mailbox_maps = static:Maildir/
virtual_uid_maps = static:$MAIL_UID
virtual_gid_maps = static:$MAIL_GID
alias_maps =
alias_database =
local_recipient_maps =
local_transport = error:5.1.1 the test peer has no local mailboxes
default_transport = error:5.7.1 the test peer does not relay
relay_transport = error:5.7.1 the test peer does not relay
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions =

# Like Exchange Online, a sender the login may not use is refused after DATA.
peer_sendas_restrictions = check_sender_access texthash:$PF_DIR/sendas
smtpd_end_of_data_restrictions = \$peer_sendas_restrictions

# TLS (the CA is in peer.env as PEER_CA).
smtpd_tls_cert_file = $TLS_DIR/server.pem
smtpd_tls_key_file = $TLS_DIR/server.key
smtpd_tls_security_level = may
smtpd_tls_loglevel = 0

# SASL through Dovecot; enabled per listener in master.cf.
smtpd_sasl_type = dovecot
smtpd_sasl_path = $DC_RUN/auth-client
smtpd_sasl_auth_enable = no
smtpd_sasl_security_options = noanonymous
smtpd_sasl_tls_security_options = noanonymous
smtpd_sasl_authenticated_header = yes
broken_sasl_auth_clients = no

# Used by the authenticated listeners: refuse MAIL FROM before AUTH the way Exchange does.
peer_auth_sender_restrictions = permit_sasl_authenticated, check_client_access static:{530 5.7.57 Client not authenticated to send mail}
# Used by the slow listener: the server "thinks" before it answers the end of DATA.
peer_slow_end_of_data_restrictions = sleep $SLOW_SECONDS, \$peer_sendas_restrictions
EOF

    cat >"$PF_DIR/master.cf" <<EOF
# Generated by tests/peer/start.sh. No chroot: a private instance run as root from the state dir.
$HOST:$SUBMISSION_PORT inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_delay_reject=no
  -o smtpd_sender_restrictions=\$peer_auth_sender_restrictions
$HOST:$SMTPS_PORT inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_delay_reject=no
  -o smtpd_sender_restrictions=\$peer_auth_sender_restrictions
$HOST:$SLOW_PORT inet n - n - - smtpd
  -o syslog_name=postfix/slow
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_delay_reject=no
  -o smtpd_sender_restrictions=\$peer_auth_sender_restrictions
  -o smtpd_end_of_data_restrictions=\$peer_slow_end_of_data_restrictions
$HOST:$PLAIN_PORT inet n - n - - smtpd
  -o syslog_name=postfix/plain
  -o smtpd_tls_security_level=none
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF

    printf '%s 554 5.2.252 SendAsDenied; %s not allowed to send as %s; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied\n' \
        "$SENDAS_DENIED" "$OAUTH_USER" "$SENDAS_DENIED" >"$PF_DIR/sendas"
    printf '%s 432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded\n' \
        "$SENDER_THROTTLED" >>"$PF_DIR/sendas"
    printf '%s 554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception\n' \
        "$SENDER_QUOTA" >>"$PF_DIR/sendas"

    mkdir -p "$MAILDIR/new" "$MAILDIR/cur" "$MAILDIR/tmp"
    chown -R "$MAIL_UID:$MAIL_GID" "$MAILDIR"
    chmod 755 "$PEER_DIR"
    # Postfix waits for files changed within the last second to settle; backdate them.
    touch -d '-1 min' "$PF_DIR"/main.cf "$PF_DIR"/master.cf "$PF_DIR"/sendas
}

write_dovecot_config() {
    mkdir -p "$DC_DIR" "$DC_RUN" "$DC_DIR/state" "$DC_DIR/keys/default/$JWT_ALG"
    chmod 755 "$DC_DIR" "$DC_RUN"
    local key_file="$DC_DIR/keys/default/$JWT_ALG/$JWT_KID"
    # One HMAC key per state dir, so tokens minted before a restart stay valid.
    if [[ ! -s "$key_file" ]]; then
        printf '%s' "$(openssl rand -base64 32)" >"$key_file"
    fi
    chmod -R go+rX "$DC_DIR/keys"

    cat >"$DC_DIR/oauth2.conf.ext" <<EOF
# Local JWT validation: keys at <azp or default>/<alg>/<kid> in the dict. No scope: app-only
# Entra tokens carry none, and setting it makes Dovecot require one.
introspection_mode = local
local_validation_key_dict = fs:posix:prefix=$DC_DIR/keys/
client_id = $JWT_AUD
username_attribute = $JWT_USER_CLAIM
EOF

    printf '%s:{PLAIN}%s::::::\n' "$BASIC_USER" "$BASIC_PASSWORD" >"$DC_DIR/passwd"

    cat >"$DC_DIR/dovecot.conf" <<EOF
# Generated by tests/peer/start.sh: SASL only, for the Postfix peer.
protocols =
instance_name = mail-relay-peer
base_dir = $DC_RUN
state_dir = $DC_DIR/state
log_path = $DC_LOG
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_verbose = yes
auth_cache_size = 0
# Tests fail logins on purpose; failures must not slow the next test down.
auth_failure_delay = 0

passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $DC_DIR/passwd
}
passdb {
  driver = oauth2
  args = $DC_DIR/oauth2.conf.ext
}
userdb {
  driver = static
  args = uid=$MAIL_UID gid=$MAIL_GID home=/nonexistent allow_all_users=yes
}

service auth {
  unix_listener auth-client {
    mode = 0666
  }
}
# The auth process (an unprivileged user) cannot open a mode-0 socket: that switches the
# per-IP auth penalty off, which would otherwise delay good logins after bad-token tests.
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
EOF
}

write_env() {
    local tmp="$ENV_FILE.tmp"
    cat >"$tmp" <<EOF
PEER_HOST=$HOST
PEER_SUBMISSION_PORT=$SUBMISSION_PORT
PEER_SMTPS_PORT=$SMTPS_PORT
PEER_PLAIN_PORT=$PLAIN_PORT
PEER_SLOW_PORT=$SLOW_PORT
PEER_SLOW_SECONDS=$SLOW_SECONDS
PEER_CA=$TLS_DIR/ca.pem
PEER_MAILDIR=$MAILDIR
PEER_LOG=$PF_LOG
PEER_DOVECOT_LOG=$DC_LOG
PEER_OAUTH_USER=$OAUTH_USER
PEER_JWT_KEY_B64=$(cat "$DC_DIR/keys/default/$JWT_ALG/$JWT_KID")
PEER_JWT_ALG=$JWT_ALG
PEER_JWT_KID=$JWT_KID
PEER_JWT_AUD=$JWT_AUD
PEER_JWT_USER_CLAIM=$JWT_USER_CLAIM
PEER_BASIC_USER=$BASIC_USER
PEER_BASIC_PASSWORD=$BASIC_PASSWORD
PEER_SENDAS_DENIED=$SENDAS_DENIED
PEER_SENDER_THROTTLED=$SENDER_THROTTLED
PEER_SENDER_QUOTA=$SENDER_QUOTA
PEER_DIR=$PEER_DIR
EOF
    mv "$tmp" "$ENV_FILE"
    echo "$CONFIG_VERSION" >"$PEER_DIR/config.version"
}

wait_until_healthy() {
    for _ in $(seq 1 100); do
        if smtp_banner_ok "$SUBMISSION_PORT" && smtp_banner_ok "$PLAIN_PORT" && tcp_ok "$SMTPS_PORT" &&
            smtp_banner_ok "$SLOW_PORT" && [[ -S "$DC_RUN/auth-client" ]]; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# --- main -----------------------------------------------------------------------------------------

main() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (private Postfix and Dovecot instances)"
    mkdir -p "$PEER_DIR"
    # Several test runs may call start.sh at once: one starts the peer, the others wait and reuse it.
    # flock(1) holds the lock in its own process and closes it for us (-o): daemons started below
    # must not inherit it, or it would stay held as long as they run.
    if [[ -z "${PEER_LOCK_HELD:-}" ]]; then
        PEER_LOCK_HELD=1 exec flock -w 300 -o "$PEER_DIR/start.lock" "$0" "$@"
    fi

    if healthy; then
        echo "SMTP peer already running; settings in $ENV_FILE"
        return 0
    fi

    ensure_packages

    # A running peer of an older config version whose Dovecot part is unchanged is reloaded, not
    # restarted: Postfix finishes the sessions in progress, so tests running now are not broken.
    # A freshly installed build must replace the running daemons, so it gets a full restart.
    if [[ -z "${INSTALLED:-}" ]] && running && [[ -s "$ENV_FILE" ]]; then
        local before
        before="$(dovecot_config_sum)"
        write_dovecot_config
        if [[ "$(dovecot_config_sum)" == "$before" ]]; then
            write_postfix_config
            : >"$PEER_DIR/start.out"
            postfix -c "$PF_DIR" reload </dev/null >>"$PEER_DIR/start.out" 2>&1 ||
                die "postfix reload failed"
            wait_until_healthy || die "peer did not answer after the reload"
            write_env
            echo "SMTP peer reloaded with new configuration; settings in $ENV_FILE"
            return 0
        fi
    fi

    # Whatever is left of an older or broken instance goes first.
    "$HERE/stop.sh" </dev/null >/dev/null 2>&1 || true
    rm -f "$ENV_FILE"

    make_tls
    write_postfix_config
    write_dovecot_config
    # A fresh start begins with an empty Maildir and fresh logs (the previous ones are kept as .old).
    find "$MAILDIR/new" "$MAILDIR/cur" "$MAILDIR/tmp" -type f -delete
    local log
    for log in "$PF_LOG" "$DC_LOG"; do
        [[ -f "$log" ]] && mv -f "$log" "$log.old"
    done
    : >"$PEER_DIR/start.out"

    dovecot -c "$DC_DIR/dovecot.conf" </dev/null >>"$PEER_DIR/start.out" 2>&1 ||
        die "dovecot did not start"
    postfix -c "$PF_DIR" start </dev/null >>"$PEER_DIR/start.out" 2>&1 ||
        die "postfix did not start (try: script -qc 'postfix -c $PF_DIR check')"

    wait_until_healthy || die "peer did not answer on 127.0.0.1:$SUBMISSION_PORT/$SMTPS_PORT/$PLAIN_PORT within 10 s"
    write_env
    echo "SMTP peer running; settings in $ENV_FILE"
}

main "$@"

#!/usr/bin/env bash
# The typed client test: generate TypeScript types from the committed openapi/openapi.json with
# openapi-typescript, type-check the small program that uses them with openapi-fetch (tsc, strict),
# and run it against the relay binary (outbox mode) on a free loopback port. Fails when the document,
# the program and the server disagree. Needs a built relay (target/debug/mail-relay or MAIL_RELAY_BIN).
set -euo pipefail
cd "$(dirname "$0")"
repo="$(cd ../.. && pwd)"
bin="${MAIL_RELAY_BIN:-$repo/target/debug/mail-relay}"
[ -x "$bin" ] || { echo "no relay binary at $bin: run cargo build first" >&2; exit 1; }

[ -d node_modules/openapi-typescript ] || npm ci --silent --no-audit --no-fund
rm -rf generated dist
npx --no-install openapi-typescript "$repo/openapi/openapi.json" -o generated/api.d.ts >/dev/null
npx --no-install tsc -p .

work="$(mktemp -d)"
key="mr_typed_client_$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
sha="$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >"$work/relay.yml" <<YAML
server: {address: 127.0.0.1, port: $port}
mailRelay:
  delivery: {mode: outbox, outboxDir: $work/outbox}
  auth:
    apiKeys: [{name: typed-client, sha256: $sha, allowedFrom: ["*@contoso.com"]}]
YAML
env -u RUST_LOG "$bin" serve --config "$work/relay.yml" >"$work/relay.log" 2>&1 &
relay=$!
trap 'kill $relay 2>/dev/null; wait $relay 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/health/live" >/dev/null 2>&1 && break
    kill -0 $relay 2>/dev/null || { cat "$work/relay.log" >&2; exit 1; }
    sleep 0.1
done

marker="typed-client-$$-$RANDOM"
MAIL_MARKER="$marker" node dist/send-mail.js "http://127.0.0.1:$port" "$key"
grep -lq "$marker" "$work"/outbox/*.eml || { echo "FAIL the mail is not in the outbox" >&2; exit 1; }
echo "typed client: the generated types compile, and the relay answers as the document says"

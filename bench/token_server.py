#!/usr/bin/env python3
"""A tiny fake Entra ID token endpoint for the benchmark.

Answers every POST with an app-only token the test peer accepts (an HS256 JWT signed with the
peer's key from peer.env, the claims of tests/api/peer.rs `mint_token`) and counts the calls.
GET /count answers the number of token requests so far; GET /token prints a fresh token (for
the direct-SMTP client).

Usage: token_server.py PEER_ENV PORT_FILE [LIFETIME_SECONDS]
Binds 127.0.0.1 on a free port and writes the port to PORT_FILE.
"""

import base64
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def read_env(path):
    env = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "=" in line:
                key, value = line.strip().split("=", 1)
                env[key] = value
    return env


class Minter:
    def __init__(self, env, lifetime):
        self.key = base64.b64decode(env["PEER_JWT_KEY_B64"])
        self.kid = env["PEER_JWT_KID"]
        self.aud = env["PEER_JWT_AUD"]
        self.claim = env["PEER_JWT_USER_CLAIM"]
        self.user = env["PEER_OAUTH_USER"]
        self.lifetime = lifetime

    def mint(self):
        now = int(time.time())
        header = {"alg": "HS256", "typ": "JWT", "kid": self.kid}
        claims = {"sub": "mail-relay-bench", "aud": self.aud, "iat": now, "nbf": now,
                  "exp": now + self.lifetime, self.claim: self.user}
        signing_input = (b64url(json.dumps(header).encode()) + "."
                         + b64url(json.dumps(claims).encode()))
        signature = hmac.new(self.key, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + b64url(signature)


def main():
    env = read_env(sys.argv[1])
    port_file = sys.argv[2]
    lifetime = int(sys.argv[3]) if len(sys.argv) > 3 else 3600
    minter = Minter(env, lifetime)
    lock = threading.Lock()
    count = [0]

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status, body, content_type="application/json"):
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            with lock:
                count[0] += 1
            self._answer(200, json.dumps({
                "token_type": "Bearer", "expires_in": lifetime - 1,
                "ext_expires_in": lifetime - 1, "access_token": minter.mint()}))

        def do_GET(self):  # noqa: N802
            if self.path == "/count":
                with lock:
                    self._answer(200, str(count[0]), "text/plain")
            elif self.path == "/token":
                self._answer(200, minter.mint(), "text/plain")
            else:
                self._answer(404, "{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file + ".tmp", "w", encoding="utf-8") as f:
        f.write(str(server.server_address[1]))
    import os
    os.replace(port_file + ".tmp", port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()

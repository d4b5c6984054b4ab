#!/usr/bin/env python3
"""mail-relay memory: peak RSS of the relay for one mail with a 25 MB attachment.

Called by bench/run.sh (after the peer is started and the release binary built), or alone:
    python3 bench/memory.py /tmp/mail-relay-peer/peer.env
For each way of sending the file, as JSON (base64, 33 MB of body) and as multipart/form-data
(the raw 25 MB as a file part), a fresh relay (the settings of bench/run.py) sends one small
mail first (token fetched, SMTP connection open), then its RSS high-water mark is reset
(/proc/PID/clear_refs) and the large mail is sent; VmHWM afterwards is its peak. Bounded: two
relay starts and two large mails, well under a minute. BENCH_RELAY names another binary (to
compare with an older build). Writes bench/results/memory.{md,json}.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the benchmark's helpers: config, relay process, token server)

ATTACHMENT = 25 * 1000 * 1000
BOUNDARY = "mail-relay-bench-boundary-3b1f"


def multipart_body(marker, content):
    mail = json.dumps({"from": "bench@contoso.test", "to": "alice@contoso.test",
                       "subject": f"{marker} multipart", "text": "see the file"})
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"mail\"\r\n"
            f"Content-Type: application/json\r\n\r\n{mail}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + content + f"\r\n--{BOUNDARY}--\r\n".encode()


def measure(config, port, work, kind, body, content_type):
    relay = run.Relay(config, port, work)
    relay.start()
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {run.API_KEY}"}
        status, answer = run.http(f"http://127.0.0.1:{port}/mail",
                                  run.mail_body("warm-up").encode(), headers)
        if status != 202:
            raise SystemExit(f"warm-up mail: {status} {answer[:300]!r}")
        time.sleep(0.3)
        idle = run.proc_status(relay.proc.pid, "VmRSS")
        with open(f"/proc/{relay.proc.pid}/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        headers["Content-Type"] = content_type
        began = time.monotonic()
        status, answer = run.http(f"http://127.0.0.1:{port}/mail", body, headers)
        seconds = time.monotonic() - began
        peak = run.proc_status(relay.proc.pid, "VmHWM")
        if status != 202:
            run.log(f"{kind}: {status} {answer[:300]!r}")
        result = {"kind": kind, "body_bytes": len(body), "status": status, "seconds": seconds,
                  "rss_before_mib": idle, "peak_rss_mib": peak}
        run.log(f"{kind}: {result}")
        return result
    finally:
        relay.stop()


def main():
    peer_env = sys.argv[1]
    peer = run.read_env(peer_env)
    if os.environ.get("BENCH_RELAY"):
        run.RELAY = os.environ["BENCH_RELAY"]
    work = tempfile.mkdtemp(prefix="mail-relay-memory-")
    marker = f"bench-memory-{int(time.time())}"
    token_server, token_port = run.start_token_server(peer_env, work)
    try:
        port = run.free_port()
        config = run.write_config(work, peer, token_port, port)
        content = os.urandom(ATTACHMENT)
        results = [
            measure(config, port, work, "JSON (base64)",
                    run.mail_body(marker, attachment=content).encode(), "application/json"),
            measure(config, port, work, "multipart/form-data",
                    multipart_body(marker, content), f"multipart/form-data; boundary={BOUNDARY}"),
        ]
    finally:
        token_server.terminate()
        token_server.wait()

    lines = [
        f"Relay: {run.RELAY}. One mail with a {ATTACHMENT // 1000 // 1000} MB attachment (random bytes) "
        "to the Postfix + Dovecot peer, on a fresh relay after one small mail; peak = VmHWM after the "
        "high-water mark was reset.",
        "",
        "| sent as | body | answer | time | RSS before | peak RSS | peak / encoded message (about 34.3 MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    message_mib = (ATTACHMENT * 4 / 3 * 78 / 76) / 1024 / 1024
    for r in results:
        lines.append(f"| {r['kind']} | {r['body_bytes'] / 1e6:.1f} MB | {r['status']} | {r['seconds']:.2f} s "
                     f"| {r['rss_before_mib']:.1f} MiB | {r['peak_rss_mib']:.1f} MiB "
                     f"| {r['peak_rss_mib'] / message_mib:.2f} |")
    table = "\n".join(lines) + "\n"
    run.write_results(os.environ.get("BENCH_MEMORY_RESULTS", "memory"),
                      {"relay": run.RELAY, "results": results}, table)


if __name__ == "__main__":
    main()

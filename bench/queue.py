#!/usr/bin/env python3
"""Queued delivery against synchronous delivery, on the same relay and store, in the same round.

Called by bench/run.sh (`bash bench/run.sh queue`), which starts the SMTP peer and builds the
release binary; this starts the test PostgreSQL (tests/store/start.sh). One relay per durable
store (sqlite:, postgres://), `queue: prefer`, rate limits off, 3 SMTP connections. Each of
BENCH_RUNS rounds runs, per relay:
  1. synchronous: wrk at BENCH_QUEUE_CLIENTS clients for BENCH_SECONDS; every 202 is a mail the
     server accepted, so its rate is the delivery throughput;
  2. queued: the same with `Prefer: respond-async`; wrk's latencies are the accept latency, and
     the end-to-end throughput is the mails accepted divided by the time from the first request
     to the last of them `sent` (`mail_relay_queue_attempts_total{outcome="sent"}`, polled every
     50 ms from /metrics); its CPU per mail covers accepting and delivering.
A ratio divides the queued end-to-end throughput by the synchronous rate of the same round.
Writes bench/results/queue.{md,json}.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (the main benchmark's helpers: relay process, wrk, CPU)

ROOT = bench.ROOT
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CLIENTS = int(os.environ.get("BENCH_QUEUE_CLIENTS", "8"))
# Delivery workers per relay; 0: the relay's default.
WORKERS = int(os.environ.get("BENCH_QUEUE_WORKERS", "0"))
SENT = re.compile(r'^mail_relay_queue_attempts_total\{outcome="sent"\} (\d+)', re.M)


def queue_config(base, store, password_file):
    """The main benchmark's settings with `store` and queued delivery on request."""
    with open(base, encoding="utf-8") as f:
        text = f.read()
    text = text.replace("  delivery:\n    mode: smtp\n", f"  delivery:\n    mode: smtp\n    queue: prefer\n    workers: {WORKERS}\n")
    text += f"  store:\n    url: \"{store}\"\n"
    if store.startswith("postgres"):
        text += f"    passwordFile: {password_file}\n"
    path = base.replace("-base.yml", ".yml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def queued_script(work, marker):
    """wrk posting the benchmark mail with `Prefer: respond-async`."""
    path = os.path.join(work, "queued.lua")
    with open(bench.wrk_script(work, marker), encoding="utf-8") as f:
        plain = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(plain + 'wrk.headers["Prefer"] = "respond-async"\n')
    return path


def sent_so_far(relay):
    status, body = bench.http(f"http://127.0.0.1:{relay.port}/metrics", timeout=5)
    if status != 200:
        raise SystemExit(f"/metrics answered {status}")
    match = SENT.search(body.decode() if isinstance(body, bytes) else body)
    return int(match.group(1)) if match else 0


def queued_run(relay, script):
    """Accept for BENCH_SECONDS, then wait for the last accepted mail to be sent."""
    before = sent_so_far(relay)
    cpu_before = bench.cpu_seconds(relay.proc.pid)
    began = time.monotonic()
    accepted = bench.run_wrk(relay, script, CLIENTS)
    deadline = time.monotonic() + 300
    while sent_so_far(relay) - before < accepted["mails"]:
        if time.monotonic() > deadline:
            raise SystemExit("queued mails not sent within 300 s")
        time.sleep(0.05)
    took = time.monotonic() - began
    # Accepting and delivering, the polls of /metrics included (they cost a little).
    accepted["cpu_ms_per_mail"] = 1000.0 * (bench.cpu_seconds(relay.proc.pid) - cpu_before) / accepted["mails"]
    accepted["delivered_rate"] = accepted["mails"] / took
    accepted["drain_s"] = took - bench.SECONDS
    return accepted


def main():
    peer_env = sys.argv[1]
    peer = bench.read_env(peer_env)
    subprocess.run(["bash", os.path.join(ROOT, "tests/store/start.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    store_env = bench.read_env(os.path.join(os.environ.get("MAIL_RELAY_STORE_DIR",
                                                           "/tmp/mail-relay-store"), "store.env"))
    work = tempfile.mkdtemp(prefix="mail-relay-bench-queue-")
    marker = f"bench-queue-{int(time.time())}"
    token_server, token_port = bench.start_token_server(peer_env, work)
    relays = {}
    stores = {
        "sqlite": f"sqlite:{work}/relay.db",
        "postgres": store_env["MAIL_RELAY_STORE_URL"],
    }
    try:
        for name, url in stores.items():
            port = bench.free_port()
            base = bench.write_config(work, peer, token_port, port)
            named = base.replace(".yml", f"-{name}-base.yml")
            os.rename(base, named)
            relay = bench.Relay(queue_config(named, url, store_env["MAIL_RELAY_STORE_PASSWORD_FILE"]),
                                port, work)
            relay.start()
            relays[name] = relay
        plain, queued = bench.wrk_script(work, marker), queued_script(work, marker)
        for relay in relays.values():  # warm-up: logged in, pools full
            bench.run_wrk(relay, plain, 2)
        rounds = []
        for i in range(RUNS):
            row = {}
            for name, relay in relays.items():
                sync = bench.run_wrk(relay, plain, CLIENTS)
                asynchronous = queued_run(relay, queued)
                row[name] = {"sync": sync, "queued": asynchronous,
                             "ratio": asynchronous["delivered_rate"] / sync["rate"]}
                bench.log(f"round {i + 1} {name}: sync {sync['rate']:.0f}/s p50 {sync['p50_ms']:.2f} ms; "
                          f"queued accept {asynchronous['rate']:.0f}/s p50 {asynchronous['p50_ms']:.2f} ms, "
                          f"delivered {asynchronous['delivered_rate']:.0f}/s "
                          f"(ratio {row[name]['ratio']:.2f})")
            rounds.append(row)
    finally:
        for relay in relays.values():
            relay.stop()
        token_server.terminate()
        token_server.wait()

    med = bench.median
    summary = {"machine": bench.machine(os.getloadavg()[0]), "runs": RUNS,
               "seconds_per_run": bench.SECONDS, "clients": CLIENTS, "rounds": rounds}
    lines = [f"Queued against synchronous delivery: {RUNS} rounds x {bench.SECONDS} s of requests, wrk at "
             f"{CLIENTS} clients, 3 SMTP connections; medians (lowest-highest). Delivered mails/s for the "
             "queued rows is end to end: accepted mails over the time from the first request to the last "
             "of them sent. The ratio divides it by the synchronous rate of the same round.", "",
             "| store | mode | accept p50 ms | accept p99 ms | accepted mails/s | delivered mails/s | "
             "ratio to sync | CPU ms/mail | non-2xx |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in stores:
        sync = [r[name]["sync"] for r in rounds]
        queued_runs = [r[name]["queued"] for r in rounds]
        ratios = [r[name]["ratio"] for r in rounds]
        lines.append(
            f"| {name} | synchronous | {med([s['p50_ms'] for s in sync]):.2f} | "
            f"{med([s['p99_ms'] for s in sync]):.2f} | {med([s['rate'] for s in sync]):.0f} | "
            f"{med([s['rate'] for s in sync]):.0f} | 1.00 | {med([s['cpu_ms_per_mail'] for s in sync]):.3f} | "
            f"{sum(s['non2xx'] for s in sync)} |")
        lines.append(
            f"| {name} | queued | {med([q['p50_ms'] for q in queued_runs]):.2f} | "
            f"{med([q['p99_ms'] for q in queued_runs]):.2f} | {med([q['rate'] for q in queued_runs]):.0f} | "
            f"{med([q['delivered_rate'] for q in queued_runs]):.0f} | {med(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {med([q['cpu_ms_per_mail'] for q in queued_runs]):.3f} | "
            f"{sum(q['non2xx'] for q in queued_runs)} |")
    table = "\n".join(lines) + "\n"
    bench.write_results("queue", summary, table)


if __name__ == "__main__":
    main()

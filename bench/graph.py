#!/usr/bin/env python3
"""The Graph transport's own cost: CPU per mail and mails/s against a fake Graph.

Called by bench/run.sh (`bash bench/run.sh graph`), which starts the SMTP peer and builds the
release binary and the fake (bench/graph_fake.rs). Two relays side by side, each with the same
fake Entra ID (bench/token_server.py), rate limits off:
  - `graph`: `mailRelay.delivery.mode: graph` to the fake Graph on loopback (plain HTTP/1.1 with
    keep-alive: loopback may be http; Graph itself is HTTPS/2), 4 requests in flight at most;
  - `smtp`: the main benchmark's relay (STARTTLS to the Postfix peer, 3 connections), for
    reference.
Each of BENCH_RUNS rounds runs wrk at each of BENCH_GRAPH_CLIENTS against each relay in turn;
the CPU is the relay process's own (user + system). The fake is not Graph: its speed says
nothing of Graph's, only that the relay is measured and not the far end.
Writes bench/results/graph.{md,json}.
"""

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (the main benchmark's helpers: relay process, wrk, CPU)

ROOT = bench.ROOT
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CLIENTS = [int(c) for c in os.environ.get("BENCH_GRAPH_CLIENTS", "1,8,32").split(",")]
FAKE = os.path.join(ROOT, "target/release/examples/graph_fake")


def start_fake(work):
    port_file = os.path.join(work, "graph.port")
    fake = subprocess.Popen([FAKE, port_file], stdin=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(port_file) and os.path.getsize(port_file) > 0:
            break
        time.sleep(0.05)
    with open(port_file, encoding="utf-8") as f:
        return fake, int(f.read())


def graph_config(base, graph_port):
    """The main benchmark's settings, sending through the fake Graph instead."""
    with open(base, encoding="utf-8") as f:
        text = f.read()
    text = text.replace("  delivery:\n    mode: smtp\n",
                        "  delivery:\n    mode: graph\n"
                        f"  graph:\n    baseUrl: http://127.0.0.1:{graph_port}/v1.0\n")
    path = base.replace(".yml", "-graph.yml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def main():
    peer_env = sys.argv[1]
    peer = bench.read_env(peer_env)
    work = tempfile.mkdtemp(prefix="mail-relay-bench-graph-")
    marker = f"bench-graph-{int(time.time())}"
    token_server, token_port = bench.start_token_server(peer_env, work)
    fake, graph_port = start_fake(work)
    relays = {}
    try:
        for name in ("graph", "smtp"):
            port = bench.free_port()
            config = bench.write_config(work, peer, token_port, port)
            named = config.replace(".yml", f"-{name}.yml")
            os.rename(config, named)
            if name == "graph":
                named = graph_config(named, graph_port)
            relay = bench.Relay(named, port, work)
            relay.start()
            relays[name] = relay
        script = bench.wrk_script(work, marker)
        for relay in relays.values():  # warm-up: tokens fetched, connections open
            bench.run_wrk(relay, script, 2)
        rounds = []
        for i in range(RUNS):
            row = {}
            for clients in CLIENTS:
                for name, relay in relays.items():
                    result = bench.run_wrk(relay, script, clients)
                    row[f"{name}@{clients}"] = result
                    bench.log(f"round {i + 1} {name} at {clients} clients: {result['rate']:.0f}/s, "
                              f"p50 {result['p50_ms']:.2f} ms, CPU {result['cpu_ms_per_mail']:.3f} ms/mail, "
                              f"non-2xx {result['non2xx']}")
            rounds.append(row)
        _, taken = bench.http(f"http://127.0.0.1:{graph_port}/count")
    finally:
        for relay in relays.values():
            relay.stop()
        fake.terminate()
        fake.wait()
        token_server.terminate()
        token_server.wait()

    med = bench.median
    summary = {"machine": bench.machine(os.getloadavg()[0]), "runs": RUNS,
               "seconds_per_run": bench.SECONDS, "clients": CLIENTS, "rounds": rounds,
               "graph_fake_took": int(taken)}
    lines = [f"The Graph transport against a fake Graph on loopback, and the SMTP transport against the "
             f"Postfix peer for reference: {RUNS} rounds x {bench.SECONDS} s, wrk; medians (lowest-highest). "
             "CPU is the relay's own.", "",
             "| transport | clients | mails/s | p50 ms | p99 ms | CPU ms/mail | non-2xx |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for clients in CLIENTS:
        for name in relays:
            runs = [r[f"{name}@{clients}"] for r in rounds]
            rates = [r["rate"] for r in runs]
            cpu = [r["cpu_ms_per_mail"] for r in runs]
            lines.append(
                f"| {name} | {clients} | {med(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
                f"{med([r['p50_ms'] for r in runs]):.2f} | {med([r['p99_ms'] for r in runs]):.2f} | "
                f"{med(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f}) | {sum(r['non2xx'] for r in runs)} |")
    table = "\n".join(lines) + "\n"
    bench.write_results("graph", summary, table)


if __name__ == "__main__":
    main()

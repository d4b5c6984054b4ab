#!/usr/bin/env python3
"""Two sending identities side by side against one: does throughput add up, and is the CPU per
mail unchanged?

Called by bench/run.sh (`bash bench/run.sh identities`), which starts the SMTP peer and builds
the release binary. One relay with two identities on the peer's two mailboxes: the default logs
in with XOAUTH2 as the OAuth mailbox and serves bench@contoso.test, `second` logs in with a
password as the peer's other mailbox and serves bench2@contoso.test; 3 SMTP connections each,
rate limits off. Each of BENCH_RUNS rounds runs wrk at BENCH_IDENTITY_CLIENTS clients:
  1. `one`: every mail from bench@ (one identity, one mailbox's 3 connections);
  2. `two`: mails alternating between bench@ and bench2@ (both identities, 6 connections).
The ratio divides `two` by `one` of the same round. CPU is the relay's own.
Writes bench/results/identities.{md,json}.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (the main benchmark's helpers: relay process, wrk, CPU)

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CLIENTS = int(os.environ.get("BENCH_IDENTITY_CLIENTS", "16"))


def two_identity_config(base, peer):
    """The main benchmark's settings and a second identity on the peer's other mailbox."""
    with open(base, encoding="utf-8") as f:
        text = f.read()
    text += (
        "  defaultIdentity:\n"
        "    from: [bench@contoso.test]\n"
        "  identities:\n"
        "    - name: second\n"
        "      from: [bench2@contoso.test]\n"
        "      smtpAuthentication: BASIC\n"
        f"      smtpUsername: {peer['PEER_BASIC_USER']}\n"
        f"      smtpPassword: {peer['PEER_BASIC_PASSWORD']}\n"
    )
    path = base.replace(".yml", "-identities.yml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def alternating_script(work, marker):
    """wrk posting the benchmark mail, its From alternating between the two identities."""
    with open(bench.wrk_script(work, marker), encoding="utf-8") as f:
        plain = f.read()
    first = json.loads(bench.mail_body(marker))
    second = dict(first, **{"from": "bench2@contoso.test"})
    bodies = [json.dumps(b).replace("\\", "\\\\").replace('"', '\\"') for b in (first, second)]
    path = os.path.join(work, "alternating.lua")
    with open(path, "w", encoding="utf-8") as f:
        f.write(plain)
        f.write(f'local bodies = {{"{bodies[0]}", "{bodies[1]}"}}\nlocal n = 0\n'
                "request = function()\n  n = n + 1\n"
                "  return wrk.format(nil, nil, nil, bodies[(n % 2) + 1])\nend\n")
    return path


def main():
    peer_env = sys.argv[1]
    peer = bench.read_env(peer_env)
    work = tempfile.mkdtemp(prefix="mail-relay-bench-identities-")
    marker = f"bench-identities-{int(time.time())}"
    token_server, token_port = bench.start_token_server(peer_env, work)
    relay = None
    try:
        port = bench.free_port()
        config = two_identity_config(bench.write_config(work, peer, token_port, port), peer)
        relay = bench.Relay(config, port, work)
        relay.start()
        one, two = bench.wrk_script(work, marker), alternating_script(work, marker)
        bench.run_wrk(relay, two, 4)  # warm-up: both mailboxes logged in, pools full
        rounds = []
        for i in range(RUNS):
            single = bench.run_wrk(relay, one, CLIENTS)
            both = bench.run_wrk(relay, two, CLIENTS)
            ratio = both["rate"] / single["rate"]
            rounds.append({"one": single, "two": both, "ratio": ratio})
            bench.log(f"round {i + 1}: one identity {single['rate']:.0f}/s "
                      f"({single['cpu_ms_per_mail']:.3f} ms CPU), two {both['rate']:.0f}/s "
                      f"({both['cpu_ms_per_mail']:.3f} ms CPU), ratio {ratio:.2f}")
    finally:
        if relay:
            relay.stop()
        token_server.terminate()
        token_server.wait()

    med = bench.median
    ratios = [r["ratio"] for r in rounds]
    summary = {"machine": bench.machine(os.getloadavg()[0]), "runs": RUNS,
               "seconds_per_run": bench.SECONDS, "clients": CLIENTS, "rounds": rounds}
    lines = [f"One identity against two on the peer's two mailboxes (3 SMTP connections each): {RUNS} "
             f"rounds x {bench.SECONDS} s, wrk at {CLIENTS} clients; medians (lowest-highest). The ratio "
             "divides the two-identity rate by the one-identity rate of the same round.", "",
             "| identities | mails/s | p50 ms | p99 ms | CPU ms/mail | ratio | non-2xx |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("one", "1 (3 connections)"), ("two", "2 (6 connections)")):
        runs = [r[name] for r in rounds]
        rates = [r["rate"] for r in runs]
        ratio = "1.00" if name == "one" else f"{med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        lines.append(
            f"| {label} | {med(rates):.0f} ({min(rates):.0f}-{max(rates):.0f}) | "
            f"{med([r['p50_ms'] for r in runs]):.2f} | {med([r['p99_ms'] for r in runs]):.2f} | "
            f"{med([r['cpu_ms_per_mail'] for r in runs]):.3f} | {ratio} | "
            f"{sum(r['non2xx'] for r in runs)} |")
    bench.write_results("identities", summary, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

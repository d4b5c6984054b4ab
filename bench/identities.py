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
The ratio divides `two` by `one` of the same round. CPU is the relay's own. On this machine the
peer itself is the limit, so a second relay run, `slow`, sends both identities to the peer's slow
port, which answers the end of DATA 5 s late: there each mailbox's 3 connections are the limit, as
Exchange's are in production, for BENCH_IDENTITY_SLOW_SECONDS (40) per run.
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
SLOW_SECONDS = int(os.environ.get("BENCH_IDENTITY_SLOW_SECONDS", "40"))
# Two mailboxes' connections: every client has one, none waits past wrk's timeout.
SLOW_CLIENTS = 6


def two_identity_config(base, peer, slow=False):
    """The main benchmark's settings and a second identity on the peer's other mailbox;
    `slow`: both on the peer's slow port."""
    with open(base, encoding="utf-8") as f:
        text = f.read()
    if slow:
        text = text.replace(f"smtpPort: {peer['PEER_SUBMISSION_PORT']}", f"smtpPort: {peer['PEER_SLOW_PORT']}")
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
    path = base.replace(".yml", "-slow.yml" if slow else "-identities.yml")
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
        rounds = [measure(relay, one, two, i, CLIENTS) for i in range(RUNS)]
        relay.stop()

        port = bench.free_port()
        config = two_identity_config(bench.write_config(work, peer, token_port, port), peer, slow=True)
        relay = bench.Relay(config, port, work)
        relay.start()
        bench.SECONDS = SLOW_SECONDS
        slow = [measure(relay, one, two, i, SLOW_CLIENTS, "slow ") for i in range(2)]
    finally:
        if relay:
            relay.stop()
        token_server.terminate()
        token_server.wait()

    summary = {"machine": bench.machine(os.getloadavg()[0]), "runs": RUNS, "clients": CLIENTS,
               "rounds": rounds, "slow_rounds": slow, "slow_seconds_per_run": SLOW_SECONDS}
    lines = [f"One identity against two on the peer's two mailboxes (3 SMTP connections each), wrk at "
             f"{CLIENTS} clients ({SLOW_CLIENTS} against the slow peer); medians (lowest-highest). The ratio divides the two-identity rate by the "
             "one-identity rate of the same round. `slow`: the peer answers the end of DATA 5 s late, so "
             "the mailboxes' connections are the limit.", "",
             "| server | identities | mails/s | p50 ms | p99 ms | CPU ms/mail | ratio | non-2xx |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += rows("peer", rounds) + rows("slow peer", slow)
    bench.write_results("identities", summary, "\n".join(lines) + "\n")


def measure(relay, one, two, i, clients, label=""):
    single = bench.run_wrk(relay, one, clients)
    both = bench.run_wrk(relay, two, clients)
    ratio = both["rate"] / single["rate"]
    bench.log(f"{label}round {i + 1}: one identity {single['rate']:.1f}/s "
              f"({single['cpu_ms_per_mail']:.3f} ms CPU), two {both['rate']:.1f}/s "
              f"({both['cpu_ms_per_mail']:.3f} ms CPU), ratio {ratio:.2f}")
    return {"one": single, "two": both, "ratio": ratio}


def rows(server, rounds):
    med = bench.median
    ratios = [r["ratio"] for r in rounds]
    out = []
    for name, label in (("one", "1 (3 connections)"), ("two", "2 (6 connections)")):
        runs = [r[name] for r in rounds]
        rates = [r["rate"] for r in runs]
        ratio = "1.00" if name == "one" else f"{med(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        out.append(
            f"| {server} | {label} | {med(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
            f"{med([r['p50_ms'] for r in runs]):.2f} | {med([r['p99_ms'] for r in runs]):.2f} | "
            f"{med([r['cpu_ms_per_mail'] for r in runs]):.3f} | {ratio} | "
            f"{sum(r['non2xx'] for r in runs)} |")
    return out


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What the store costs per mail, and what two replicas sharing 3 connections deliver.

Called by bench/run.sh (`bash bench/run.sh store`), which starts the SMTP peer and builds the
release binary; this starts the test PostgreSQL (tests/store/start.sh). Every mail carries an
Idempotency-Key of its own and every rate limit is on (far above what is sent), so each mail asks
the store what a production mail asks it: the key's claim and answer, the limits' reservation,
the send-as denial memory. Three relays run side by side, one per store (memory, sqlite:,
postgres://); BENCH_RUNS rounds each run wrk at BENCH_STORE_CLIENTS clients against each relay
in turn, and a ratio compares a store with memory *of the same round*. Then two replicas on the
one PostgreSQL (one cap of 3 SMTP connections between them) take the load together, against one
replica alone with the same number of clients. Writes bench/results/store.{md,json}.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (the main benchmark's helpers: relay process, wrk, CPU)

ROOT = bench.ROOT
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
CLIENTS = int(os.environ.get("BENCH_STORE_CLIENTS", "8"))
RESULTS = "store" if CLIENTS == 8 else f"store-{CLIENTS}c"


def store_config(base, store, password_file):
    """The main benchmark's settings with every limit on (never reached) and `store`."""
    with open(base, encoding="utf-8") as f:
        text = f.read()
    limits = ("  rateLimits:\n    mailboxMessagesPerMinute: 100000\n"
              "    mailboxRecipientsPerDay: 10000000\n"
              "    callerMessagesPerMinute: 100000\n    callerRecipientsPerDay: 10000000\n")
    text = text.replace("  rateLimits:\n    mailboxMessagesPerMinute: 0\n    mailboxRecipientsPerDay: 0\n",
                        limits)
    text += f"  store:\n    url: \"{store}\"\n"
    if store.startswith("postgres"):
        text += f"    passwordFile: {password_file}\n"
    path = base.replace(".yml", f"-{store.split(':')[0]}-{len(store)}.yml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def keyed_script(work, marker, name):
    """wrk posting the benchmark mail, each request with an Idempotency-Key of its own: a
    fresh script (its own key prefix) per run, so that no run replays an earlier run's keys."""
    name = f"{name}-{uuid.uuid4().hex[:12]}"
    path = os.path.join(work, f"keyed-{name}.lua")
    body = bench.mail_body(marker).replace("\\", "\\\\").replace('"', '\\"')
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'''wrk.method = "POST"
wrk.body = "{body}"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {bench.API_KEY}"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", "{name}-{marker}-" .. threads)
end
local n = 0
function request()
  n = n + 1
  wrk.headers["Idempotency-Key"] = tid .. "-" .. n
  return wrk.format()
end
''')
    return path


def main():
    peer_env = sys.argv[1]
    peer = bench.read_env(peer_env)
    subprocess.run(["bash", os.path.join(ROOT, "tests/store/start.sh")], check=True,
                   stdout=subprocess.DEVNULL)
    store_env = bench.read_env(os.path.join(os.environ.get("MAIL_RELAY_STORE_DIR",
                                                           "/tmp/mail-relay-store"), "store.env"))
    work = tempfile.mkdtemp(prefix="mail-relay-bench-store-")
    marker = f"bench-store-{int(time.time())}"
    token_server, token_port = bench.start_token_server(peer_env, work)
    relays = {}
    try:
        stores = {
            "memory": "memory",
            "sqlite": f"sqlite:{work}/relay.db",
            "postgres": store_env["MAIL_RELAY_STORE_URL"],
        }
        for name, url in stores.items():
            port = bench.free_port()
            base = bench.write_config(work, peer, token_port, port)
            os.rename(base, base.replace(".yml", f"-{name}-base.yml"))
            config = store_config(base.replace(".yml", f"-{name}-base.yml"), url,
                                  store_env["MAIL_RELAY_STORE_PASSWORD_FILE"])
            relay = bench.Relay(config, port, work)
            relay.start()
            relays[name] = relay
        # Warm-up: every relay logs in and fills its pools.
        for name, relay in relays.items():
            bench.run_wrk(relay, keyed_script(work, marker, name), 2)
        rounds = []
        for i in range(RUNS):
            row = {name: bench.run_wrk(relay, keyed_script(work, marker, name), CLIENTS)
                   for name, relay in relays.items()}
            rounds.append(row)
            bench.log(f"round {i + 1}: " + ", ".join(
                f"{n} {r['rate']:.0f}/s p50 {r['p50_ms']:.2f} ms cpu {r['cpu_ms_per_mail']:.3f}"
                for n, r in row.items()))

        # Two replicas on PostgreSQL sharing the cap, against one alone, same clients in all.
        for name in ["memory", "sqlite"]:
            relays.pop(name).stop()
        one = relays["postgres"]
        port = bench.free_port()
        base = bench.write_config(work, peer, token_port, port)
        os.rename(base, base.replace(".yml", "-second-base.yml"))
        second = bench.Relay(store_config(base.replace(".yml", "-second-base.yml"),
                                          stores["postgres"],
                                          store_env["MAIL_RELAY_STORE_PASSWORD_FILE"]), port, work)
        second.start()
        relays["second"] = second
        pairs = []
        for i in range(RUNS):
            alone = bench.run_wrk(one, keyed_script(work, marker, "one"), 2 * CLIENTS)
            results = {}

            def load(key, relay, script):
                results[key] = bench.run_wrk(relay, script, CLIENTS)

            threads = [threading.Thread(target=load, args=("a", one, keyed_script(work, marker, "a"))),
                       threading.Thread(target=load, args=("b", second, keyed_script(work, marker, "b")))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            together = results["a"]["rate"] + results["b"]["rate"]
            pairs.append({"one_replica": alone["rate"], "two_replicas": together,
                          "ratio": together / alone["rate"],
                          "non2xx": alone["non2xx"] + results["a"]["non2xx"] + results["b"]["non2xx"]})
            bench.log(f"round {i + 1}: one replica {alone['rate']:.0f}/s, two {together:.0f}/s")
    finally:
        for relay in relays.values():
            relay.stop()
        token_server.terminate()
        token_server.wait()

    summary = {"machine": bench.machine(os.getloadavg()[0]), "runs": RUNS,
               "seconds_per_run": bench.SECONDS, "clients": CLIENTS, "rounds": rounds,
               "replicas": pairs, "stores": {}}
    for name in stores:
        runs = [r[name] for r in rounds]
        summary["stores"][name] = {
            "rate": bench.median([r["rate"] for r in runs]),
            "p50_ms": bench.median([r["p50_ms"] for r in runs]),
            "p99_ms": bench.median([r["p99_ms"] for r in runs]),
            "cpu_ms_per_mail": bench.median([r["cpu_ms_per_mail"] for r in runs]),
            "added_p50_ms": bench.median([r[name]["p50_ms"] - r["memory"]["p50_ms"] for r in rounds]),
            "added_cpu_ms": bench.median([r[name]["cpu_ms_per_mail"] - r["memory"]["cpu_ms_per_mail"]
                                          for r in rounds]),
            "non2xx": sum(r["non2xx"] for r in runs),
        }
    lines = [f"Store cost per mail: {RUNS} rounds x {bench.SECONDS} s, wrk at {CLIENTS} clients, "
             "every mail with its own Idempotency-Key and every rate limit on; medians, the added "
             "figures taken against memory in the same round. CPU is the relay's own (not the "
             "database server's).", "",
             "| store | mails/s | p50 ms | p99 ms | CPU ms/mail | added p50 ms | added CPU ms | non-2xx |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["stores"].items():
        lines.append(f"| {name} | {s['rate']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                     f"{s['cpu_ms_per_mail']:.3f} | {s['added_p50_ms']:+.2f} | {s['added_cpu_ms']:+.3f} | "
                     f"{s['non2xx']} |")
    lines += ["", f"Replicas on one PostgreSQL, sharing 3 SMTP connections ({2 * CLIENTS} clients in all):", "",
              "| | mails/s |", "|---|---:|",
              f"| one replica | {bench.median([p['one_replica'] for p in pairs]):.0f} |",
              f"| two replicas | {bench.median([p['two_replicas'] for p in pairs]):.0f} "
              f"(ratio {bench.median([p['ratio'] for p in pairs]):.2f}, "
              f"non-2xx {sum(p['non2xx'] for p in pairs)}) |", ""]
    table = "\n".join(lines)
    bench.write_results(RESULTS, summary, table)


if __name__ == "__main__":
    main()

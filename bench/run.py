#!/usr/bin/env python3
"""mail-relay benchmark: the relay against direct SMTP to the Postfix + Dovecot peer.

Called by bench/run.sh (which starts the peer and builds the release binaries). Measures, in
BENCH_RUNS rounds of BENCH_SECONDS per row, each round one direct run followed by one relay run
per client count (interleaved, so that drift in the machine's load hits both alike), with medians
and the spread over the rounds; a ratio compares a relay run with the direct run of its round:
- the limit: direct SMTP over 3 pooled XOAUTH2 connections (bench/smtp_direct.rs);
- the relay: POST /mail from wrk at 1, 8, 32, 128 clients: mails/s, p50/p99, ratio to the limit,
  the relay's CPU per mail (from /proc/PID/stat);
- token endpoint calls during the whole run; RSS idle, under load, peak with one 25 MB attachment;
- start-up time to ready.
Prints a markdown table and writes it with the raw figures to bench/results/.
"""

import base64
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BENCH_RELAY: another build of the relay, to compare two builds under the same conditions.
RELAY = os.environ.get("BENCH_RELAY") or os.path.join(ROOT, "target/release/mail-relay")
DIRECT = os.path.join(ROOT, "target/release/examples/smtp_direct")
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
CLIENTS = [int(c) for c in os.environ.get("BENCH_CLIENTS", "1,8,32,128").split(",")]
CONNECTIONS = 3
# Flame graphs after the measured rounds (BENCH_PROFILE=1): one unmeasured run at each.
FLAME_CLIENTS = [int(c) for c in os.environ.get("BENCH_FLAME_CLIENTS", "1,8,32").split(",") if c]
# `shared`: everything on all cores. `split` (bench/run.sh sets it): the SMTP server on CPU 0,
# the relay and its clients on the others, as in production, where Exchange is elsewhere.
LAYOUT = os.environ.get("BENCH_LAYOUT", "shared")
CALLGRAPH = os.environ.get("BENCH_CALLGRAPH", "fp")
RESULTS = "latest" if LAYOUT == "shared" else f"latest-{LAYOUT}"
API_KEY = "mr_bench-key-not-secret"
TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_env(path):
    env = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "=" in line:
                k, v = line.strip().split("=", 1)
                env[k] = v
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, headers=None, timeout=120):
    request = urllib.request.Request(url, data=body, headers=headers or {},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, OSError):
        return None, b""


def proc_status(pid, field):
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # MiB
    return 0.0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def context_switches(pid):
    """Voluntary and involuntary context switches of all the process's threads so far.

    /proc/PID/status counts the main thread only; a thread that exits takes its count along, which
    the runtime's long-lived workers do not."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status", encoding="utf-8") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def start_token_server(peer_env, work):
    """bench/token_server.py on a port of its own; returns the process and the port."""
    port_file = os.path.join(work, "token.port")
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench/token_server.py"),
                               peer_env, port_file], stdin=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(port_file):
            break
        time.sleep(0.05)
    with open(port_file, encoding="utf-8") as f:
        return server, int(f.read())


def write_config(work, peer, token_port, port):
    sha = hashlib.sha256(API_KEY.encode()).hexdigest()
    path = os.path.join(work, "bench.yml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""server:
  address: 127.0.0.1
  port: {port}
featureSwitches:
  sendEmail:
    smtpServer: {peer['PEER_HOST']}
    smtpPort: {peer['PEER_SUBMISSION_PORT']}
    smtpEncryption: TLS
    smtpAuthentication: MS_OAUTH
    smtpUsername: {peer['PEER_OAUTH_USER']}
    oAuthClientId: {peer['PEER_JWT_AUD']}
    oAuthClientSecret: bench-client-secret
    oAuthTenantId: {TENANT}
    oAuthTokenEndpoint: http://127.0.0.1:{token_port}/{TENANT}/oauth2/v2.0/token
mailRelay:
  delivery:
    mode: smtp
  smtp:
    maxConnections: {CONNECTIONS}
    caFile: {peer['PEER_CA']}
  rateLimits:
    mailboxMessagesPerMinute: 0
    mailboxRecipientsPerDay: 0
  auth:
    apiKeys:
      - name: bench
        sha256: {sha}
        allowedFrom: ["*@contoso.test"]
""")
    return path


class Relay:
    """One relay process; `start` returns the time from exec to a 200 from /health/ready."""

    def __init__(self, config, port, work):
        self.config, self.port, self.work = config, port, work
        self.proc = None

    def start(self):
        logfile = open(os.path.join(self.work, "relay.log"), "ab")  # noqa: SIM115
        began = time.monotonic()
        self.proc = subprocess.Popen([RELAY, "--config", self.config, "serve"],
                                     stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile)
        url = f"http://127.0.0.1:{self.port}/health/ready"
        while time.monotonic() - began < 30:
            if self.proc.poll() is not None:
                raise SystemExit(f"relay exited with {self.proc.returncode}; see {self.work}/relay.log")
            status, _ = http(url, timeout=1)
            if status == 200:
                return time.monotonic() - began
            time.sleep(0.002)
        raise SystemExit("relay not ready within 30 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def mail_body(marker, text_bytes=1000, attachment=None):
    body = {"from": "bench@contoso.test", "to": "alice@contoso.test",
            "subject": f"{marker} relay", "text": ("Lorem ipsum dolor sit amet. " * 40)[:text_bytes]}
    if attachment is not None:
        body["attachments"] = [{"filename": "big.bin", "contentType": "application/octet-stream",
                                "content": base64.b64encode(attachment).decode()}]
    return json.dumps(body)


def wrk_script(work, marker):
    path = os.path.join(work, "post.lua")
    body = mail_body(marker).replace("\\", "\\\\").replace('"', '\\"')
    with open(path, "w", encoding="utf-8") as f:
        f.write(f'wrk.method = "POST"\nwrk.body = "{body}"\n'
                f'wrk.headers["Content-Type"] = "application/json"\n'
                f'wrk.headers["Authorization"] = "Bearer {API_KEY}"\n')
    return path


def parse_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(relay, script, clients):
    threads = min(clients, 2)
    before_cpu = cpu_seconds(relay.proc.pid)
    before_switches = context_switches(relay.proc.pid)
    rss = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                rss.append(proc_status(relay.proc.pid, "VmRSS"))
            except OSError:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = subprocess.run(["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{SECONDS}s",
                              "--timeout", "30s", "--latency", "-s", script,
                              f"http://127.0.0.1:{relay.port}/mail"],
                             capture_output=True, text=True, check=True).stdout
    finally:
        done.set()
        sampler.join()
    cpu = cpu_seconds(relay.proc.pid) - before_cpu
    switches = context_switches(relay.proc.pid) - before_switches
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))
    duration_m = re.search(r"\d+ requests in ([\d.]+)(\w+)", out)
    duration = parse_ms(duration_m.group(1), duration_m.group(2)) / 1000.0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(g) for g in errors.groups()) if errors else 0
    pct = {m.group(1): parse_ms(m.group(2), m.group(3))
           for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)}
    ok = requests - failed
    return {"clients": clients, "mails": ok, "non2xx": failed, "socket_errors": socket_errors,
            "rate": ok / duration, "p50_ms": pct.get("50"), "p99_ms": pct.get("99"),
            "cpu_ms_per_mail": 1000.0 * cpu / ok if ok else None,
            "switches_per_mail": switches / ok if ok else None,
            "rss_max_mib": max(rss) if rss else None}


def profile(relay, script, work):
    """One extra, unmeasured 8-client run under `perf record`: where the relay's CPU goes."""
    data = os.path.join(work, "perf.data")
    try:
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-g", "-o", data,
                                 "-p", str(relay.proc.pid)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        log("perf not installed: no profile")
        return
    time.sleep(0.3)
    run_wrk(relay, script, 8)
    perf.send_signal(2)
    perf.wait(timeout=60)
    reports = []
    for sort in ["dso", "symbol"]:
        out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                              "-g", "none", "--percent-limit", "0.7", "--sort", sort],
                             capture_output=True, text=True, check=False).stdout
        reports.append("\n".join(re.sub(r"(\s+-)*\s*$", "", line) for line in out.splitlines()
                                 if line.strip() and not line.startswith("#")))
    os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench/results/profile.txt"), "w", encoding="utf-8") as f:
        f.write("perf record -F 999 -g on the relay during one 8-client wrk run\n\n"
                "== by shared object ==\n" + reports[0] + "\n\n== by symbol ==\n"
                + reports[1] + "\n")
    log("profile written to bench/results/profile.txt")
    for clients in FLAME_CLIENTS:
        flame_graph(relay, script, work, clients)


def flame_graph(relay, script, work, clients):
    """bench/results/flame-<clients>.svg from one unmeasured run under `perf record`, drawn with
    inferno (`cargo install inferno`); skipped when inferno is not installed."""
    collapse, draw = shutil.which("inferno-collapse-perf"), shutil.which("inferno-flamegraph")
    if not (collapse and draw):
        log("inferno not installed (cargo install inferno): no flame graphs")
        return
    data = os.path.join(work, f"perf-{clients}.data")
    # BENCH_CALLGRAPH=dwarf unwinds with DWARF instead of frame pointers, which the release build
    # and std lack: far fewer [unknown] frames, at the cost of a much larger perf.data.
    callgraph = ["--call-graph", "dwarf,16384", "-F", "299"] if CALLGRAPH == "dwarf" else ["-F", "999", "-g"]
    perf = subprocess.Popen(["perf", "record", "-q", *callgraph, "-o", data,
                             "-p", str(relay.proc.pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    run_wrk(relay, script, clients)
    perf.send_signal(2)
    perf.wait(timeout=60)
    stacks = subprocess.run(["perf", "script", "-i", data], capture_output=True, check=False).stdout
    folded = subprocess.run([collapse], input=stacks, capture_output=True, check=True).stdout
    svg = subprocess.run([draw, "--title", f"mail-relay, POST /mail at {clients} clients "
                          "(perf -F 999, relay process)"],
                         input=folded, capture_output=True, check=True).stdout
    suffix = "-dwarf" if CALLGRAPH == "dwarf" else ""
    path = os.path.join(ROOT, f"bench/results/flame-{clients}{suffix}.svg")
    with open(path, "wb") as f:
        f.write(svg)
    log(f"flame graph written to {path}")


def run_direct(peer, token, marker):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([DIRECT, peer["PEER_HOST"], peer["PEER_SUBMISSION_PORT"], peer["PEER_CA"],
                          peer["PEER_OAUTH_USER"], str(CONNECTIONS), str(SECONDS), marker],
                         env={**os.environ, "BENCH_TOKEN": token},
                         capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    switches = (after.ru_nvcsw - before.ru_nvcsw) + (after.ru_nivcsw - before.ru_nivcsw)
    result["cpu_ms_per_mail"] = 1000.0 * cpu / result["mails"] if result["mails"] else None
    result["switches_per_mail"] = switches / result["mails"] if result["mails"] else None
    return result


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def machine(load):
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = proc_meminfo_total()
    layout = ("client (wrk), relay, token endpoint and Postfix + Dovecot share the same cores"
              if LAYOUT == "shared" else
              "Postfix + Dovecot pinned to CPU 0, the relay, wrk, the direct client and the token "
              "endpoint to the other cores")
    return (f"{os.cpu_count()} vCPU ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
            f"{platform.freedesktop_os_release().get('PRETTY_NAME', 'Linux')}; {layout}, all on "
            f"loopback; load average before the run {load:.2f} (other work on the machine)")


def proc_meminfo_total():
    with open("/proc/meminfo", encoding="utf-8") as f:
        return int(f.readline().split()[1]) / 1024 / 1024


def main():
    peer_env = sys.argv[1]
    peer = read_env(peer_env)
    load_before = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="mail-relay-bench-")
    marker = f"bench-{int(time.time())}"
    log(f"work dir {work}, marker {marker}, {RUNS} runs x {SECONDS} s")

    token_server, token_port = start_token_server(peer_env, work)
    relay = None
    try:
        token_base = f"http://127.0.0.1:{token_port}"
        port = free_port()
        config = write_config(work, peer, token_port, port)

        # Start-up: several cold starts of the release binary, to a 200 from /health/ready.
        startups = []
        for _ in range(RUNS):
            relay = Relay(config, port, work)
            startups.append(relay.start())
            if len(startups) < RUNS:
                relay.stop()
        log(f"start-up to ready: {[round(s * 1000, 1) for s in startups]} ms")
        time.sleep(0.5)
        rss_idle = proc_status(relay.proc.pid, "VmRSS")

        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        status, answer = http(f"http://127.0.0.1:{port}/mail", mail_body(marker).encode(), headers)
        if status != 202:
            raise SystemExit(f"warm-up mail: {status} {answer[:500]!r}")

        _, token = http(f"{token_base}/token")
        script = wrk_script(work, marker)
        # Unmeasured: the server's first run after a pause is slow (its processes start).
        log(f"warm-up, direct: {run_direct(peer, token.decode(), marker)}")
        direct = []
        relay_runs = {c: [] for c in CLIENTS}
        for i in range(RUNS):
            direct.append(run_direct(peer, token.decode(), marker))
            log(f"round {i + 1}, direct: {direct[-1]}")
            for clients in CLIENTS:
                result = run_wrk(relay, script, clients)
                result["ratio"] = result["rate"] / direct[-1]["rate"]
                relay_runs[clients].append(result)
                log(f"round {i + 1}, relay at {clients} clients: {result}")
        rss_after_load = proc_status(relay.proc.pid, "VmRSS")
        if os.environ.get("BENCH_PROFILE", "1") == "1" and LAYOUT == "shared":
            profile(relay, script, work)

        # Peak RSS while sending one 25 MB attachment: reset the high-water mark first.
        with open(f"/proc/{relay.proc.pid}/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        before_big = proc_status(relay.proc.pid, "VmHWM")
        big = mail_body(marker, attachment=os.urandom(25 * 1000 * 1000)).encode()
        began = time.monotonic()
        status, answer = http(f"http://127.0.0.1:{port}/mail", big, headers)
        big_seconds = time.monotonic() - began
        peak_big = proc_status(relay.proc.pid, "VmHWM")
        log(f"25 MB attachment: {status}, {big_seconds:.2f} s, VmHWM {before_big:.1f} -> {peak_big:.1f} MiB")
        if status != 202:
            log(f"25 MB attachment refused: {answer[:300]!r}")

        _, calls = http(f"{token_base}/count")
        token_calls = int(calls)
    finally:
        if relay:
            relay.stop()
        token_server.terminate()
        token_server.wait()

    limit = median([d["rate"] for d in direct])
    rows = []
    for clients in CLIENTS:
        runs = relay_runs[clients]
        rates = [r["rate"] for r in runs]
        ratios = [r["ratio"] for r in runs]
        rows.append({"clients": clients, "rate": median(rates),
                     "rate_min": min(rates), "rate_max": max(rates),
                     "ratio": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "p50_ms": median([r["p50_ms"] for r in runs]),
                     "p99_ms": median([r["p99_ms"] for r in runs]),
                     "cpu_ms_per_mail": median([r["cpu_ms_per_mail"] for r in runs]),
                     "cpu_ratio": median([r["cpu_ms_per_mail"] / d["cpu_ms_per_mail"]
                                          for r, d in zip(runs, direct)
                                          if r["cpu_ms_per_mail"] and d["cpu_ms_per_mail"]]),
                     "switches_per_mail": median([r["switches_per_mail"] for r in runs]),
                     "non2xx": sum(r["non2xx"] for r in runs),
                     "socket_errors": sum(r["socket_errors"] for r in runs)})
    total_mails = sum(r["mails"] for runs in relay_runs.values() for r in runs) + 1
    summary = {
        "machine": machine(load_before), "runs": RUNS, "seconds_per_run": SECONDS, "marker": marker,
        "direct": {"rate": limit, "rate_min": min(d["rate"] for d in direct),
                   "rate_max": max(d["rate"] for d in direct), "p50_ms": median([d["p50_ms"] for d in direct]),
                   "p99_ms": median([d["p99_ms"] for d in direct]),
                   "cpu_ms_per_mail": median([d["cpu_ms_per_mail"] for d in direct]),
                   "switches_per_mail": median([d["switches_per_mail"] for d in direct]), "runs": direct},
        "relay": rows, "relay_runs": relay_runs,
        "token_calls": token_calls, "relay_mails": total_mails,
        "startup_ms": 1000 * median(startups), "startups_ms": [1000 * s for s in startups],
        "rss_idle_mib": rss_idle,
        "rss_load_mib": max(r["rss_max_mib"] for runs in relay_runs.values() for r in runs),
        "rss_after_load_mib": rss_after_load,
        "rss_25mb_peak_mib": peak_big, "big_status": status, "big_seconds": big_seconds,
    }
    write_results(RESULTS, summary, render(summary))
    guard_cpu_ratio(rows)


def guard_cpu_ratio(rows):
    """Prints the relay's CPU per mail over the bare client's at 8 clients and more; exits 1 when
    BENCH_MAX_CPU_RATIO (bench/run.sh --max-cpu-ratio R) is set and a median exceeds it."""
    limit = os.environ.get("BENCH_MAX_CPU_RATIO")
    over = []
    for row in rows:
        if row["clients"] < 8 or row["cpu_ratio"] is None:
            continue
        log(f"CPU per mail, relay over direct, {row['clients']} clients: {row['cpu_ratio']:.2f}"
            + (f" (limit {float(limit):.2f})" if limit else ""))
        if limit and row["cpu_ratio"] > float(limit):
            over.append(row["clients"])
    if over:
        log(f"FAIL: the CPU ratio exceeds {limit} at {over} clients")
        sys.exit(1)


def write_results(name, summary, table):
    """bench/results/NAME.json (the raw figures) and NAME.md (the table), and the table printed."""
    os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
    with open(os.path.join(ROOT, f"bench/results/{name}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(ROOT, f"bench/results/{name}.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)


def fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def render(s):
    d = s["direct"]
    lines = [
        f"Machine: {s['machine']}.",
        f"{s['runs']} rounds of {s['seconds_per_run']:.0f} s per row, each round a direct run and then "
        "the relay at each client count; medians, with the lowest and highest round in brackets; a "
        "ratio divides a relay run by the direct run of the same round. Small mails (about 1 KB), "
        f"{CONNECTIONS} SMTP connections, STARTTLS + XOAUTH2. CPU ms/mail: user + system time of the "
        "relay process (of the direct client in the first row) divided by the mails it sent; CPU ratio: "
        "that of a relay run over that of the direct run of its round; switches/mail: the process's "
        "context switches (all threads) per mail.",
        "",
        "| path | clients | mails/s | ratio to direct | p50 ms | p99 ms | CPU ms/mail | CPU ratio "
        "| switches/mail | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| direct SMTP (the limit) | {CONNECTIONS} conns | {fmt(d['rate'])} "
        f"({fmt(d['rate_min'], 0)}–{fmt(d['rate_max'], 0)}) | 1.00 | "
        f"{fmt(d['p50_ms'], 2)} | {fmt(d['p99_ms'], 2)} | {fmt(d['cpu_ms_per_mail'], 3)} (client) | 1.00 | "
        f"{fmt(d['switches_per_mail'], 1)} | – |",
    ]
    for r in s["relay"]:
        lines.append(f"| relay, POST /mail (wrk) | {r['clients']} | {fmt(r['rate'])} "
                     f"({fmt(r['rate_min'], 0)}–{fmt(r['rate_max'], 0)}) | "
                     f"{fmt(r['ratio'], 2)} ({fmt(r['ratio_min'], 2)}–{fmt(r['ratio_max'], 2)}) | "
                     f"{fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} | "
                     f"{fmt(r['cpu_ms_per_mail'], 3)} | {fmt(r['cpu_ratio'], 2)} | "
                     f"{fmt(r['switches_per_mail'], 1)} | {r['non2xx'] + r['socket_errors']} |")
    lines += [
        "",
        "| measure | value |",
        "|---|---|",
        f"| token endpoint calls, whole run ({s['relay_mails']} mails through the relay, token lifetime 1 h) "
        f"| {s['token_calls']} |",
        f"| start-up to ready (exec to `200` from `/health/ready`, median of {s['runs']}) "
        f"| {fmt(s['startup_ms'])} ms |",
        f"| RSS idle (after start) | {fmt(s['rss_idle_mib'])} MiB |",
        f"| RSS under load (max sampled, up to {max(CLIENTS)} clients) | {fmt(s['rss_load_mib'])} MiB |",
        f"| RSS after the load | {fmt(s['rss_after_load_mib'])} MiB |",
        f"| peak RSS, one mail with a 25 MB attachment (33 MB JSON; answer {s['big_status']} "
        f"in {fmt(s['big_seconds'], 2)} s) | {fmt(s['rss_25mb_peak_mib'])} MiB |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Soak: `runner serve` under a steady mix of sync, async-with-webhook, streaming (SSE) and
canceled predictions, at the highest rate the clients sustain, for a bounded time.

    benches/soak.py [--runner PATH] [--seconds 600] [--clients 8] [--json-out FILE]

Serves models/stream (a streaming model: words back one by one) on 127.0.0.1 with a queue,
runs the clients against it, and checks at the end:
  - 0 lost predictions: every accepted prediction reached a terminal state, and every async
    one delivered exactly one terminal webhook;
  - 0 answers of 5xx (and no unexpected 4xx);
  - every prediction accounted for: runner's /metrics counts (runner_predictions_total by
    status) equal what the clients saw;
  - memory: the server's RSS at the start and the end of the soak (flat = the end is within
    10 % + 8 MB of the start, after a warm-up minute or a tenth of the run).
Prints a markdown report; exits 1 when a check fails. Standard library only.
"""
import argparse
import http.client
import http.server
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Hooks(http.server.ThreadingHTTPServer):
    """Webhook receiver: records every terminal webhook per prediction id."""

    daemon_threads = True

    def __init__(self):
        self.lock = threading.Lock()
        self.terminal = defaultdict(list)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(handler):  # noqa: N805 - the handler is the request
                body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
                if body.get("status") in ("succeeded", "failed", "canceled"):
                    with self.lock:
                        self.terminal[body["id"]].append(body["status"])
                handler.send_response(200)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *args):  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Soak:
    def __init__(self, addr, hook_url):
        self.host, self.port = addr.split(":")
        self.hook_url = hook_url
        self.lock = threading.Lock()
        self.outcomes = Counter()  # (kind, terminal status) -> count
        self.statuses = Counter()  # HTTP status -> count
        self.async_ids = {}  # id -> "succeeded" | "canceled" (what the webhook must say)
        self.problems = []

    def conn(self):
        return http.client.HTTPConnection(self.host, int(self.port), timeout=60)

    def note(self, kind, status, http_status):
        with self.lock:
            self.outcomes[(kind, status)] += 1
            self.statuses[http_status] += 1
            if http_status >= 500:
                self.problems.append(f"{kind}: HTTP {http_status}")

    def request(self, method, path, body=None, headers=None):
        c = self.conn()
        c.request(method, path, body=json.dumps(body) if body is not None else None,
                  headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def sync(self, n):
        status, data = self.request("POST", "/predictions", {"input": {"prompt": f"sync {n} a b c"}})
        body = json.loads(data) if status == 200 else {}
        if status == 200 and "".join(body.get("output") or []).split() != ["sync", f"{n}", "a", "b", "c"]:
            self.problems.append(f"sync {n}: wrong output {body.get('output')!r}")
        self.note("sync", body.get("status", f"http {status}"), status)

    def async_webhook(self, n, cancel):
        pid = f"soak-{'cancel' if cancel else 'async'}-{n}-{random.getrandbits(32):08x}"
        inputs = {"prompt": "slow words " * 50, "delay": 0.05} if cancel else {"prompt": f"async {n} x y"}
        status, data = self.request("POST", "/predictions",
                                    {"id": pid, "input": inputs, "webhook": self.hook_url,
                                     "webhook_events_filter": ["completed"]},
                                    {"Prefer": "respond-async"})
        if status != 202:
            self.note("cancel" if cancel else "async", f"http {status}", status)
            return
        if cancel:
            time.sleep(random.uniform(0.0, 0.1))
            c_status, _ = self.request("POST", f"/predictions/{pid}/cancel")
            # 404: it finished (or had not been registered) before the cancel arrived.
            expect = "canceled" if c_status == 200 else None
            with self.lock:
                self.async_ids[pid] = expect
            self.note("cancel", "requested" if c_status == 200 else f"cancel {c_status}", 202)
        else:
            with self.lock:
                self.async_ids[pid] = "succeeded"
            self.note("async", "accepted", 202)

    def stream(self, n):
        c = self.conn()
        c.request("POST", "/predictions", body=json.dumps({"input": {"prompt": f"stream {n} one two"}}),
                  headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        chunks = re.findall(r"^event: output\ndata: (.*)$", text, re.M)
        completed = re.search(r"^event: completed\ndata: (.*)$", text, re.M)
        status = json.loads(completed.group(1))["status"] if completed else "no completed event"
        if r.status == 200 and len(chunks) != 4:
            self.problems.append(f"stream {n}: {len(chunks)} output events, expected 4")
        self.note("stream", status, r.status)

    def client(self, c, stop):
        n = c
        while time.time() < stop:
            kind = n % 8
            try:
                if kind < 3:
                    self.sync(n)
                elif kind < 5:
                    self.async_webhook(n, cancel=False)
                elif kind < 7:
                    self.stream(n)
                else:
                    self.async_webhook(n, cancel=True)
            except Exception as e:  # noqa: BLE001 - a lost request is a finding
                with self.lock:
                    self.problems.append(f"client {c}, request {n}: {e!r}")
            n += 97


def metrics(soak):
    _, data = soak.request("GET", "/metrics")
    counts = {}
    for m in re.finditer(r'^runner_predictions_total\{status="(\w+)"\} (\d+)', data.decode(), re.M):
        counts[m.group(1)] = int(m.group(2))
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runner", default=os.path.join(ROOT, "target/release/runner"))
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    hooks = Hooks()
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"soak-serve-{os.getpid()}.log"), "w+")
    server = subprocess.Popen([args.runner, "serve", os.path.join(ROOT, "models/stream"), "--port", "0",
                               "--device", "cpu", "--max-queue", "64"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 60
        addr = None
        while addr is None:
            log.seek(0)
            m = re.search(r"^runner: ready at http://(\S+)", log.read(), re.M)
            if m:
                addr = m.group(1)
            elif server.poll() is not None or time.time() > deadline:
                sys.exit(f"runner did not start:\n{open(log.name).read()[-2000:]}")
            else:
                time.sleep(0.05)
        soak = Soak(addr, f"http://127.0.0.1:{hooks.server_address[1]}/hook")
        started = time.time()
        stop = started + args.seconds
        warm = started + min(60.0, args.seconds / 10)
        threads = [threading.Thread(target=soak.client, args=(c, stop)) for c in range(args.clients)]
        [t.start() for t in threads]
        while time.time() < warm:
            time.sleep(0.1)
        rss_start = rss_kib(server.pid)
        [t.join() for t in threads]
        elapsed = time.time() - started
        rss_end = rss_kib(server.pid)

        # Every async prediction's terminal webhook, exactly once.
        wait_until = time.time() + 30
        while time.time() < wait_until:
            with hooks.lock:
                if all(pid in hooks.terminal for pid in soak.async_ids):
                    break
            time.sleep(0.1)
        time.sleep(1)
        lost, duplicated, wrong = [], [], []
        terminal_by_status = Counter()
        with hooks.lock:
            for pid, expect in soak.async_ids.items():
                got = hooks.terminal.get(pid, [])
                if not got:
                    lost.append(pid)
                    continue
                if len(got) > 1:
                    duplicated.append(pid)
                if expect and got[0] != expect:
                    wrong.append(f"{pid}: {got[0]}, expected {expect}")
                terminal_by_status[got[0]] += 1
        counted = metrics(soak)
    finally:
        server.terminate()
        server.wait(timeout=30)

    seen = Counter()
    for (kind, status), n in soak.outcomes.items():
        if kind in ("sync", "stream") and status in ("succeeded", "failed", "canceled"):
            seen[status] += n
    seen.update(terminal_by_status)
    total = sum(soak.outcomes[(k, s)] for (k, s) in soak.outcomes if not s.startswith("http"))
    bad_status = {s: n for s, n in soak.statuses.items() if s not in (200, 202)}
    flat = rss_end <= rss_start * 1.10 + 8 * 1024
    checks = {
        "no lost predictions (every async one has its terminal webhook)": not lost,
        "no terminal webhook delivered twice": not duplicated,
        "canceled predictions end canceled": not wrong,
        "no 5xx and no unexpected status": not bad_status,
        "no client errors or wrong outputs": not soak.problems,
        "metrics count every prediction": all(counted.get(s, 0) == seen[s] for s in ("succeeded", "failed", "canceled")),
        "memory flat": flat,
    }
    report = {
        "seconds": round(elapsed, 1),
        "clients": args.clients,
        "requests": total,
        "predictions_per_second": round(sum(seen.values()) / elapsed, 1),
        "outcomes": {f"{k} {s}": n for (k, s), n in sorted(soak.outcomes.items())},
        "terminal_states_seen_by_clients": dict(seen),
        "runner_predictions_total": counted,
        "http_statuses": {str(k): v for k, v in sorted(soak.statuses.items())},
        "rss_kib_start": rss_start,
        "rss_kib_end": rss_end,
        "lost": lost[:10],
        "duplicated": duplicated[:10],
        "wrong": wrong[:10],
        "problems": soak.problems[:10],
        "checks": checks,
    }
    print(f"## Soak: {elapsed:.0f} s, {args.clients} clients, models/stream\n")
    print("| what | value |\n|---|---|")
    print(f"| predictions finished | {sum(seen.values())} ({report['predictions_per_second']}/s): {dict(seen)} |")
    print(f"| by kind | {report['outcomes']} |")
    print(f"| HTTP statuses | {report['http_statuses']} |")
    print(f"| runner_predictions_total | {counted} |")
    print(f"| server RSS, after warm-up → end | {rss_start / 1024:.1f} MiB → {rss_end / 1024:.1f} MiB |")
    for name, ok in checks.items():
        print(f"| {name} | {'yes' if ok else 'NO'} |")
    if soak.problems or lost or duplicated or wrong:
        print(f"\nproblems: {soak.problems[:5]} lost: {lost[:5]} duplicated: {duplicated[:5]} wrong: {wrong[:5]}")
    if args.json_out:
        json.dump(report, open(args.json_out, "w"), indent=2)
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()

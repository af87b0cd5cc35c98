#!/usr/bin/env python3
"""Python predictors under load: an async Cog predictor (concurrency 8) with its own async
healthcheck(), current_scope() metrics and per-request context, served by runner; 6 clients
send predictions, each with its own `context`, while 2 more poll /health-check.

    benches/python-soak/soak.py --python VENV/bin/python [--runner PATH] [--seconds 60]

Checks that every prediction succeeded with its own context echoed and its own metrics
(no cross-talk between concurrent predictions), that /health-check only ever said READY or
BUSY, and that /metrics counts what the clients saw. Exits 1 on any failure.
"""
import argparse
import http.client
import json
import os
import random
import subprocess
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", required=True, help="an interpreter with cog==0.23.1")
    ap.add_argument("--runner", default=os.path.join(ROOT, "target/release/runner"))
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    server = subprocess.Popen(
        [args.runner, "-q", "--python", args.python, "serve", HERE, "--port", "0"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        line = server.stderr.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        run(port, args.seconds)
    finally:
        server.terminate()
        server.wait()


def run(port, seconds):
    stop = time.time() + seconds
    errors, counts, lock = [], {"predictions": 0, "health_checks": 0}, threading.Lock()

    def predictor(k):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = 0
        while time.time() < stop:
            i += 1
            who = f"client{k}-{i}"
            body = json.dumps({"input": {"i": i, "wait": random.random() * 0.05}, "context": {"who": who}})
            c.request("POST", "/predictions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            if r.status == 409:  # every slot busy: Cog's answer, not an error
                continue
            v = json.loads(data)
            ok = (r.status == 200 and v.get("status") == "succeeded" and v.get("output") == f"{i}:{who}"
                  and v["metrics"].get("steps") == 3 and v["metrics"].get("i") == i)
            with lock:
                counts["predictions"] += 1
                if not ok:
                    errors.append((r.status, data[:300]))

    def health():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.time() < stop:
            c.request("GET", "/health-check")
            v = json.loads(c.getresponse().read())
            with lock:
                counts["health_checks"] += 1
                if v["status"] not in ("READY", "BUSY"):
                    errors.append(("health", v["status"], v.get("user_healthcheck_error")))

    threads = [threading.Thread(target=predictor, args=(k,)) for k in range(6)]
    threads += [threading.Thread(target=health) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    metrics = c.getresponse().read().decode()
    succeeded = next(l for l in metrics.splitlines() if l.startswith('runner_predictions_total{status="succeeded"}'))
    if int(succeeded.split()[-1]) != counts["predictions"]:
        errors.append(("metrics", succeeded, counts["predictions"]))
    print(json.dumps({**counts, "errors": len(errors), "first_errors": errors[:5]}))
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Time to READY of a Python Cog predictor whose module takes 2 s to import (standing in for
`import torch`), under runner and under Cog's own server (coglet), alternating.

    benches/python-cold-start.py --python VENV/bin/python [--runner PATH] [--runs 3]

The predictor is cog-spec/predictors/scope with `time.sleep(2)` at the top of predict.py,
copied to a temporary folder. coglet gets the schema `cog build` would have written in
.cog/openapi_schema.json (as in a Cog image); runner reads the signature itself. Prints
seconds from process start to READY for each run, and the medians.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready_after(cmd, port, **popen):
    started = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health-check", timeout=5) as r:
                    if json.load(r)["status"] == "READY":
                        return time.time() - started
            except OSError:
                pass
            if p.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited with {p.returncode}")
            time.sleep(0.01)
    finally:
        p.terminate()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", required=True, help="an interpreter with cog==0.23.1 (coglet)")
    ap.add_argument("--runner", default=os.path.join(ROOT, "target/release/runner"))
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    model = os.path.join(work, "model")
    shutil.copytree(os.path.join(ROOT, "cog-spec/predictors/scope"), model)
    source = open(os.path.join(model, "predict.py")).read()
    with open(os.path.join(model, "predict.py"), "w") as f:
        f.write("import time\ntime.sleep(2)  # stands in for importing torch\n" + source)
    coglet_model = os.path.join(work, "coglet")
    shutil.copytree(model, coglet_model)
    os.makedirs(os.path.join(coglet_model, ".cog"))
    shutil.copy(os.path.join(model, "openapi_schema.json"), os.path.join(coglet_model, ".cog/openapi_schema.json"))
    env = dict(os.environ, PATH=os.path.dirname(args.python) + os.pathsep + os.environ["PATH"],
               COG_PREDICT_TYPE_STUB="predict.py:Predictor")
    times = {"runner": [], "coglet": []}
    for _ in range(args.runs):
        port = free_port()
        times["runner"].append(ready_after(
            [args.runner, "-q", "--python", args.python, "serve", model, "--port", str(port)], port))
        port = free_port()
        times["coglet"].append(ready_after(
            [args.python, "-m", "cog.server.http", "--host", "127.0.0.1"], port,
            cwd=coglet_model, env=dict(env, PORT=str(port))))
    shutil.rmtree(work)
    for name, ts in times.items():
        print(f"{name}: ready in " + " / ".join(f"{t:.3f}" for t in ts) + f" s (median {statistics.median(ts):.3f} s)")


if __name__ == "__main__":
    main()

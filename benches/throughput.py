#!/usr/bin/env python3
"""Throughput benchmark, driven by benches/throughput.sh (standard library only).

Side by side in one run, on one machine, alternating engines round by round:
  1. A trivial predictor over HTTP: runner's candle:conformance (with a queue, and without
     one as Cog behaves) vs Cog's own server (coglet) on its Python twin. wrk at 1 and 8
     connections: successful predictions/s, refusals, p50/p99.
  2. MiniLM over HTTP (runner, with and without dynamic batching) vs sentence-transformers
     in-process (PyTorch, 2 threads) on a fixed corpus of 256 short sentences: one
     sequential client vs batch 1, 32 concurrent clients vs batch 32.
  3. Memory: runner's resident memory after load vs the weights' size, and during a
     60-second soak at full load.
Writes results.md and results.json into --out.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health-check", timeout=2) as r:
                status = json.load(r).get("status")
                if status == "READY":
                    return
                if status == "SETUP_FAILED":
                    raise SystemExit("server setup failed")
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("server not ready in time")


class Served:
    """A server process on a free port, stopped on exit."""

    def __init__(self, name, cmd, env=None, cwd=None):
        self.name = name
        self.port = free_port()
        full_env = dict(os.environ, **(env or {}))
        full_env["PORT"] = str(self.port)
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, env=full_env, cwd=cwd, stdout=self.log, stderr=self.log,
            start_new_session=True,
        )
        wait_ready(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def rss_kb(self):
        fields = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0])
        return fields

    def predict(self, payload):
        req = urllib.request.Request(
            f"{self.url}/predictions", data=json.dumps({"input": payload}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def warm_up(server, payload):
    """One prediction, retried: Cog's server answers a sequential client 409 now and then."""
    for _ in range(50):
        try:
            return server.predict(payload)
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise
            time.sleep(0.01)
    raise SystemExit(f"{server.name}: still at capacity after 50 tries")


def to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url, script, connections, seconds):
    """Runs wrk (one thread, so the load generator takes as little CPU as possible)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, f"{url}/predictions"],
        capture_output=True, text=True, check=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))
    dur_m = re.search(r"requests in ([\d.]+)(ms|s|m)", out)
    duration = float(dur_m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[dur_m.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {p: to_ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    return {
        "connections": connections,
        "seconds": round(duration, 2),
        "requests": total,
        "refused": non2xx,
        "socket_errors": errors.group(1).strip() if errors else "",
        "ok_per_s": round((total - non2xx) / duration, 1),
        "all_per_s": round(total / duration, 1),
        "p50_ms": round(lat["50"], 3) if "50" in lat else None,
        "p99_ms": round(lat["99"], 3) if "99" in lat else None,
    }


def lua_fixed(path, body):
    Path(path).write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body)}\n"
    )


def lua_corpus(path, corpus_file):
    # Each connection walks the corpus from its own offset, one sentence per request.
    Path(path).write_text(
        f"""
local sentences = {{}}
for line in io.lines({json.dumps(str(corpus_file))}) do table.insert(sentences, line) end
local counter = 0
setup = function(thread) thread:set("offset", counter * 37); counter = counter + 1 end
local n = 0
request = function()
  n = n + 1
  local s = sentences[((offset or 0) + n) % #sentences + 1]
  return wrk.format("POST", "/predictions", {{["Content-Type"] = "application/json"}},
    '{{"input":{{"text":"' .. s .. '"}}}}')
end
"""
    )


def median_by(runs, key):
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[len(ordered) // 2]


def coglet_dir(tmp):
    src = ROOT / "cog-spec/predictors/conformance"
    dst = Path(tmp) / "coglet-conformance"
    shutil.copytree(src, dst)
    (dst / ".cog").mkdir()
    shutil.copy(src / "openapi_schema.json", dst / ".cog/openapi_schema.json")
    return dst


def trivial(args, tmp):
    script = Path(tmp) / "trivial.lua"
    lua_fixed(script, json.dumps({"input": {"text": "hello"}}))
    cog_dir = coglet_dir(tmp)
    venv = Path(args.coglet_venv)
    engines = {
        "coglet 0.23.1 (Python predictor)": lambda: Served(
            "coglet",
            [str(venv / "bin/python"), "-m", "cog.server.http", "--host", "127.0.0.1"],
            env={
                "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
                "COG_MAX_CONCURRENCY": "1",
                "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
            },
            cwd=cog_dir,
        ),
        "runner, --max-queue 64": lambda: Served(
            "runner", [args.runner, "-q", "serve", str(ROOT / "models/conformance"),
                       "--port", "{port}", "--device", "cpu", "--max-queue", "64"],
        ),
        "runner, no queue (Cog's 409s)": lambda: Served(
            "runner", [args.runner, "-q", "serve", str(ROOT / "models/conformance"),
                       "--port", "{port}", "--device", "cpu"],
        ),
    }
    runs = {name: {1: [], 8: []} for name in engines}
    for round_no in range(args.rounds):
        for name, start in engines.items():
            with start() as server:
                for _ in range(20):
                    warm_up(server, {"text": "hello"})
                for conns in (1, 8):
                    r = wrk(server.url, str(script), conns, args.seconds)
                    runs[name][conns].append(r)
                    print(f"  trivial round {round_no + 1} {name} c={conns}: {r['ok_per_s']}/s ok, "
                          f"{r['refused']} refused, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms",
                          file=sys.stderr)
    return {name: {str(c): median_by(v, "ok_per_s") for c, v in by_c.items()} for name, by_c in runs.items()}


def pytorch_baseline(args):
    out = subprocess.run(
        [args.st_python, str(ROOT / "benches/st_baseline.py"), str(ROOT / "models/all-minilm-l6-v2/weights"),
         str(ROOT / "benches/data/sentences.txt")],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def minilm(args, tmp):
    script = Path(tmp) / "embed.lua"
    lua_corpus(script, ROOT / "benches/data/sentences.txt")
    model = str(ROOT / "models/all-minilm-l6-v2")
    base = [args.runner, "-q", "serve", model, "--port", "{port}", "--device", "cpu", "--snapshot", "off",
            "--max-queue", "256"]
    pytorch, batched, unbatched = [], [], []
    for round_no in range(args.rounds):
        pt = pytorch_baseline(args)
        pytorch.append(pt)
        print(f"  minilm round {round_no + 1} PyTorch: batch 1 {pt['batch1_per_s']:.1f}/s, "
              f"batch 32 {pt['batch32_per_s']:.1f}/s", file=sys.stderr)
        with Served("runner", base + ["--max-batch-size", "32"]) as server:
            server.predict({"text": "warm up"})
            one = wrk(server.url, str(script), 1, args.seconds)
            many = wrk(server.url, str(script), 32, args.seconds)
            batched.append({"c1": one, "c32": many})
            print(f"  minilm round {round_no + 1} runner batched: c=1 {one['ok_per_s']}/s, "
                  f"c=32 {many['ok_per_s']}/s ({many['refused']} refused)", file=sys.stderr)
        with Served("runner", base) as server:
            server.predict({"text": "warm up"})
            many = wrk(server.url, str(script), 32, args.seconds)
            unbatched.append({"c32": many})
            print(f"  minilm round {round_no + 1} runner unbatched: c=32 {many['ok_per_s']}/s",
                  file=sys.stderr)
    return {
        "pytorch": pytorch,
        "runner_batched": batched,
        "runner_unbatched": unbatched,
        "pytorch_batch1": statistics.median(p["batch1_per_s"] for p in pytorch),
        "pytorch_batch32": statistics.median(p["batch32_per_s"] for p in pytorch),
        "runner_c1": statistics.median(b["c1"]["ok_per_s"] for b in batched),
        "runner_c32": statistics.median(b["c32"]["ok_per_s"] for b in batched),
        "runner_c32_unbatched": statistics.median(u["c32"]["ok_per_s"] for u in unbatched),
    }


def memory(args, tmp):
    script = Path(tmp) / "embed-soak.lua"
    lua_corpus(script, ROOT / "benches/data/sentences.txt")
    model = ROOT / "models/all-minilm-l6-v2"
    weights = (model / "weights/model.safetensors").stat().st_size
    result = {"weights_bytes": weights}
    with Served("runner", [args.runner, "-q", "serve", str(model), "--port", "{port}", "--device", "cpu",
                           "--snapshot", "off", "--max-batch-size", "32", "--max-queue", "256"]) as server:
        time.sleep(1)
        result["after_load"] = server.rss_kb()
        server.predict({"text": "warm up"})
        samples = []
        soak = subprocess.Popen(
            ["wrk", "-t1", "-c32", f"-d{args.soak}s", "--latency", "-s", str(script), server.url],
            stdout=subprocess.PIPE, text=True,
        )
        start = time.time()
        while soak.poll() is None:
            time.sleep(5)
            if soak.poll() is None:
                samples.append({"t": round(time.time() - start, 1), **server.rss_kb()})
        out = soak.stdout.read()
        result["soak_seconds"] = args.soak
        result["soak_samples"] = samples
        total = int(re.search(r"(\d+) requests in", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        result["soak_requests"] = total
        result["soak_refused"] = int(non2xx.group(1)) if non2xx else 0
    return result


def machine():
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def soak_line(mem, samples):
    if len(samples) < 2:
        return "- soak: too short to sample"
    half = samples[len(samples) // 2]
    last = samples[-1]
    return (f"- {mem['soak_seconds']} s soak at 32 connections: {mem['soak_requests']} predictions, "
            f"{mem['soak_refused']} refused. RSS at {samples[0]['t']} s {samples[0]['VmRSS'] / 1024:.1f} MiB "
            f"(working buffers for batches of 32), at {half['t']} s {half['VmRSS'] / 1024:.1f} MiB, at "
            f"{last['t']} s {last['VmRSS'] / 1024:.1f} MiB: **{(last['VmRSS'] - half['VmRSS']) / 1024:+.1f} MiB** "
            f"over the second half (max {max(s['VmRSS'] for s in samples) / 1024:.1f} MiB)")


def report(results):
    lines = [f"# Throughput, {results['machine']['date']}", "",
             f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
             f"Linux {results['machine']['kernel']}. Medians of {results['rounds']} alternating rounds "
             f"of {results['seconds']} s each; load from wrk (1 thread) on the same machine.", ""]
    t = results["trivial"]
    lines += ["## 1. Trivial predictor over HTTP", "",
              "| server | conns | successful/s | refused | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for name, by_c in t.items():
        for c, r in by_c.items():
            lines.append(f"| {name} | {c} | {r['ok_per_s']} | {r['refused']} of {r['requests']} | "
                         f"{r['p50_ms']} | {r['p99_ms']} |")
    cog = t["coglet 0.23.1 (Python predictor)"]
    ours = t["runner, --max-queue 64"]
    ratio8 = ours["8"]["ok_per_s"] / max(cog["8"]["ok_per_s"], 1e-9)
    lines += ["", f"- successful rate at 8 connections: runner (queue) / coglet = **{ratio8:.1f}x** (goal ≥ 5x)",
              f"- runner p99 at 1 connection {ours['1']['p99_ms']} ms vs coglet p50 {cog['1']['p50_ms']} ms "
              f"(goal: ≤)", ""]
    m = results["minilm"]
    lines += ["## 2. MiniLM (all-MiniLM-L6-v2), 256-sentence corpus", "",
              "| engine | sentences/s |", "|---|---|",
              f"| PyTorch in-process, batch 1 (2 threads) | {m['pytorch_batch1']:.1f} |",
              f"| runner over HTTP, 1 sequential client | {m['runner_c1']:.1f} |",
              f"| PyTorch in-process, batch 32 (2 threads) | {m['pytorch_batch32']:.1f} |",
              f"| runner over HTTP, 32 clients, --max-batch-size 32 | {m['runner_c32']:.1f} |",
              f"| runner over HTTP, 32 clients, no batching | {m['runner_c32_unbatched']:.1f} |", "",
              f"- sequential: runner / PyTorch batch 1 = **{m['runner_c1'] / m['pytorch_batch1']:.2f}x** (goal ≥ 1.0x)",
              f"- concurrent: runner / PyTorch batch 32 = **{m['runner_c32'] / m['pytorch_batch32']:.2f}x** (goal ≥ 1.0x)",
              f"- batching's own effect at 32 clients: **{m['runner_c32'] / max(m['runner_c32_unbatched'], 1e-9):.2f}x**", ""]
    mem = results["memory"]
    w = mem["weights_bytes"] / 1024
    a = mem["after_load"]
    samples = mem["soak_samples"]
    lines += ["## 3. Memory (MiniLM, runner with batching)", "",
              f"- weights: {mem['weights_bytes'] / 1e6:.1f} MB (model.safetensors)",
              f"- after load: RSS {a['VmRSS'] / 1024:.1f} MiB = **{a['VmRSS'] / w:.2f}x** the weights "
              f"(goal ≤ 1.15x); anonymous {a['RssAnon'] / 1024:.1f} MiB ({a['RssAnon'] / w:.2f}x), "
              f"file-backed (code, and weight pages mapped from the safetensors file) {a['RssFile'] / 1024:.1f} MiB",
              soak_line(mem, samples), ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runner", required=True)
    p.add_argument("--coglet-venv", required=True)
    p.add_argument("--st-python", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--soak", type=int, default=60)
    p.add_argument("--only", choices=["trivial", "minilm", "memory"], action="append")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["trivial", "minilm", "memory"]
    results = {"machine": machine(), "rounds": args.rounds, "seconds": args.seconds}
    with tempfile.TemporaryDirectory() as tmp:
        if "trivial" in parts:
            print("1. trivial predictor", file=sys.stderr)
            results["trivial"] = trivial(args, tmp)
        if "minilm" in parts:
            print("2. MiniLM", file=sys.stderr)
            results["minilm"] = minilm(args, tmp)
        if "memory" in parts:
            print("3. memory", file=sys.stderr)
            results["memory"] = memory(args, tmp)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if len(parts) == 3:
        text = report(results)
        (out / "results.md").write_text(text + "\n")
        print(text)
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Text generation on the CPU: runner (candle:llama) beside llama.cpp, same model, same run.

    benches/text-generation.sh   (builds what it needs, then runs this)

For each engine and each prompt length, greedy generation of --new-tokens tokens, repeated
--runs times (after one warm-up). Measured per run:
  - time to first token (prompt processing plus the first sampled token),
  - prompt tokens per second (prompt tokens / time to first token),
  - generation tokens per second (tokens after the first / the time they took).
runner is measured as users run it: `runner serve` over HTTP, its timings from the
prediction's metrics (server side, so HTTP overhead is excluded as it is for llama.cpp,
which runs in-process through llama-cpp-python). Medians are reported with the ratio
runner / llama.cpp (above 1.0 means runner is faster).
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

FILLER = (
    "The river runs through the valley, past the old mill and the stone bridge, where the "
    "children of the village gather in the summer to swim and to watch the boats go by. "
)


def prompt_of(n_tokens, tokenize):
    text = ""
    while len(tokenize(text)) < n_tokens:
        text += FILLER
    # Trim word by word to the wanted length.
    words = text.split(" ")
    while len(tokenize(" ".join(words))) > n_tokens:
        words.pop()
    return " ".join(words)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


class Runner:
    name = "runner (candle:llama, GGUF Q4_1)"

    def __init__(self, binary, model_dir, threads):
        self.port = free_port()
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUNNER_LOG="warn")
        self.proc = subprocess.Popen(
            [binary, "serve", model_dir, "--port", str(self.port), "--device", "cpu", "--snapshot", "off"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health-check", timeout=2) as r:
                    if json.load(r)["status"] == "READY":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("runner did not become ready")

    def run(self, prompt, new_tokens):
        p = post(f"http://127.0.0.1:{self.port}/predictions", {"input": {
            "prompt": prompt, "use_chat_template": False, "temperature": 0,
            "max_new_tokens": new_tokens, "stop": []}})
        assert p["status"] == "succeeded", p
        m = p["metrics"]
        return {
            "prompt_tokens": m["input_token_count"],
            "new_tokens": m["output_token_count"],
            "ttft": m["time_to_first_token"],
            "gen_tps": m["tokens_per_second"],
        }

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class LlamaCpp:
    def __init__(self, gguf, threads):
        import llama_cpp
        self.version = llama_cpp.__version__
        self.name = f"llama.cpp (llama-cpp-python {self.version}, GGUF Q4_1)"
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False, seed=0)

    def tokenize(self, text):
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def run(self, prompt, new_tokens):
        tokens = self.tokenize(prompt)
        self.llm.reset()
        started = time.perf_counter()
        first = None
        n = 0
        for _ in self.llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter()
            if n >= new_tokens:
                break
        end = time.perf_counter()
        return {
            "prompt_tokens": len(tokens),
            "new_tokens": n,
            "ttft": first - started,
            "gen_tps": (n - 1) / max(end - first, 1e-9),
        }


def median_of(runs, key):
    return statistics.median(r[key] for r in runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runner", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", default="16,256")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--isa", default="", help="what both engines were limited to, for the report")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    lcpp = LlamaCpp(args.gguf, args.threads)
    prompts = {int(n): prompt_of(int(n), lcpp.tokenize) for n in args.prompt_tokens.split(",")}
    runner = Runner(args.runner, args.model_dir, args.threads)
    results = {}
    try:
        for n, prompt in prompts.items():
            for engine in (runner, lcpp):
                engine.run(prompt, 4)  # warm-up
            runs = {runner.name: [], lcpp.name: []}
            # Alternate engines so both see the same machine state.
            for _ in range(args.runs):
                for engine in (runner, lcpp):
                    runs[engine.name].append(engine.run(prompt, args.new_tokens))
            results[n] = runs
    finally:
        runner.close()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        machine = f"{model}, {os.cpu_count()} cores, {args.threads} threads"
    except (OSError, StopIteration):
        pass
    if args.isa:
        machine = f"{machine}; {args.isa}"
    report = {"machine": machine, "new_tokens": args.new_tokens, "runs": args.runs, "cases": []}
    lines = [
        f"SmolLM2-135M-Instruct Q4_1, greedy, {args.new_tokens} new tokens, median of {args.runs} runs; {machine}",
        "",
        "| prompt tokens | engine | time to first token (s) | prompt tok/s | generation tok/s |",
        "|---|---|---|---|---|",
    ]
    for n, runs in results.items():
        row = {}
        for name, rs in runs.items():
            ttft = median_of(rs, "ttft")
            prompt_tokens = rs[0]["prompt_tokens"]
            row[name] = {"prompt_tokens": prompt_tokens, "ttft_s": ttft,
                         "prompt_tps": prompt_tokens / ttft, "gen_tps": median_of(rs, "gen_tps"),
                         "new_tokens": rs[0]["new_tokens"]}
            lines.append(f"| {prompt_tokens} | {name} | {ttft:.3f} | {prompt_tokens / ttft:.1f} | {row[name]['gen_tps']:.1f} |")
        r, l = row[runner.name], row[lcpp.name]
        ratios = {"ttft (llama.cpp / runner)": l["ttft_s"] / r["ttft_s"],
                  "prompt tok/s (runner / llama.cpp)": r["prompt_tps"] / l["prompt_tps"],
                  "generation tok/s (runner / llama.cpp)": r["gen_tps"] / l["gen_tps"]}
        lines.append(f"| {n} | **ratio** | {ratios['ttft (llama.cpp / runner)']:.2f}x | {ratios['prompt tok/s (runner / llama.cpp)']:.2f}x | {ratios['generation tok/s (runner / llama.cpp)']:.2f}x |")
        report["cases"].append({"prompt_tokens": n, "engines": row, "ratios": ratios})
    table = "\n".join(lines)
    print(table)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())

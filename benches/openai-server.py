#!/usr/bin/env python3
"""runner's OpenAI-compatible server beside llama.cpp's (llama-cpp-python's
`llama_cpp.server`), on the same SmolLM2 GGUF, in one run: time to ready, and for a streamed
chat completion the time to the first token and the tokens per second after it, as a client
sees them over HTTP; and a conversation's follow-up turns, which resend the history (the
prompt cache's case), beside runner with its prompt cache off.

    benches/openai-server.py --llama-python VENV/bin/python [--runner target/release/runner]
                             [--runs 9] [--tokens 64] [--json-out FILE]

VENV is the llama-cpp-python build of benches/text-generation.sh with the server's extras
(`pip install uvicorn fastapi sse-starlette starlette-context pydantic-settings`). Both
servers get the CPU's cores (llama.cpp: n_threads = the physical cores, as runner picks),
greedy decoding, the model's own chat template, and the same requests, each one different
from the one before (llama.cpp's server reuses a previous prompt's cache). Both servers are
up at once, and requests alternate between them. Prints a Markdown table on stdout.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models/smollm2-135m-instruct")
GGUF = os.path.join(MODEL, "weights/SmolLM2-135M-Instruct.Q4_1.gguf")
TOPICS = [
    "a lighthouse keeper who finds a message in a bottle",
    "a robot learning to paint",
    "a village where it never stops raining",
    "two rival bakers who must work together",
    "a map that redraws itself every night",
    "an astronaut who hears music on the moon",
    "a cat who runs a library",
    "a clock that runs backwards",
]


def messages(run):
    # A different request each time: llama.cpp's server reuses the previous prompt's KV
    # cache where the prompts share a prefix, so repeating one prompt would time no prompt
    # processing at all on its side. Each request starts differently.
    return [
        {"role": "system", "content": f"Request {run}. You are a helpful assistant."},
        {"role": "user", "content": f"Write a short story about {TOPICS[run % len(TOPICS)]}."},
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, port, env=None):
    started = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return p, time.time() - started
        except OSError:
            pass
        if p.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with {p.returncode}")
        if time.time() - started > 120:
            p.kill()
            raise SystemExit(f"{cmd} did not become ready")
        time.sleep(0.01)


def streamed_chat(port, tokens, run, conversation=None, extra=None):
    """A greedy streamed chat completion, timed as its client sees it; `extra` adds fields
    to the request (e.g. `response_format`)."""
    body = {
        "model": "smollm2",
        "messages": conversation if conversation is not None else messages(run),
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
        **(extra or {}),
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    sent = time.time()
    first = None
    pieces = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            content = choices[0].get("delta", {}).get("content") if choices else None
            if content:
                if first is None:
                    first = time.time()
                pieces.append(content)
    done = time.time()
    return {
        "seconds": done - sent,
        "ttft": first - sent,
        "chunks": len(pieces),
        "decode_tokens_per_second": (len(pieces) - 1) / max(done - first, 1e-9),
        "text": "".join(pieces),
    }


FOLLOW_UPS = ["What happens next?", "How does it end?", "Give it a title."]


def conversation_ttfts(port, tokens, run):
    """A chat of 1 + len(FOLLOW_UPS) turns, each resending the whole history (as chat
    clients do): the time to first token of each follow-up turn."""
    history = messages(run)
    ttfts = []
    for turn, follow_up in enumerate([None] + FOLLOW_UPS):
        if follow_up is not None:
            history = history + [{"role": "user", "content": follow_up}]
        answer = streamed_chat(port, tokens, run, conversation=history)
        if turn > 0:
            ttfts.append(answer["ttft"])
        history = history + [{"role": "assistant", "content": answer["text"]}]
    return ttfts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", required=True)
    ap.add_argument("--runner", default=os.path.join(ROOT, "target/release/runner"))
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    physical = len(
        {l for l in open("/proc/cpuinfo") if l.startswith("core id")}
    ) or os.cpu_count()
    servers = {
        "runner": lambda port: [args.runner, "serve", MODEL, "--port", str(port), "--device", "cpu"],
        "runner, prompt cache off": lambda port: [
            "env", "RUNNER_LLAMA_PROMPT_CACHE_MB=0",
            args.runner, "serve", MODEL, "--port", str(port), "--device", "cpu",
        ],
        "llama.cpp": lambda port: [
            args.llama_python, "-m", "llama_cpp.server", "--model", GGUF, "--port", str(port),
            "--n_threads", str(physical), "--n_ctx", "2048", "--verbose", "False",
        ],
    }
    # Both servers up, idle when not asked; requests alternate between them, so a noisy
    # moment on a shared machine falls on both alike.
    started = {}
    try:
        for name, command in servers.items():
            port = free_port()
            p, ready = start(command(port), port)
            started[name] = (p, port, ready)
            streamed_chat(port, 4, 1000)  # warm-up
        runs = {name: [] for name in servers}
        follow_ups = {name: [] for name in servers}
        for run in range(args.runs):
            for name, (_, port, _) in started.items():
                runs[name].append(streamed_chat(port, args.tokens, run))
        for run in range(args.conversations):
            for name, (_, port, _) in started.items():
                follow_ups[name].extend(conversation_ttfts(port, 32, 100 + run))
    finally:
        for p, _, _ in started.values():
            p.terminate()
            p.wait()
    results = {}
    for name, (_, _, ready) in started.items():
        results[name] = {
            "ready_seconds": ready,
            "ttft": statistics.median(r["ttft"] for r in runs[name]),
            "decode_tokens_per_second": statistics.median(
                r["decode_tokens_per_second"] for r in runs[name]
            ),
            "follow_up_ttft": statistics.median(follow_ups[name]),
            "chunks": runs[name][0]["chunks"],
            "text": runs[name][0]["text"],
        }
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'text'})}", file=sys.stderr)
    cpu = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        "unknown CPU",
    )
    r, l = results["runner"], results["llama.cpp"]
    print(
        f"SmolLM2-135M-Instruct Q4_1 (GGUF), streamed chat completions over HTTP, greedy; "
        f"{cpu}, {os.cpu_count()} CPUs. New requests: up to {args.tokens} tokens, median of "
        f"{args.runs}. Follow-up turns: {args.conversations} conversations of "
        f"{1 + len(FOLLOW_UPS)} turns (32 tokens each), each turn resending the history; "
        f"median over the follow-up turns.\n"
    )
    print("| server | ready (s) | first token, new request (s) | tokens/s after it | first token, follow-up turn (s) |")
    print("|---|---|---|---|---|")
    for name, x in results.items():
        print(
            f"| {name} | {x['ready_seconds']:.2f} | {x['ttft']:.3f} | "
            f"{x['decode_tokens_per_second']:.1f} | {x['follow_up_ttft']:.3f} |"
        )
    print(
        f"| **runner vs llama.cpp** | {l['ready_seconds'] / r['ready_seconds']:.1f}x sooner | "
        f"{l['ttft'] / r['ttft']:.2f}x sooner | {r['decode_tokens_per_second'] / l['decode_tokens_per_second']:.2f}x | "
        f"{l['follow_up_ttft'] / r['follow_up_ttft']:.2f}x sooner |"
    )
    print(f"\nrunner's text: {r['text'][:120]!r}…\nllama.cpp's text: {l['text'][:120]!r}…")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cpu": cpu, "tokens": args.tokens, "runs": args.runs, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

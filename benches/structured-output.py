#!/usr/bin/env python3
"""Structured output (OpenAI's `response_format` with a JSON Schema): runner beside
llama.cpp's server (llama-cpp-python's `llama_cpp.server`, which turns the schema into a
GBNF grammar), on the same SmolLM2 GGUF, in one run; and runner with the schema beside
runner without it, for what the constraint costs per token.

    benches/structured-output.py --llama-python VENV/bin/python [--runner target/release/runner]
                                 [--runs 8] [--schema city|bounded|collections] [--json-out FILE]

VENV is the llama-cpp-python build of benches/openai-server.py. Each request asks for a
city described as JSON matching SCHEMA (bounded strings and arrays, so a small model must
finish), greedy, up to 400 tokens, streamed. Reported per server (medians): the time to the
whole answer, the time to its first token, the tokens per second after it (each streamed
chunk is a token), and how many answers are whole JSON the schema accepts (checked here, by
hand, for this schema). `--schema bounded` asks for BOUNDED_SCHEMA instead: numbers held to
`minimum`/`maximum` and strings to a `pattern` (Pydantic's `Field(ge=…, le=…, pattern=…)`),
which llama.cpp's schema-to-grammar converter also claims. `--schema collections` asks for
COLLECTIONS_SCHEMA: a `set[int]` within bounds (`uniqueItems`), a `dict[Literal[…], int]`
(`propertyNames`) and a `Field(multiple_of=0.5)` (`multipleOf`). "runner, no schema" is a second runner server asked the same
prompts for as many tokens as runner's constrained answer had, without the schema: its own
server, so that both runners' prompt caches see the same requests. Requests alternate
between the servers. Prints a Markdown table on stdout.
"""
import argparse
import json
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib import import_module

bench = import_module("openai-server")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
        "size": {"enum": ["small", "medium", "large"]},
        "mayor": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
        "coastal": {"type": "boolean"},
    },
    "required": ["name", "country", "population", "landmarks", "size", "mayor", "coastal"],
    "additionalProperties": False,
}
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0},
        "founded": {"type": "integer", "minimum": -3000, "maximum": 2025},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
    },
    "required": ["name", "population", "founded", "rating", "postcode", "code"],
    "additionalProperties": False,
}
COLLECTIONS_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "years": {"type": "array", "items": {"type": "integer", "minimum": 1000, "maximum": 2025},
                  "uniqueItems": True, "minItems": 2, "maxItems": 4},
        "districts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                      "propertyNames": {"enum": ["north", "south", "east", "west"]}, "minProperties": 2},
        "area": {"type": "number", "multipleOf": 0.5, "minimum": 0},
    },
    "required": ["name", "years", "districts", "area"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Mumbai", "Rome"]


def valid_bounded(v):
    """Whether `v` is a value BOUNDED_SCHEMA accepts (checked by hand for this schema)."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    integer = lambda x: number(x) and float(x).is_integer()
    return (
        isinstance(v, dict)
        and set(v) == set(BOUNDED_SCHEMA["required"])
        and isinstance(v["name"], str) and len(v["name"]) <= 30
        and integer(v["population"]) and v["population"] >= 0
        and integer(v["founded"]) and -3000 <= v["founded"] <= 2025
        and number(v["rating"]) and 0 <= v["rating"] <= 5
        and isinstance(v["postcode"], str) and re.fullmatch(r"[0-9]{5}", v["postcode"]) is not None
        and isinstance(v["code"], str) and re.fullmatch(r"[A-Z]{3}", v["code"]) is not None
    )


def valid_collections(v):
    """Whether `v` is a value COLLECTIONS_SCHEMA accepts (checked by hand for this schema)."""
    integer = lambda x: isinstance(x, int) and not isinstance(x, bool)
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    return (
        isinstance(v, dict)
        and set(v) == set(COLLECTIONS_SCHEMA["required"])
        and isinstance(v["name"], str) and len(v["name"]) <= 30
        and isinstance(v["years"], list) and 2 <= len(v["years"]) <= 4
        and all(integer(y) and 1000 <= y <= 2025 for y in v["years"])
        and len(set(v["years"])) == len(v["years"])
        and isinstance(v["districts"], dict) and len(v["districts"]) >= 2
        and set(v["districts"]) <= {"north", "south", "east", "west"}
        and all(integer(n) and n >= 0 for n in v["districts"].values())
        and number(v["area"]) and v["area"] >= 0 and float(v["area"] * 2).is_integer()
    )


def valid(text):
    """Whether `text` is JSON that SCHEMA accepts (checked by hand for this schema)."""
    try:
        v = json.loads(text)
    except ValueError:
        return False
    if SCHEMA is BOUNDED_SCHEMA:
        return valid_bounded(v)
    if SCHEMA is COLLECTIONS_SCHEMA:
        return valid_collections(v)
    short = lambda s: isinstance(s, str) and len(s) <= 30
    return (
        isinstance(v, dict)
        and set(v) == set(SCHEMA["required"])
        and short(v["name"])
        and short(v["country"])
        and isinstance(v["population"], int)
        and not isinstance(v["population"], bool)
        and isinstance(v["landmarks"], list)
        and len(v["landmarks"]) <= 3
        and all(short(x) for x in v["landmarks"])
        and v["size"] in ("small", "medium", "large")
        and (v["mayor"] is None or short(v["mayor"]))
        and isinstance(v["coastal"], bool)
    )


def chat(port, run, response_format=None, max_tokens=400):
    """One streamed request for a city (each chunk a token)."""
    conversation = [{"role": "user", "content": f"Describe {CITIES[run % len(CITIES)]}. (request {run})"}]
    extra = {"response_format": response_format} if response_format is not None else None
    answer = bench.streamed_chat(port, max_tokens, run, conversation=conversation, extra=extra)
    answer["tokens"] = answer["chunks"]
    return answer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-python", required=True)
    ap.add_argument("--runner", default=os.path.join(bench.ROOT, "target/release/runner"))
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--schema", choices=["city", "bounded", "collections"], default="city")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    global SCHEMA
    if args.schema == "bounded":
        SCHEMA = BOUNDED_SCHEMA
    elif args.schema == "collections":
        SCHEMA = COLLECTIONS_SCHEMA
    physical = len({l for l in open("/proc/cpuinfo") if l.startswith("core id")}) or os.cpu_count()
    runner = lambda port: [args.runner, "serve", bench.MODEL, "--port", str(port), "--device", "cpu"]
    commands = {
        "runner": runner,
        "llama.cpp": lambda port: [
            args.llama_python, "-m", "llama_cpp.server", "--model", bench.GGUF, "--port", str(port),
            "--n_threads", str(physical), "--n_ctx", "2048", "--verbose", "False",
        ],
        "runner, no schema": runner,
    }
    # The same schema, in each server's spelling: OpenAI's, and llama-cpp-python's.
    formats = {
        "runner": {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": SCHEMA}},
        "llama.cpp": {"type": "json_object", "schema": SCHEMA},
        "runner, no schema": None,
    }
    started = {}
    results = {name: [] for name in commands}
    try:
        for name, command in commands.items():
            port = bench.free_port()
            p, _ = bench.start(command(port), port)
            started[name] = (p, port)
            chat(port, 1000, formats[name], 8)  # warm-up: the grammar path included
        for run in range(args.runs):
            for name, (_, port) in started.items():
                # Without the schema: as many tokens as runner's answer with it.
                tokens = results["runner"][-1]["tokens"] if name == "runner, no schema" else 400
                results[name].append(chat(port, run, formats[name], tokens))
    finally:
        for p, _ in started.values():
            p.terminate()
            p.wait()
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            key: statistics.median(r[key] for r in runs)
            for key in ["seconds", "ttft", "decode_tokens_per_second", "tokens"]
        }
        summary[name].update(valid=sum(valid(r["text"]) for r in runs), runs=len(runs), example=runs[0]["text"])
        print(f"{name}: {json.dumps({k: v for k, v in summary[name].items() if k != 'example'})}", file=sys.stderr)
    cpu = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        "unknown CPU",
    )
    print(
        f"SmolLM2-135M-Instruct Q4_1 (GGUF), streamed chat completions with a JSON Schema "
        f"(`response_format`), greedy, up to 400 tokens, {args.runs} prompts; {cpu}, "
        f"{os.cpu_count()} CPUs. Medians.\n"
    )
    print("| server | whole answer (s) | first token (s) | tokens/s after it | tokens | whole JSON the schema accepts |")
    print("|---|---|---|---|---|---|")
    for name, x in summary.items():
        valid_cell = "n/a (no schema)" if name == "runner, no schema" else f"{x['valid']} of {x['runs']}"
        print(
            f"| {name} | {x['seconds']:.3f} | {x['ttft']:.3f} | {x['decode_tokens_per_second']:.1f} | "
            f"{x['tokens']:.0f} | {valid_cell} |"
        )
    r, l, free = summary["runner"], summary["llama.cpp"], summary["runner, no schema"]
    print(
        f"\nrunner with the schema: each answer **{l['seconds'] / r['seconds']:.2f}x** sooner than "
        f"llama.cpp's with the same schema, at **{r['decode_tokens_per_second'] / l['decode_tokens_per_second']:.2f}x** "
        f"its tokens/s (the answers differ: llama.cpp's grammar fixes the properties' order and "
        f"allows other whitespace); and {r['decode_tokens_per_second'] / free['decode_tokens_per_second']:.2f}x "
        f"runner's own tokens/s without a schema."
    )
    print(f"\nrunner's first answer: {r['example']!r}\nllama.cpp's first answer: {l['example']!r}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cpu": cpu, "runs": args.runs, "schema": SCHEMA, "results": summary, "raw": results}, f, indent=2)


if __name__ == "__main__":
    main()

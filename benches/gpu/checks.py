#!/usr/bin/env python3
"""GPU-machine checks that need Python beside runner (device-check.sh calls them).

    checks.py minilm-generate DIR          random MiniLM-shaped BERT weights (seed 0) into DIR
    checks.py minilm DEVICE DIR            runner vs sentence-transformers on the same weights:
                                           embeddings, dynamic batching, throughput, /metrics
    checks.py smollm2 DEVICE GGUF_DIR      runner (GGUF and converted safetensors, CPU and
                                           DEVICE) vs transformers: greedy text, tokens/s
    checks.py llama-generate DIR           a TinyLlama-shaped Llama (random bf16 weights,
                                           seed 0; LLAMA_LAYERS sets the depth) into DIR,
                                           beside a tokenizer.json of vocabulary 49,152
    checks.py llama-compare ADDR ADDR      two servers of one model generate the same text

Each prints a markdown section on stdout. Servers are runner processes on 127.0.0.1 that
this script starts and stops. DEVICE=cpu runs everything on the CPU (a dry run).
"""
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

RUNNER = os.path.abspath("./runner")


class Server:
    """`runner serve DIR` on a free loopback port, stopped on exit."""

    def __init__(self, model_dir, device, *args, log=None, env=None):
        self.log_path = log or f"/tmp/serve-{os.path.basename(model_dir)}-{device}.log"
        self.cmd = [RUNNER, "serve", model_dir, "--device", device, "--port", "0", "--snapshot", "off", *args]
        self.env = {**os.environ, **(env or {})}

    def __enter__(self):
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log, env=self.env)
        deadline = time.time() + 180
        while time.time() < deadline:
            text = open(self.log_path).read()
            m = re.search(r"^runner: .*?http://(\S+)", text, re.M)
            if m and "setup failed" in m.group(0):
                raise RuntimeError(f"setup failed: {text[-800:]}")
            if m:
                self.addr = m.group(1).rstrip("/")
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {text[-800:]}")
            time.sleep(0.05)
        raise RuntimeError("server not ready in 180 s")

    def predict(self, inputs, timeout=300):
        return self.prediction(inputs, timeout)["output"]

    def prediction(self, inputs, timeout=300):
        """The whole succeeded prediction (output, metrics, logs)."""
        req = urllib.request.Request(
            f"http://{self.addr}/predictions",
            data=json.dumps({"input": inputs}).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.load(urllib.request.urlopen(req, timeout=timeout))
        if answer.get("status") != "succeeded":
            raise RuntimeError(f"prediction {answer.get('status')}: {answer.get('error')}")
        return answer

    def openai_chat(self, question, tokens=20):
        """The text of a greedy OpenAI-compatible chat completion."""
        req = urllib.request.Request(
            f"http://{self.addr}/v1/chat/completions",
            data=json.dumps({"model": "m", "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": tokens}).encode(),
            headers={"Content-Type": "application/json"},
        )
        return json.load(urllib.request.urlopen(req, timeout=300))["choices"][0]["message"]["content"]

    def metrics(self):
        return urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=30).read().decode()

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def torch_device(device):
    return "cuda" if device.startswith("cuda") else "cpu"


def minilm_generate(model_dir):
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig.from_pretrained(model_dir))
    # Keys as sentence-transformers' MiniLM stores them (no "bert." prefix).
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{model_dir}/model.safetensors")
    print(f"random MiniLM-shaped weights (seed 0) in {model_dir}")


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def rate(work, clients, seconds, items):
    """Runs work(item) from `clients` threads over `items` for `seconds`; returns done/s."""
    done, stop, errors = [0] * clients, time.time() + seconds, []

    def client(c):
        i = c
        while time.time() < stop:
            try:
                work(items[i % len(items)])
            except Exception as e:  # noqa: BLE001 - counted, then reported
                errors.append(repr(e))
                return
            done[c] += 1
            i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.time()
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    return sum(done) / (time.time() - started)


def minilm(device, model_dir):
    from concurrent.futures import ThreadPoolExecutor

    sentences = [s.strip() for s in open("sentences.txt") if s.strip()][:256]
    print(f"### MiniLM-shaped BERT on {device} (random weights, seed 0; {len(sentences)} sentences)\n")
    with Server(model_dir, device, "--max-batch-size", "32", "--max-queue", "256") as server:
        def embed(sentence):  # one vector, whether the output nests it or not
            out = server.predict({"text": sentence})
            return out[0] if out and isinstance(out[0], list) else out

        sequential = [embed(s) for s in sentences]
        with ThreadPoolExecutor(32) as pool:
            concurrent = list(pool.map(embed, sentences))
        batch_diff = max(abs(x - y) for a, b in zip(sequential, concurrent) for x, y in zip(a, b))
        seq_rate = rate(embed, 1, 5, sentences)
        conc_rate = rate(embed, 32, 10, sentences)
        metrics = server.metrics()
    # The same without cudarc's per-allocation CUDA events (RUNNER_CUDA_EVENT_TRACKING=off,
    # opt-in until measured here): the same vectors, and the rates side by side.
    untracked = {"RUNNER_CUDA_EVENT_TRACKING": "off"}
    with Server(model_dir, device, "--max-batch-size", "32", "--max-queue", "256", env=untracked,
                log=f"/tmp/serve-minilm-{device}-untracked.log") as server:
        def embed_untracked(sentence):
            out = server.predict({"text": sentence})
            return out[0] if out and isinstance(out[0], list) else out

        untracked_same = [embed_untracked(s) for s in sentences] == sequential
        untracked_seq = rate(embed_untracked, 1, 5, sentences)
        untracked_conc = rate(embed_untracked, 32, 10, sentences)
    memory = [line for line in metrics.splitlines() if line.startswith("runner_device_memory")]
    batches = [line for line in metrics.splitlines() if re.match(r"runner_batch(es|ed_predictions)_total ", line)]

    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(f"{model_dir}/weights", device=torch_device(device))
    reference = st.encode(sentences, batch_size=32, normalize_embeddings=True).tolist()
    cos = min(cosine(a, b) for a, b in zip(sequential, reference))
    diff = max(abs(x - y) for a, b in zip(sequential, reference) for x, y in zip(a, b))

    def st_rate(batch):
        st.encode(sentences[:batch], batch_size=batch)
        started, n = time.time(), 0
        while time.time() - started < 5:
            for i in range(0, len(sentences), batch):
                st.encode(sentences[i:i + batch], batch_size=batch)
                n += len(sentences[i:i + batch])
        if torch_device(device) == "cuda":
            torch.cuda.synchronize()
        return n / (time.time() - started)

    st1, st32 = st_rate(1), st_rate(32)
    print("| check | value |\n|---|---|")
    print(f"| runner vs sentence-transformers, same weights | cosine min {cos:.7f}, max abs diff {diff:.2e} |")
    print(f"| 32 concurrent predictions (dynamic batching) vs one at a time | max abs diff {batch_diff:.2e} |")
    print(f"| batches formed (from /metrics) | {'; '.join(batches) or 'no batch metrics'} |")
    print(f"| device memory in /metrics | {'; '.join(memory) or 'absent'} |")
    print(f"| runner over HTTP, 1 client | {seq_rate:.0f} sentences/s ({seq_rate / st1:.2f}x sentence-transformers batch 1: {st1:.0f}/s) |")
    print(f"| runner over HTTP, 32 clients, batching | {conc_rate:.0f} sentences/s ({conc_rate / st32:.2f}x sentence-transformers batch 32: {st32:.0f}/s) |")
    print(f"| the same without cudarc's event tracking: vectors | {'bit-identical' if untracked_same else 'DIFFERENT'} |")
    print(f"| the same without cudarc's event tracking: 1 client, 32 clients | {untracked_seq:.0f} ({untracked_seq / seq_rate:.2f}x), {untracked_conc:.0f} ({untracked_conc / conc_rate:.2f}x) sentences/s |")
    print("\n(The HTTP clients are Python threads on the same machine; sentence-transformers runs in-process.)\n")


# Structured output's check: bounded, so even the trimmed model must finish the JSON.
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
        "coastal": {"type": "boolean"},
    },
    "required": ["name", "population", "landmarks", "coastal"],
    "additionalProperties": False,
}


def city_ok(text):
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(v, dict) and set(v) == set(CITY_SCHEMA["required"])
        and isinstance(v["name"], str) and len(v["name"]) <= 30
        and isinstance(v["population"], int) and not isinstance(v["population"], bool)
        and isinstance(v["landmarks"], list) and len(v["landmarks"]) <= 3
        and all(isinstance(x, str) and len(x) <= 30 for x in v["landmarks"])
        and isinstance(v["coastal"], bool)
    )


def smollm2(device, gguf_dir):
    cases = json.load(open("smollm2_reference.json"))["model"]["cases"]
    converted = "smollm2-st"
    subprocess.run([RUNNER, "-q", "convert", *[f"{gguf_dir}/weights/{f}" for f in os.listdir(f"{gguf_dir}/weights") if f.endswith(".gguf")], "--out", converted, "--force"], check=True, stdout=subprocess.DEVNULL)
    story = {"prompt": "Write a story about a robot who learns to paint.", "use_chat_template": False, "temperature": 0, "max_new_tokens": 128}
    texts, speed, openai, structured, logprobs = {}, {}, {}, {}, {}
    for name, model_dir, dev in [
        ("runner GGUF cpu", gguf_dir, "cpu"),
        (f"runner GGUF {device}", gguf_dir, device),
        ("runner safetensors cpu (f32)", converted, "cpu"),
        (f"runner safetensors {device} ({'bf16' if device != 'cpu' else 'f32'})", converted, device),
    ]:
        if name in texts:
            continue
        with Server(model_dir, dev) as server:
            texts[name] = ["".join(server.predict({"prompt": c["prompt"], "use_chat_template": False, "temperature": 0, "max_new_tokens": 20})) for c in cases]
            # The OpenAI-compatible route: the same text as the Cog prediction it becomes.
            question = "What is the capital of France?"
            openai[name] = server.openai_chat(question) == "".join(server.predict({"prompt": question, "temperature": 0, "max_new_tokens": 20}))
            # Structured output and log probabilities (the first step's top five).
            city = "".join(server.predict({"prompt": "Describe Paris.", "temperature": 0, "max_new_tokens": 300, "json_schema": json.dumps(CITY_SCHEMA)}))
            structured[name] = (city_ok(city), city)
            first = server.prediction({"prompt": cases[0]["prompt"], "use_chat_template": False, "temperature": 0, "max_new_tokens": 1, "top_logprobs": 5})
            logprobs[name] = [(t["token"], t["logprob"]) for t in first["metrics"]["logprobs"][0]["top_logprobs"]]
            server.predict(dict(story, max_new_tokens=4))
            started = time.time()
            tokens = server.predict(story)
            speed[name] = (len(tokens), time.time() - started)

    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    tokenizer = Tokenizer.from_file(f"{converted}/weights/tokenizer.json")
    tdev = torch_device(device)
    for dtype, label in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        if tdev == "cpu" and dtype == torch.bfloat16:
            continue
        model = LlamaForCausalLM.from_pretrained(f"{converted}/weights", dtype=dtype).to(tdev).eval()
        name = f"transformers {tdev} ({label})"
        out = []
        with torch.no_grad():
            for c in cases:
                ids = torch.tensor([c["prompt_ids"]], device=tdev)
                gen = model.generate(ids, max_new_tokens=20, do_sample=False)
                out.append(tokenizer.decode(gen[0, ids.shape[1]:].tolist()))
            ids = torch.tensor([tokenizer.encode(story["prompt"], add_special_tokens=False).ids], device=tdev)
            model.generate(ids, max_new_tokens=4, do_sample=False)
            started = time.time()
            gen = model.generate(ids, max_new_tokens=128, do_sample=False)
            if tdev == "cuda":
                torch.cuda.synchronize()
            speed[name] = (gen.shape[1] - ids.shape[1], time.time() - started)
        texts[name] = out

    names = list(texts)
    print(f"### SmolLM2-135M-Instruct, first blocks only (see the GGUF's llama.block_count), on {device}\n")
    print("Greedy, 20 new tokens, the reference prompts. Each cell: cases whose text is identical to the row's.\n")
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for a in names:
        print(f"| {a} | " + " | ".join(f"{sum(x == y for x, y in zip(texts[a], texts[b]))}/{len(cases)}" for b in names) + " |")
    print("\n| implementation | 128 greedy tokens | tokens/s (incl. prefill) |\n|---|---|---|")
    for name, (n, seconds) in speed.items():
        print(f"| {name} | {n} tokens in {seconds:.3f} s | {n / seconds:.1f} |")
    print("\n| implementation | /v1/chat/completions gives the Cog prediction's text |\n|---|---|")
    for name, same in openai.items():
        print(f"| {name} | {'yes' if same else 'NO'} |")
    print("\n| implementation | `json_schema`: whole JSON the schema accepts | answer |\n|---|---|---|")
    for name, (ok, city) in structured.items():
        print(f"| {name} | {'yes' if ok else 'NO'} | `{city[:90]!r}` |")
    print("\n| implementation | first step's top 5 (`top_logprobs`) | max \\|Δ logprob\\| against the CPU's, same weights |\n|---|---|---|")
    for name, top in logprobs.items():
        cpu = next((t for n, t in logprobs.items() if n.split()[1] == name.split()[1] and "cpu" in n), top)
        same = [a[0] for a in top] == [b[0] for b in cpu]
        delta = max(abs(a[1] - b[1]) for a, b in zip(top, cpu))
        print(f"| {name} | {', '.join(f'{t!r} {lp:.3f}' for t, lp in top)} | {delta:.4f}{'' if same else ' (other tokens)'} |")
    print("\nTexts:\n")
    for i, c in enumerate(cases):
        print(f"- {c['prompt']!r}: " + "; ".join(f"{n}: {texts[n][i]!r}" for n in names))
    print()


def llama_generate(weights_dir):
    import torch
    from safetensors.torch import save_file

    hidden, ffn, heads, kv_heads, vocab = 2048, 5632, 32, 4, 49152
    layers = int(os.environ.get("LLAMA_LAYERS", "22"))
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "hidden_act": "silu",
    }
    json.dump(config, open(f"{weights_dir}/config.json", "w"), indent=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)

    def matrix(rows, cols):
        return (torch.randn(rows, cols, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    w = {"model.embed_tokens.weight": matrix(vocab, hidden), "lm_head.weight": matrix(vocab, hidden),
         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        w[p + "self_attn.q_proj.weight"] = matrix(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = matrix(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = matrix(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = matrix(hidden, heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = matrix(ffn, hidden)
        w[p + "mlp.up_proj.weight"] = matrix(ffn, hidden)
        w[p + "mlp.down_proj.weight"] = matrix(hidden, ffn)
    save_file(w, f"{weights_dir}/model.safetensors", metadata={"format": "pt"})
    params = sum(t.numel() for t in w.values())
    print(f"random TinyLlama-shaped Llama: {layers} layers, {params / 1e9:.2f} B parameters, "
          f"{os.path.getsize(f'{weights_dir}/model.safetensors') / 1e9:.2f} GB of bf16")


def llama_compare(cold_addr, restored_addr):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    same = 0
    for prompt in prompts:
        body = {"input": {"prompt": prompt, "use_chat_template": False, "temperature": 0, "max_new_tokens": 16}}
        answers = []
        for addr in (cold_addr, restored_addr):
            req = urllib.request.Request(f"http://{addr}/predictions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            answers.append(json.load(urllib.request.urlopen(req, timeout=120)))
        texts = ["".join(a.get("output") or []) for a in answers]
        ok = all(a["status"] == "succeeded" for a in answers) and texts[0] == texts[1]
        same += ok
        rate = answers[1].get("metrics", {}).get("tokens_per_second")
        print(f"llama q8_0 {prompt!r}: cold and restored {'identical' if ok else 'DIFFER'} "
              f"({len(texts[0])} chars; restored {rate} tokens/s)")
    print(f"llama q8_0: {same} of {len(prompts)} generations identical, cold vs restored")
    sys.exit(0 if same == len(prompts) else 1)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"minilm-generate": minilm_generate, "minilm": minilm, "smollm2": smollm2,
     "llama-generate": llama_generate, "llama-compare": llama_compare}[command](*args)

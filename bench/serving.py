"""Serving: adapter switch latency, hot-load time, router overhead and throughput with 1 vs 8 adapters.

Run:  python -m bench.run serving                                (CPU, models/tiny-llama, pool + HTTP; ~2 min busy)
      python -m bench.run serving --device cuda --model-size 1b  (GPU, random-weight ~1B Llama, bf16; writes
                                                                   bench/results/serving_cuda_1b.json)

Everything runs on `serving.pool.AdapterPool` with random LoRA adapters (every linear layer, rank 16) saved as real
PEFT adapter directories, so the pool loads them exactly as it loads trained ones:
- switch: the pool's selection path (`_use`: LRU bookkeeping + set_adapter on the cached LoRA layers) when the
  previous request used another loaded adapter, against the same path with no switch; and a 1-token request after a
  switch against one without (what a request pays);
- hot-load: `pool.load` of a new key from a local directory (what the server does after the registry has downloaded
  and sha256-verified it), `pool.unload`, and the verified fetch itself (`LocalStore.get_dir`) for scale;
- router: `Router.choose` with a canary active and a sticky user key (the costlier path) as a share of one request;
- throughput: requests/s and tokens/s, sequential through the pool, with 1 adapter vs 8 adapters round-robin.
With fastapi/uvicorn/httpx installed (not on the GPU image), the same through the HTTP server: a hot load over
POST /admin/adapters/load, routed vs pinned request latency, and throughput with 8 concurrent clients. The sides of
every ratio are measured in the same run, interleaved where the box's load could drift between them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.common import RESULTS_DIR, ratio, row, write_result

NAME = "serving"
TINY_BASE = Path(__file__).resolve().parent.parent / "models" / "tiny-llama"
LLAMA_1B = {"hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
"""TinyLlama-1.1B's shape; the weights are random (nothing is downloaded)."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROMPTS = ["### Customer: where is my order?\n### Agent:", "### Customer: I want a refund for my last purchase\n"
           "### Agent:", "### Customer: how do I change my delivery address?\n### Agent:"]
N_ADAPTERS = 8
HTTP_CLIENTS = 8
HTTP_DEPS = ("fastapi", "uvicorn", "httpx", "pydantic", "prometheus_client")


def us(seconds: list[float]) -> dict:
    """Median and p99 in microseconds (row() rounds seconds to 0.1 ms, too coarse for a switch)."""
    s = sorted(seconds)
    return {"median_us": round(statistics.median(s), 1), "p99_us": round(s[min(len(s) - 1, int(0.99 * len(s)))], 1)}


def us_row(case: str, seconds: list[float], **extra) -> dict:
    return row(case, seconds, **us([x * 1e6 for x in seconds]), **extra)


# ---------------------------------------------------------------------------------------------------- models


def build_base(size: str, device: str, tmp: Path) -> Path:
    """The base directory: models/tiny-llama, or a random-weight ~1B Llama saved (bf16 safetensors) under tmp."""
    if size == "tiny":
        return TINY_BASE
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = json.loads((TINY_BASE / "config.json").read_text())
    cfg = LlamaConfig(**LLAMA_1B, bos_token_id=tiny["bos_token_id"], eos_token_id=tiny["eos_token_id"],
                      pad_token_id=tiny["pad_token_id"], rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out = tmp / "base-1b"
    model.save_pretrained(out)
    del model
    for name in TOKENIZER_FILES:  # the tiny base's tokenizer: its ids (< 4096) are valid in a 32000 vocab
        shutil.copy(TINY_BASE / name, out / name)
    return out


def make_adapters(base_dir: Path, n: int, rank: int, tmp: Path) -> list[Path]:
    """n random LoRA adapters saved as PEFT directories (adapter_config.json + adapter_model.safetensors).

    The key names and shapes come from PEFT itself, on a model built on the meta device (no weights allocated).
    lora_B is non-zero (unlike PEFT's init), so every adapter changes the outputs, as trained ones do.
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  get_peft_model_state_dict(get_peft_model(AutoModelForCausalLM.from_config(
                      AutoConfig.from_pretrained(base_dir)), lora)).items()}
    dirs = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {k: (torch.randn(*s, generator=g) / s[1] ** 0.5 if "lora_A" in k
                       else torch.randn(*s, generator=g) * 0.02) for k, s in shapes.items()}
        d = tmp / f"adapter{i}"
        d.mkdir(parents=True)
        lora.save_pretrained(str(d))
        save_file(tensors, str(d / "adapter_model.safetensors"))
        dirs.append(d)
    return dirs


# ---------------------------------------------------------------------------------------------------- pool level


def select_times(pool, seq: list[str]) -> list[float]:
    """Seconds of the pool's selection path (inside its lock, as a request runs it) for each key of seq."""
    out = []
    for key in seq:
        with pool._lock:
            t0 = time.perf_counter()
            with pool._use(key):
                out.append(time.perf_counter() - t0)
    return out


def switch_latency(pool, keys: list[str], switches: int) -> tuple[list[float], list[float]]:
    """The selection path with a switch (each call another adapter than the last, round-robin over keys) and without
    (always keys[0]), interleaved in blocks so that both sides see the same load."""
    select_times(pool, keys * 4)  # warm-up
    before = pool.switches
    switch, same = [], []
    for _ in range(4):
        switch += select_times(pool, [keys[i % len(keys)] for i in range(switches // 4)])
        same += select_times(pool, [keys[0]] * (switches // 4))
    if pool.switches - before < len(switch) - 4:
        raise RuntimeError(f"the switch side switched adapters {pool.switches - before} times, not {len(switch)}")
    return switch, same


def switch_request(pool, keys: list[str], requests: int, sync) -> tuple[list[dict], list[dict]]:
    """1-token requests alternating between two adapters vs always the same one."""
    def run(seq: list[str]) -> list[float]:
        out = []
        for i, key in enumerate(seq):
            t0 = time.perf_counter()
            pool.complete(PROMPTS[0], key, max_tokens=1)
            sync()
            out.append(time.perf_counter() - t0)
        return out

    run(keys[:2] * 2)
    alt, same = [], []
    for _ in range(4):
        alt += run([keys[i % 2] for i in range(requests // 4)])
        same += run([keys[0]] * (requests // 4))
    rows = [us_row("1-token request, other adapter than the last (switch)", alt),
            us_row("1-token request, same adapter as the last", same)]
    d = statistics.median(alt) - statistics.median(same)
    ratios = [ratio("request with switch / without", statistics.median(alt), statistics.median(same),
                    f"difference of medians {d * 1e6:.0f} us: the switch as a request sees it (noise included)")]
    return rows, ratios


def hot_load(pool, adapter_dir: Path, repeats: int, tmp: Path, sync) -> tuple[list[dict], float]:
    """pool.load of a new key from a local (already verified) directory, and pool.unload; the verified fetch
    from a LocalStore for scale."""
    from registry.store import LocalStore

    loads, unloads = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        pool.load(f"hot@{i}", adapter_dir)
        sync()
        t1 = time.perf_counter()
        pool.unload(f"hot@{i}")
        sync()
        if i:  # the first is a warm-up
            loads.append(t1 - t0)
            unloads.append(time.perf_counter() - t1)
    store = LocalStore(tmp / "store")
    store.put_dir("adapters/hot", adapter_dir)
    fetch = []
    for i in range(repeats):
        t0 = time.perf_counter()
        store.get_dir("adapters/hot", tmp / f"fetched{i}")
        fetch.append(time.perf_counter() - t0)
    mib = sum(f.stat().st_size for f in adapter_dir.iterdir()) / 2**20
    rows = [us_row(f"hot-load: pool.load of a new adapter from a local dir ({mib:.1f} MiB)", loads),
            us_row("unload: pool.unload", unloads),
            us_row("verified fetch: LocalStore.get_dir (copy + sha256 of every file)", fetch)]
    return rows, statistics.median(loads)


def router_choose(repeats: int, batch: int = 2000) -> tuple[list[dict], float]:
    """Router.choose with a canary active and a sticky user key (sha256 per call): seconds per call, per batch."""
    from serving.router import Router

    router = Router(seed=0)
    router.set("fam", champion="1", challenger="2", weight=0.05)
    users = [f"user-{i}" for i in range(batch)]
    per_call = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for u in users:
            "fam".partition("@")  # what resolve() does before asking the router
            router.choose("fam", u)
        per_call.append((time.perf_counter() - t0) / batch)
    per_call = per_call[1:]
    return [us_row(f"Router.choose, canary active, sticky user key (per call, {batch}-call batches)",
                   per_call)], statistics.median(per_call)


def pool_throughput(pool, keys: list[str], requests: int, max_tokens: int, rounds: int,
                    sync) -> tuple[list[dict], list[dict], dict]:
    """Sequential requests through the pool: 1 adapter vs N adapters round-robin, interleaved rounds."""
    def run(seq: list[str]) -> tuple[float, int, list[float]]:
        tokens, lat = 0, []
        t0 = time.perf_counter()
        for i, key in enumerate(seq):
            t = time.perf_counter()
            tokens += pool.complete(PROMPTS[i % len(PROMPTS)], key, max_tokens=max_tokens).completion_tokens
            sync()
            lat.append(time.perf_counter() - t)
        return time.perf_counter() - t0, tokens, lat

    run(keys[:2])
    res = {1: [], len(keys): []}
    lat_one: list[float] = []
    for _ in range(rounds):
        seconds, tokens, lat = run([keys[0]] * requests)
        res[1].append((seconds, tokens))
        lat_one += lat
        res[len(keys)].append(run([keys[i % len(keys)] for i in range(requests)])[:2])
    rows, rps = [], {}
    for n, runs in res.items():
        secs = [s for s, _ in runs]
        rps[n] = statistics.median(requests / s for s, _ in runs)
        rows.append(row(f"pool: {requests} requests x {max_tokens} tokens, {n} adapter{'s' * (n > 1)}"
                        f"{' round-robin' if n > 1 else ''}", secs, req_per_s=round(rps[n], 2),
                        tok_per_s=round(statistics.median(t / s for s, t in runs), 1)))
    ratios = [ratio(f"pool throughput {len(keys)} adapters / 1 adapter (requests/s)", rps[len(keys)], rps[1])]
    return rows, ratios, {"request_median_s": statistics.median(lat_one)}


# ---------------------------------------------------------------------------------------------------- HTTP level


def http_parts(pool, adapters: list[Path], requests: int, max_tokens: int, rounds: int,
               choose_s: float) -> tuple[list[dict], list[dict], list[str]]:
    import httpx

    from serving.app import BackgroundServer, ServerState, create_app
    from serving.router import Router

    key = "bench-admin-key"
    auth = {"Authorization": f"Bearer {key}"}
    state = ServerState(pool=pool, router=Router(seed=0), api_key=key, max_tokens_limit=max(256, max_tokens))
    server = BackgroundServer(create_app(state))
    url = server.start()
    rows, ratios, notes = [], [], []
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(120.0)) as c:
            loads = []
            for i, d in enumerate(adapters):
                t0 = time.perf_counter()
                r = c.post("/admin/adapters/load", json={"family": f"f{i}", "version": "1", "path": str(d)},
                           headers=auth)
                loads.append(time.perf_counter() - t0)
                r.raise_for_status()
            c.post("/admin/adapters/load", json={"family": "f0", "version": "2", "path": str(adapters[1])},
                   headers=auth).raise_for_status()
            rows.append(us_row("hot-load over HTTP: POST /admin/adapters/load (new family@version)", loads))

            def request(model: str, tokens: int, client=c, user: int = 0) -> tuple[float, int]:
                t0 = time.perf_counter()
                r = client.post("/v1/completions", json={"model": model, "prompt": PROMPTS[user % len(PROMPTS)],
                                                         "max_tokens": tokens, "user": f"user-{user}"})
                r.raise_for_status()
                return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

            # routed (router.choose, canary active) vs pinned (no router) requests, interleaved
            state.router.set("f0", champion="1", challenger="2", weight=0.05)
            routed, pinned = [], []
            for _ in range(3):
                request("f0", 1)
            for i in range(requests):
                routed.append(request("f0", max_tokens, user=i)[0])
                pinned.append(request("f0@1", max_tokens, user=i)[0])
            state.router.set("f0", champion="1")
            rows += [us_row(f"HTTP /v1/completions, routed (canary active), {max_tokens} tokens", routed),
                     us_row(f"HTTP /v1/completions, pinned family@version, {max_tokens} tokens", pinned)]
            req_s = statistics.median(routed)
            ratios += [ratio("router overhead: Router.choose / HTTP request (target <= 0.01)", choose_s, req_s,
                             f"{choose_s * 1e6:.1f} us of a {req_s * 1e3:.1f} ms request"),
                       ratio("HTTP routed / pinned request", req_s, statistics.median(pinned),
                             "end-to-end cross-check of the router's cost; the box's noise dominates it")]

        def load_run(models: list[str]) -> tuple[float, int]:
            """HTTP_CLIENTS threads share the requests; returns (seconds, completion tokens)."""
            tokens, errors, lock = [0], [], threading.Lock()

            def worker(k: int) -> None:
                with httpx.Client(base_url=url, timeout=httpx.Timeout(120.0)) as wc:
                    for i, m in enumerate(models[k::HTTP_CLIENTS]):
                        try:
                            _, n = request(m, max_tokens, wc, user=i)
                        except httpx.HTTPError as e:
                            errors.append(str(e))
                            continue
                        with lock:
                            tokens[0] += n

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(HTTP_CLIENTS)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError(f"{len(errors)} HTTP requests failed during the throughput run: {errors[:3]}")
            return time.perf_counter() - t0, tokens[0]

        n = len(adapters)
        res = {1: [], n: []}
        load_run(["f0"] * HTTP_CLIENTS)
        for _ in range(rounds):
            res[1].append(load_run(["f0"] * requests))
            res[n].append(load_run([f"f{i % n}" for i in range(requests)]))
        rps = {}
        for k, runs in res.items():
            rps[k] = statistics.median(requests / s for s, _ in runs)
            rows.append(row(f"HTTP: {requests} requests x {max_tokens} tokens, {HTTP_CLIENTS} clients, {k} "
                            f"famil{'ies round-robin' if k > 1 else 'y'}", [s for s, _ in runs],
                            req_per_s=round(rps[k], 2), tok_per_s=round(statistics.median(t / s for s, t in runs), 1)))
        ratios.append(ratio(f"HTTP throughput {n} adapters / 1 adapter (requests/s)", rps[n], rps[1]))
    finally:
        server.stop()
    notes.append(f"HTTP: uvicorn in a thread of the benchmark process on 127.0.0.1, {HTTP_CLIENTS} client threads "
                 f"(httpx) in the same process; the pool serves one request at a time, so concurrency overlaps "
                 f"HTTP handling with the model, not two forwards.")
    return rows, ratios, notes


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.run serving", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="torch device of the pool: cpu or cuda")
    p.add_argument("--model-size", choices=("tiny", "1b"), default="tiny",
                   help="tiny: models/tiny-llama; 1b: random-weight TinyLlama-1.1B shape, bf16 (needs --device cuda)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the random adapters (every linear layer)")
    p.add_argument("--switches", type=int, default=2000, help="selection-path switches timed (and as many without)")
    p.add_argument("--requests", type=int, default=48, help="requests per throughput run and per latency series")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default: 8 tiny, 32 1b)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved 1-adapter / 8-adapter throughput rounds")
    p.add_argument("--load-repeats", type=int, default=10, help="hot-load / unload / fetch repeats")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP server parts even if fastapi is installed")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the results JSON goes")
    args = p.parse_args(argv)
    if args.model_size == "1b" and not args.device.startswith("cuda"):
        p.error("--model-size 1b is a GPU benchmark: add --device cuda (on a CPU it would take hours)")
    max_tokens = args.max_tokens or (8 if args.model_size == "tiny" else 32)
    if min(args.requests, args.rounds, args.load_repeats, max_tokens, args.rank) < 1 or args.switches < 16:
        p.error("--requests, --rounds, --load-repeats, --max-tokens and --rank must be >= 1, --switches >= 16")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but torch {torch.__version__} sees no CUDA device")
    from serving.pool import AdapterPool

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    http = not args.no_http and all(importlib.util.find_spec(m) is not None for m in HTTP_DEPS)
    name = NAME if (args.device, args.model_size) == ("cpu", "tiny") else f"{NAME}_{args.device.split(':')[0]}_" \
                                                                          f"{args.model_size}"
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        base = build_base(args.model_size, args.device, tmp)
        adapters = make_adapters(base, N_ADAPTERS + 1, args.rank, tmp / "adapters")
        pool = AdapterPool(base, device=args.device, max_adapters=2 * N_ADAPTERS + 2)
        keys = [f"a{i}@1" for i in range(N_ADAPTERS)]
        for k, d in zip(keys[:2], adapters):
            pool.load(k, d)
        print(f"  setup ({args.model_size} base on {args.device}, adapters r{args.rank}): "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        switch2, _ = switch_latency(pool, keys[:2], args.switches // 2)
        for k, d in zip(keys[2:], adapters[2:]):
            pool.load(k, d)
        switch, same = switch_latency(pool, keys, args.switches)
        rows = [us_row(f"select a loaded adapter, switch ({N_ADAPTERS} loaded, round-robin)", switch),
                us_row("select a loaded adapter, switch (2 loaded, alternating)", switch2),
                us_row("select the already-active adapter (no switch)", same)]
        ratios = [ratio("switch / no-switch selection", statistics.median(switch), statistics.median(same)),
                  ratio(f"switch with {N_ADAPTERS} loaded / with 2 loaded", statistics.median(switch),
                        statistics.median(switch2), "how the switch grows with the adapters in the pool")]
        print(f"  switch: median {rows[0]['median_us']} us, p99 {rows[0]['p99_us']} us ({N_ADAPTERS} loaded); "
              f"{rows[1]['median_us']} us (2 loaded)", flush=True)
        r, q = switch_request(pool, keys, args.requests * 2, sync)
        rows += r
        ratios += q
        r, load_s = hot_load(pool, adapters[-1], args.load_repeats, tmp, sync)
        rows += r
        print(f"  hot-load: median {r[0]['median_us'] / 1e3:.1f} ms", flush=True)
        r, choose_s = router_choose(repeats=20)
        rows += r
        r, q, tp = pool_throughput(pool, keys, args.requests, max_tokens, args.rounds, sync)
        rows += r
        ratios += q
        ratios.append(ratio("router overhead: Router.choose / pool request", choose_s, tp["request_median_s"],
                            "pool-level request (no HTTP): an upper bound of the HTTP share"))
        print("  pool throughput: " + "; ".join(f"{x['case']}: {x['req_per_s']} req/s" for x in r), flush=True)
        if http:
            r, q, n = http_parts(pool, adapters[:N_ADAPTERS], args.requests, max_tokens, args.rounds, choose_s)
            rows += r
            ratios += q
            notes += n
            print("  HTTP: " + "; ".join(f"{x['case']}: {x.get('req_per_s', x.get('median_us'))}" for x in r),
                  flush=True)
        else:
            missing = [m for m in HTTP_DEPS if importlib.util.find_spec(m) is None]
            notes.append("HTTP parts skipped: " + (f"{', '.join(missing)} not installed; the numbers are the pool's"
                                                   if missing else "--no-http"))
    sw_ms = statistics.median(switch) * 1e3
    notes += [f"Switch to an already-loaded adapter: median {sw_ms:.4f} ms (target <= 1 ms: "
              f"{'met' if sw_ms <= 1.0 else 'NOT met'}).",
              f"Hot-load of a new adapter (pool.load from a verified local dir): median {load_s * 1e3:.1f}"
              f" ms; the registry download and its sha256 check come before it (the LocalStore row).",
              "Random LoRA adapters on every linear layer (q,k,v,o,gate,up,down) saved by PEFT's own config and key "
              "names; requests are greedy with the KV cache, prompts of ~20 tokens; the tokens/s counts generated "
              "tokens only (a request can stop early at eos).",
              "Timings are wall clock on a shared machine (see load_avg_1m); medians of interleaved runs."]
    if args.model_size == "1b":
        notes.append(f"1b: random weights in the TinyLlama-1.1B shape ({LLAMA_1B}), bf16, built on the device; the "
                     f"tokenizer is the tiny base's (its ids are valid in the 32000 vocab).")
    result = {"title": f"Serving: adapter switch, hot-load, router overhead, 1 vs {N_ADAPTERS} adapters "
                       f"({args.model_size} base, {args.device})",
              "description": "What a request pays to use another loaded adapter, how long a hot load takes, the "
                             "router's share of a request, and throughput with 1 vs 8 adapters round-robin.",
              "command": " ".join(["python -m bench.run", NAME, *(argv or [])]),
              "rows": rows, "ratios": ratios, "notes": notes}
    path = write_result(name, result, results_dir=args.out_dir)
    print(f"  wrote {path}")
    return result

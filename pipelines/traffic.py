"""Simulated users for the demo and the tests: real HTTP requests to the OpenAI-compatible server, plus feedback.

A simulated user knows the dataset's reference answer for its question and rates the served answer by the MiniLM
cosine similarity between the two (clipped to [0, 1]). That is a crude judge, but an honest one: a model that
answers the question asked scores higher than one that answers another question.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import httpx

from pipelines.data import Example


class SimilarityJudge:
    def __init__(self, encoder=None):
        from monitoring.embeddings import load_encoder

        self.encoder = encoder or load_encoder()
        self._lock = threading.Lock()

    def __call__(self, response: str, reference: str) -> float:
        from monitoring.embeddings import embed

        with self._lock:
            a, b = embed(self.encoder, [response or " ", reference])
        return float(min(1.0, max(0.0, float(a @ b))))


def send(base_url: str, model: str, examples: list[Example], clients: int = 4, max_tokens: int = 16,
         judge: Callable[[str, str], float] | None = None, stop: Callable[[], bool] | None = None,
         user_prefix: str = "user", timeout: float = 60.0) -> list[dict]:
    """Send one completion per example with `clients` concurrent clients; rate answers with `judge` if given.

    `stop` is polled before each request (e.g. "the canary has finished"); requests after it returns True are skipped.
    Returns one record per request sent: version, route, latency, score, error.
    """
    results: list[dict] = []
    lock = threading.Lock()
    stopped = threading.Event()

    def one(i: int, ex: Example, client: httpx.Client) -> None:
        if stopped.is_set() or (stop is not None and stop()):
            stopped.set()
            return
        t0 = time.perf_counter()
        rec = {"i": i, "category": ex.category}
        try:
            r = client.post("/v1/completions", json={"model": model, "prompt": ex.prompt, "max_tokens": max_tokens,
                                                     "user": f"{user_prefix}-{i}"})
            rec["latency_ms"] = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
            else:
                body = r.json()
                meta = body.get("adapterops", {})
                rec.update(id=body["id"], version=meta.get("version"), route=meta.get("route"),
                           text=body["choices"][0]["text"])
                if judge is not None:
                    rec["score"] = judge(rec["text"], ex.response)
                    fb = client.post("/v1/feedback", json={"id": body["id"], "score": rec["score"]})
                    if fb.status_code != 200:
                        rec["error"] = f"feedback HTTP {fb.status_code}: {fb.text[:200]}"
        except httpx.HTTPError as e:
            rec["error"] = f"{type(e).__name__}: {e}"
        with lock:
            results.append(rec)

    with httpx.Client(base_url=base_url, timeout=timeout) as client, ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda a: one(a[0], a[1], client), enumerate(examples)))
    return sorted(results, key=lambda r: r["i"])

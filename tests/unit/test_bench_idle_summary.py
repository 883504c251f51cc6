"""bench.train_throughput.idle_summary: device idle time read off a torch.profiler chrome trace, and what the host
was doing meanwhile. A hand-made trace with known gaps (no GPU needed)."""

from __future__ import annotations

import pytest

from bench.train_throughput import idle_summary, idle_text


def X(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_gaps_and_their_attribution():
    events = [
        X("user_annotation", "diag_step", 0, 1000), X("user_annotation", "diag_step", 1000, 1000),
        # step 1: kernels 0-400 and 450-900 (overlapping ones merge); idle 400-450 and 900-1000
        X("kernel", "k", 0, 300), X("kernel", "k", 250, 150), X("gpu_memcpy", "m", 450, 450),
        # step 2: one kernel 1000-1500, a 500 us gap to the window's end
        X("kernel", "k", 1000, 500),
        X("kernel", "outside", 2500, 100),  # after the last step: not counted
        X("user_annotation", "phase:prefetch", 880, 120), X("user_annotation", "phase:prefetch", 1500, 500),
        X("user_annotation", "not_a_phase", 0, 2000),
        X("cuda_runtime", "cudaStreamSynchronize", 400, 50), X("cpu_op", "aten::nonzero", 1600, 100),
    ]
    s = idle_summary(events)
    assert s["steps"] == 2 and s["window_ms_per_step"] == 1.0
    assert s["idle_ms_per_step"] == pytest.approx((50 + 100 + 500) / 2 / 1e3, abs=0.05)  # rounded to 0.1 ms
    assert s["idle_fraction"] == pytest.approx(650 / 2000, abs=1e-4)
    phases = {p["name"]: p for p in s["idle_by_phase"]}
    assert set(phases) == {"phase:prefetch"}  # only phase:* ranges are phases
    assert phases["phase:prefetch"]["idle_overlap_ms_per_step"] == pytest.approx((100 + 500) / 2 / 1e3, abs=0.01)
    rt = s["idle_by_runtime_call"][0]
    assert rt["name"] == "cudaStreamSynchronize" and rt["idle_overlap_ms_per_step"] == pytest.approx(0.025, abs=0.01)
    assert s["idle_by_host_op"][0]["name"] == "aten::nonzero"
    assert s["gaps_per_step"]["0.1-1ms"]["count"] == 1.0  # the 500 us gap, over two steps
    assert s["largest_gaps"][0]["ms"] == 0.5 and s["largest_gaps"][0]["phases"] == ["phase:prefetch"]
    assert "idle 0.3 ms (32.5%)" in idle_text(s)


def test_a_trace_without_steps_says_so():
    assert "error" in idle_summary([X("kernel", "k", 0, 10)])
    assert idle_text(idle_summary([])).startswith("no diag_step")

"""`monitor check` logic without the real embedding model: JSONL parsing, columns, embeddings reuse, JSON contract.

The encoder here is a stand-in for MiniLM (a bag-of-words hash); the real model runs in
tests/integration/test_monitoring_embeddings.py.
"""

import json
import zlib

import numpy as np
import pytest

from monitoring.check import check_windows, load_jsonl, log_window, rows_to_columns, run_check
from monitoring.drift import EMBEDDING_STAT, NOVELTY_STAT, DriftConfig
from monitoring.embeddings import EmbeddingIndex


class BagOfWordsEncoder:
    """Deterministic text encoder: hashed word counts, 64 dims. Records what it was asked to encode."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=64, **kw):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), 64), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % 64] += 1.0
        return out


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompts(topic_words, n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(topic_words, size=6)) for _ in range(n)]


ORDER_WORDS = ["order", "cancel", "purchase", "track", "item", "buy", "cart", "checkout"]
OTHER_WORDS = ["weather", "poem", "python", "guitar", "planet", "recipe", "soccer", "novel"]


def test_load_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"w\.jsonl:3: malformed JSON"):
        load_jsonl(p)
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r'w\.jsonl:2: row has no string "prompt"'):
        load_jsonl(p)
    p.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"w\.jsonl:2: expected a JSON object"):
        load_jsonl(p)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b", "prompt_nll": 1.5}\n')
    assert [r["prompt"] for r in load_jsonl(p)] == ["a", "b"]


def test_rows_to_columns():
    cols = rows_to_columns([{"prompt": "a", "prompt_nll": 1}, {"prompt": "b", "prompt_nll": None}, {"prompt": "c"}],
                           ("prompt_nll", "gen_entropy"))
    np.testing.assert_array_equal(cols["prompt_nll"], [1.0, np.nan, np.nan])
    assert np.isnan(cols["gen_entropy"]).all() and cols["gen_entropy"].shape == (3,)
    with pytest.raises(ValueError, match="row 0: prompt_nll='high' is not a number"):
        rows_to_columns([{"prompt": "a", "prompt_nll": "high"}], ("prompt_nll",))


def test_check_windows_embeds_each_prompt_once_and_detects_topic_shift():
    ref = [{"prompt": p} for p in _prompts(ORDER_WORDS, 120, 0)]
    same = [{"prompt": p} for p in _prompts(ORDER_WORDS, 120, 1)]
    shifted = [{"prompt": p} for p in _prompts(OTHER_WORDS, 120, 2)]
    # A repeated prompt across windows and one row that already carries its max-cos.
    same[0]["prompt"] = ref[0]["prompt"]
    shifted[5][EMBEDDING_STAT] = 0.123
    enc = BagOfWordsEncoder()
    cfg = DriftConfig(stats=(EMBEDDING_STAT,))
    ok, drift = check_windows(ref, [same, shifted], cfg, encoder=enc)
    both = DriftConfig(stats=(EMBEDDING_STAT, NOVELTY_STAT))
    ok2, drift2 = check_windows(ref, [same, shifted], both, encoder=BagOfWordsEncoder())
    assert ok2.status == "ok" and drift2.status == "drift"
    assert {t.name for t in drift2.tests if t.fired} >= {NOVELTY_STAT}
    assert len(enc.calls) == 1
    encoded = enc.calls[0]
    assert len(encoded) == len(set(encoded))
    assert shifted[5]["prompt"] not in encoded
    assert ok.status == "ok" and drift.status == "drift"
    assert drift.tests[0].name == EMBEDDING_STAT and drift.tests[0].n_current == 120


def test_check_windows_against_a_training_index():
    enc = BagOfWordsEncoder()
    index = EmbeddingIndex(enc.encode(_prompts(ORDER_WORDS, 200, 3)))
    ref = [{"prompt": p} for p in _prompts(ORDER_WORDS, 100, 4)]
    cur = [{"prompt": p} for p in _prompts(OTHER_WORDS, 100, 5)]
    (res,) = check_windows(ref, [cur], DriftConfig(stats=(EMBEDDING_STAT,)), encoder=enc, index=index)
    assert res.drift


def test_without_encoder_embedding_stat_is_not_tested():
    rng = np.random.default_rng(0)
    ref = [{"prompt": "p", "prompt_nll": float(x)} for x in rng.normal(0, 1, 100)]
    cur = [{"prompt": "p", "prompt_nll": float(x)} for x in rng.normal(0, 1, 100)]
    (res,) = check_windows(ref, [cur], DriftConfig())
    tests = {t.name: t for t in res.tests}
    assert res.status == "ok"
    assert tests["prompt_nll"].n_current == 100 and not np.isnan(tests["prompt_nll"].p_value)
    assert "not tested" in tests[EMBEDDING_STAT].note
    with pytest.raises(ValueError, match="reference window has no rows"):
        check_windows([], [cur], DriftConfig())


def test_run_check_json_contract_with_logged_stats(tmp_path):
    rng = np.random.default_rng(1)

    def rows(shift, n):
        return [{"prompt": f"q{i}", "prompt_nll": float(rng.normal(shift, 1)), "gen_entropy": float(rng.normal()),
                 "gen_max_prob": float(rng.uniform()), EMBEDDING_STAT: float(rng.uniform(0.6, 0.9)),
                 NOVELTY_STAT: float(rng.uniform(0.1, 0.4))} for i in range(n)]

    ref = _write(tmp_path / "ref.jsonl", rows(0.0, 200))
    cur_ok = _write(tmp_path / "ok.jsonl", rows(0.0, 200))
    cur_bad = _write(tmp_path / "bad.jsonl", rows(1.0, 200))
    small = _write(tmp_path / "small.jsonl", rows(5.0, 20))
    out_path = tmp_path / "out" / "verdict.json"

    # Every row carries its max-cos and novelty, so no encoder is needed even with embeddings on.
    out = run_check(ref, [cur_ok, cur_bad, small], out_path)
    assert json.loads(out_path.read_text()) == out
    assert out["drift"] is True
    assert [r["current"] for r in out["results"]] == [str(cur_ok), str(cur_bad), str(small)]
    assert [r["status"] for r in out["results"]] == ["ok", "drift", "insufficient_data"]
    fired = [t["name"] for t in out["results"][1]["tests"] if t["fired"]]
    assert fired == ["prompt_nll"]
    assert out["config"]["alpha"] == 0.01 and out["config"]["reference"] == str(ref)
    assert "status" not in out  # several windows: no single top-level verdict
    assert list(out_path.parent.iterdir()) == [out_path]  # no temp file left behind

    one = run_check(ref, [cur_ok], out_path, use_embeddings=False)
    assert one["drift"] is False and one["status"] == "ok" and one["current"] == str(cur_ok)
    assert len(one["tests"]) == 5 and one["tests"] == one["results"][0]["tests"]


def test_run_check_leaves_previous_output_on_error(tmp_path):
    out_path = tmp_path / "verdict.json"
    out_path.write_text('{"previous": true}')
    ref = _write(tmp_path / "ref.jsonl", [{"prompt": "a"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        run_check(ref, [bad], out_path, use_embeddings=False)
    assert json.loads(out_path.read_text()) == {"previous": True}
    with pytest.raises(ValueError, match="at least one --current"):
        run_check(ref, [], out_path)
    with pytest.raises(FileNotFoundError, match="reference window .*nope.jsonl does not exist"):
        run_check(tmp_path / "nope.jsonl", [ref], out_path)
    assert json.loads(out_path.read_text()) == {"previous": True}


def _stat_rows(rng, n, version=None, shift=0.0):
    rows = [{"prompt": f"q{i}", "prompt_nll": float(rng.normal(shift, 1)), "gen_entropy": float(rng.normal()),
             "gen_max_prob": float(rng.uniform()), EMBEDDING_STAT: float(rng.uniform(0.6, 0.9))} for i in range(n)]
    if version is not None:
        for r in rows:
            r["version"] = version
    return rows


def test_a_window_of_another_version_is_refused_not_compared():
    rng = np.random.default_rng(3)
    ref = _stat_rows(rng, 100, version="2")
    # same distribution, but v3's traffic against v2's reference: an error, never a verdict
    with pytest.raises(ValueError, match=r"current window 0 has 100 rows of version\(s\) \['3'\].*version 2"):
        check_windows(ref, [_stat_rows(rng, 100, version="3")], DriftConfig())
    mixed = _stat_rows(rng, 60, version="2") + _stat_rows(rng, 40, version="3")
    with pytest.raises(ValueError, match="40 rows of version"):
        check_windows(ref, [mixed], DriftConfig())
    with pytest.raises(ValueError, match="reference mixes rows of versions"):
        check_windows(ref[:50] + _stat_rows(rng, 50, version="3"), [_stat_rows(rng, 100)], DriftConfig())
    # an explicit reference version applies to references whose rows carry none
    with pytest.raises(ValueError, match="reference is of version 2"):
        check_windows(_stat_rows(rng, 100), [_stat_rows(rng, 100, version="3")], DriftConfig(),
                      reference_version="2")
    (ok,) = check_windows(ref, [_stat_rows(rng, 100, version="2")], DriftConfig())
    assert ok.status == "ok"
    (ok,) = check_windows(ref, [_stat_rows(rng, 100)], DriftConfig())  # rows without a version are not checked
    assert ok.status == "ok"


def test_run_check_refuses_a_reference_of_another_version(tmp_path):
    rng = np.random.default_rng(4)
    ref = _write(tmp_path / "ref.jsonl", _stat_rows(rng, 100, version="1"))
    cur = _write(tmp_path / "cur.jsonl", _stat_rows(rng, 100, version="2"))
    with pytest.raises(ValueError, match="reference is of version 1"):
        run_check(ref, [cur], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_empty_and_small_windows_say_insufficient_data_without_alert(tmp_path):
    rng = np.random.default_rng(5)
    ref = _write(tmp_path / "ref.jsonl", _stat_rows(rng, 100))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    small = _write(tmp_path / "small.jsonl", _stat_rows(rng, 49, shift=10.0))
    out = run_check(ref, [empty, small], tmp_path / "out.json", use_embeddings=False)
    assert out["drift"] is False
    for r, n in zip(out["results"], (0, 49)):
        assert r["status"] == "insufficient_data" and not r["drift"]
        assert f"at most {n} finite values" in r["reason"] and "no alert" in r["reason"]


def test_nan_statistics_are_counted_never_an_alarm(tmp_path):
    rng = np.random.default_rng(6)
    ref = _stat_rows(rng, 200)
    cur = _stat_rows(rng, 200)
    for r in cur[:60]:
        r["gen_entropy"] = None  # requests without generated tokens
    for r in cur[60:80]:
        r["prompt_nll"] = float("nan")
    (res,) = check_windows(ref, [cur], DriftConfig())
    t = {x.name: x for x in res.tests}
    assert res.status == "ok"
    assert t["gen_entropy"].n_current == 140 and "60 non-finite current values left out" in t["gen_entropy"].note
    assert t["prompt_nll"].n_current == 180 and "20 non-finite" in t["prompt_nll"].note


def test_a_reference_too_small_to_test_anything_is_an_error():
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="fewer than min_window=50 finite values for every configured stat"):
        check_windows(_stat_rows(rng, 30), [_stat_rows(rng, 100)], DriftConfig())


def test_log_window_reuses_stored_embeddings_and_backfills_missing_ones(tmp_path):
    from monitoring.store import PredictionLog

    enc = BagOfWordsEncoder()
    index = EmbeddingIndex(enc.encode(_prompts(ORDER_WORDS, 200, 8)))
    stored = _prompts(ORDER_WORDS, 30, 9)
    fresh = _prompts(OTHER_WORDS, 20, 10)
    with PredictionLog(tmp_path / "log.sqlite") as log:
        for p in stored:
            log.log({"family": "support", "version": "2", "prompt": p, "prompt_nll": 1.0,
                     "embedding": enc.encode([p])[0] / np.linalg.norm(enc.encode([p])[0])})
        for p in fresh:
            log.log({"family": "support", "version": "2", "prompt": p, "prompt_nll": 2.0})
        log.log({"family": "support", "version": "3", "prompt": "other version", "prompt_nll": 3.0})
        enc.calls.clear()

        rows, last = log_window(log, "support", "2", index, encoder=enc)
        assert enc.calls == [fresh]  # only the rows logged without an embedding were embedded
        assert len(rows) == 50 and last == rows[-1]["id"] and {r["version"] for r in rows} == {"2"}
        assert all("embedding" not in r for r in rows)
        cos = np.array([r[EMBEDDING_STAT] for r in rows])
        expected = index.max_cosine(np.stack([enc.encode([p])[0] for p in stored + fresh]))
        np.testing.assert_allclose(cos, expected, rtol=1e-5)
        assert cos[:30].mean() > cos[30:].mean()  # the off-topic prompts are further from the index

        enc.calls.clear()
        again, _ = log_window(log, "support", "2", index, encoder=enc)
        assert enc.calls == []  # written back: nothing is embedded twice
        np.testing.assert_allclose([r[EMBEDDING_STAT] for r in again], cos, rtol=1e-6)

        newer, _ = log_window(log, "support", "2", index, after_id=last)
        assert newer == []
        no_encoder, _ = log_window(log, "support", "3", index)
        assert np.isnan(no_encoder[0][EMBEDDING_STAT])  # left out of the test, never a made-up value
        with pytest.raises(ValueError, match="needs the adapter version"):
            log_window(log, "support", "", index)
        with pytest.raises(ValueError, match="dimension"):
            log_window(log, "support", "2", EmbeddingIndex(np.eye(8, dtype=np.float32)))


def test_check_window_reuses_stored_embeddings_writes_back_the_rest_and_tests_novelty(tmp_path, monkeypatch):
    """The production monitor path (flows.monitor_check -> pipelines.monitor_jobs.check_window): prompts with a stored
    embedding are never embedded again, the missing ones once, and those are written back to the log."""
    import monitoring.report
    from monitoring.store import PredictionLog
    from pipelines.monitor_jobs import check_window

    reports = []
    monkeypatch.setattr(monitoring.report, "write_evidently_report",
                        lambda ref, cur, path, title="", decision=None: reports.append((ref, cur, path, decision))
                        or path)
    enc = BagOfWordsEncoder()
    ref_dir = tmp_path / "monitoring"
    ref_dir.mkdir()
    EmbeddingIndex(enc.encode(_prompts(ORDER_WORDS, 400, 11))).save(ref_dir / "train_index.npy")
    _write(ref_dir / "reference.jsonl", [{"prompt": p, "prompt_nll": 1.0, EMBEDDING_STAT: 0.9}
                                         for p in _prompts(ORDER_WORDS, 100, 12)])
    familiar, novel = _prompts(ORDER_WORDS, 180, 13), _prompts(OTHER_WORDS, 20, 14)
    with PredictionLog(tmp_path / "log.sqlite") as log:
        for p in familiar[:100]:
            v = enc.encode([p])[0]
            log.log({"family": "s", "version": "1", "prompt": p, "embedding": v / np.linalg.norm(v)})
        for p in familiar[100:] + novel:  # 10% of the window from another topic
            log.log({"family": "s", "version": "1", "prompt": p})
        log.flush()
        rows = log.query(family="s", version="1")
        enc.calls.clear()
        cfg = DriftConfig(stats=(EMBEDDING_STAT, NOVELTY_STAT))
        result = check_window(ref_dir, rows, cfg, enc, tmp_path / "r.html", log=log)
        assert enc.calls == [list(dict.fromkeys(familiar[100:] + novel))]
        assert all(r["embedding"] is not None for r in log.query(family="s"))  # written back
        tests = {t["name"]: t for t in result["tests"]}
        assert tests[NOVELTY_STAT]["fired"] and result["drift"]
        distinct = len(np.unique(EmbeddingIndex.load(ref_dir / "train_index.npy").embeddings, axis=0))
        assert tests[NOVELTY_STAT]["n_reference"] == distinct < 400  # the null: the index's leave-one-out novelty
        enc.calls.clear()
        again = check_window(ref_dir, log.query(family="s", version="1"), cfg, enc, tmp_path / "r.html", log=log)
        assert enc.calls == [] and again["tests"] == result["tests"]
    assert NOVELTY_STAT in reports[0][1].columns
    decision = reports[0][3]  # the report states the product's own verdict, version and window
    assert decision["status"] == result["status"] and decision["tests"] == result["tests"]
    assert decision["version"] == "1" and decision["window"]["n"] == 200
    assert decision["window"]["first_ts"] <= decision["window"]["last_ts"]


def test_report_decision_block_carries_the_verdict_version_and_window():
    from monitoring.report import decision_html

    block = decision_html({"status": "drift", "reason": "drift in embedding_novelty <b>", "version": "3",
                           "window": {"n": 200, "first_ts": 0.0, "last_ts": 3600.0, "first_id": 5, "last_id": 204},
                           "config": {"alpha": 0.01, "min_window": 50},
                           "tests": [{"name": NOVELTY_STAT, "statistic": 0.2, "p_value": 1e-6, "threshold": 0.002,
                                      "fired": True, "n_reference": 1000, "n_current": 200, "note": ""}]})
    assert "adapterops decision: drift" in block and "&lt;b&gt;" in block  # escaped
    assert "version: 3" in block and "200 requests" in block and "1970-01-01 01:00:00Z" in block
    assert "FIRED" in block and NOVELTY_STAT in block and "0.002" in block

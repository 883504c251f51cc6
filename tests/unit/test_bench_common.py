"""bench/common.py: the results JSON and the BENCHMARKS.md rendered from it; bench/run.py's discovery."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # bench/ is run from the repo root (python -m bench.run), not installed
    sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.run import available, main as run_main  # noqa: E402

MACHINE = {"cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2, "load_avg_1m": 0.5, "torch": "2.13.0",
           "transformers": "5.23.0", "peft": "0.21.2", "gpu": None}


def _result():
    return {"title": "Demo bench", "description": "What it measures.",
            "rows": [common.row("cold", [3.0, 1.0, 2.0]), common.row("hit", [0.1, 0.3, 0.2], size_mib=64)],
            "ratios": [common.ratio("hit / cold", 0.2, 2.0, "same run")], "notes": ["a note"]}


def test_row_and_ratio_use_the_median():
    r = common.row("x", [3.0, 1.0, 2.0], extra="y")
    assert (r["median_s"], r["min_s"], r["repeats"], r["extra"]) == (2.0, 1.0, 3, "y")
    assert common.ratio("a / b", 1.0, 4.0)["value"] == 0.25
    assert common.ratio("a / b", 1.0, 0.0)["value"] is None


def test_timed_counts_calls_and_runs_setup_untimed():
    calls = []
    secs = common.timed(lambda arg: calls.append(arg), 3, setup=lambda: "fresh")
    assert len(secs) == 3 and calls == ["fresh"] * 3 and all(s >= 0 for s in secs)
    with pytest.raises(ValueError, match="repeats"):
        common.timed(lambda: None, 0)


def test_write_result_round_trips_with_machine_info(tmp_path):
    path = common.write_result("demo_bench", _result(), results_dir=tmp_path, machine=MACHINE)
    assert path == tmp_path / "demo_bench.json"
    doc = json.loads(path.read_text())
    assert doc["name"] == "demo_bench" and doc["machine"] == MACHINE
    assert doc["rows"][1]["size_mib"] == 64 and doc["ratios"][0]["value"] == 0.1
    assert doc["command"] == "python -m bench.run demo_bench" and doc["created"].endswith("Z")
    assert common.load_results(tmp_path) == [doc]


def test_write_result_rejects_a_name_that_is_not_a_module_name(tmp_path):
    with pytest.raises(ValueError, match="identifier"):
        common.write_result("init-cache", _result(), results_dir=tmp_path, machine=MACHINE)


def test_markdown_has_a_section_per_result_with_tables(tmp_path):
    common.write_result("b_second", {**_result(), "title": "Second"}, results_dir=tmp_path, machine=MACHINE)
    common.write_result("a_first", _result(), results_dir=tmp_path, machine=MACHINE)
    out = common.write_benchmarks_md(tmp_path, tmp_path / "BENCHMARKS.md")
    md = out.read_text()
    assert md.startswith("# Benchmarks\n")
    assert md.index("## Demo bench") < md.index("## Second")  # sorted by file name
    assert "| case | median_s | min_s | repeats | size_mib |" in md
    assert "| hit | 0.2 | 0.1 | 3 | 64 |" in md and "| cold | 2 | 1 | 3 | - |" in md
    assert "| hit / cold | 0.1 | same run |" in md
    assert "Test CPU (2 CPUs, 2 torch threads, 1-min load 0.5), GPU: none" in md and "- a note" in md


def test_markdown_without_results_says_how_to_make_them():
    assert "python -m bench.run" in common.render_markdown([])


def test_pipes_in_cells_are_escaped():
    md = common.render_markdown([{"name": "x", "rows": [{"case": "a|b"}]}])
    assert "| a\\|b |" in md


def test_committed_benchmarks_md_is_generated_from_the_committed_results():
    results = common.load_results()
    if not results:
        pytest.skip("no bench/results yet")
    assert common.BENCHMARKS_MD.read_text() == common.render_markdown(results), (
        "BENCHMARKS.md differs from bench/results/*.json; regenerate it with "
        "`python -c 'from bench.common import write_benchmarks_md; write_benchmarks_md()'`")


def test_run_discovers_benchmark_modules_only(capsys):
    names = available()
    assert "init_cache" in names and not {"run", "common", "__init__"} & set(names)
    assert run_main(["--list"]) == 0
    assert "init_cache" in capsys.readouterr().out
    assert run_main(["no_such_bench"]) == 2

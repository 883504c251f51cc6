"""Benchmarks: each module measures a change against a baseline timed in the same run and writes
bench/results/<name>.json; BENCHMARKS.md is regenerated from all results.

Run:  python -m bench.run            (every benchmark)
      python -m bench.run init_cache (one; extra arguments go to its main())
"""

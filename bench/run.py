"""Run benchmarks and regenerate BENCHMARKS.md.

Run:  python -m bench.run                       every bench/<name>.py that defines main()
      python -m bench.run init_cache [ARGS...]  one benchmark; ARGS go to its main(argv)
      python -m bench.run --list
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

from bench.common import BENCH_DIR, write_benchmarks_md

NOT_BENCHMARKS = {"run", "common"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(BENCH_DIR)])
                  if m.name not in NOT_BENCHMARKS and not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "DO_NOT_TRACK"):
        os.environ.setdefault(var, "1")  # offline, and no progress bars in the benchmark log
    names = available()
    if argv[:1] in (["--list"], ["-l"]):
        print("\n".join(names))
        return 0
    if argv[:1] in (["--help"], ["-h"]):
        print(__doc__)
        return 0
    if argv and not argv[0].startswith("-"):
        chosen, rest = argv[0], argv[1:]
        if chosen not in names:
            print(f"error: no benchmark {chosen!r}; available: {', '.join(names)}", file=sys.stderr)
            return 2
        todo = [(chosen, rest)]
    else:
        todo = [(n, argv) for n in names]
    for name, rest in todo:
        module = importlib.import_module(f"bench.{name}")
        print(f"== bench {name}", flush=True)
        module.main(rest)
    print(f"wrote {write_benchmarks_md()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One rank of a multi-process training run: `python -m pipelines.train_worker SPEC` (started by torchrun through
pipelines.distributed.launch). It reads the run's spec, joins the process group inside pipelines.train.run and, if it
fails, records its error for the launcher's report. It lives apart from both so that the trainer imports the
launcher (pipelines.distributed) and not the other way round: no import cycle.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from pipelines import train
from pipelines.distributed import LOG_MARK, die_with_parent
from pipelines.train import HealthConfig, TrainConfig


def _config_from_dict(d: dict):
    return TrainConfig(**{**d, "health": HealthConfig(**d["health"])})


def worker_main(spec_path: str) -> None:
    """One rank of launch(): train (pipelines.train.run joins the process group), record a failure for the
    launcher."""
    import torch.distributed as dist

    die_with_parent()
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    try:
        cfg = _config_from_dict(spec["config"])
        if rank == 0:
            def log(*a):
                print(LOG_MARK + " ".join(map(str, a)), flush=True)
        else:
            def log(*a):
                print(f"rank {rank}:", *a, file=sys.stderr, flush=True)
        train.run(cfg, Path(spec["base"]), Path(spec["init_entry"]), Path(spec["train"]), Path(spec["val"]),
                  Path(spec["out"]), parent=Path(spec["parent"]) if spec["parent"] else None, log=log,
                  identity=spec.get("identity"))
    except BaseException as e:  # noqa: BLE001  (recorded for the launcher, then this rank exits)
        failures = Path(spec["failures"])
        failures.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "time": time.time(), "error": f"{type(e).__name__}: {e}".strip()[:2000],
                  "traceback": traceback.format_exc(), "health": getattr(e, "report", None)}
        (failures / f"rank-{rank}.json").write_text(json.dumps(record, default=str))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # no process-group teardown: the peers may be dead, and torchrun stops the rest
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(sys.argv[1])

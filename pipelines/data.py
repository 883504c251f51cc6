"""Customer-support data: loading, prompt formatting, deterministic splits and the before/after category shift.

The Bitext CSV (data/customer_support, CDLA-Sharing-1.0) has 11 categories. The "before" categories are what
adapter v1 is trained on and what traffic looks like at first; the "after" categories arrive later and are the
distribution shift that the drift monitors must catch.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from common import jsonl
from pipelines.config import REPO_ROOT

BITEXT_CSV = REPO_ROOT / "data" / "customer_support" / "bitext_customer_support.csv"
DIALOGUE_JSONL = REPO_ROOT / "data" / "dialogue" / "sgd_pairs_subset.jsonl"
REFERENCE_TEXT = REPO_ROOT / "data" / "corpus" / "gutenberg" / "chesterton-thursday.txt"
"""Forgetting check text: a book the base saw only in part (its held-out tail is used) and adapters never see."""

CATEGORIES_BEFORE = ("ACCOUNT", "ORDER", "SHIPPING_ADDRESS", "CANCELLATION_FEE", "CONTACT", "NEWSLETTER")
CATEGORIES_AFTER = ("REFUND", "DELIVERY", "INVOICE", "PAYMENT", "FEEDBACK")
SPLITS = ("train", "val", "test")
PROMPT_TEMPLATE = "### Customer: {instruction}\n### Agent:"


class DataError(ValueError):
    """A dataset that is missing, empty or malformed."""


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    category: str
    intent: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def format_prompt(instruction: str) -> str:
    """The one prompt format used by training, serving and monitoring."""
    return PROMPT_TEMPLATE.format(instruction=instruction.strip())


def load_bitext(path: Path = BITEXT_CSV) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"customer-support data {path} does not exist; it ships in data/customer_support/")
    required = {"instruction", "response", "category"}
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = required - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path} lacks column(s) {sorted(missing)}; expected the Bitext CSV header")
        for row in reader:
            if row["instruction"].strip() and row["response"].strip():
                out.append(Example(format_prompt(row["instruction"]), " " + row["response"].strip(),
                                   row["category"].strip(), row.get("intent", "").strip()))
    if not out:
        raise DataError(f"{path} holds no usable rows (every instruction or response is empty)")
    return out


def split_of(example: Example, val: float = 0.1, test: float = 0.1) -> str:
    """Deterministic split from a hash of the prompt: duplicates land together, so no leakage across splits."""
    h = int.from_bytes(hashlib.sha256(example.prompt.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val else "test" if h < val + test else "train"


def splits(examples: list[Example], categories: tuple[str, ...] | None = None) -> dict[str, list[Example]]:
    chosen = [e for e in examples if categories is None or e.category in categories]
    if not chosen:
        raise DataError(f"no examples in categories {categories}")
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for e in chosen:
        out[split_of(e)].append(e)
    return out


def write_jsonl(examples: list[Example] | list[dict], path: Path) -> Path:
    """The examples as a JSONL dataset, written atomically (common.jsonl.write_jsonl)."""
    return jsonl.write_jsonl(path, (e.as_dict() if isinstance(e, Example) else e for e in examples))


def _example(row) -> Example:
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
        raise ValueError("needs string fields 'prompt' and 'response'")
    return Example(row["prompt"], row["response"], row.get("category", ""), row.get("intent", ""))


def read_jsonl(path: Path) -> list[Example]:
    """Read a prompt/response dataset (common.jsonl's reader, typed); every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset {path} does not exist")
    try:
        out = jsonl.read_jsonl(path, _example)
    except jsonl.JsonlError as e:
        if e.json_error is not None:
            raise DataError(f"{path}:{e.lineno} is not valid JSON ({e.json_error}); each line must be one JSON "
                            "object") from None
        raise DataError(f"{path}:{e.lineno} {e.detail}") from None
    if not out:
        raise DataError(f"dataset {path} is empty; give it at least one {{'prompt', 'response'}} line")
    return out


def category_counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(e.category for e in examples).items()))


def sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return rng.sample(examples, min(n, len(examples)))


def load_dialogue(path: Path = DIALOGUE_JSONL, n: int | None = None, seed: int = 0) -> list[Example]:
    """SGD (user, system) turns as prompt/response pairs in the support prompt format (category = the domain).

    The demo's bad v3 is trained on these instead of support tickets: a data-pipeline mix-up (wrong dataset).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dialogue data {path} does not exist; it ships in data/dialogue/")
    try:
        rows = jsonl.read_jsonl(path, lambda r: Example(format_prompt(r["user"]), " " + r["system"].strip(),
                                                        r.get("domain", "")))
    except jsonl.JsonlError as e:
        raise DataError(f"{path}:{e.lineno} is not a {{'user', 'system'}} JSON object ({e.json_error or e.detail})"
                        ) from None
    return rows if n is None else sample(rows, n, seed)


def version_data_dir(family_dir: Path, version: str) -> Path:
    """Where the data a version was trained on is kept: <data>/<family>/versions/<version>/{train,val}.jsonl."""
    return Path(family_dir) / "versions" / str(version)


def record_version_data(family_dir: Path, version: str, train: Path, val: Path) -> Path:
    """Keep a copy of what `version` was trained and validated on (atomic writes), so that whichever version the
    canary promotes later, the next retrain replays the data of *that* champion, not of the one before it."""
    from common.atomic import copy_file

    dest = version_data_dir(family_dir, version)
    copy_file(train, dest / "train.jsonl")
    copy_file(val, dest / "val.jsonl")
    return dest


def champion_training_data(family_dir: Path, champion: str, fallback_train: Path,
                           fallback_val: Path) -> tuple[Path, Path, str]:
    """(train, val, where) of the champion's own training data: versions/<champion>/ when it was recorded there
    (by `adapterops build` or a retrain), else the given files (<data>/<family>/champion/, kept by hand)."""
    d = version_data_dir(family_dir, champion)
    if (d / "train.jsonl").is_file() and (d / "val.jsonl").is_file():
        return d / "train.jsonl", d / "val.jsonl", f"{d} (recorded with v{champion})"
    return Path(fallback_train), Path(fallback_val), f"{Path(fallback_train).parent} (v{champion} recorded none)"

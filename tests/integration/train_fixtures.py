"""Helpers shared by the training tests (test_pipelines_train, test_pipelines_methods): the tiny base, fixed
prompts, teacher-forced logits and tokenized validation rows."""

from __future__ import annotations

from pathlib import Path

BASE = Path(__file__).resolve().parents[2] / "models" / "tiny-llama"


def val_rows(val: Path, max_len: int = 64):
    """(tokenized rows of a validation JSONL, pad id), as the trainer tokenizes them."""
    from pipelines.data import read_jsonl
    from pipelines.lm import tokenize
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE)
    return tokenize(read_jsonl(val), tok, max_len), tok.pad_token_id


def prompt_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE)
    return tok(["### Customer: where is my order?\n### Agent:", "### Customer: how do I close my account\n"
                "### Agent: I"], return_tensors="pt", padding=True).input_ids


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=ids).logits

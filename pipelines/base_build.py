"""Pretrain the project's small Llama-architecture base model and its BPE tokenizer.

Run:  adapterops base build --out models/tiny-llama [--device cuda] [--steps 2000]
 or:  python -m pipelines.base_build --out models/tiny-llama   (needs only torch, transformers, tokenizers)

The base is trained on public-domain books (data/corpus) and a CC BY-SA subset of SGD dialogues
(data/dialogue), never on the Bitext customer-support data, so that fine-tuning on Bitext is a real
adaptation. The output directory loads with `AutoModelForCausalLM.from_pretrained(path)` and carries a
manifest with the corpus hashes, the config and held-out perplexity against a random-init model and a
unigram baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.atomic import write_json
from common.jsonl import read_jsonl
from pipelines.manifest import staging

REPO_ROOT = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass
class BaseBuildConfig:
    """How to pretrain the tiny base. Defaults reproduce the committed checkpoint."""

    corpus_dir: str = "data/corpus"
    """Plain-text books (public domain); every *.txt below it is used."""
    dialogue_file: str = "data/dialogue/sgd_pairs_subset.jsonl"
    """SGD (user, system) pairs for conversational English; empty string to skip."""
    vocab_size: int = 4096
    """BPE vocabulary; small keeps the embedding under a quarter of the parameters."""
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    """Grouped-query attention as in Llama 2/3, so adapters see realistic k/v shapes."""
    seq_len: int = 256
    batch_size: int = 64
    steps: int = 2000
    """Optimizer steps; the best held-out checkpoint is kept (evaluated every eval_every)."""
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    heldout_fraction: float = 0.05
    """Tail of every document kept out of training, for perplexity."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError("steps and batch_size must be >= 1 and seq_len >= 8")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_documents(cfg: BaseBuildConfig) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Return (name, text) documents and the sha256 of every source file."""
    corpus = REPO_ROOT / cfg.corpus_dir if not Path(cfg.corpus_dir).is_absolute() else Path(cfg.corpus_dir)
    files = sorted(corpus.rglob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt files under {corpus}; copy the corpus there (see data/PROVENANCE.md)")
    docs, hashes = [], {}
    for p in files:
        docs.append((p.name, p.read_text(encoding="utf-8", errors="replace")))
        hashes[str(p.relative_to(REPO_ROOT) if p.is_relative_to(REPO_ROOT) else p)] = _sha256_file(p)
    if cfg.dialogue_file:
        dpath = REPO_ROOT / cfg.dialogue_file
        lines = read_jsonl(dpath, lambda row: f"User: {row['user']}\nAssistant: {row['system']}\n")
        docs.append((dpath.name, "\n".join(lines)))
        hashes[cfg.dialogue_file] = _sha256_file(dpath)
    return docs, hashes


def split_documents(docs: list[tuple[str, str]], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the tail of each document: contiguous, so held-out text is unseen prose, not shuffled lines."""
    train, held = [], []
    for _, text in docs:
        cut = int(len(text) * (1 - fraction))
        cut = text.rfind("\n", 0, cut) + 1 or cut
        train.append(text[:cut])
        held.append(text[cut:])
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def encode_stream(tokenizer, texts: list[str]):
    import torch

    ids: list[int] = []
    for t in texts:
        for para in t.split("\n\n"):
            if para.strip():
                ids.extend(tokenizer(para + "\n\n", add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def make_model(cfg: BaseBuildConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(512, cfg.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def heldout_nll(model, stream, seq_len: int, device, max_windows: int = 400) -> float:
    """Mean per-token NLL over non-overlapping windows of the held-out stream."""
    import torch

    model.eval()
    n = min((len(stream) - 1) // seq_len, max_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 16):
            rows = [stream[j * seq_len : (j + 1) * seq_len + 1] for j in range(i, min(i + 16, n))]
            batch = torch.stack(rows).to(device)
            logits = model(input_ids=batch[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += batch[:, 1:].numel()
    model.train()
    return total / max(count, 1)


def unigram_nll(train_stream, held_stream, vocab_size: int) -> float:
    """Held-out NLL of an add-one smoothed unigram model fitted on the training tokens."""
    import torch

    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[held_stream].mean())


def lr_schedule(cfg: BaseBuildConfig):
    """Linear warm-up to cfg.lr, then cosine decay to 10% of it."""
    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def pretrain(model, cfg: BaseBuildConfig, train_stream, held_stream, device: str, log=print) -> dict:
    """AdamW on random windows of the training stream; the held-out NLL every eval_every steps. Returns
    {"best_nll", "best_state" (CPU copy of the best weights), "best_step", "curve"}."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    lr_at = lr_schedule(cfg)
    use_bf16 = device.startswith("cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    best_nll, best_state, best_step, curve = float("inf"), None, 0, []
    model.train()
    for step in range(cfg.steps):
        starts = torch.randint(0, len(train_stream) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_stream[s : s + cfg.seq_len + 1] for s in starts.tolist()]).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise RuntimeError(f"pretraining loss became {loss.item()} at step {step}; lower --lr and rebuild")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            nll = heldout_nll(model, held_stream, cfg.seq_len, device)
            curve.append({"step": step + 1, "train_loss": round(loss.item(), 4), "heldout_nll": round(nll, 4)})
            log(f"step {step + 1}/{cfg.steps} train loss {loss.item():.3f} held-out ppl {math.exp(nll):.2f}")
            if nll < best_nll:
                best_nll, best_step = nll, step + 1
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {"best_nll": best_nll, "best_state": best_state, "best_step": best_step, "curve": curve}


def build(cfg: BaseBuildConfig, out: Path, device: str = "auto", log=print) -> dict:
    """Pretrain and write `out` (model, tokenizer, manifest.json). Returns the manifest."""
    import torch
    import transformers

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    docs, hashes = load_documents(cfg)
    train_texts, held_texts = split_documents(docs, cfg.heldout_fraction)
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_stream = encode_stream(tokenizer, train_texts)
    held_stream = encode_stream(tokenizer, held_texts)
    log(f"tokenizer: {len(tokenizer)} tokens; train {len(train_stream):,} tokens, held-out {len(held_stream):,}")

    model = make_model(cfg, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    random_nll = heldout_nll(model, held_stream, cfg.seq_len, device)
    log(f"model: {n_params:,} parameters on {device}; random-init held-out ppl {math.exp(random_nll):.1f}")
    best = pretrain(model, cfg, train_stream, held_stream, device, log)

    model.load_state_dict(best["best_state"])
    model = model.to("cpu").float()
    with staging(Path(out)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "kind": "base_model",
            "architecture": "LlamaForCausalLM",
            "config": asdict(cfg),
            "parameters": n_params,
            "corpus_sha256": hashes,
            "tokens": {"train": len(train_stream), "heldout": len(held_stream)},
            "heldout_perplexity": {
                "pretrained": round(math.exp(best["best_nll"]), 3),
                "random_init": round(math.exp(random_nll), 3),
                "unigram": round(math.exp(unigram_nll(train_stream, held_stream, len(tokenizer))), 3),
            },
            "best_step": best["best_step"],
            "curve": best["curve"],
            "built_on": {
                "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "seconds": round(time.time() - t0, 1),
            },
        }
        write_json(tmp / "manifest.json", manifest)
    log(f"wrote {out}: held-out ppl {manifest['heldout_perplexity']}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="adapterops base build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output directory for model + tokenizer + manifest")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    for name, f in BaseBuildConfig.__dataclass_fields__.items():
        if f.type in ("int", "float", "str"):
            p.add_argument(f"--{name.replace('_', '-')}", type={"int": int, "float": float, "str": str}[f.type], default=None)
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("out", "device") and v is not None}
    cfg = BaseBuildConfig(**overrides)
    build(cfg, args.out, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

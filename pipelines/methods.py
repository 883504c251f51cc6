"""The training methods: one entry per method, read by the init cache (PEFT config, residual, nf4), training
(default learning rate and warm-up, fast forward, export) and the CLI (its --method choices).

Adding a method is one `Method(...)` in METHODS; nothing else compares method names. LoRA+ is not a method: it is
TrainConfig.loraplus_lr_ratio on top of any of these.

Run:  python -c "from pipelines import methods; print(list(methods.METHODS), methods.QUANT_ALIASES)"
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def export_copy(model, out: Path, init_entry: Path) -> None:
    """The adapter as trained already applies to the plain base: adapter/ is a copy of adapter_native/."""
    shutil.copytree(out / "adapter_native", out / "adapter")


def export_as_plain_lora(model, out: Path, init_entry: Path) -> None:
    """A residual-base adapter (PiSSA) exported as plain LoRA against the ORIGINAL base (rank 2r): PEFT's conversion
    from the entry's initial adapter, so PEFT, vLLM and our engines load it on the plain base."""
    with tempfile.TemporaryDirectory() as scratch:
        init_copy = Path(scratch) / "pissa_init"
        shutil.copytree(Path(init_entry) / "initial_adapter", init_copy)  # PEFT rewrites its config
        model.save_pretrained(out / "adapter", path_initial_model_for_weight_conversion=str(init_copy))


def fast_dora(model) -> None:
    """DoRA's forward from pipelines.fast_dora (same function and gradients as PEFT's, less time and memory)."""
    from pipelines import fast_dora as fd

    fd.enable(model)


@dataclass(frozen=True)
class Method:
    """What makes a training method, for every stage that needs to know."""

    name: str
    lr: float
    """Default learning rate (TrainConfig.lr null; divided by 4 under LoRA+)."""
    warmup: float
    """Default warm-up, a fraction of the steps (TrainConfig.warmup_ratio null)."""
    peft: dict = field(default_factory=dict)
    """LoraConfig keyword arguments that select the method (use_rslora, use_dora)."""
    residual_init: str | None = None
    """PEFT's init_lora_weights for an init that moves the top-r directions of each weight into the adapter and
    leaves a residual base (PiSSA: "pissa"; with svd_niter N, "pissa_niter_N"). The init-cache entry then stores the
    residual, the adapter starts non-zero, and the base under a disabled adapter is the residual, not the base.
    None: PEFT's default init (B = 0, the adapter starts as a no-op on the plain base)."""
    nf4_alias: str | None = None
    """The name users know for this method on an nf4 base (qlora, qpissa), accepted as a method name."""
    nf4_refused: str = ""
    """Why the method cannot train on an nf4 base (its init would depend on the base's quantization); empty: it can."""
    fast_forward: Callable | None = None
    """A faster forward with the same function and gradients, used unless TrainConfig.fast_dora is false."""
    export: Callable = export_copy
    """Writes out/adapter (deployable on the original base) from the trained model and out/adapter_native."""

    @property
    def residual(self) -> bool:
        return self.residual_init is not None

    @property
    def nf4(self) -> bool:
        return not self.nf4_refused

    def init_lora_weights(self, svd_niter: int | None) -> str | bool:
        if self.residual_init is None:
            return True
        return self.residual_init if svd_niter is None else f"{self.residual_init}_niter_{svd_niter}"


# PiSSA starts from the principal components (large, non-zero A and B), so full LoRA learning rates overshoot; it gets a
# lower rate and a longer warm-up. rsLoRA scales by alpha/sqrt(r) (larger than alpha/r), so it gets a lower rate too.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", lr=2e-3, warmup=0.05, nf4_alias="qlora"),
    Method("rslora", lr=1e-3, warmup=0.05, peft={"use_rslora": True}),
    Method("dora", lr=2e-3, warmup=0.05, peft={"use_dora": True}, fast_forward=fast_dora,
           nf4_refused="its magnitudes would be initialised from the fp32 weights, not the quantized ones it trains "
                       "on"),
    Method("pissa", lr=1e-3, warmup=0.1, residual_init="pissa", nf4_alias="qpissa", export=export_as_plain_lora),
)}
QUANT_ALIASES = {m.nf4_alias: m.name for m in METHODS.values() if m.nf4_alias}
"""Method names users know, accepted on input and stored as (method, base_quant="nf4")."""
CHOICES = (*METHODS, *QUANT_ALIASES)
"""Every name a user may pass as a method (the CLI's --method choices)."""


def get(name: str) -> Method:
    """The method called `name` (not an alias: InitConfig resolves those), with the choices when there is none."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method {name!r} is not one of {', '.join(METHODS)} (or {', '.join(QUANT_ALIASES)}: "
                         f"{' / '.join(QUANT_ALIASES.values())} on an nf4 base)") from None

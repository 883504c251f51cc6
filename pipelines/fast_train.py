"""The trainer's CUDA fast path: Liger kernels, per-layer torch.compile, varlen attention over packed rows.

Used by pipelines.train (TrainConfig.fast_kernels / compile / attention) and bench/train_throughput.py. Each part is
optional and falls back to the plain path with one log line when it cannot run (no CUDA device, the package missing,
an old torch, a model it does not know); nothing here is needed on the CPU, and nothing here imports mlflow, prefect
or bitsandbytes.

- Liger kernels (`liger-kernel`, pure Triton; the optional extra `gpu`): RoPE, RMSNorm and SwiGLU patched into the
  model instance, and the output layer + cross-entropy fused (`fused_loss`: the vocabulary-sized logits of the loss
  positions are never materialised in full; Liger's Triton cross-entropy kernel in our own chunk loop, which needs
  no device-to-host sync, where Liger's own loss has two per step).
- Attention over packed rows. transformers keeps packed examples apart by turning the restarting position ids into
  a block-diagonal mask: with sdpa that is a dense [rows, 1, S, S] boolean mask and a masked kernel (no flash
  attention). "varlen" instead flattens the rows and calls flash attention's variable-length form
  (torch.nn.attention.varlen, torch >= 2.9) with cumulative sequence lengths taken from the position ids: no mask
  at all and no work across example boundaries. "flex" is transformers' flex-attention path (block-sparse mask).
  On a device without flash attention (the CPU) "varlen" runs each example through sdpa, so the same code is tested
  there.
- torch.compile of each decoder layer (regional compilation: one graph, reused by every layer, no graph break from
  the loss's data-dependent indexing). Under compile, Liger's in-layer kernels (RoPE, RMSNorm, SwiGLU) are left out
  by default (`liger_layers="auto"`): Inductor fuses the same math with its neighbours (the residual adds, the LoRA
  adds) and Liger's autograd Functions would break the graph; they are used when the layers are not compiled.
- Fused LoRA linears (`fuse_lora`): each plain LoRA layer (one active adapter, no dropout, nn.Linear base) runs as
  one custom op with its own backward: y = x W^T, then y += s (x A^T) B^T in place inside the matmul (addmm_, no
  separate [tokens, out] temporary and add), and in the backward dx = g W + (s g B) A likewise accumulated in place.
  Same function and gradients as PEFT's forward (tested on the CPU in fp32).
- Liger's patching functions also replace module-level names of the model's modeling file (apply_rotary_pos_emb,
  LlamaRMSNorm, LlamaMLP): every model built later in the process would get them, on the CPU too. Those names are
  restored right after patching; RoPE goes to this instance's attention modules only.
"""

from __future__ import annotations

import inspect
import sys
import types
from dataclasses import dataclass, field

VARLEN = "adapterops_varlen"
ATTENTION = ("auto", "varlen", "flex", "sdpa")
SWITCH = ("auto", "on", "off")


@dataclass
class FastPath:
    """What the fast path turned on for one model; `notes` holds the reason for each part left off."""

    device: str = "cpu"
    liger: bool = False
    fused_loss: bool = False
    fused_lora: int = 0
    compiled: bool = False
    attention: str = "sdpa"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        on = [name for name, v in (("liger kernels in layers", self.liger), ("fused output+loss", self.fused_loss),
                                   (f"fused LoRA linears ({self.fused_lora})", self.fused_lora),
                                   ("torch.compile per layer", self.compiled)) if v]
        on.append(f"attention={self.attention}")
        off = f"; off: {'; '.join(self.notes)}" if self.notes else ""
        return f"fast path on {self.device}: {', '.join(on)}{off}"


def _lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def liger_available() -> str | None:
    """None when liger-kernel imports, else why not."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # ImportError, or a Triton/torch mismatch raising at import
        return f"liger-kernel not importable ({type(e).__name__}: {e}); install the extra: pip install '.[gpu]'"
    return None


def varlen_available() -> str | None:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception as e:
        return f"torch has no varlen attention ({type(e).__name__})"
    return None


def cu_seqlens(position_ids):
    """Cumulative sequence starts (int32, [n+1]) of the packed rows: a sequence starts wherever a position id is 0
    (every row starts one), and the flattened rows end at rows * width."""
    import torch

    flat = position_ids.reshape(-1)
    if flat.device.type == "cpu":  # the trainer's collation (a step's critical path): numpy's nonzero, ~50x faster
        import numpy as np

        starts = np.flatnonzero(flat.numpy() == 0)
        return torch.from_numpy(np.append(starts, flat.numel()).astype(np.int32))
    starts = torch.nonzero(flat == 0).flatten()
    end = torch.tensor([flat.numel()], device=flat.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def max_seqlen_bucket(cu, width: int, step: int = 128) -> int:
    """The longest sequence of cumulative bounds `cu` (a CPU tensor), rounded up to `step` and capped at `width`:
    flash attention's varlen grid is sized by it (a block per `step` query tokens of every sequence), so the row
    width (1024) instead of the real longest example (~500) launches twice the blocks, most of them empty. Rounding
    keeps the compiled layers to a few distinct values."""
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else width
    return min(width, -(-longest // step) * step)


_VARLEN: dict = {}


def _varlen_kernel():
    """(kernel, fixed keyword arguments): resolved once, outside any compiled graph (inspect would break it)."""
    if not _VARLEN:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        _VARLEN.update(kernel=varlen_attn, gqa="enable_gqa" in params, causal="is_causal" in params,
                       scale="scale" in params)
    return _VARLEN


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             cu_seq_lens_q=None, max_length_q=None, position_ids=None, **kwargs):
    """transformers attention function: query [B, H, S, D], key/value [B, Hkv, S, D] -> ([B, S, H, D], None).

    Causal within each packed example, nothing across examples. `cu_seq_lens_q` (from cu_seqlens) is computed once
    per batch by the caller; without it, from `position_ids` here."""
    import torch

    b, h, s, d = query.shape
    hkv = key.shape[1]
    if dropout:
        raise ValueError("varlen attention in the fast path does not do attention dropout")
    if cu_seq_lens_q is None:
        if position_ids is None or position_ids.shape[0] != b:  # one unpacked (right-padded) sequence per row
            position_ids = torch.arange(s, device=query.device).expand(b, s)
        cu_seq_lens_q = cu_seqlens(position_ids)
    q = query.transpose(1, 2).reshape(b * s, h, d)
    k = key.transpose(1, 2).reshape(b * s, hkv, d)
    v = value.transpose(1, 2).reshape(b * s, hkv, d)
    if query.is_cuda and _VARLEN:
        cfg = _VARLEN
        extra = {}
        if hkv != h:
            if cfg["gqa"]:
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(h // hkv, dim=1)
                v = v.repeat_interleave(h // hkv, dim=1)
        if cfg["causal"]:
            extra["is_causal"] = True
        else:
            extra["window_size"] = (-1, 0)
        if scaling is not None and cfg["scale"]:
            extra["scale"] = scaling
        # max_length: the longest packed example (bucketed, see max_seqlen_bucket), else the row width
        m = max_length_q if max_length_q is not None else s
        out = cfg["kernel"](q, k, v, cu_seq_lens_q, cu_seq_lens_q, m, m, **extra)
    else:  # reference path (CPU): each example through sdpa, causal
        out = torch.empty_like(q)
        bounds = cu_seq_lens_q.tolist()
        for a, z in zip(bounds[:-1], bounds[1:]):
            qi = q[a:z].transpose(0, 1)
            ki = k[a:z].transpose(0, 1).repeat_interleave(h // hkv, dim=0)
            vi = v[a:z].transpose(0, 1).repeat_interleave(h // hkv, dim=0)
            out[a:z] = torch.nn.functional.scaled_dot_product_attention(
                qi, ki, vi, is_causal=True, scale=scaling).transpose(0, 1)
    return out.reshape(b, s, h, d), None


def register_varlen() -> None:
    """Make VARLEN a transformers attention implementation (no mask: the sequence bounds come from position ids)."""
    from transformers import AttentionInterface

    if varlen_available() is None:
        _varlen_kernel()
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(VARLEN, lambda *args, **kwargs: None)
    except Exception:  # older transformers: custom implementations get no mask anyway
        pass


def set_attention(model, attention: str) -> None:
    """Switch a (PEFT-wrapped) transformers model's attention implementation: varlen | flex | sdpa."""
    impl = {"varlen": VARLEN, "flex": "flex_attention", "sdpa": "sdpa"}[attention]
    if attention == "varlen":
        register_varlen()
    lm = _lm(model)
    configs = [lm.config] + [getattr(lm.config, k) for k in ("text_config",) if hasattr(lm.config, k)]
    for c in configs:
        c._attn_implementation = impl


def _with_globals(fn, overrides: dict):
    """A copy of function `fn` that reads `overrides` in place of its module's globals of the same names."""
    g = dict(fn.__globals__)
    g.update(overrides)
    new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


def apply_liger(model) -> str | None:
    """Patch Liger's RoPE, RMSNorm and SwiGLU into this model instance only; None on success, else why not.

    Liger's own patching also rebinds names in the model's modeling module (the RoPE function, the RMSNorm and MLP
    classes), which every model built later in the process would pick up (a CPU model then runs Triton kernels):
    those names are put back at once, and RoPE is bound to this instance's attention modules instead."""
    why = liger_available()
    if why:
        return why
    lm = _lm(model)
    modeling = sys.modules.get(type(lm).__module__)
    before = dict(vars(modeling)) if modeling is not None else {}
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=lm, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as e:
        return f"liger kernels not applied ({type(e).__name__}: {e})"
    finally:
        changed = {}
        if modeling is not None:
            for name, value in list(vars(modeling).items()):
                if name in before and before[name] is not value:
                    changed[name] = value
                    setattr(modeling, name, before[name])
    rope = changed.get("apply_rotary_pos_emb")
    if rope is not None:
        for module in lm.modules():
            fwd = getattr(type(module), "forward", None)
            code = getattr(fwd, "__code__", None)
            if code is not None and "apply_rotary_pos_emb" in code.co_names and fwd.__globals__ is vars(modeling):
                module.forward = types.MethodType(_with_globals(fwd, {"apply_rotary_pos_emb": rope}), module)
    return None


_LORA_OPS: dict = {}


def _lora_function():
    """The fused LoRA linear as two custom ops (forward, backward) with autograd: opaque to torch.compile, so their
    in-place accumulation (addmm_ into the output the first matmul wrote) stays in place. Written as a plain autograd
    Function, Inductor turned each addmm into a device copy of the output plus an addmm (as many bytes moved as
    PEFT's separate add). Returns an object whose .apply(x, weight, bias, A, B, scaling) is the layer's output."""
    if _LORA_OPS:
        return _LORA_OPS["fn"]
    import torch

    # explicit schemas: this module's `from __future__ import annotations` leaves the hints as strings
    @torch.library.custom_op("adapterops::lora_linear", mutates_args=(),
                             schema="(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scaling)"
                                    " -> (Tensor, Tensor)")
    def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                    B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, in] -> (y = x W^T (+ b) + s (x A^T) B^T [T, out], u = x A^T [T, r])."""
        u = torch.mm(x, A.t())
        y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        y.addmm_(u, B.t(), alpha=scaling)
        return y, u

    @lora_linear.register_fake
    def _(x, weight, bias, A, B, scaling):
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], A.shape[0])

    @torch.library.custom_op("adapterops::lora_linear_backward", mutates_args=(),
                             schema="(Tensor g, Tensor x, Tensor u, Tensor weight, Tensor A, Tensor B, float scaling,"
                                    " bool need_dx) -> (Tensor, Tensor, Tensor)")
    def lora_linear_backward(g: torch.Tensor, x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                             A: torch.Tensor, B: torch.Tensor, scaling: float,
                             need_dx: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx = g W + (s g B) A [T, in] or empty, dA = (s g B)^T x, dB = s g^T u)."""
        gu = torch.mm(g, B).mul_(scaling)
        grad_B = torch.mm(g.t(), u).mul_(scaling)
        grad_A = torch.mm(gu.t(), x)
        if need_dx:
            dx = torch.mm(g, weight)
            dx.addmm_(gu, A)
        else:
            dx = g.new_empty(0)
        return dx, grad_A, grad_B

    @lora_linear_backward.register_fake
    def _(g, x, u, weight, A, B, scaling, need_dx):
        dx = g.new_empty(g.shape[0], weight.shape[1]) if need_dx else g.new_empty(0)
        return dx, A.new_empty(A.shape), B.new_empty(B.shape)

    def setup_context(ctx, inputs, output):
        x, weight, bias, A, B, scaling = inputs
        ctx.save_for_backward(x, output[1], weight, A, B)
        ctx.scaling = scaling
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_y, grad_u):
        x, u, weight, A, B = ctx.saved_tensors
        need_dx = bool(ctx.needs_input_grad[0])
        dx, grad_A, grad_B = lora_linear_backward(grad_y.contiguous(), x, u, weight, A, B, ctx.scaling, need_dx)
        return (dx if need_dx else None), None, None, grad_A, grad_B, None

    lora_linear.register_autograd(backward, setup_context=setup_context)

    class LoraLinear:
        """y = x W^T (+ b) + s (x A^T) B^T for x [..., in]; W (and b) frozen."""

        @staticmethod
        def apply(x, weight, bias, A, B, scaling: float):
            y, _ = lora_linear(x.reshape(-1, x.shape[-1]), weight, bias, A, B, scaling)
            return y.view(*x.shape[:-1], y.shape[-1])

    _LORA_OPS["fn"] = LoraLinear
    return LoraLinear


def _fused_lora_forward(self, x, *args, **kwargs):
    """PEFT LoRA Linear forward through LoraLinear when it is the plain case (one active adapter, no DoRA, no
    dropout in training, not merged, frozen nn.Linear base); anything else goes to PEFT's forward."""
    import torch

    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
        return self._fused_lora_peft_forward(x, *args, **kwargs)
    name = active[0]
    dropout = self.lora_dropout[name] if name in self.lora_dropout else None
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {})
            or not (isinstance(dropout, torch.nn.Identity) or not self.training)):
        return self._fused_lora_peft_forward(x, *args, **kwargs)
    base = self.base_layer
    w = base.weight
    dt = w.dtype  # the frozen weight's dtype is the compute dtype (bf16 under the trainer's autocast)
    A = self.lora_A[name].weight.to(dt)
    B = self.lora_B[name].weight.to(dt)
    bias = base.bias.to(dt) if base.bias is not None else None
    return self._fused_lora_fn.apply(x.to(dt), w, bias, A, B, float(self.scaling[name]))


def fuse_lora(model) -> int:
    """Route every plain LoRA Linear of a PEFT model through the fused Function (see module doc); returns how many.
    Layers whose base is not a plain frozen nn.Linear (quantized, fan_in_fan_out, trainable base) keep PEFT's."""
    import torch

    fn, n = _lora_function(), 0
    for module in model.modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")) or hasattr(module, "_fused_lora_fn"):
            continue
        base = module.get_base_layer()
        if (type(base) is not torch.nn.Linear or getattr(module, "fan_in_fan_out", False)
                or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)):
            continue
        if getattr(module, "lora_magnitude_vector", None) and len(module.lora_magnitude_vector):
            continue  # DoRA: pipelines.fast_dora's forward
        module._fused_lora_fn = fn
        module._fused_lora_peft_forward = module.forward
        module.forward = types.MethodType(_fused_lora_forward, module)
        n += 1
    return n


def decoder_layers(model):
    lm = _lm(model)
    decoder = getattr(lm, "model", None) or getattr(lm, "base_model", None)
    return getattr(decoder, "layers", None)


def compile_layers(model) -> str | None:
    """torch.compile each decoder layer in place (module names, state dicts and PEFT saving are unchanged)."""
    layers = decoder_layers(model)
    if layers is None:
        return "no decoder layers found to compile"
    try:
        for layer in layers:
            layer.compile()
    except Exception as e:
        return f"torch.compile failed ({type(e).__name__}: {e})"
    return None


def enable(model, device: str, *, fast_kernels: str = "auto", compile: str = "auto", attention: str = "auto",
           precision: str = "bf16", liger_layers: str = "auto", log=print) -> FastPath:
    """Turn on what can run; never raises for a part that cannot (it stays plain, with a note). "on" asks for a
    part even where auto would not (still only on CUDA: the kernels and compile are for the GPU). liger_layers:
    Liger's RoPE/RMSNorm/SwiGLU inside the decoder layers; auto = only when the layers are not compiled."""
    for name, value, allowed in (("fast_kernels", fast_kernels, SWITCH), ("compile", compile, SWITCH),
                                 ("attention", attention, ATTENTION), ("liger_layers", liger_layers, SWITCH)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    fp = FastPath(device=device)
    cuda = str(device).startswith("cuda")
    if fast_kernels != "off":
        if not cuda:
            fp.notes.append("liger kernels: not a CUDA device")
        else:
            why = liger_available()
            in_layers = liger_layers == "on" or (liger_layers == "auto" and compile == "off")
            if not why and in_layers:
                why = apply_liger(model)
            if why:
                fp.notes.append(why)
            else:
                fp.fused_loss = True
                fp.liger = in_layers
            fp.fused_lora = fuse_lora(model)
    if attention == "auto":
        attention = ("varlen" if varlen_available() is None else "flex") if cuda and precision == "bf16" else "sdpa"
    if attention == "varlen" and cuda and precision != "bf16":
        fp.notes.append("varlen attention: flash attention needs bf16 (precision is fp32); sdpa instead")
        attention = "sdpa"
    if attention == "varlen" and cuda and varlen_available():
        fp.notes.append(f"varlen attention: {varlen_available()}; flex attention instead")
        attention = "flex"
    if attention != "sdpa":
        try:
            set_attention(model, attention)
            fp.attention = attention
        except Exception as e:
            fp.notes.append(f"{attention} attention not set ({type(e).__name__}: {e}); sdpa")
    if compile != "off":
        if not cuda:
            fp.notes.append("torch.compile: not a CUDA device")
        else:
            import torch

            # a layer's graphs: input with / without grad (the first layer's input is the frozen embedding's output),
            # training / evaluation, a few sequence bounds; the default limit (8) would send some of them to eager
            dyn = torch._dynamo.config
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(dyn, knob):
                    setattr(dyn, knob, max(getattr(dyn, knob), 32))
                    break
            why = compile_layers(model)
            if why:
                fp.notes.append(why)
            else:
                fp.compiled = True
    model._adapterops_fast = fp
    log(f"train: {fp.describe()}")
    return fp


def state(model) -> FastPath | None:
    return getattr(model, "_adapterops_fast", None)


_HEAD_CE: dict = {}
HEAD_LOSS = "nosync"
"""fused_head_loss's implementation: "nosync" (ours, below) or "liger" (LigerFusedLinearCrossEntropyLoss: two
host syncs per step); bench/train_throughput.py measures both."""
HEAD_CHUNK_BYTES = 512 * 2**20
"""Transient logits per chunk of the head loss (bf16 [rows, vocab]): 8192 rows of a 32k vocabulary."""


def _head_ce_function():
    """Output layer + cross-entropy (sum over the rows), chunked, with no device-to-host sync.

    Liger's LigerFusedLinearCrossEntropyLoss reads the count of non-ignored targets with .item() in its forward and
    tests grad_output with torch.equal in its backward: two waits per step for the device to drain (the CPU stops
    queueing work while it waits). A sum needs neither count. Same math as Liger's (its own Triton cross-entropy
    kernel per chunk of rows: loss and the logits' gradient in place, then grad_hidden = grad_logits @ W, all in the
    forward); the backward only scales the stored gradient by grad_output on the device. Frozen head only (LoRA
    never trains it): a trainable head gets Liger's Function."""
    if _HEAD_CE:
        return _HEAD_CE["fn"]
    import torch
    import triton
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

    class HeadCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, target):
            n, v = hidden.shape[0], weight.shape[0]
            loss = torch.zeros(n, dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            if n:
                chunk = max(1, min(n, HEAD_CHUNK_BYTES // (v * hidden.element_size())))
                buf = torch.empty((chunk, v), dtype=hidden.dtype, device=hidden.device)
                block = min(32768, triton.next_power_of_2(v))
                with torch.autocast(hidden.device.type, enabled=False):
                    for a in range(0, n, chunk):
                        z = min(n, a + chunk)
                        logits = buf[: z - a]
                        torch.mm(hidden[a:z], weight.t(), out=logits)
                        if bias is not None:
                            logits.add_(bias)
                        lo = loss[a:z]
                        liger_cross_entropy_kernel[(z - a,)](
                            X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=target[a:z], Y_stride=1,
                            weight_ptr=None, loss_ptr=lo, z_loss_ptr=None, loss_stride=lo.stride(-1),
                            token_accuracy_ptr=None, token_accuracy_stride=0, predicted_tokens_ptr=None,
                            predicted_tokens_stride=0, n_cols=v, n_non_ignore=1, sum_non_ignore_weight=1,
                            weight_sum=0.0, ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0,
                            reduction="sum", softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False,
                            RETURN_PREDICTED_TOKENS=False, BLOCK_SIZE=block, HAS_WEIGHT=False,
                            HAS_SOFTCAPPING=False, HAS_GRADIENTS=grad is not None, num_warps=32)
                        if grad is not None:
                            torch.mm(logits, weight, out=grad[a:z])  # logits now hold d loss / d logits
            ctx.save_for_backward(grad)
            return loss.sum()

        @staticmethod
        def backward(ctx, grad_out):
            (grad,) = ctx.saved_tensors
            return grad * grad_out.to(grad.dtype), None, None, None

    _HEAD_CE["fn"] = HeadCrossEntropy
    return HeadCrossEntropy


def fused_head_loss(head, hidden, target):
    """Sum of cross-entropy of head(hidden) against target (-100: ignored), fused: chunks of logits, never all at
    once, and no device-to-host sync (see _head_ce_function); a trainable head goes through Liger's loss."""
    import torch

    weight = head.weight
    bias = getattr(head, "bias", None)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if (HEAD_LOSS == "liger" or weight.requires_grad or (bias is not None and bias.requires_grad)
            or not hidden.is_cuda):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, target, bias)
    else:
        loss = _head_ce_function().apply(hidden.contiguous(), weight, bias, target.contiguous())
    return loss.float() if loss.dtype != torch.float32 else loss


def rows_that_fit(step, rows_probe: tuple[int, int] = (1, 2), budget_frac: float = 0.85,
                  cap: int = 256) -> dict:
    """Micro-batch rows that fit in this GPU's memory: run step(rows) at two small sizes, take the peak memory's
    growth per row, and fill `budget_frac` of the card (what is already allocated counts). `step(rows)` must run a
    full forward + backward + optimizer step at that many rows. Returns rows, per-row GiB and the probe's peaks."""
    import torch

    peaks = []
    for r in rows_probe:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step(r)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
    per_row = max((peaks[1] - peaks[0]) / (rows_probe[1] - rows_probe[0]), 1.0)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fixed = peaks[0] - per_row * rows_probe[0]
    rows = int((budget_frac * total - fixed) // per_row)
    return {"rows": max(1, min(cap, rows)), "per_row_gib": round(per_row / 2**30, 4),
            "fixed_gib": round(fixed / 2**30, 3), "probe_peaks_gib": [round(p / 2**30, 3) for p in peaks]}

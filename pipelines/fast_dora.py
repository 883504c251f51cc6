"""A faster DoRA forward for training: the same function and gradients as PEFT's, fewer and smaller tensors.

Used by pipelines.train for DoRA adapters (TrainConfig.fast_dora). PEFT's DoraLinearLayer.forward, per layer and
step, builds the dense B @ A by pushing an identity matrix through the adapter, adds it to W, takes row norms, then
combines base and adapter outputs in several elementwise ops whose results are promoted to fp32 under bf16 autocast
(the magnitude is fp32) and kept for the backward pass. Here:
- the row norms ||W + s B A|| come from ||W||^2 (computed once: W is frozen) + 2 s <W A^T, B> + s^2 <B (A A^T), B>,
  all O(out * r) after one W @ A^T, with no out x in temporary; like PEFT, the norm is a constant for the gradient
  (DoRA paper, section 4.3);
- on a bias-free base layer (every Llama projection) the whole layer's output (m/n) * (y + s l) is one autograd
  Function that keeps only that output for the magnitude's gradient (grad_m = sum(g * out) / m): the next op (RoPE,
  SwiGLU, attention) keeps the same tensor anyway, so DoRA adds no activation memory there; with a bias, the extra
  term (m/n - 1) * y + (m/n) * s * l is one Function that keeps z = y + s l;
- ||W||^2 is computed once when enabled (and again only if W changes outside torch.compile), so compiled layers see
  no data-dependent checks.
Plain, unquantized nn.Linear base layers only; other layers keep PEFT's forward.
"""

from __future__ import annotations

import types


def _combine():
    import torch

    class DoraCombine(torch.autograd.Function):
        """extra = (m / n - 1) * y + (m / n) * s * l, with y the base output (no bias), l = B A x, n constant."""

        @staticmethod
        def forward(ctx, y, lora, magnitude, norm, scaling: float):
            scale = magnitude / norm  # fp32 [out]
            z = y + lora * scaling if lora.dtype == y.dtype else y + (lora * scaling).to(y.dtype)
            ctx.save_for_backward(z, scale, norm)
            ctx.scaling = scaling
            return z * scale.to(z.dtype) - y

        @staticmethod
        def backward(ctx, g):
            z, scale, norm = ctx.saved_tensors
            sc = scale.to(g.dtype)
            grad_y = g * (sc - 1)
            grad_lora = g * (sc * ctx.scaling)
            dims = tuple(range(g.dim() - 1))
            grad_m = torch.sum(g * z, dim=dims, dtype=torch.float32) / norm
            return grad_y, grad_lora, grad_m.to(scale.dtype), None, None

    class DoraOut(torch.autograd.Function):
        """out = (m / n) * (y + s * l), the whole DoRA layer output of a bias-free base (y = W x); n constant."""

        @staticmethod
        def forward(ctx, y, lora, magnitude, norm, scaling: float):
            scale = magnitude / norm  # fp32 [out]
            z = y + lora * scaling if lora.dtype == y.dtype else y + (lora * scaling).to(y.dtype)
            out = z * scale.to(z.dtype)
            ctx.save_for_backward(out, scale, magnitude)
            ctx.scaling = scaling
            return out

        @staticmethod
        def backward(ctx, g):
            out, scale, magnitude = ctx.saved_tensors
            sc = scale.to(g.dtype)
            grad_y = g * sc
            grad_lora = g * (sc * ctx.scaling)
            dims = tuple(range(g.dim() - 1))
            # sum(g * z) / n = sum(g * out) / (scale * n) = sum(g * out) / m
            m = torch.where(magnitude.abs() < 1e-12, torch.full_like(magnitude, 1e-12), magnitude)
            grad_m = torch.sum(g * out, dim=dims, dtype=torch.float32) / m.float()
            return grad_y, grad_lora, grad_m.to(magnitude.dtype), None, None

    return DoraCombine, DoraOut


def weight_norm(layer, W, A, B, scaling: float):
    """Row norms of W + s B A (fp32, no gradient), without forming the out x in matrix."""
    import torch

    with torch.no_grad():
        if not (torch.compiler.is_compiling() and getattr(layer, "_fast_dora_w2", None) is not None):
            key = (W.data_ptr(), W._version, W.dtype, W.device)
            if getattr(layer, "_fast_dora_w2_key", None) != key:  # ||W_o||^2 once per (frozen) weight
                layer._fast_dora_w2 = torch.cat([rows.float().pow(2).sum(1) for rows in W.split(4096)])
                layer._fast_dora_w2_key = key
        Af, Bf = A.float(), B.float()
        WAt = (W @ A.to(W.dtype).t()).float()  # [out, r]
        cross = (WAt * Bf).sum(1)
        ba2 = ((Bf @ (Af @ Af.t())) * Bf).sum(1)
        return (layer._fast_dora_w2 + 2 * scaling * cross + scaling**2 * ba2).clamp_min(0).sqrt()


def _forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
    if base_result is None:  # dropout active: PEFT recomputes the base output; keep its path
        return self._peft_forward(x, lora_A=lora_A, lora_B=lora_B, scaling=scaling, base_layer=base_layer,
                                  base_result=base_result, adapter_name=adapter_name)
    norm = weight_norm(self, base_layer.weight, lora_A.weight, lora_B.weight, scaling)
    lora = lora_B(lora_A(x))
    y = base_result if base_layer.bias is None else base_result - base_layer.bias
    return self._combine.apply(y, lora, self.weight, norm, scaling)


def _linear_forward(self, x, *args, **kwargs):
    """The PEFT LoRA Linear's forward for one active DoRA adapter on a bias-free base; anything else goes to PEFT."""
    import torch

    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1:
        return self._fast_dora_linear_forward(x, *args, **kwargs)
    name = active[0]
    dora = self.lora_magnitude_vector[name] if name in self.lora_magnitude_vector else None
    dropout = self.lora_dropout[name] if name in self.lora_dropout else None
    if dora is None or name not in self.lora_A or not (isinstance(dropout, torch.nn.Identity) or not self.training):
        return self._fast_dora_linear_forward(x, *args, **kwargs)
    base = self.base_layer
    lora_A, lora_B, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
    y = base(x)
    lora = lora_B(lora_A(self._cast_input_dtype(x, lora_A.weight.dtype)))
    norm = weight_norm(dora, base.weight, lora_A.weight, lora_B.weight, scaling)
    return dora._fast_out.apply(y, lora, dora.weight, norm, scaling).to(y.dtype)


def enable(model) -> int:
    """Swap the forward of every eligible DoRA layer of a PEFT model; returns how many were swapped. Call it after
    the model is on its device and in its precision (||W||^2 is taken here)."""
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer

    (combine, out_fn), swapped = _combine(), 0
    for module in model.modules():
        if not hasattr(module, "lora_magnitude_vector"):
            continue
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or getattr(module, "fan_in_fan_out", False):
            continue
        here = 0
        for name, dora in module.lora_magnitude_vector.items():
            if type(dora) is not DoraLinearLayer or hasattr(dora, "_peft_forward"):
                continue
            dora._peft_forward = dora.forward
            dora._combine, dora._fast_out = combine, out_fn
            dora.forward = types.MethodType(_forward, dora)
            if name in module.lora_A:
                weight_norm(dora, base.weight, module.lora_A[name].weight, module.lora_B[name].weight,
                            module.scaling[name])  # fills the ||W||^2 cache now, outside any compiled graph
            here += 1
        swapped += here
        if base.bias is None and here and not hasattr(module, "_fast_dora_linear_forward"):
            module._fast_dora_linear_forward = module.forward
            module.forward = types.MethodType(_linear_forward, module)
    return swapped

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

How it plugs in: through PEFT's own extension point, not by patching `forward`. PEFT 0.21 resolves each adapter of
a LoRA layer to a LoraVariant (`Linear.resolve_lora_variant` picks `variants.DoraLinearVariant` for use_dora and
stores an instance in `layer.lora_variant[adapter]`); `lora.Linear.forward` computes the base output and hands it to
`variant.forward(module, active_adapter, x, result)`. `enable` is the one registration point: it puts a
FastDoraLinearVariant (a DoraLinearVariant whose forward is the one above; init, merge and unmerge are PEFT's) in
that slot of every eligible layer. Not through `Linear.lora_variants` (the class-level mapping): that would need
our own LoRA layer class at model creation (PEFT's custom-module dispatch) for a choice made later, per training run
(TrainConfig.fast_dora) and per layer (bias, base layer type).
"""

from __future__ import annotations


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


_FUNCTIONS: tuple | None = None


def _functions():
    global _FUNCTIONS
    if _FUNCTIONS is None:
        _FUNCTIONS = _combine()
    return _FUNCTIONS


def _dora_variant_class():
    """FastDoraLinearVariant, built on first use (importing PEFT costs seconds; this module must stay cheap)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    class FastDoraLinearVariant(DoraLinearVariant):
        """PEFT's DoRA variant with the fast forward; PEFT's forward where dropout is active in training (PEFT then
        recomputes the base output from the dropped-out input)."""

        @staticmethod
        def forward(module, active_adapter: str, x, result, **kwargs):
            import torch

            dropout = module.lora_dropout[active_adapter]
            if not (isinstance(dropout, torch.nn.Identity) or not module.training):
                return DoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
            combine, out_fn = _functions()
            base = module.get_base_layer()
            lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
            scaling = module.scaling[active_adapter]
            dora = module.lora_magnitude_vector[active_adapter]
            norm = weight_norm(dora, base.weight, lora_A.weight, lora_B.weight, scaling)
            lora = lora_B(lora_A(x))  # x is already cast to the adapter's dtype by lora.Linear.forward
            if base.bias is None and len(module.active_adapters) == 1:  # result is W x: one Function for the output
                return out_fn.apply(result, lora, dora.weight, norm, scaling)
            # as PEFT: the DoRA term on `result` (the base output plus any adapter before this one), minus the bias
            y = result if base.bias is None else result - base.bias
            return result + combine.apply(y, lora, dora.weight, norm, scaling)

    return FastDoraLinearVariant


_VARIANT = None


def variant_class():
    global _VARIANT
    if _VARIANT is None:
        _VARIANT = _dora_variant_class()
    return _VARIANT


def enable(model) -> int:
    """Register the fast DoRA variant on every eligible DoRA adapter of a PEFT model (the layer's
    `lora_variant[adapter]`, PEFT's own slot); returns how many were swapped (0 on a second call). Call it after the
    model is on its device and in its precision (||W||^2 is taken here)."""
    import torch
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant

    fast, swapped = variant_class(), 0
    _functions()  # the autograd Functions exist before any compiled forward (building a class breaks the graph)
    for module in model.modules():
        variants = getattr(module, "lora_variant", None)
        if not variants or not hasattr(module, "lora_magnitude_vector"):
            continue
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or getattr(module, "fan_in_fan_out", False):
            continue
        for name, variant in list(variants.items()):
            dora = module.lora_magnitude_vector[name] if name in module.lora_magnitude_vector else None
            if type(dora) is not DoraLinearLayer or not isinstance(variant, DoraLinearVariant):
                continue
            if type(variant) is fast:
                continue
            variants[name] = fast()
            weight_norm(dora, base.weight, module.lora_A[name].weight, module.lora_B[name].weight,
                        module.scaling[name])  # fills the ||W||^2 cache now, outside any compiled graph
            swapped += 1
    return swapped

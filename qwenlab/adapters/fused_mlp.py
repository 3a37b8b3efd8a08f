"""LoRA training's MLP as one autograd function that keeps 2 of the 4 intermediate-sized activations.

Through modules, autograd keeps, per token of each layer, four [intermediate] tensors for the backward: the gate
projection g (for SiLU), SiLU(g) and the up projection u (for the product), and the product p = SiLU(g)·u (down's
LoRA A needs its input). On the Qwen2.5-0.5B shape they are 1.1 of the 1.4 GB a 608-token fp32 step keeps. This
function keeps g and u only (and the LoRA paths' r-wide hidden states and dropout masks), and recomputes SiLU(g)
and p in the backward: two element-wise passes, against the six matmuls it runs anyway.

    g = x W_gᵀ + s_g·(d_g(x) A_gᵀ) B_gᵀ        (the same for u)
    y = p W_dᵀ + s_d·(d_d(p) A_dᵀ) B_dᵀ,   p = SiLU(g)·u

d is LoRA dropout (adapters/dropout.py: the same masks, drawn in the same order as the modules draw them: gate,
up, down). The forward's values and the gradients are those of the three LoRALinear modules bit for bit (the same ops,
summed in autograd's order).

It runs when every linear of the MLP is a LoRALinear with one unmerged adapter on every row over a plain float
weight, and the adapter is trainable (LoRA SFT/GRPO on the model core). Anything else returns None, and the MLP
runs its modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenlab.adapters.dropout import keep_mask
from qwenlab.adapters.lora_linear import LoRALinear
from qwenlab.model.linear import Linear

PLAIN_FORWARDS = (torch.nn.Linear.forward, Linear.forward)  # x Wᵀ (+ b) and nothing else: what the function redoes


def _lora_of(module) -> tuple | None:
    """(weight, A, B, scaling, dropout p) of a LoRALinear training one adapter on all rows, else None."""
    if not isinstance(module, LoRALinear) or module.selection is None or module.merged:
        return None
    selection = module.selection
    if len(selection.groups) != 1 or selection.groups[0][1] is not None:
        return None
    name = selection.groups[0][0]
    base = module.base_layer
    weight = getattr(base, "weight", None)
    if (name not in module.lora_A or type(base).forward not in PLAIN_FORWARDS or base.bias is not None
            or not weight.is_floating_point()):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    if not (a.requires_grad or b.requires_grad):
        return None
    if module.compute_dtype is not None:
        a, b = a.to(module.compute_dtype), b.to(module.compute_dtype)
    if a.dtype != weight.dtype:
        return None
    return weight, a, b, module.scaling[name], module.dropout if module.training else 0.0


def fused_lora_mlp(mlp, x: torch.Tensor) -> torch.Tensor | None:
    """down(SiLU(gate(x)) · up(x)) through LoRAMLPFunction, or None where it does not apply (see the module doc)."""
    if not torch.is_grad_enabled():
        return None
    parts = [_lora_of(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    if any(p is None for p in parts):
        return None
    if x.dtype != parts[0][0].dtype:
        return None
    (wg, ag, bg, sg, pg), (wu, au, bu, su, pu), (wd, ad, bd, sd, pd) = parts
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    intermediate = wg.shape[0]
    masks = (keep_mask(flat.shape, pg) if pg else None, keep_mask(flat.shape, pu) if pu else None,
             keep_mask(torch.Size((flat.shape[0], intermediate)), pd) if pd else None)
    y = LoRAMLPFunction.apply(flat, wg, wu, wd, ag, bg, au, bu, ad, bd, (sg, su, sd), (pg, pu, pd), masks)
    return y.view(*shape[:-1], y.shape[-1])


def _dropped(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """adapters/dropout.py's forward, the same expression (so the same bits)."""
    return x if keep is None else x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def _lora_hidden(x_dropped: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    return F.linear(x_dropped, a) * scaling


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wg, wu, wd, ag, bg, au, bu, ad, bd, scalings, dropouts, masks):
        sg, su, sd = scalings
        mg, mu, md = masks
        # In place where the modules make a new tensor (the same values): fewer intermediate-sized allocations.
        hg = _lora_hidden(_dropped(x, mg, dropouts[0]), ag, sg)
        g = F.linear(x, wg).add_(F.linear(hg, bg))
        hu = _lora_hidden(_dropped(x, mu, dropouts[1]), au, su)
        u = F.linear(x, wu).add_(F.linear(hu, bu))
        p = F.silu(g).mul_(u)
        hd = _lora_hidden(_dropped(p, md, dropouts[2]), ad, sd)
        y = F.linear(p, wd).add_(F.linear(hd, bd))
        del p
        ctx.save_for_backward(x, g, u, wg, wu, wd, ag, bg, au, bu, ad, bd, hg, hu, hd, *(m for m in masks if m is not None))
        ctx.has_mask = [m is not None for m in masks]
        ctx.scalings, ctx.dropouts = scalings, dropouts
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, g, u, wg, wu, wd, ag, bg, au, bu, ad, bd, hg, hu, hd, *stored = ctx.saved_tensors
        stored = iter(stored)
        mg, mu, md = (next(stored) if has else None for has in ctx.has_mask)
        sg, su, sd = ctx.scalings
        pg, pu, pd = ctx.dropouts
        grad_y = grad_y.contiguous()
        # The modules' backward, op for op and summed in autograd's order, so training takes the same steps to the
        # bit (the recipe's specialists are the same models with or without the fusion).
        silu = F.silu(g)
        # down: y = p W_dᵀ + hd B_dᵀ, hd = s_d·d(p) A_dᵀ
        grad_bd = grad_y.t() @ hd
        grad_hd = (grad_y @ bd) * sd
        grad_ad = grad_hd.t() @ _dropped(silu * u, md, pd)
        grad_p = _dropped(grad_hd @ ad, md, pd) + grad_y @ wd
        # p = SiLU(g)·u
        grad_u = grad_p * silu
        del silu
        grad_g = torch.ops.aten.silu_backward(grad_p * u, g)
        del grad_p
        # gate and up: autograd meets x's four gradients in the order up's LoRA, up's base, gate's LoRA, gate's base
        grads, parts = [], []
        for grad_out, w, a, b, h, keep, p_drop, scaling in ((grad_u, wu, au, bu, hu, mu, pu, su),
                                                            (grad_g, wg, ag, bg, hg, mg, pg, sg)):
            grad_b = grad_out.t() @ h
            grad_h = (grad_out @ b) * scaling
            grad_a = grad_h.t() @ _dropped(x, keep, p_drop)
            parts += [_dropped(grad_h @ a, keep, p_drop), grad_out @ w]
            grads.append((grad_a, grad_b))
        grad_x = ((parts[0] + parts[1]) + parts[2]) + parts[3]
        (grad_au, grad_bu), (grad_ag, grad_bg) = grads
        return (grad_x, None, None, None, grad_ag, grad_bg, grad_au, grad_bu, grad_ad, grad_bd, None, None, None)


def fuse_lora_mlps(model: torch.nn.Module, on: bool = True) -> None:
    """Route every MLP of the model core through fused_lora_mlp (on) or its modules (off)."""
    from qwenlab.model.qwen2 import MLP

    for module in model.modules():
        if isinstance(module, MLP):
            module.fused = fused_lora_mlp if on else None

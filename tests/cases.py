"""Shared test cases: every compression mode and granularity, with an input dim that fits it."""

from __future__ import annotations

import torch

import vcon_kernels as vk

# name -> (config factory taking grad, input features K). K = 53 (prime) where the mode
# allows any K; 52 where N:M (m = 4) or quantization groups (13) must divide it.
LINEAR_CASES = {
    "prune_layer": (lambda g: vk.Prune(sparsity=0.6, grad=g), 53),
    "prune_row": (lambda g: vk.Prune(sparsity=0.3, granularity="row", grad=g), 53),
    "prune_nm": (lambda g: vk.Prune(granularity="nm", n=2, m=4, grad=g), 52),
    "prune_once": (lambda g: vk.Prune(sparsity=0.6, update="once", grad=g), 53),
    "prune_nm_every3": (lambda g: vk.Prune(granularity="nm", n=1, m=4, update=3, grad=g), 52),
    "int8_channel": (lambda g: vk.Quantize(bits=8, grad=g), 53),
    "int4_group": (lambda g: vk.Quantize(bits=4, granularity="group", group_size=13, grad=g), 52),
    "int2_tensor": (lambda g: vk.Quantize(bits=2, granularity="tensor", grad=g), 53),
    "binary_tensor": (lambda g: vk.Quantize(bits=1, granularity="tensor", grad=g), 53),
    "binary_channel": (lambda g: vk.Quantize(bits=1, granularity="channel", grad=g), 53),
    "prune_int4": (lambda g: vk.Compose(vk.Prune(sparsity=0.5, grad=g), vk.Quantize(bits=4, grad=g)), 53),
    "nm_int8_group": (
        lambda g: vk.Compose(vk.Prune(granularity="nm", grad=g), vk.Quantize(bits=8, granularity="group",
                                                                              group_size=13, grad=g)), 52),
    "prune_binary": (lambda g: vk.Compose(vk.Prune(sparsity=0.8, grad=g), vk.Quantize(bits=1, grad=g)), 53),
    "lowrank": (lambda g: vk.LowRank(rank=5, grad=g), 53),
}
OUT_FEATURES = 37


def make_linear(case: str, grad: str = "ste", dtype=torch.float32, out_features=OUT_FEATURES, bias=True, seed=0):
    factory, k = LINEAR_CASES[case]
    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, out_features, bias=bias, dtype=dtype)
    return vk.VCONLinear.from_linear(dense, factory(grad))


def set_betas(layer, beta: float, second: float | None = None):
    """beta for every stage, or (beta, second) for the two stages of a Compose layer."""
    layer.set_beta(beta)
    if second is not None and len(layer.stage_names) == 2:
        layer.set_beta(second, layer.stage_names[1])


def grads_of(layer, x):
    params = {"x": x, "weight": layer.weight, "bias": layer.bias,
              "lowrank_u": getattr(layer, "lowrank_u", None), "lowrank_v": getattr(layer, "lowrank_v", None)}
    return {k: (None if v is None else v.grad) for k, v in params.items()}


def run_fwd_bwd(module, layer, x, grad_out):
    """Output and all gradients of ``module(x)`` (module is the layer or its reference wrapper)."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_out)
    grads = grads_of(layer, x)
    return y.detach(), {k: (None if v is None else v.clone()) for k, v in grads.items()}

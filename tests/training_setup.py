"""A small VCON training setup shared by the DDP, FSDP2 and resume tests.

One model mixes every kind of layer state the reliability tests care about:

* ``0``: a conv with int8 per-channel fake quantization (online scales);
* ``3``: a linear with prune + int4 group quantization, its mask refreshed every 2 steps
  (``Prune(update=2)``: a stored mask that changes during training);
* ``5``: a linear with low rank (U and V are parameters);
* ``7``: a linear with a 2:4 mask frozen at conversion (``update="once"``).

The stages fade over staggered windows, so ``STEPS`` optimizer steps cross every transition
and end with every beta at 0. Batches are a pure function of (step, micro-batch, shard), so
that a resumed or sharded run sees exactly the data of the uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

import vcon_kernels as vk
from vcon_kernels import torch_transforms as transforms
from vcon_kernels.functional import layer_state

try:
    from torch.distributed.tensor import DTensor
except ImportError:
    DTensor = None

STEPS = 8
WINDOWS = {"prune": (0, 4), "quantize": (2, 6), "lowrank": (1, 5)}
IN_SHAPE = (2, 4, 4)
CLASSES = 8


def layer_configs() -> dict:
    return {
        "0": vk.Quantize(bits=8),
        "3": vk.Compose(vk.Prune(sparsity=0.5, update=2), vk.Quantize(bits=4, granularity="group", group_size=8)),
        "5": vk.LowRank(rank=4),
        "7": vk.Prune(granularity="nm", n=2, m=4, update="once"),
    }


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """The dense model with weights from ``seed``, converted to VCON (not yet scheduled)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 24), nn.Dropout(dropout), nn.Linear(24, CLASSES),
    )
    configs = layer_configs()
    return vk.convert(model, lambda module, name: configs.get(name))


def make_scheduler(model: nn.Module) -> vk.VCONScheduler:
    return vk.VCONScheduler(model, steps=dict(WINDOWS))


def batch(step: int, micro: int, shard: int = 0, size: int = 6):
    """Inputs and labels of micro-batch ``micro`` of optimizer step ``step``, data shard ``shard``."""
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + shard)
    x = torch.randn(size, *IN_SHAPE, generator=gen)
    y = torch.randint(0, CLASSES, (size,), generator=gen)
    return x, y


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole parameter (gathers an FSDP2-sharded DTensor: a collective)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.full_tensor()
    return t


def layer_states(model: nn.Module) -> dict:
    """{layer name: {"beta", "keep", "threshold", "scales", "mask"}}: what the next forward will use.

    ``keep`` is the bool keep-mask in effect (derived from the weights for online masks, the
    stored mask otherwise); thresholds and scales are recomputed from the current weights.
    """
    out = {}
    for name, layer in vk.vcon_layers(model):
        entry = {"beta": layer.beta.detach().clone()}
        spec = layer.spec()
        if not spec.lowrank:
            w2d = full(layer.weight).detach().reshape(layer.weight.shape[0], -1)
            threshold, scales = layer_state(w2d, layer.beta, spec, layer.mask)
            entry.update(threshold=threshold.clone(), scales=scales.clone())
            if spec.has_prune:
                entry["keep"] = transforms.keep_mask(w2d, threshold, layer.mask, spec)
        if layer.mask is not None:
            entry["mask"] = layer.mask.clone()
        out[name] = entry
    return out


def full_state(model: nn.Module) -> dict:
    """Every parameter and buffer as a plain tensor (FSDP2 shards gathered)."""
    return {k: full(v).detach().clone() for k, v in model.state_dict().items()}


def train(model, opt, sched, shards=(0,), accum: int = 2, micro_context=None, inner=None, steps: int = STEPS,
          first_step: int = 0, lr_sched=None):
    """Optimizer steps ``first_step .. steps - 1``, ``accum`` micro-batches each, over data ``shards``.

    A single-process reference passes every shard (the concatenated batch); a distributed rank
    passes its own. ``micro_context(is_last)`` wraps each micro-batch (DDP's ``no_sync`` for all
    but the last, for example). ``inner`` is the unwrapped model, for recording layer state.
    The VCON scheduler (and ``lr_sched``) step once per optimizer step, after ``opt.step()``.

    Returns (losses, states): the mean loss of each step over this process's data, and
    ``layer_states`` before every step and after the last.
    """
    inner = model if inner is None else inner
    losses, states = [], [layer_states(inner)]
    for step in range(first_step, steps):
        total = 0.0
        for micro in range(accum):
            x, y = (torch.cat(parts) for parts in zip(*(batch(step, micro, s) for s in shards)))
            ctx = micro_context(micro == accum - 1) if micro_context is not None else contextlib.nullcontext()
            with ctx:
                loss = nn.functional.cross_entropy(model(x), y) / accum
                loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if lr_sched is not None:
            lr_sched.step()
        sched.step()
        losses.append(total)
        states.append(layer_states(inner))
    return losses, states


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


# -- parity checks of distributed runs against one process ----------------------------------------
EXACT_KEYS = ("beta", "keep", "mask")


def assert_states_equal(a, b, where, exact=True):
    """Layer states equal; with ``exact=False`` the weight-derived thresholds and scales within fp32."""
    assert a.keys() == b.keys(), where
    for name in a:
        assert a[name].keys() == b[name].keys(), (where, name)
        for key in a[name]:
            if exact or key in EXACT_KEYS:
                assert torch.equal(a[name][key], b[name][key]), f"{where}: layer {name} {key} differs"
            else:
                torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-5, atol=1e-7)


def assert_parity(results, losses_ref, reference, params_ref):
    """Ranks agree bit for bit on state and parameters; losses and parameters match the single process.

    ``results``: per rank, {"losses": mean over ranks per step, "states", "params"}.
    """
    rank0 = results[0]
    for r, res in enumerate(results):
        for step, (s, s0, s_ref) in enumerate(zip(res["states"], rank0["states"], reference)):
            assert_states_equal(s, s0, f"rank {r} vs rank 0, step {step}")
            assert_states_equal(s, s_ref, f"rank {r} vs single process, step {step}", exact=False)
        for key, p in res["params"].items():
            assert torch.equal(p, rank0["params"][key]), f"rank {r} parameter {key} differs from rank 0"
    torch.testing.assert_close(rank0["losses"], torch.tensor(losses_ref, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    for key, p in rank0["params"].items():
        torch.testing.assert_close(p, params_ref[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def single_process_reference(world_size: int):
    """(losses, states, params) of one process training on the concatenated batches of every rank."""
    model = make_model(seed=0)
    sched, opt = make_scheduler(model), make_optimizer(model)
    losses, states = train(model, opt, sched, shards=tuple(range(world_size)))
    # The run crosses every transition: betas go 1 -> 0 and the every-2-steps mask changes.
    assert [s["3"]["beta"].tolist() for s in (states[0], states[-1])] == [[1.0, 1.0], [0.0, 0.0]]
    assert sched.finished
    assert not torch.equal(states[0]["3"]["mask"], states[-1]["3"]["mask"])
    return losses, states, full_state(model)

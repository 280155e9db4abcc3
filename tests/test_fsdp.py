"""FSDP2 (``fully_shard``, 2 spawned processes, gloo on loopback, CPU) trains a VCON model like one process.

The same parity test as ``test_ddp.py``: every VCON layer and the root are sharded with
``fully_shard``; gradient accumulation uses ``set_requires_gradient_sync(False)`` on all but
the last micro-batch. On top of the DDP checks it asserts that the layers read their weights
through the module parameters that FSDP2 gathers: between steps ``weight`` is a sharded
``DTensor``, while inside ``forward`` it is the plain, full-size unsharded parameter (a layer
that kept its own reference to the weight would compute with a stale or sharded tensor, and the
parity check would fail), and that no layer output is a view (FSDP2 warns that an in-place op on
one would skip its pre-backward all-gather). Finally rank 0 gathers a full state dict, loads it
into an unsharded model and finalizes it: its outputs equal the sharded model's.
"""

import contextlib
import warnings

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_workers
from training_setup import assert_parity
from training_setup import batch
from training_setup import full_state
from training_setup import make_model
from training_setup import make_optimizer
from training_setup import make_scheduler
from training_setup import single_process_reference
from training_setup import train

import vcon_kernels as vk

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _fsdp_worker(rank, world_size, out_dir):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    # A layer output that is a view makes FSDP2 drop its pre-backward hook after any in-place op.
    warnings.filterwarnings("error", message=".*returned a view tensor.*")
    model = make_model(seed=0)
    full_shapes = {name: tuple(layer.weight.shape) for name, layer in vk.vcon_layers(model)}
    seen_in_forward = []

    def check_gathered(layer, args):
        seen_in_forward.append(type(layer.weight) is torch.nn.Parameter and tuple(layer.weight.shape) == layer._shape)

    for name, layer in vk.vcon_layers(model):
        layer._shape = full_shapes[name]
        fully_shard(layer)
        layer.register_forward_pre_hook(check_gathered)  # runs after FSDP's own pre-forward (all-gather)
    fully_shard(model)
    assert all(isinstance(layer.weight, DTensor) for _, layer in vk.vcon_layers(model))
    sched, opt = make_scheduler(model), make_optimizer(model)

    def micro_context(is_last):
        model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    losses, states = train(model, opt, sched, shards=(rank,), micro_context=micro_context)
    assert seen_in_forward and all(seen_in_forward), "a VCON layer saw a sharded or stale weight in forward"
    assert all(isinstance(layer.weight, DTensor) for _, layer in vk.vcon_layers(model)), "resharded after forward"
    mean_losses = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(mean_losses)
    mean_losses /= world_size
    torch.save({"losses": mean_losses, "states": states, "params": full_state(model)}, f"{out_dir}/rank{rank}.pt")
    finalize_on_rank0(model, rank)


def finalize_on_rank0(model, rank):
    """The README recipe: gather a full state dict, load it into an unsharded model, finalize there."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    x, _ = batch(99, 0)
    with torch.no_grad():
        y_sharded = model(x)  # a collective: every rank runs it
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        assert not state  # cpu_offload: only rank 0 receives the full state dict
        return
    plain = make_model(seed=1)  # another init: everything must come from the state dict
    plain.load_state_dict(state)
    final = vk.finalize(plain)
    assert not vk.vcon_layers(final)
    with torch.no_grad():
        torch.testing.assert_close(final(x), y_sharded, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_matches_single_process(tmp_path):
    run_workers(_fsdp_worker, WORLD, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert_parity(results, *single_process_reference(WORLD))

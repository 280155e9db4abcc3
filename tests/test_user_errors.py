"""Clear messages where a user's mistake used to pass silently: explain's input, a group_size without
granularity="group", and a transition that did not finish before finalize / the end of training."""

import pytest
import torch
from torch import nn

import vcon_kernels as vk


def test_quantize_group_size_needs_group_granularity():
    with pytest.raises(ValueError, match=r"group_size=32 applies only to granularity='group' \(got "
                                         r"granularity='channel'\)"):
        vk.Quantize(bits=4, group_size=32)
    assert vk.Quantize(bits=4, granularity="group").group_size == 128
    assert vk.Quantize(bits=4, granularity="group", group_size=32).group_size == 32
    assert vk.Quantize(bits=4).group_size is None


@pytest.mark.parametrize("bad, error, match", [
    ("x", TypeError, r"x must be the input tensor or its shape \(a tuple of non-negative ints\), got str"),
    ((4, 7), ValueError, r"a VCONLinear input must be \(\.\.\., 16\), got \(4, 7\)"),
    ((4, -1), TypeError, r"got tuple \(4, -1\)"),
])
def test_explain_validates_input(bad, error, match):
    layer = vk.VCONLinear.from_linear(nn.Linear(16, 8), vk.Prune(sparsity=0.5))
    with pytest.raises(error, match=match):
        vk.explain(layer, bad)


def test_explain_names_mode_dtype_and_path():
    prune = vk.VCONLinear.from_linear(nn.Linear(16, 8), vk.Prune(sparsity=0.5))
    lowrank = vk.VCONLinear.from_linear(nn.Linear(16, 8), vk.LowRank(rank=2))
    text = vk.explain(prune, torch.randn(4, 16))
    assert "VCONLinear, prune (Prune(sparsity=0.5" in text and "input (4, 16) float32" in text
    assert "computes in float32 on cpu" in text
    assert "lowrank (LowRank(rank=2" in vk.explain(lowrank, (4, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "computes in bfloat16" in vk.explain(prune, torch.randn(4, 16))
    conv = vk.VCONConv2d.from_conv2d(nn.Conv2d(3, 4, 3), vk.Quantize(bits=8))
    assert "one convolution" in vk.explain(conv, (1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"VCONConv2d input must be \(N, 3, H, W\)"):
        vk.explain(conv, (1, 4, 8, 8))


def test_finalize_says_the_scheduler_never_stepped():
    model = vk.convert(nn.Sequential(nn.Linear(8, 8)), vk.Prune(sparsity=0.5))
    vk.VCONScheduler(model, steps=10)
    with pytest.raises(ValueError, match=r"their VCONScheduler never stepped \(0 of 10 steps\): sched.step\(\) "
                                         r"was not called"):
        vk.finalize(model)


def test_finalize_says_how_far_the_scheduler_got():
    model = vk.convert(nn.Sequential(nn.Linear(8, 8)), vk.Prune(sparsity=0.5))
    sched = vk.VCONScheduler(model, steps=10)
    for _ in range(4):
        sched.step()
    with pytest.raises(ValueError, match=r"beta > 0 \(e.g. 0: prune=0.6\); their VCONScheduler took 4 of the 10"):
        vk.finalize(model)
    assert isinstance(model[0], vk.VCONLinear)  # unchanged
    assert isinstance(vk.finalize(model, force=True)[0], vk.CompressedLinear)


def test_hf_callback_warns_when_training_ends_mid_transition():
    transformers = pytest.importorskip("transformers")
    from vcon_kernels.integrations.hf import VCONCallback

    model = vk.convert(nn.Sequential(nn.Linear(8, 8)), vk.Prune(sparsity=0.5))
    callback = VCONCallback(vk.VCONScheduler(model, steps=10))
    state = transformers.TrainerState()
    state.global_step = 3
    callback.on_train_begin(None, state, None)
    with pytest.warns(UserWarning, match=r"training ended at step 3 with 1 of 1 VCON layers still have beta > 0 "
                                         r".*took 3 of the 10 steps"):
        callback.on_train_end(None, state, None)

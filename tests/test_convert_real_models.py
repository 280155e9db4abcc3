"""``vk.convert`` on what real models contain: Linear subclasses, nn.TransformerEncoder (with
nn.MultiheadAttention and its inference fast path), HF GPT-2 Conv1D; VCON layers as nn.Linear /
nn.Conv2d for isinstance-keyed tools.
"""

import warnings

import pytest
import torch
from torch import nn

import vcon_kernels as vk


class TaggedLinear(nn.Linear):
    """A subclass that only adds an attribute: its forward is nn.Linear's."""

    tag = "ffn"


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_vcon_layers_are_linear_and_conv2d():
    lin = vk.VCONLinear.from_linear(nn.Linear(8, 4), vk.Prune(sparsity=0.5))
    conv = vk.VCONConv2d.from_conv2d(nn.Conv2d(3, 4, 3), vk.Quantize(bits=8))
    assert isinstance(lin, nn.Linear) and isinstance(conv, nn.Conv2d)
    assert (lin.in_features, lin.out_features) == (8, 4)
    assert "config=Prune" in repr(lin) and "config=Quantize" in repr(conv)
    built = vk.VCONLinear(8, 4, config=vk.Quantize(bits=4))
    assert isinstance(built, nn.Linear) and built(torch.randn(2, 8)).shape == (2, 4)


@pytest.mark.parametrize("config", [vk.Prune(sparsity=0.5, update="once"), vk.LowRank(rank=2)], ids=["mask", "lowrank"])
def test_reset_parameters_rederives_vcon_state(config):
    layer = vk.VCONLinear.from_linear(nn.Linear(16, 8), config)
    u = getattr(layer, "lowrank_u", None)
    layer.reset_parameters()
    fresh = vk.VCONLinear.from_linear(nn.Linear(16, 8), config)
    with torch.no_grad():
        fresh.weight.copy_(layer.weight)
    fresh._rederive_vcon_state()
    if layer.mask is not None:
        assert torch.equal(layer.mask, fresh._current_mask())
    else:
        assert layer.lowrank_u is u  # updated in place: optimizers keep their references
        torch.testing.assert_close(layer.lowrank_u, fresh.lowrank_u)


def test_effective_weight_is_the_blend():
    layer = vk.VCONLinear.from_linear(nn.Linear(16, 8), vk.Quantize(bits=4, granularity="group", group_size=8))
    layer.set_beta(0.25)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.effective_weight(), layer.bias))


def test_subclass_with_parent_forward_converts_own_forward_is_named():
    model = nn.Sequential(TaggedLinear(8, 8), nn.ReLU(), ScaledLinear(8, 4))
    with pytest.warns(UserWarning, match=r"1 Linear/Conv-like module\(s\) left dense: 2 \(ScaledLinear\): "
                                         r"ScaledLinear subclasses nn.Linear with its own forward"):
        vk.convert(model, vk.Prune(sparsity=0.5))
    assert isinstance(model[0], vk.VCONLinear) and type(model[2]) is ScaledLinear


def test_transformer_encoder_converts_feedforward_names_attention():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vk.convert(model, vk.Prune(sparsity=0.9))
    message = " ".join(str(w.message) for w in caught if "vk.convert" in str(w.message))
    assert "layers.0.self_attn.out_proj (NonDynamicallyQuantizableLinear): its weight is read directly" in message
    assert "layers.1.self_attn (MultiheadAttention): nn.MultiheadAttention keeps its input projection" in message
    converted = sorted(n for n, _ in vk.vcon_layers(model))
    assert converted == [f"layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)]
    for _, vcon in vk.vcon_layers(model):
        vcon.set_beta(0.0)
    x = torch.randn(2, 5, 16)
    model.train()
    with torch.no_grad():
        y_train_mode = model(x)  # the regular path (dropout is 0)
    model.eval()
    with torch.no_grad():
        y_eval = model(x)  # the fast path would use the dense linear weights here
    torch.testing.assert_close(y_eval, y_train_mode, rtol=1e-5, atol=1e-5)


def test_hf_conv1d_is_named_not_converted():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pytorch_utils.Conv1D(8, 4), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"0 \(Conv1D\): transformers Conv1D stores its weight transposed"):
        vk.convert(model, vk.Quantize(bits=8))
    assert isinstance(model[1], vk.VCONLinear) and type(model[0]) is pytorch_utils.Conv1D


def test_config_function_and_filter_take_module_then_name():
    seen = []
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

    def choose(module, name):
        seen.append((type(module).__name__, name))
        return vk.Prune(sparsity=0.5) if name == "0" else None

    vk.convert(model, choose, filter_fn=lambda module, name: isinstance(module, nn.Linear))
    assert seen == [("Linear", "0"), ("Linear", "1")]
    assert isinstance(model[0], vk.VCONLinear) and type(model[1]) is nn.Linear

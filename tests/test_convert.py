"""convert / finalize on real small models: filters, atomicity, sharing, state_dict round trips."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import vcon_kernels as vk


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.features(x))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def test_convert_mlp_and_filter_fn():
    model = mlp()
    x = torch.randn(3, 64)
    y_dense = model(x)
    out = vk.convert(model, vk.Prune(sparsity=0.5), filter_fn=lambda mod, name: name != "4")
    assert out is model
    assert [type(m).__name__ for m in model] == ["VCONLinear", "ReLU", "VCONLinear", "ReLU", "Linear"]
    assert torch.equal(model(x), y_dense)  # beta = 1


def test_parameters_are_shared_not_copied():
    model = mlp()
    weight = model[0].weight
    vk.convert(model, vk.Quantize(bits=4))
    assert model[0].weight is weight


def test_convert_cnn_with_config_function():
    torch.manual_seed(0)
    model = SmallCNN()

    def choose(module, name):
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            return vk.Quantize(bits=8)
        if name == "head":
            return None
        return vk.Prune(sparsity=0.7, granularity="row")

    vk.convert(model, choose)
    kinds = {n: type(m.config).__name__ for n, m in vk.vcon_layers(model)}
    assert kinds == {"features.0": "Prune", "features.2": "Quantize", "features.4": "Prune"}
    assert type(model.head) is nn.Linear
    model(torch.randn(2, 1, 12, 12)).sum().backward()


def test_shared_module_replaced_everywhere():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    vk.convert(model, vk.Prune(sparsity=0.5))
    assert model[0] is model[2] and isinstance(model[0], vk.VCONLinear)


def test_tied_weights_survive():
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    vk.convert(model, vk.Quantize(bits=8))
    assert model["head"].weight is model["emb"].weight


def test_failed_convert_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))  # 10 % 4 ok; 8 % 4 ok
    model.add_module("odd", nn.Linear(6, 3))  # 6 % 4 != 0
    before = snapshot(model)
    with pytest.raises(ValueError, match="odd: N:M pruning needs m=4 to divide the input dim 6"):
        vk.convert(model, vk.Prune(granularity="nm"))
    after = snapshot(model)
    assert before[0] == after[0]
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_nan_weights_rejected():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="2: weight has NaN or Inf"):
        vk.convert(model, vk.Prune(sparsity=0.5))
    assert type(model[0]) is nn.Linear


def test_convert_twice_and_nothing_to_convert():
    model = vk.convert(mlp(), vk.Prune(sparsity=0.5))
    with pytest.raises(ValueError, match="already contains VCON layers"):
        vk.convert(model, vk.Quantize())
    plain = nn.Sequential(nn.ReLU(), nn.Tanh())
    with pytest.warns(UserWarning, match="no nn.Linear or nn.Conv2d matched"):
        assert vk.convert(plain, vk.Quantize()) is plain
    with pytest.raises(TypeError, match="config must be"):
        vk.convert(mlp(), "prune")


def test_convert_single_layer_returns_new_layer():
    layer = nn.Linear(8, 4)
    out = vk.convert(layer, vk.Quantize())
    assert isinstance(out, vk.VCONLinear) and out.weight is layer.weight


def test_state_dict_round_trip_mid_transition():
    cfg = vk.Compose(vk.Prune(sparsity=0.6, update="once"), vk.Quantize(bits=4))
    model = vk.convert(mlp(), cfg)
    sched = vk.VCONScheduler(model, steps={"prune": 10, "quantize": (5, 15)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(7):
        model(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert any(k.endswith("mask") for k in state["model"]) and any(k.endswith("beta") for k in state["model"])
    fresh = vk.convert(mlp(), cfg)
    fresh.load_state_dict(state["model"])
    sched2 = vk.VCONScheduler(fresh, steps={"prune": 10, "quantize": (5, 15)})
    sched2.load_state_dict(state["sched"])
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh[0].mask, model[0].mask)
    assert fresh[0].beta.tolist() == pytest.approx([0.3, 0.8])


def test_finalized_storage_is_smaller_and_equal():
    model = vk.convert(mlp(), vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=4)))
    dense_bytes = vk.storage_bytes(mlp())
    for _, layer in vk.vcon_layers(model):
        layer.set_beta(0.0)
    x = torch.randn(7, 64)
    with torch.no_grad():
        y = model(x)
        model = vk.finalize(model)
        # decode-sized batches run the compressed GEMV (FMA, its own summation order): 1e-5
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    assert vk.storage_bytes(model) < 0.2 * dense_bytes


def test_cnn_finalize_round_trip():
    torch.manual_seed(0)
    model = vk.convert(SmallCNN(), vk.Quantize(bits=4, granularity="tensor"))
    for _, layer in vk.vcon_layers(model):
        layer.set_beta(0.0)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        y = model(x)
        final = vk.finalize(copy.deepcopy(model))
        torch.testing.assert_close(final(x), y, rtol=1e-5, atol=1e-6)  # decode GEMV at M = 2: 1e-5
    assert vk.storage_bytes(final) < vk.storage_bytes(SmallCNN()) / 4


def test_module_cast_keeps_beta_fp32():
    model = vk.convert(mlp(), vk.Prune(sparsity=0.5))
    sched = vk.VCONScheduler(model, steps=3)
    sched.step()
    model.to(torch.bfloat16)
    assert model[0].beta.dtype == torch.float32 and model[0].beta.item() == pytest.approx(2 / 3)
    model.double()
    assert model[0].beta.dtype == torch.float32 and model[0].weight.dtype == torch.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 64, dtype=torch.float64))

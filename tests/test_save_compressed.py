"""vk.save_compressed / vk.load_compressed: every finalized format, built on the meta device, exact outputs."""

import json
import os

import pytest
import torch
from torch import nn

import vcon_kernels as vk
from vcon_kernels.integrations import saving

CONFIGS = {
    "csr": vk.Prune(sparsity=0.9),
    "dense-pruned": vk.Prune(sparsity=0.1),
    "nm": vk.Prune(granularity="nm", n=2, m=4),
    "int8": vk.Quantize(bits=8),
    "int4-g8": vk.Quantize(bits=4, granularity="group", group_size=8),
    "int2-tensor": vk.Quantize(bits=2, granularity="tensor"),
    "binary": vk.Quantize(bits=1),
    "prune+binary": vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=1)),
    "prune+int8": vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8)),
    "lowrank": vk.LowRank(rank=4),
}


class Net(nn.Module):
    """A conv, two linears, a non-persistent buffer and a weight tied to another module's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 48)
        self.fc2 = nn.Linear(48, 32)
        self.head = nn.Linear(32, 48, bias=False)
        self.tail = nn.Linear(32, 48, bias=False)
        self.tail.weight = self.head.weight  # tied: stored once, the same Parameter after loading
        self.register_buffer("offset", torch.linspace(-1, 1, 48), persistent=False)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.relu(self.fc1(h)) + self.offset
        h = self.fc2(h)
        return self.head(h) + self.tail(h)


def finalized(config, seed=0):
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        model.offset.uniform_(-1, 1)  # not what __init__ builds: the saved buffer must be loaded
    vk.convert(model, config, filter_fn=lambda mod, name: name in ("conv", "fc1", "fc2"))
    for _, layer in vk.vcon_layers(model):
        layer.set_beta(0.0)
    return vk.finalize(model).eval()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_round_trip_from_a_meta_factory_is_exact(kind, tmp_path, monkeypatch):
    model = finalized(CONFIGS[kind])
    x = torch.randn(5, 8, 4, 4)
    with torch.no_grad():
        expected = model(x)
    vk.save_compressed(model, str(tmp_path))

    devices = []

    def factory():
        devices.append(torch.empty(1).device.type)  # the default device while the architecture is built
        return Net()

    def forbidden(*args, **kwargs):
        raise AssertionError("loading re-derived compression state")

    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    monkeypatch.setattr(vk.torch_transforms, "prune_threshold", forbidden)
    monkeypatch.setattr(vk.torch_transforms, "quant_scales", forbidden)
    loaded = vk.load_compressed(factory, str(tmp_path))
    monkeypatch.undo()

    assert devices == ["meta"]
    assert type(loaded.fc1) is type(model.fc1) and type(loaded.conv) is type(model.conv)
    assert all(t.device.type == "cpu" for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert loaded.tail.weight is loaded.head.weight
    assert torch.equal(loaded.offset, model.offset)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_load_into_a_built_model_and_onto_a_device(tmp_path):
    model = finalized(CONFIGS["int4-g8"])
    vk.save_compressed(model, str(tmp_path), metadata={"note": "kept"})
    dense = Net()
    loaded = vk.load_compressed(dense, str(tmp_path), device="cpu")
    assert loaded is dense and isinstance(dense.fc1, vk.CompressedLinear)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert saving.read_compression_config(str(tmp_path))["metadata"] == {"note": "kept"}


def test_folder_layout_and_size(tmp_path):
    model = finalized(CONFIGS["csr"])
    vk.save_compressed(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["vcon_compression.json", "vcon_model.safetensors"]
    config = json.load(open(tmp_path / "vcon_compression.json"))
    assert config["format_version"] == 2 and config["non_persistent_buffers"] == ["offset"]
    assert config["aliases"] == {"tail.weight": "head.weight"}
    assert set(config["modules"]) == {"conv", "fc1", "fc2"}
    dense_bytes = sum(t.numel() * t.element_size() for t in Net().state_dict().values())
    assert os.path.getsize(tmp_path / "vcon_model.safetensors") < 0.6 * dense_bytes


def test_legacy_version_1_folder_still_loads_into_a_built_model(tmp_path):
    model = finalized(CONFIGS["int8"])
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "tail.weight"}
    import safetensors.torch as st

    st.save_file(state, str(tmp_path / "model.safetensors"))
    json.dump({"format_version": 1, "modules": saving.compression_metadata(model)},
              open(tmp_path / "vcon_compression.json", "w"))
    with pytest.raises(ValueError, match="format_version 1"):
        vk.load_compressed(Net, str(tmp_path))
    dense = Net()
    dense.tail.weight = dense.head.weight
    with pytest.raises(RuntimeError, match="tail.weight"):  # v1 had no alias table: strict loading says so
        vk.load_compressed(dense, str(tmp_path))

    # A v1 folder of an untied model, as the previous save_compressed wrote it (safetensors.save_model).
    torch.manual_seed(0)
    mlp = vk.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), vk.Quantize(bits=4))
    for _, layer in vk.vcon_layers(mlp):
        layer.set_beta(0.0)
    mlp = vk.finalize(mlp)
    old = tmp_path / "v1-mlp"
    old.mkdir()
    st.save_model(mlp, str(old / "model.safetensors"))
    json.dump({"format_version": 1, "modules": saving.compression_metadata(mlp)},
              open(old / "vcon_compression.json", "w"))
    fresh = vk.load_compressed(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), str(old))
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), mlp(x))


def test_bad_inputs_are_named(tmp_path):
    model = finalized(CONFIGS["int8"])
    vk.save_compressed(model, str(tmp_path))
    with pytest.raises(TypeError, match="model_or_factory must be an nn.Module .* or a callable"):
        vk.load_compressed("Net", str(tmp_path))
    with pytest.raises(TypeError, match="the factory returned dict"):
        vk.load_compressed(dict, str(tmp_path))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        vk.save_compressed({"w": torch.zeros(1)}, str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="not written by save_compressed"):
        vk.load_compressed(Net, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no submodule 'conv'; was it saved from another architecture"):
        vk.load_compressed(lambda: nn.Sequential(nn.Linear(2, 2)), str(tmp_path))

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(4, 4)

    with pytest.raises(RuntimeError, match="extra.weight"):
        vk.load_compressed(Wider, str(tmp_path))
    json.dump({"format_version": 99}, open(tmp_path / "vcon_compression.json", "w"))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        vk.load_compressed(Net, str(tmp_path))


def test_unfinalized_and_uncompressed_models_are_refused(tmp_path):
    model = Net()
    with pytest.raises(ValueError, match="no finalized"):
        vk.save_compressed(model, str(tmp_path))
    vk.convert(model, vk.Prune(sparsity=0.5))
    with pytest.raises(ValueError, match="call vk.finalize"):
        vk.save_compressed(model, str(tmp_path))


def test_readme_save_example_runs_as_written(tmp_path, monkeypatch):
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = re.search(r"<!-- save-example:begin -->\s*```python\n(.*?)```\s*<!-- save-example:end -->", readme, re.S)
    assert block, "README.md has no <!-- save-example:begin --> python block"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert isinstance(namespace["loaded"][0], vk.CompressedLinear)
    assert (tmp_path / "out" / "mlp-int4" / "vcon_model.safetensors").exists()

"""compressed-tensors export on small BERTs: plain transformers (no vcon_kernels) loads the exact weights.

The loading side runs in ``ct_load_worker.py``, a process that cannot import vcon_kernels.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

import vcon_kernels as vk
from vcon_kernels.integrations import hf
from vcon_kernels.integrations.hf.compressed_tensors import EXPORTERS
from vcon_kernels.integrations.hf.compressed_tensors import UnsupportedExport
from vcon_kernels.integrations.hf.compressed_tensors import pack_int32

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ct_load_worker.py")
MIXED = {"*layer.0.*": vk.Quantize(bits=4, granularity="group", group_size=16),
         "*layer.1.attention.*": vk.Quantize(bits=8),
         "*layer.1.intermediate*": vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=4, granularity="tensor")),
         "*": vk.Quantize(bits=8, granularity="tensor")}
INT4_G16 = vk.Quantize(bits=4, granularity="group", group_size=16)


@pytest.fixture(autouse=True)
def quiet():
    transformers.utils.logging.set_verbosity_error()
    yield
    transformers.utils.logging.set_verbosity_warning()


def tiny_bert(config, dtype=torch.float32, seed=0):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=96, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg).to(dtype).eval()
    hf.convert(model, config)
    for _, layer in vk.vcon_layers(model):
        layer.set_beta(0.0)
    return vk.finalize(model).eval()


def dense_reference(model):
    """The finalized model with every CompressedLinear as an nn.Linear holding its materialized weight."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, vk.CompressedLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, dtype=module.storage.dtype)
            linear.weight.data, linear.bias.data = module.weight.detach().clone(), module.bias.detach().clone()
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent), attr, linear)
    return ref


def load_elsewhere(tmp_path, inputs, folders):
    """Run ct_load_worker.py on ``folders`` (no vcon_kernels importable); its results."""
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([sys.executable, WORKER, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"),
                          *map(str, folders)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 40, 8, 3])
def test_packing_matches_the_compressed_tensors_library(bits, cols):
    torch.manual_seed(cols)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), dtype=torch.int8)
    codes[0, :] = -(1 << (bits - 1))  # the extremes: the top word's sign bit is set
    codes[1, :] = (1 << (bits - 1)) - 1
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An fp32 model with mixed schemes and a bf16 one, exported, then loaded by one worker process."""
    tmp = tmp_path_factory.mktemp("ct")
    models = {"fp32": tiny_bert(MIXED), "bf16": tiny_bert(INT4_G16, dtype=torch.bfloat16)}
    for name, model in models.items():
        hf.save_pretrained_compressed(model, str(tmp / name), format="compressed-tensors")
    inputs = {"input_ids": torch.randint(0, 64, (4, 11)), "attention_mask": torch.ones(4, 11, dtype=torch.long)}
    inputs["attention_mask"][0, 7:] = 0
    got = load_elsewhere(tmp, inputs, [tmp / name for name in models])
    return {name: (model, tmp / name, got[str(tmp / name)]) for name, model in models.items()}, inputs


def test_mixed_schemes_config_and_tensors(exported):
    model, folder, _ = exported[0]["fp32"]
    config = json.load(open(folder / "config.json"))["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and config["sparsity_config"] == {}
    assert config["ignore"] == ["bert.pooler.dense", "classifier"]
    weights = {json.dumps(g["weights"], sort_keys=True): sorted(g["targets"]) for g in config["config_groups"].values()}
    int4_g16 = {"dynamic": False, "group_size": 16, "num_bits": 4, "strategy": "group", "symmetric": True,
                "type": "int"}
    assert weights[json.dumps(int4_g16, sort_keys=True)] == sorted(
        n for n, m in model.named_modules() if n.startswith("bert.encoder.layer.0.") and hasattr(m, "storage"))
    assert len(weights) == 3  # int4 g16; int8 per channel (tensor scales written per channel); int4 per channel
    tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
    q = "bert.encoder.layer.0.attention.self.query."
    assert {k[len(q):] for k in tensors if k.startswith(q)} == {"weight_packed", "weight_scale", "weight_shape",
                                                               "bias"}
    assert tensors[q + "weight_packed"].dtype == torch.int32 and tensors[q + "weight_packed"].shape == (48, 6)
    assert tensors[q + "weight_scale"].shape == (48, 3) and tensors[q + "weight_shape"].tolist() == [48, 48]
    assert tensors["bert.encoder.layer.1.output.dense.weight_scale"].shape == (48, 1)


def test_mixed_schemes_load_exactly_in_plain_transformers(exported):
    (model, _, got), inputs = exported[0]["fp32"], exported[1]
    assert got["quantization_config"] == "CompressedTensorsConfig"
    assert set(got["classes"].values()) >= {"Linear"}
    with torch.no_grad():
        reference = dense_reference(model)(**inputs).logits
        finalized = model(**inputs).logits
    compressed = {n + ".weight" for n, m in model.named_modules() if isinstance(m, vk.CompressedLinear)}
    assert len(compressed & set(got["weights"])) == 6  # block 0's six linears (the LayerNorm weights too)
    for name, weight in got["weights"].items():
        assert torch.equal(weight, model.get_submodule(name[: -len(".weight")]).weight), name
    assert torch.equal(got["logits"], reference)  # the format's arithmetic is ours: bit for bit
    torch.testing.assert_close(got["logits"], finalized, rtol=1e-5, atol=1e-6)  # our fast paths sum in their order


def test_bf16_model_loads_in_bf16_within_bf16_rounding(exported):
    (model, folder, got), inputs = exported[0]["bf16"], exported[1]
    tensors = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert tensors["bert.encoder.layer.0.attention.self.query.weight_scale"].dtype == torch.bfloat16  # model dtype
    assert got["logits"].dtype == torch.bfloat16
    for name, weight in got["weights"].items():
        # (code * bf16 scale) in bf16 against bf16(code * fp32 scale): at most a few bf16 ulps apart
        torch.testing.assert_close(weight, model.get_submodule(name[: -len(".weight")]).weight, rtol=2 ** -6, atol=0)
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(got["logits"].float(), expected.float(), rtol=0.05, atol=0.02 * expected.abs().max())


@pytest.mark.parametrize("config, message", [
    (vk.Quantize(bits=1), "binary codes have no compressed-tensors export"),
    (vk.Quantize(bits=2), "int2 codes have no compressed-tensors export"),
    (vk.LowRank(rank=4), "a finalized LowRankLinear has no compressed-tensors export"),
    (vk.Prune(sparsity=0.9), "storage SparseWeight .'csr'. has no compressed-tensors export .compressed-tensors has "
                             "no sparse format any more"),
    (vk.Prune(granularity="nm", n=2, m=4), "storage NMSparseWeight .'nm'. has no compressed-tensors export"),
])
def test_formats_without_an_equivalent_raise_naming_the_supported_ones(config, message, tmp_path):
    model = tiny_bert({"*layer.1.output.dense": config, "*": vk.Quantize(bits=8)})
    with pytest.raises(UnsupportedExport, match=message) as exc:
        hf.save_pretrained_compressed(model, str(tmp_path / "ct"), format="compressed-tensors")
    assert "bert.encoder.layer.1.output.dense" in str(exc.value)
    assert "supported: int4 and int8 symmetric quantization" in str(exc.value)
    assert not (tmp_path / "ct").exists()  # nothing written


def test_unknown_storage_types_fail_loudly(tmp_path, monkeypatch):
    """A storage this exporter was not taught (e.g. one added later) must not be exported as something else."""
    model = tiny_bert(vk.Quantize(bits=8))
    storage_type = type(model.bert.encoder.layer[0].attention.self.query.storage)
    subclass = type("NewQuantizedWeight", (storage_type,), {"format_name": "new"})
    model.bert.encoder.layer[0].attention.self.query.storage.__class__ = subclass
    with pytest.raises(UnsupportedExport, match="storage NewQuantizedWeight .'new'. has no compressed-tensors export"):
        hf.save_pretrained_compressed(model, str(tmp_path / "ct"), format="compressed-tensors")
    assert storage_type in EXPORTERS and subclass not in EXPORTERS


def test_a_reloaded_vcon_folder_exports_without_the_vcon_marker(tmp_path):
    model = tiny_bert(vk.Quantize(bits=8))
    hf.save_pretrained_compressed(model, str(tmp_path / "vcon"))
    reloaded = hf.from_pretrained_compressed(str(tmp_path / "vcon"))
    hf.save_pretrained_compressed(reloaded, str(tmp_path / "ct"), format="compressed-tensors")
    config = json.load(open(tmp_path / "ct" / "config.json"))
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "transformers_weights" not in config

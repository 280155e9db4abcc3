"""Hugging Face folders: plain from_pretrained refuses (never random weights), our loader builds on meta."""

import json
import os

import pytest
import torch
import transformers

import vcon_kernels as vk
from vcon_kernels.integrations import hf
from vcon_kernels.integrations.hf.pretrained import LOADER


@pytest.fixture(autouse=True)
def quiet():
    transformers.utils.logging.set_verbosity_error()
    yield
    transformers.utils.logging.set_verbosity_warning()


INT4_G16 = vk.Quantize(bits=4, granularity="group", group_size=16)


def tiny_bert(config=INT4_G16, seed=0):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg).eval()
    hf.convert(model, config)
    for _, layer in vk.vcon_layers(model):
        layer.set_beta(0.0)
    return vk.finalize(model).eval()


def test_plain_from_pretrained_refuses_and_names_the_loader(tmp_path):
    model = tiny_bert()
    hf.save_pretrained_compressed(model, str(tmp_path))
    config = json.load(open(tmp_path / "config.json"))
    assert config["quantization_config"]["quant_method"] == "vcon_kernels"
    assert config["quantization_config"]["loader"] == LOADER
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(ValueError, match=LOADER.replace(".", r"\.")):
        transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    # A transformers that ignores `transformers_weights` still finds no weights to load: it refuses too.
    del config["transformers_weights"]
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path))


def test_from_pretrained_compressed_builds_on_meta_and_is_exact(tmp_path, monkeypatch):
    model = tiny_bert(vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8)))
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    hf.save_pretrained_compressed(model, str(tmp_path))

    devices = []
    real_init = transformers.BertForSequenceClassification.__init__

    def init(self, *args, **kwargs):
        devices.append(torch.empty(1).device.type)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(transformers.BertForSequenceClassification, "__init__", init)
    loaded = hf.from_pretrained_compressed(str(tmp_path))
    monkeypatch.undo()
    assert devices == ["meta"]  # the dense weights were never allocated nor initialized
    assert not loaded.training
    assert isinstance(loaded.bert.encoder.layer[1].output.dense, vk.CompressedLinear)
    assert all(t.device.type == "cpu" for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert torch.equal(loaded.bert.embeddings.position_ids, model.bert.embeddings.position_ids)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    # Saving the reloaded model again gives the same folder contents.
    again = tmp_path / "again"
    hf.save_pretrained_compressed(loaded, str(again))
    loaded2 = hf.from_pretrained_compressed(str(again))
    with torch.no_grad():
        assert torch.equal(loaded2(input_ids=ids).logits, expected)


def test_bad_arguments_are_named(tmp_path):
    model = tiny_bert()
    with pytest.raises(ValueError, match="format must be one of 'vcon', 'compressed-tensors', got 'gguf'"):
        hf.save_pretrained_compressed(model, str(tmp_path), format="gguf")
    with pytest.raises(TypeError, match="expects a transformers PreTrainedModel; use vk.save_compressed"):
        hf.save_pretrained_compressed(torch.nn.Sequential(torch.nn.Linear(2, 2)), str(tmp_path))
    hf.save_pretrained_compressed(model, str(tmp_path))
    meta = json.load(open(tmp_path / "vcon_compression.json"))
    meta["metadata"]["transformers_class"] = "NoSuchModel"
    config = json.load(open(tmp_path / "config.json"))
    config["architectures"] = None
    json.dump(meta, open(tmp_path / "vcon_compression.json", "w"))
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="names no known model class .'NoSuchModel'.; pass model_class="):
        hf.from_pretrained_compressed(str(tmp_path))
    loaded = hf.from_pretrained_compressed(str(tmp_path), model_class=transformers.BertForSequenceClassification)
    assert isinstance(loaded.classifier, torch.nn.Linear)
    assert os.path.exists(tmp_path / "vcon_model.safetensors")


def test_plain_save_pretrained_of_a_compressed_model_refuses(tmp_path):
    """Plain save_pretrained would write tensors from_pretrained re-initializes at random: it refuses,
    after vk.finalize and after from_pretrained_compressed, and writes nothing."""
    model = tiny_bert()
    with pytest.raises(RuntimeError, match="save_pretrained_compressed"):
        model.save_pretrained(str(tmp_path / "plain"))
    assert not (tmp_path / "plain").exists()
    hf.save_pretrained_compressed(model, str(tmp_path / "ours"))
    reloaded = hf.from_pretrained_compressed(str(tmp_path / "ours"))
    with pytest.raises(RuntimeError, match="save_pretrained_compressed"):
        reloaded.save_pretrained(str(tmp_path / "plain"))
    assert not (tmp_path / "plain").exists()
    # A dense model of the same class still saves normally (the guard is on the instances only).
    dense = transformers.BertForSequenceClassification(model.config)
    dense.save_pretrained(str(tmp_path / "dense"))
    assert (tmp_path / "dense" / "model.safetensors").exists()


def test_peft_adapters_of_a_finalized_model_still_save(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg)
    hf.convert(model, vk.Quantize(bits=8))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    for _, layer in vk.vcon_layers(wrapped):
        layer.set_beta(0.0)
    wrapped = vk.finalize(wrapped)
    wrapped.save_pretrained(str(tmp_path))  # PeftModel.save_pretrained: the adapters alone
    assert (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(RuntimeError, match="save_pretrained_compressed"):
        wrapped.base_model.model.save_pretrained(str(tmp_path / "base"))

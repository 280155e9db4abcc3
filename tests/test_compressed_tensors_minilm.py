"""all-MiniLM-L6-v2 with its 36 encoder linears as int4 g32 / int8 per channel, exported to compressed-tensors
and loaded by plain transformers in a process that cannot import vcon_kernels: the same logits, bit for bit."""

import os

import torch
import transformers
from test_compressed_tensors import dense_reference
from test_compressed_tensors import load_elsewhere

import vcon_kernels as vk
from vcon_kernels.integrations import hf
from vcon_kernels.tasks.minilm_rt import minilm_path
from vcon_kernels.tasks.minilm_rt import quiet_transformers

SENTENCES = ["a gorgeous, moving film", "dull and lifeless", "sharp, funny and humane", "a tedious mess of a movie"]
CONFIGS = {"int4-g32": vk.Quantize(bits=4, granularity="group", group_size=32), "int8-channel": vk.Quantize(bits=8)}


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def test_minilm_int4_and_int8_reload_in_plain_transformers_with_identical_logits(tmp_path):
    quiet_transformers()
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    inputs = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    models = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        hf.convert(model, config, include=["*encoder.layer.*"])
        assert len(vk.vcon_layers(model)) == 36
        for _, layer in vk.vcon_layers(model):
            layer.set_beta(0.0)
        models[name] = vk.finalize(model).eval()
        hf.save_pretrained_compressed(models[name], str(tmp_path / name), tokenizer=tok, format="compressed-tensors")
    got = load_elsewhere(tmp_path, inputs, [tmp_path / name for name in CONFIGS])

    dense = folder_bytes(minilm_path())
    sizes = {name: folder_bytes(tmp_path / name) for name in CONFIGS}
    assert sizes["int4-g32"] < sizes["int8-channel"] < 0.7 * dense  # the 47 MB embedding table stays dense
    for name, model in models.items():
        result = got[str(tmp_path / name)]
        with torch.no_grad():
            reference = dense_reference(model)(**inputs).logits
            finalized = model(**inputs).logits
        assert torch.equal(result["logits"], reference), name
        torch.testing.assert_close(result["logits"], finalized, rtol=1e-5, atol=1e-6)
        assert (tmp_path / name / "tokenizer.json").exists()
    print(f"MiniLM safetensors: dense {dense / 1e6:.1f} MB, "
          + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))

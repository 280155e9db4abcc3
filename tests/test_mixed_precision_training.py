"""Real bf16 mixed-precision runs on all-MiniLM-L6-v2: the HF Trainer (bf16=True, use_cpu=True) and
Accelerate (mixed_precision="bf16"). The loss goes down, beta reaches 0, parameters stay fp32,
finalize works, and the finalized model's logits match the beta = 0 model under the same autocast.
"""

import pytest
import torch

import vcon_kernels as vk
from vcon_kernels.tasks.minilm_rt import minilm_path
from vcon_kernels.tasks.minilm_rt import quiet_transformers

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from vcon_kernels.integrations import hf  # noqa: E402  (needs transformers)

SENTENCES = [("a gorgeous, moving film", 1), ("dull and lifeless", 0), ("sharp, funny and humane", 1),
             ("a tedious mess", 0), ("the best film of the year", 1), ("I walked out bored", 0),
             ("warm and wonderfully acted", 1), ("a clumsy, joyless slog", 0)]
STEPS, TRANSITION = 16, 8
INT4 = vk.Quantize(bits=4, granularity="group", group_size=32)
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def setup(config=INT4):
    quiet_transformers()
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    hf.convert(model, config)
    enc = tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])
    return model, enc, labels


class Sentences(torch.utils.data.Dataset):
    def __init__(self, enc, labels):
        self.enc, self.labels = enc, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def check_finalized_matches_beta_zero(model, enc):
    assert all(float(layer.beta.max()) == 0.0 for _, layer in vk.vcon_layers(model))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.eval()
    with torch.no_grad(), torch.autocast(**BF16):
        before = model(**enc).logits  # Trainer / Accelerate wrap forward to return fp32 outputs
    vk.finalize(model)
    assert not vk.vcon_layers(model)
    with torch.no_grad(), torch.autocast(**BF16):
        after = model(**enc).logits
    torch.testing.assert_close(after.float(), before.float(), rtol=2e-2, atol=2e-2)


def record_layer_dtypes(model):
    """dtypes of every VCON layer's output, per call (the autocast evidence: wrapped models return fp32)."""
    seen = []
    for _, layer in vk.vcon_layers(model):
        layer.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


def test_hf_trainer_bf16(tmp_path):
    model, enc, labels = setup()
    dtypes = record_layer_dtypes(model)
    sched = vk.VCONScheduler(model, steps=TRANSITION)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=STEPS, per_device_train_batch_size=8,
        learning_rate=3e-4, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sentences(enc, labels),
                                   callbacks=[hf.VCONCallback(sched)])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS and sum(losses[-4:]) < sum(losses[:4]), losses
    assert dtypes and set(dtypes) == {torch.bfloat16}
    check_finalized_matches_beta_zero(model, enc)


def test_accelerate_bf16():
    model, enc, labels = setup(vk.Prune(sparsity=0.5))
    dtypes = record_layer_dtypes(model)
    accelerator = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    sched = vk.VCONScheduler(model, steps=TRANSITION)
    losses = []
    for _ in range(STEPS):
        out = model(**enc, labels=labels)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad()
        sched.step()
        losses.append(out.loss.item())
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert dtypes and set(dtypes) == {torch.bfloat16}  # Accelerate ran the forward under CPU bf16 autocast
    check_finalized_matches_beta_zero(accelerator.unwrap_model(model), enc)

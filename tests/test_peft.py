"""PEFT LoRA on VCON layers: the memory-tight recipe (frozen base fading into its compressed form
while the adapters learn), a trainable base, finalize keeping the adapters as a separate branch,
and merging before finalize.
"""

import pytest
import torch
from torch import nn

import vcon_kernels as vk

peft = pytest.importorskip("peft")  # a test extra (pyproject [test]); installed by `make test`

STEPS, TRANSITION = 40, 20


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    teacher = torch.randn(16, 4, generator=g)
    return x, (x @ teacher).argmax(1)


def lora_model(config, trainable_base=False, seed=0):
    torch.manual_seed(seed)
    model = vk.convert(MLP(), config, filter_fn=lambda module, name: name != "head")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                       modules_to_save=["head"]))
    if trainable_base:
        for _, layer in vk.vcon_layers(model):
            layer.weight.requires_grad_(True)
    return model


def train(model, steps=STEPS):
    x, y = data()
    sched = vk.VCONScheduler(model, steps=TRANSITION)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(steps):
        i = (step * 32) % 256
        loss = nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    return losses


def test_peft_sees_vcon_layers_as_linear():
    model = lora_model(vk.Prune(sparsity=0.8))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert sorted(wrapped) == ["base_model.model.fc1", "base_model.model.fc2"]
    assert all(isinstance(m.base_layer, vk.VCONLinear) for n, m in model.named_modules() if n in wrapped)


@pytest.mark.parametrize("config", [vk.Prune(sparsity=0.8), vk.Quantize(bits=4, granularity="group", group_size=16)],
                         ids=["prune80", "int4"])
def test_frozen_base_adapters_learn_while_beta_fades(config):
    model = lora_model(config)
    layers = [layer for _, layer in vk.vcon_layers(model)]
    frozen = [layer.weight.detach().clone() for layer in layers]
    lora_a = [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]
    losses = train(model)
    assert all(float(layer.beta.max()) == 0.0 for layer in layers)
    assert all(torch.equal(layer.weight, w) and layer.weight.grad is None for layer, w in zip(layers, frozen))
    after = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert all(not torch.equal(a, b) for a, b in zip(lora_a, after)), "the adapters did not train"
    assert sum(losses[-5:]) < sum(losses[:5]), losses

    x = data(1)[0][:16]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    vk.finalize(model)
    bases = [m.base_layer for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert all(isinstance(b, vk.CompressedLinear) for b in bases)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="cannot absorb a merged adapter"):
        model.merge_and_unload()


def test_trainable_base_gets_gradients():
    model = lora_model(vk.Prune(sparsity=0.8), trainable_base=True)
    layers = [layer for _, layer in vk.vcon_layers(model)]
    before = [layer.weight.detach().clone() for layer in layers]
    train(model, steps=5)
    assert all(not torch.equal(layer.weight, w) for layer, w in zip(layers, before))


def test_merge_before_finalize_folds_adapters_into_latent_weight():
    model = lora_model(vk.Prune(sparsity=0.8))
    train(model)
    x = data(1)[0][:16]
    model.eval()
    with torch.no_grad():
        with_adapter = model(x)
    merged = model.merge_and_unload()  # W <- W + B A in the VCON layers' latent weights
    assert [type(m) for m in (merged.fc1, merged.fc2)] == [vk.VCONLinear, vk.VCONLinear]
    with torch.no_grad():
        vcon_merged = merged(x)
    vk.finalize(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), vcon_merged, rtol=1e-5, atol=1e-5)
    # Re-compressing W + BA is a different model from compressed W plus the adapter branch.
    assert not torch.allclose(vcon_merged, with_adapter, atol=1e-4)


def test_frozen_vcon_layer_saves_no_input():
    layer = vk.VCONLinear.from_linear(nn.Linear(32, 32), vk.Quantize(bits=8)).requires_grad_(False)
    layer.set_beta(0.5)
    x = torch.randn(64, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.untyped_storage().nbytes() >= x.numel() * x.element_size() for t in saved
                   if t is not layer.weight), [tuple(t.shape) for t in saved]
    y.sum().backward()
    expected = torch.ones(64, 32) @ vk.functional.blended_weight(layer.weight, 0.5, layer.config)
    torch.testing.assert_close(x.grad, expected)

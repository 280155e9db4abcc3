"""Swap modules in place: ``convert`` (dense -> VCON) and ``finalize`` (VCON -> compressed).

Both validate and build every replacement first and swap only when all succeeded, so a
failed call leaves the model exactly as it was. A module reachable under several names
(shared layers) is replaced everywhere by the same new module; parameters are shared
with the original modules, so weight tying survives.

Example usage::

    import vcon_kernels as vk
    model = vk.convert(model, vk.Prune(sparsity=0.9), filter_fn=lambda module, name: name != "head")
    sched = vk.VCONScheduler(model, steps=1000)
    ...  # train, calling sched.step() after each optimizer step
    model = vk.finalize(model)
"""

from __future__ import annotations

import warnings
from typing import Callable
from typing import Optional
from typing import Union

import torch
from torch import nn

from .batchnorm import finalize_batchnorms
from .batchnorm import split_batchnorms
from .compressed.build import finalize_layer
from .configs import VCONConfig
from .modules.base import VCONLayerBase
from .modules.conv import VCONConv2d
from .modules.linear import VCONLinear

ConfigOrFn = Union[VCONConfig, Callable[[nn.Module, str], Optional[VCONConfig]]]
CONVERTIBLE = (nn.Linear, nn.Conv2d)
# Modules that hold a linear or convolution weight but have no VCON form (named in the warning).
_LINEAR_LIKE = (nn.Bilinear, nn.Conv1d, nn.Conv3d, nn.MultiheadAttention,
                nn.modules.conv._ConvTransposeNd)


def _references(model: nn.Module):
    """{id(module): (module, [(parent, attribute name, qualified name), ...])} for every submodule."""
    refs: dict = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None:
                continue
            qualified = f"{parent_name}.{attr}" if parent_name else attr
            refs.setdefault(id(child), (child, []))[1].append((parent, attr, qualified))
    return refs


def _swap(model: nn.Module, replacements: dict) -> nn.Module:
    """Apply {id(old): (old, new)}; returns the new root if the root itself was replaced."""
    refs = _references(model)
    for key, (_, new) in replacements.items():
        for parent, attr, _ in refs.get(key, (None, []))[1]:
            parent._modules[attr] = new
    root = replacements.get(id(model))
    return root[1] if root is not None else model


def _config_for(config: ConfigOrFn, name: str, module: nn.Module) -> Optional[VCONConfig]:
    if isinstance(config, VCONConfig):
        return config
    chosen = config(module, name)
    if chosen is not None and not isinstance(chosen, VCONConfig):
        raise TypeError(f"{name}: the config function returned {type(chosen).__name__}, expected a config or None")
    return chosen


def _weight_read_elsewhere(model: nn.Module) -> dict:
    """{id(module): reason} for Linear layers whose weight their owner reads without calling them.

    ``nn.MultiheadAttention`` passes ``out_proj.weight`` straight to ``F.multi_head_attention_forward``:
    a VCON layer there would never run, and the model would silently train the dense weight.
    """
    found = {}
    for _, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(module.out_proj, nn.Linear):
            found[id(module.out_proj)] = (
                "its weight is read directly by nn.MultiheadAttention (F.multi_head_attention_forward), "
                "not through its forward"
            )
    return found


def _not_convertible(module: nn.Module) -> Optional[str]:
    """Why a Linear/Conv-like module cannot become a VCON layer (None: it can)."""
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is not nn.Linear.forward:
        return f"{cls.__name__} subclasses nn.Linear with its own forward (converting would drop it)"
    if isinstance(module, nn.Conv2d) and cls.forward is not nn.Conv2d.forward:
        return f"{cls.__name__} subclasses nn.Conv2d with its own forward (converting would drop it)"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module with uninitialized parameters (run one forward first)"
    if isinstance(module, CONVERTIBLE):
        return None
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return ("transformers Conv1D stores its weight transposed (in, out); it has no VCON form "
                "(models with nn.Linear projections convert)")
    if isinstance(module, nn.MultiheadAttention):
        return "nn.MultiheadAttention keeps its input projection as a raw parameter (in_proj_weight)"
    if isinstance(module, _LINEAR_LIKE):
        return f"no VCON layer for {cls.__name__} (only nn.Linear and nn.Conv2d)"
    return None


def _disable_encoder_fastpath(model: nn.Module, converted: set) -> None:
    """Keep ``nn.TransformerEncoderLayer``'s inference fast path off where its linears are VCON layers.

    In eval mode without grad the fast path calls a fused kernel with ``linear1.weight`` and
    ``linear2.weight`` directly, bypassing the layers' forward (the blend). Its own guard
    ``activation_relu_or_gelu`` falsy makes it take the regular path; nothing else reads it.
    """
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and (
            id(module.linear1) in converted or id(module.linear2) in converted
        ):
            module.activation_relu_or_gelu = 0


def convert(model: nn.Module, config: ConfigOrFn, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
            split_batchnorm: bool = True):
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` by its VCON layer; returns the model.

    Subclasses whose forward is the parent's (HF's ``NonDynamicallyQuantizableLinear``, a
    user's ``class MyLinear(nn.Linear)`` adding attributes) convert too; a subclass with its
    own forward, ``nn.MultiheadAttention``'s ``out_proj`` (its weight is read outside its
    forward), HF ``Conv1D`` and other Linear/Conv-like modules are left dense, and one warning
    names each of them with the reason.

    Args:
        model: converted in place (the return value is the model, or the new layer when
            ``model`` itself is a single Linear/Conv2d).
        config: one config for every layer, or a function ``(module, name) -> config or
            None`` to compress layers differently (None leaves the layer dense).
        filter_fn: ``(module, name) -> bool``; only layers for which it returns True convert.
            Both callables take ``(module, name)``, as torchao's ``quantize_`` filter does.
        split_batchnorm: a converted conv directly followed by a ``BatchNorm2d`` gets a
            BatchNorm per path (``vcon_kernels/batchnorm.py``: ``beta BN_f(f) + (1 - beta)
            BN_g(g)``, finalized into the compressed conv + ``BN_g``); False keeps the one
            BatchNorm, which then normalizes the blend.

    Raises ``ValueError`` if the model already contains VCON layers, or if a layer cannot
    take the config (its name is in the message); warns and returns the model unchanged
    when nothing matches.
    """
    if not isinstance(config, VCONConfig) and not callable(config):
        raise TypeError(
            "config must be a vcon_kernels config (vk.Prune, vk.Quantize, vk.LowRank, vk.Compose) or a "
            f"function (module, name) -> config, got {type(config).__name__}"
        )
    already = [name for name, m in model.named_modules() if isinstance(m, VCONLayerBase)]
    if already:
        raise ValueError(
            f"model already contains VCON layers ({', '.join(already[:3])}{', ...' if len(already) > 3 else ''}); "
            "convert() runs once per model. To compress layers differently, pass config as a function "
            "(module, name) -> config or None."
        )
    read_elsewhere = _weight_read_elsewhere(model)
    replacements, skipped = {}, []
    for name, module in model.named_modules():
        # filter_fn sees only Linear/Conv-like modules (candidates), so it may read .groups & co.
        reason = read_elsewhere.get(id(module)) or _not_convertible(module)
        if reason is None and not isinstance(module, CONVERTIBLE):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        cfg = _config_for(config, name, module) if reason is None else None
        if reason is not None:
            skipped.append(f"{name or '<root>'} ({type(module).__name__}): {reason}")
            continue
        if cfg is None:
            continue
        where = name or type(module).__name__
        if isinstance(module, nn.Linear):
            new = VCONLinear.from_linear(module, cfg, name=where)
        else:
            new = VCONConv2d.from_conv2d(module, cfg, name=where)
        replacements[id(module)] = (module, new)
    if skipped:
        warnings.warn(
            f"vk.convert: {len(skipped)} Linear/Conv-like module(s) left dense: " + "; ".join(skipped), stacklevel=2
        )
    if not replacements:
        warnings.warn("vk.convert: no nn.Linear or nn.Conv2d matched; the model is returned unchanged", stacklevel=2)
        return model
    if not isinstance(split_batchnorm, bool):
        raise TypeError(f"split_batchnorm must be True or False, got {split_batchnorm!r}")
    _disable_encoder_fastpath(model, set(replacements))
    if split_batchnorm:
        replacements.update(split_batchnorms(model, replacements))
    return _swap(model, replacements)


def vcon_layers(model: nn.Module):
    """[(name, layer)] of every VCON layer in ``model``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, VCONLayerBase)]


def finalize(model: nn.Module, force: bool = False) -> nn.Module:
    """Replace every VCON layer by its truly compressed module; returns the model.

    Quantized layers store integer codes (int4/int2/binary bit-packed) and fp32 scales;
    pruned layers store kept values and indices (CSR or N:M), or the dense weight when
    sparsity is too low for indices to pay off; low-rank layers become two small layers.
    Outputs equal the VCON layer at beta = 0. Raises if a layer's beta > 0 unless
    ``force=True``, and if the model has no VCON layer (for example finalized already).
    """
    layers = vcon_layers(model)
    if not layers:
        raise ValueError("vk.finalize: the model has no VCON layers (already finalized, or never converted)")
    if not force:
        _check_transition_done(layers)
    replacements = {}
    for name, layer in layers:
        new = finalize_layer(layer, force=force, name=name or type(layer).__name__)
        new.train(layer.training)
        replacements[id(layer)] = (layer, new)
    replacements.update(finalize_batchnorms(model))  # a split BatchNorm leaves its compressed path's BN_g
    adapters = _adapter_wrappers(model, replacements)
    model = _swap(model, replacements)
    for wrapper in adapters:
        wrapper.merge = _refuse_merge  # on the instance: only these wrappers change
    guard_plain_save(model)
    return model


def _is_transformers_model(module: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel`` (by its class hierarchy: the core does not import transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


def guard_plain_save(model: nn.Module) -> None:
    """Make ``save_pretrained`` of every Hugging Face model in ``model`` refuse (on the instances).

    Plain ``save_pretrained`` writes the compressed modules' tensors under names that
    ``from_pretrained`` does not know: it would load the model with those weights re-initialized
    at random (transformers only logs them as missing). PEFT's ``PeftModel.save_pretrained``,
    which saves the adapters alone, is not a PreTrainedModel and keeps working.
    """
    for module in model.modules():
        if _is_transformers_model(module):
            module.save_pretrained = _refuse_plain_save


def _refuse_plain_save(*args, **kwargs):
    raise RuntimeError(
        "vcon_kernels: this model holds compressed (finalized) modules; plain save_pretrained would write weights "
        "that from_pretrained cannot read (they would be re-initialized at random). Save it with "
        "vcon_kernels.integrations.hf.save_pretrained_compressed(model, directory) (load it back with "
        "from_pretrained_compressed), or with format='compressed-tensors' for int4 / int8 weights that plain "
        "transformers + compressed-tensors and vLLM load. Nothing was written."
    )


def _adapter_wrappers(model: nn.Module, replacements: dict) -> list:
    """PEFT adapter layers (LoRA & co.) whose ``base_layer`` is a VCON layer being finalized.

    Finalizing keeps their adapters as a separate branch on top of the compressed base, which
    is exactly what the trained model computed at beta = 0. PEFT's ``merge`` would add the
    adapter delta to ``base_layer.weight.data``, which a compressed module rebuilds on every
    read: the delta would vanish without an error. ``_refuse_merge`` makes that an error.
    """
    return [m for m in model.modules()
            if id(getattr(m, "base_layer", None)) in replacements and callable(getattr(m, "merge", None))]


def _refuse_merge(*args, **kwargs):
    raise RuntimeError(
        "vcon_kernels: this adapter's base layer was finalized into a compressed module, which cannot absorb a "
        "merged adapter (the delta would be lost). Serve the adapter as a separate branch (the finalized model "
        "computes base + adapter exactly as trained), or merge before vk.finalize: merge_and_unload() folds "
        "the adapter into the latent weight, and finalize then compresses W + BA (a different model)."
    )


def transition_report(layers) -> Optional[str]:
    """None when every beta is 0; else what is unfinished and how far the scheduler got."""
    open_layers = [(name, layer) for name, layer in layers if bool((layer.beta > 0).any())]
    if not open_layers:
        return None
    name, layer = open_layers[0]
    betas = ", ".join(f"{s}={b:.4g}" for s, b in zip(layer.stage_names, layer.beta.tolist()))
    steps = getattr(layer, "scheduled_steps", None)
    if steps is None:
        how = "no vk.VCONScheduler drives these layers (create one and call sched.step() after each optimizer step)"
    elif steps[0] == 0:
        how = (f"their VCONScheduler never stepped (0 of {steps[1]} steps): sched.step() was not called after the "
               "optimizer steps (a forgotten callback: VCONCallback for the HF Trainer)")
    else:
        how = f"their VCONScheduler took {steps[0]} of the {steps[1]} steps its transition needs"
    return (f"{len(open_layers)} of {len(layers)} VCON layers still have beta > 0 (e.g. {name or '<root>'}: "
            f"{betas}); {how}")


def _check_transition_done(layers) -> None:
    report = transition_report(layers)
    if report is not None:
        raise ValueError(
            f"vk.finalize: {report}. Finish the transition, or pass force=True to finalize as if beta were 0 "
            "(the compressed model then differs from the one that was trained)"
        )


@torch.no_grad()
def refresh_masks(model: nn.Module) -> None:
    """Re-derive every stored pruning mask from the current weights."""
    for _, layer in vcon_layers(model):
        layer.refresh_mask()


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()`` (shared storages counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.device) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total

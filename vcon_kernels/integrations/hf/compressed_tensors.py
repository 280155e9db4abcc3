"""Export a finalized Hugging Face model in the compressed-tensors "pack-quantized" format.

compressed-tensors (PyPI ``compressed-tensors``) is the checkpoint format that
``transformers`` and vLLM load for integer weight-only quantization. A finalized
``CompressedLinear`` with symmetric int4 / int8 codes maps onto it exactly: per layer ``p``

* ``p.weight_packed``: int32 (N, ceil(K * bits / 32)); value ``j`` of a row, offset to
  ``u = q + 2^(bits-1)``, sits in word ``j * bits // 32`` at bit ``(j * bits) % 32``;
* ``p.weight_scale``: (N, K / group_size) per group, (N, 1) per channel, in the model dtype;
* ``p.weight_shape``: int64 ``[N, K]``; ``p.bias`` as it is; no ``p.weight``, no zero point;

and ``config.json`` gets ``quantization_config = {"quant_method": "compressed-tensors",
"format": "pack-quantized", "config_groups": {...}, "ignore": [dense linears], ...}``. The
loader dequantizes ``w = (u - 2^(bits-1)) * scale``: with fp32 scales that is exactly the
finalized layer's weight (our codes are round-half-even and clamped, as the format's).

Supported: int4 and int8 codes (``QuantizedWeight`` storages, also after prune+quantize:
the pruned codes are stored as 0), per channel, per group, or per tensor (written as per
channel with the scale repeated, the same numbers). Everything else raises, naming what is
supported: binary and int2 codes, low rank, pruning without quantization (compressed-tensors
removed its sparse formats; a legacy ``sparse-24-bitmask`` checkpoint loads in today's
transformers with *random* weights, so one is never written), convolutions, and any
storage type this exporter does not know (a new storage must be added to ``EXPORTERS``).

This module does not import compressed-tensors: the layout is written with safetensors only.

Example usage::

    hf.save_pretrained_compressed(vk.finalize(model), "out/ct", tokenizer=tok, format="compressed-tensors")
    # any machine with transformers + compressed-tensors, no vcon_kernels:
    model = AutoModelForSequenceClassification.from_pretrained("out/ct")
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ...compressed import CompressedLinear
from ...compressed import QuantizedWeight
from ...compressed.sparse_quantized import NMQuantizedWeight
from ...compressed.sparse_quantized import SparseQuantizedWeight
from ..saving import _safetensors
from ..saving import compression_metadata

FORMAT = "pack-quantized"
# The compressed-tensors release whose loader this layout was verified against (tests/test_compressed_tensors*.py).
CT_VERSION = "0.20.1"
EXPORT_BITS = (4, 8)
SUPPORTED = ("int4 and int8 symmetric quantization (vk.Quantize(bits=4|8), alone or after vk.Prune), per channel, "
             "per group or per tensor, in Linear layers")


class UnsupportedExport(ValueError):
    """A finalized layer has no compressed-tensors equivalent."""


def _quantized_codes(name: str, storage: QuantizedWeight):
    """(int8 codes (N, K), scales (N, G) fp32, bits, group size or None for per channel)."""
    if storage.bits not in EXPORT_BITS:
        kind = "binary" if storage.bits == 1 else f"int{storage.bits}"
        raise UnsupportedExport(f"{name}: {kind} codes have no compressed-tensors export; supported: {SUPPORTED}")
    rows, cols = storage.shape
    scales = storage.scales.to(torch.float32)
    group = storage.group_size
    if group == 0:  # per tensor: the same scale on every row is per channel with equal numbers
        scales, group = scales.reshape(1, 1).expand(rows, 1).contiguous(), cols
    if group == cols:
        return storage.integer_codes(), scales.reshape(rows, 1), storage.bits, None
    return storage.integer_codes(), scales.reshape(rows, cols // group), storage.bits, group


# Storage type -> function(name, storage) returning (codes, scales, bits, group size or None).
# Keyed on the exact type: a storage added later (or a subclass) must be wired here explicitly.
# Prune + quantize storages (kept codes only) export as dense codes with the pruned ones 0: the
# format has no sparse layout any more, and 0 codes dequantize to the pruned zeros exactly.
EXPORTERS = {QuantizedWeight: _quantized_codes, NMQuantizedWeight: _quantized_codes,
             SparseQuantizedWeight: _quantized_codes}


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``codes`` (N, K) as compressed-tensors' int32 words (N, ceil(K * bits / 32))."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
    per_word = 32 // bits
    u = codes.to(torch.int64) + (1 << (bits - 1))
    pad = (-u.shape[-1]) % per_word
    if pad:
        u = nn.functional.pad(u, (0, pad))
    u = u.reshape(*u.shape[:-1], -1, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=u.device)
    words = (u << shifts).sum(dim=-1)
    # Reinterpret the unsigned 32-bit words as int32 (the top nibble may set the sign bit).
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def layer_tensors(name: str, module: nn.Module, dtype: torch.dtype) -> tuple:
    """({suffix: tensor} of one exported layer, weights scheme dict)."""
    if type(module) is not CompressedLinear:
        kind = module.compression_meta().get("module", type(module).__name__)
        raise UnsupportedExport(f"{name}: a finalized {kind} has no compressed-tensors export; supported: {SUPPORTED}")
    storage = module.storage
    exporter = EXPORTERS.get(type(storage))
    if exporter is None:
        fmt = getattr(storage, "format_name", type(storage).__name__)
        hint = (" (compressed-tensors has no sparse format any more; quantize the pruned layer to export it)"
                if fmt in ("csr", "nm", "dense") else "")
        raise UnsupportedExport(f"{name}: storage {type(storage).__name__} ({fmt!r}) has no compressed-tensors "
                                f"export{hint}; supported: {SUPPORTED}")
    codes, scales, bits, group = exporter(name, storage)
    tensors = {"weight_packed": pack_int32(codes, bits), "weight_scale": scales.to(dtype).contiguous(),
               "weight_shape": torch.tensor(list(storage.shape), dtype=torch.int64)}
    if module.bias is not None:
        tensors["bias"] = module.bias.detach().contiguous()
    scheme = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group" if group else "channel",
              "group_size": group, "dynamic": False}
    return tensors, scheme


def quantization_config(schemes: dict, dense_linears: list) -> dict:
    """config.json's ``quantization_config`` for {layer name: weights scheme}."""
    by_scheme = {}
    for name, scheme in schemes.items():
        by_scheme.setdefault(json.dumps(scheme, sort_keys=True), []).append(name)
    groups = {}
    for i, (key, names) in enumerate(by_scheme.items()):
        # One scheme: the usual class target (every Linear not ignored); several: the layer names.
        targets = ["Linear"] if len(by_scheme) == 1 else names
        groups[f"group_{i}"] = {"targets": targets, "weights": json.loads(key), "input_activations": None,
                                "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(dense_linears), "sparsity_config": {}, "transform_config": {},
            "kv_cache_scheme": None, "global_compression_ratio": None, "moe_sparsity_config": None,
            "version": CT_VERSION}


def save_compressed_tensors(model, directory: str) -> str:
    """Write ``model.safetensors`` + ``config.json`` in the compressed-tensors layout; returns ``directory``.

    Raises :class:`UnsupportedExport` (a ``ValueError``) before writing anything if a layer
    cannot be exported.
    """
    modules = compression_metadata(model)  # finalized, no VCON layer left
    state = {k: v.detach() for k, v in model.state_dict().items()}
    schemes = {}
    for name in modules:
        module = model.get_submodule(name)
        dtype = module.storage.dtype if hasattr(module, "storage") else torch.float32
        tensors, schemes[name] = layer_tensors(name, module, dtype)
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    dense_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in modules]
    # safetensors stores each tensor once: tied weights (e.g. an LM head) are written as copies.
    seen, out = set(), {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        out[key] = tensor.clone() if (ptr in seen or not tensor.is_contiguous()) else tensor
        seen.add(ptr)
    os.makedirs(directory, exist_ok=True)
    _safetensors().save_file(out, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("transformers_weights", None)  # a vcon marker, if the model was loaded from a vcon folder
    config["quantization_config"] = quantization_config(schemes, dense_linears)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return directory


__all__ = ["EXPORTERS", "SUPPORTED", "UnsupportedExport", "layer_tensors", "pack_int32", "quantization_config",
           "save_compressed_tensors"]

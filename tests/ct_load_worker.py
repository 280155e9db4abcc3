"""Load compressed-tensors folders with plain transformers, in a process that cannot import vcon_kernels.

    python ct_load_worker.py INPUTS.pt OUT.pt FOLDER [FOLDER ...]

INPUTS.pt holds the model inputs (a dict of tensors); OUT.pt receives
``{folder: {"logits", "classes": {layer name: class name}, "weights": {name: dense weight}, "quantization_config"}}``
with the weights of the first encoder block after transformers / compressed-tensors decompressed them.
Used by ``tests/test_compressed_tensors*.py``; run from a temporary folder, so that nothing of this
repository is on ``sys.path``.
"""

import sys

sys.modules["vcon_kernels"] = None  # any import of vcon_kernels now raises ImportError

import torch  # noqa: E402
import transformers  # noqa: E402


def main(inputs_path, out_path, folders):
    transformers.utils.logging.set_verbosity_error()
    inputs = torch.load(inputs_path)
    out = {}
    for folder in folders:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        block = "bert.encoder.layer.0."
        out[folder] = {"logits": logits,
                       "classes": {n: type(m).__name__ for n, m in model.named_modules() if n.startswith(block)},
                       "weights": {n: p.detach().clone() for n, p in model.named_parameters()
                                   if n.startswith(block) and n.endswith(".weight")},
                       "quantization_config": type(getattr(model.config, "quantization_config", None)).__name__}
    assert not any(name == "vcon_kernels" or name.startswith("vcon_kernels.") for name in sys.modules
                   if sys.modules[name] is not None)
    torch.save(out, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

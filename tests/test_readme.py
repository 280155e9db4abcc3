"""The README's library example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_library_example_runs(capsys):
    block = next(b for b in python_blocks() if "vk.VCONScheduler(model, steps=100)" in b)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert int(capsys.readouterr().out.strip()) > 0


def test_mixed_precision_example_runs():
    block = next(b for b in python_blocks() if 'torch.autocast("cpu", dtype=torch.bfloat16):    #' in b)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_lora_example_runs():
    block = next(b for b in python_blocks() if "peft.get_peft_model" in b and "class MLP" in b)
    namespace = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)
    import vcon_kernels as vk

    assert not vk.vcon_layers(namespace["model"])

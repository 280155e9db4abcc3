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

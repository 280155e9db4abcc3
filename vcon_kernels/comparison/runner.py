"""Fine-tuning runs at equal budget: the dense model (cached on disk), then each compression method.

Two starting points (``START_POINTS``):

* ``"finetuned"``: fine-tune the dense model on the task first (cached), then compress it;
* ``"pretrained"``: the paper's protocol: every run starts from the pretrained body with a
  new task head (initialised from the run seed) and compresses while it learns the task
  (one-shot = compressed at step 0; VCON = beta fades over the transition). The dense
  reference is then the same start fine-tuned at the same budget (:func:`dense_run`).

Every compressed run starts from the same dense weights and uses the same
optimizer (AdamW, weight decay 0.01, gradient norm clipped at the task's ``clip``; 0 = no
clipping), learning-rate schedule
(linear warm-up, then cosine decay to 0, or constant), batch size, number of steps and
data order (from the run seed). Only the method differs. Timings cover the optimizer
steps only (not the periodic validation), with the device synchronised on GPUs.

Example usage::

    task = get_task("digits-mlp"); task.load()
    dense, info = dense_model(task, "out/cache")
    result = compress_run(task, dense.state_dict(), "vcon", vk.Prune(sparsity=0.9),
                          settings_for(task), transition=60, seed=0)
    print(result["test_acc"], result["size_after_mb"])
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import asdict
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

import vcon_kernels as vk

from ..tasks.base import Task
from .memory import PeakMemory
from .methods import make_method

LR_SCHEDULES = ("cosine", "constant")
START_POINTS = ("finetuned", "pretrained")
DENSE_SEED = 0
CACHE_VERSION = 1


@dataclass
class TrainSettings:
    """One fine-tuning phase (dense or compressed)."""

    steps: int
    lr: float
    batch_size: int
    warmup: float = 0.0
    lr_schedule: str = "cosine"
    eval_every: int = 0
    eval_size: Optional[int] = None
    weight_decay: float = 0.01
    clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")


def settings_for(task: Task, dense: bool = False, **overrides) -> TrainSettings:
    """The task's default settings for the dense phase or a compression run, with overrides."""
    o = task.options
    base = dict(steps=o["dense_steps"] if dense else o["steps"], lr=o["dense_lr"] if dense else o["lr"],
                batch_size=o["batch_size"], warmup=o["warmup"], eval_every=0 if dense else o["eval_every"],
                eval_size=o["eval_size"])
    if not dense:
        base["clip"] = o["clip"]
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(**base)


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    warm = int(round(settings.warmup * settings.steps))
    if step < warm:
        return (step + 1) / warm
    if settings.lr_schedule == "constant":
        return 1.0
    p = (step - warm) / max(1, settings.steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * p))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finetune(task: Task, model: torch.nn.Module, settings: TrainSettings, seed: int, method=None,
             desc: str = "train", progress: bool = True) -> dict:
    """Train ``model`` in place for ``settings.steps`` optimizer steps; returns timings and the curve.

    The curve (``history``) has one point at step 0 and every ``eval_every`` steps: the
    validation accuracy/loss on the first ``eval_size`` validation examples, the mean
    training loss since the previous point, and the method's ``progress()`` (beta).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, settings))
    batches = task.train_batches(settings.batch_size, seed)
    history, step_times, window_losses = [], [], []
    beta_curve = [1.0 if method is None else method.progress()]

    def record(step):
        point = {"step": step, "beta": 1.0 if method is None else method.progress()}
        if window_losses:
            point["train_loss"] = sum(window_losses) / len(window_losses)
            window_losses.clear()
        if settings.eval_every:
            ev = task.evaluate(model, "val", limit=settings.eval_size)
            point.update(val_acc=ev["acc"], val_loss=ev["loss"])
        history.append(point)

    record(0)
    with PeakMemory(task.device) as mem:
        bar = tqdm(range(1, settings.steps + 1), desc=desc, unit="step", disable=not progress, leave=True)
        for step in bar:
            batch = next(batches)
            _sync(task.device)
            start = time.perf_counter()
            loss = task.loss(model, batch)
            loss.backward()
            if settings.clip:
                torch.nn.utils.clip_grad_norm_(params, settings.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if method is not None:
                method.step()
                beta_curve.append(method.progress())
            _sync(task.device)
            step_times.append(time.perf_counter() - start)
            window_losses.append(loss.item())
            if settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps):
                record(step)
                bar.set_postfix(val_acc=f"{history[-1]['val_acc']:.3f}", beta=f"{history[-1]['beta']:.2f}")
    if not settings.eval_every:
        record(settings.steps)
    return {
        "history": history,
        "beta_curve": beta_curve,
        "train_time_s": sum(step_times),
        "step_ms": 1e3 * sum(step_times) / len(step_times),
        "step_ms_median": 1e3 * statistics.median(step_times),
        "peak_mem_mib": mem.peak_mib,
        "mem_kind": mem.kind,
    }


# Task options that only shape the compression runs, not the dense model or its reported metrics.
_RUN_ONLY_OPTIONS = ("steps", "lr", "warmup", "eval_every", "eval_size", "eval_batch_size", "clip")


def _cache_key(task: Task, settings: TrainSettings) -> str:
    options = {k: v for k, v in task.options.items() if k not in _RUN_ONLY_OPTIONS}
    payload = {"task": task.name, "options": options, "settings": asdict(settings), "seed": DENSE_SEED,
               "version": CACHE_VERSION, "torch": torch.__version__.split("+")[0]}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def dense_model(task: Task, cache_dir: Optional[str], settings: Optional[TrainSettings] = None,
                progress: bool = True, log=print):
    """The fine-tuned dense model and its metrics, from ``cache_dir`` when it was trained before.

    The cache key covers the task, its options (data subsets, input size) and the dense
    settings, so changing any of them trains a new dense model.
    """
    settings = settings or settings_for(task, dense=True)
    model = task.build_model(seed=DENSE_SEED)
    path = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"{task.name}-dense-{_cache_key(task, settings)}")
        if os.path.exists(path + ".pt") and os.path.exists(path + ".json"):
            model.load_state_dict(torch.load(path + ".pt", map_location=task.device, weights_only=True))
            with open(path + ".json") as f:
                info = json.load(f)
            log(f"dense model: loaded from cache {path}.pt (trained {info['train_time_s']:.0f} s earlier)")
            return model, {**info, "cached": True}
    log(f"dense model: fine-tuning {settings.steps} steps (cached afterwards)" if path else
        f"dense model: fine-tuning {settings.steps} steps")
    run = finetune(task, model, settings, seed=DENSE_SEED, desc="dense fine-tune", progress=progress)
    info = {"train_time_s": run["train_time_s"], "step_ms": run["step_ms"], "step_ms_median": run["step_ms_median"],
            "peak_mem_mib": run["peak_mem_mib"], "mem_kind": run["mem_kind"], "steps": settings.steps}
    for split in ("val", "test"):
        ev = task.evaluate(model, split, progress=progress)
        info[f"{split}_acc"], info[f"{split}_loss"] = ev["acc"], ev["loss"]
    info["size_mb"] = vk.storage_bytes(model) / 1e6
    if path:
        torch.save(model.state_dict(), path + ".pt")
        with open(path + ".json", "w") as f:
            json.dump(info, f, indent=1)
    return model, {**info, "cached": False}


def _layer_bytes(model, names) -> int:
    return sum(vk.storage_bytes(model.get_submodule(n)) for n in names)


@torch.no_grad()
def _probe_logits(task: Task, model) -> torch.Tensor:
    model.eval()
    out = task.logits(model, task.batch("val", torch.arange(min(64, task.size("val"))))).float()
    model.train()
    return out


def dense_run(task: Task, settings: TrainSettings, seed: int, progress: bool = True,
              splits=("val", "test")) -> dict:
    """The dense reference of the paper's protocol: the pretrained start (head from ``seed``)
    fine-tuned with the compressed runs' settings, scored like them (a result with method "dense")."""
    model = task.build_model(seed=seed)
    torch.manual_seed(seed)  # dropout masks, as in compress_run
    run = finetune(task, model, settings, seed=seed, desc=f"dense (seed {seed})", progress=progress)
    size = vk.storage_bytes(model) / 1e6
    result = {"method": "dense", "seed": seed, "method_detail": "dense, pretrained + fine-tuned at the same budget",
              **run, "steps": settings.steps, "size_dense_mb": size, "size_before_mb": size, "size_after_mb": size}
    for split in splits:
        ev = task.evaluate(model, split, progress=progress)
        result[f"{split}_acc"], result[f"{split}_loss"] = ev["acc"], ev["loss"]
    result["model"] = model
    return result


def compress_run(task: Task, dense_state: Optional[dict], method_name: str, config: vk.VCONConfig,
                 settings: TrainSettings, transition: int, seed: int, schedule="linear",
                 prune_every: Optional[int] = None, progress: bool = True, base_model: Optional[torch.nn.Module] = None,
                 splits=("val", "test"), split_batchnorm: bool = True) -> dict:
    """One compression run from the dense weights: convert, fine-tune, finalize, evaluate.

    ``dense_state=None`` starts from the task's pretrained model with the head initialised
    from ``seed`` (the paper's protocol; ``base_model`` is then ignored).

    Returns accuracy/loss on the validation and test splits (of the *finalized* model),
    timings, peak memory, model sizes (dense, converted before finalization, finalized;
    and the same for the compressed layers alone), the largest |logit| difference between
    the last VCON state and the finalized model on a validation batch, and the curve.
    ``splits`` are the splits scored at the end (hyperparameter searches pass ``("val",)``
    so that the test split is never looked at).
    """
    if dense_state is None:
        if not task.pretrained:
            raise ValueError(f"task {task.name!r} has no pretrained model: start it from the fine-tuned dense "
                             "model (dense_state), not from the pretrained one")
        model = task.build_model(seed=seed)
    else:
        model = copy.deepcopy(base_model) if base_model is not None else task.build_model(seed=DENSE_SEED)
        model.load_state_dict(dense_state)
    dense_bytes = vk.storage_bytes(model)
    method = make_method(method_name, config, transition, schedule=schedule, prune_every=prune_every,
                         split_batchnorm=split_batchnorm)
    model = method.attach(model, task.compress_filter(config))
    names = [n for n, _ in vk.vcon_layers(model)]
    before_bytes, layers_before = vk.storage_bytes(model), _layer_bytes(model, names)
    torch.manual_seed(seed)  # dropout masks
    run = finetune(task, model, settings, seed=seed, method=method, desc=f"{method_name} (seed {seed})",
                   progress=progress)
    probe = _probe_logits(task, model)
    model = vk.finalize(model)
    diff = (_probe_logits(task, model) - probe).abs().max().item()
    result = {"method": method_name, "seed": seed, "method_detail": method.describe(), **run,
              "size_dense_mb": dense_bytes / 1e6, "size_before_mb": before_bytes / 1e6,
              "size_after_mb": vk.storage_bytes(model) / 1e6, "layers_before_mb": layers_before / 1e6,
              "layers_after_mb": _layer_bytes(model, names) / 1e6, "layers": len(names),
              "finalize_max_abs_diff": diff}
    for split in splits:
        ev = task.evaluate(model, split, progress=progress)
        result[f"{split}_acc"], result[f"{split}_loss"] = ev["acc"], ev["loss"]
    result["model"] = model
    return result


__all__ = ["LR_SCHEDULES", "START_POINTS", "TrainSettings", "compress_run", "dense_model", "dense_run", "finetune",
           "lr_factor", "settings_for"]

"""Run a grid of compression runs (task x compression x method x seed) and append one JSON line per run.

Resumable: a run whose key (task, compression, method, seed and every setting) is already in
the output file is skipped, so a killed grid restarts where it stopped. Every number in
experiments/RESULTS.md comes from files written by this script (see the commands there).

Example::

    python experiments/grid.py --task minilm-rt --compressions prune90 --methods oneshot,vcon \\
        --seeds 0 --lr 5e-5 --val-only --out experiments/logs/minilm-select.jsonl
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from presets import COMPRESSIONS  # noqa: E402
from presets import TASKS  # noqa: E402
from presets import compression  # noqa: E402

from vcon_kernels import LowRank  # noqa: E402
from vcon_kernels.comparison.runner import TrainSettings  # noqa: E402
from vcon_kernels.comparison.runner import compress_run  # noqa: E402
from vcon_kernels.comparison.runner import dense_model  # noqa: E402
from vcon_kernels.comparison.runner import dense_run  # noqa: E402
from vcon_kernels.tasks import get_task  # noqa: E402
from vcon_kernels.tasks.minilm_rt import quiet_transformers  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--compressions", default=",".join(COMPRESSIONS))
    p.add_argument("--methods", default="oneshot,gradual,vcon")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr", type=float, required=True, help="fine-tuning learning rate (one for every method)")
    p.add_argument("--transition", type=float, default=0.3, help="transition window as a fraction of the steps")
    p.add_argument("--transition-for", default="",
                   help="per-method overrides of --transition, e.g. gradual=0.15,vcon=0.3 (each at its val best)")
    p.add_argument("--steps", type=int, default=None, help="override the preset budget")
    p.add_argument("--schedule", default="linear")
    p.add_argument("--lr-schedule", default="cosine")
    p.add_argument("--mask-update", default="step")
    p.add_argument("--grad", default="ste")
    p.add_argument("--clip", type=float, default=None, help="override the preset gradient clipping (0 = none)")
    p.add_argument("--val-only", action="store_true",
                   help="score the validation split only (for choices); default: the test split only")
    p.add_argument("--both-splits", action="store_true",
                   help="score the validation and the test split at the end of each run (validation for reading "
                   "the runs, test for the final rows; nothing is chosen on the test split)")
    p.add_argument("--from", dest="start", default="finetuned", choices=("finetuned", "pretrained"),
                   help="finetuned: compress the cached fine-tuned dense model; pretrained: the paper's protocol "
                   "(compress the pretrained model while it learns the task; method 'dense' = the same start "
                   "fine-tuned at the same budget)")
    p.add_argument("--lowrank-init", default="split", choices=("split", "reference"))
    p.add_argument("--shared-batchnorm", action="store_true",
                   help="VCON keeps one BatchNorm per conv (the behaviour before the per-path BatchNorm)")
    p.add_argument("--tag", default="", help="free label stored with each run (e.g. the investigation)")
    p.add_argument("--out", required=True)
    p.add_argument("--cache-dir", default="out/cache")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def main():
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers() if args.task == "minilm-rt" else None
    preset = TASKS[args.task]
    mask_update = args.mask_update if args.mask_update in ("step", "once") else int(args.mask_update)
    task = get_task(args.task, **preset["options"])
    task.load()
    dense_settings = TrainSettings(batch_size=task.opt("batch_size"), **preset["dense"])
    run = dict(preset["run"], **({"steps": args.steps} if args.steps else {}))
    if args.clip is not None:
        run["clip"] = args.clip
    settings = TrainSettings(batch_size=task.opt("batch_size"), lr=args.lr, lr_schedule=args.lr_schedule,
                             eval_size=task.opt("eval_size"), **run)
    fractions = {m: args.transition for m in args.methods.split(",")}
    for item in filter(None, args.transition_for.split(",")):
        method, value = item.split("=")
        fractions[method] = float(value)
    transitions = {m: max(1, round(f * settings.steps)) for m, f in fractions.items()}
    pretrained = args.start == "pretrained"
    if pretrained:
        dense, dense_info, state = None, {"val_acc": None, "test_acc": None}, None
    else:
        dense, dense_info = dense_model(task, args.cache_dir, dense_settings)
        state = {k: v.clone() for k, v in dense.state_dict().items()}
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {json.loads(line)["key"] for line in f if line.strip()}
    if args.val_only and args.both_splits:
        raise SystemExit("--val-only and --both-splits exclude each other")
    splits = ("val",) if args.val_only else ("val", "test") if args.both_splits else ("test",)
    # Seeds outermost: a grid stopped early still has every compression for the seeds it finished.
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.compressions.split(","):
            config = compression(name, args.task, mask_update, args.grad, args.lowrank_init)
            for method in args.methods.split(","):
                transition = transitions.get(method, 0)
                key = [args.task, name, method, seed, args.lr, transition, settings.steps, args.schedule,
                       args.lr_schedule, str(mask_update), args.grad, splits, settings.clip]
                key += [args.start] if pretrained else []  # finetuned keys stay those of the earlier logs
                key += ["shared-bn"] if args.shared_batchnorm and method == "vcon" else []
                key += ["init=reference"] if args.lowrank_init == "reference" and isinstance(config, LowRank) else []
                if method == "dense":  # the paper protocol's dense reference: the same for every compression
                    if not pretrained:
                        raise SystemExit("method 'dense' is the reference of --from pretrained only")
                    key = [args.task, "none", "dense", seed, args.lr, 0, settings.steps, args.lr_schedule, splits,
                           settings.clip, args.start]
                key = json.dumps(key)
                if key in done:
                    continue
                done.add(key)
                started = time.time()
                if method == "dense":
                    r = dense_run(task, settings, seed, progress=True, splits=splits)
                else:
                    r = compress_run(task, state, method, config, settings, transition, seed,
                                     schedule=args.schedule, base_model=dense, splits=splits,
                                     split_batchnorm=not args.shared_batchnorm)
                r.pop("model")
                r.update(key=key, task=args.task, compression=name, config=repr(config), lr=args.lr,
                         transition=transition, steps=settings.steps, schedule=args.schedule,
                         lr_schedule=args.lr_schedule, mask_update=str(mask_update), grad=args.grad, tag=args.tag,
                         clip=settings.clip, start=args.start, batchnorm="shared" if args.shared_batchnorm else "split",
                         lowrank_init=args.lowrank_init,
                         dense_val_acc=dense_info["val_acc"], dense_test_acc=dense_info["test_acc"],
                         wall_s=time.time() - started)
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
                scores = " ".join(f"{s} {100 * r[f'{s}_acc']:.2f}" for s in splits)
                print(f"[{time.strftime('%H:%M:%S')}] {args.task} {name} {method} seed {seed} lr {args.lr:g} "
                      f"Q {transition}: {scores} ({r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

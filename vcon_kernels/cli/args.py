"""Command-line options of ``vcon compress`` and how they become a config, a task and settings.

Unknown options and bad values exit with status 2 and a message naming the option, the
accepted values and, for a near miss, the option that was probably meant.
"""

from __future__ import annotations

import argparse
import difflib
import sys

import vcon_kernels as vk

from ..comparison.methods import METHOD_NAMES
from ..comparison.runner import LR_SCHEDULES
from ..comparison.runner import START_POINTS
from ..configs import LOWRANK_INITS
from ..scheduler import SCHEDULES
from ..tasks import DEFAULT_TASK
from ..tasks import TASKS

COMPRESSIONS = ("prune", "quantize", "lowrank", "prune+quantize")
# Task options settable from the command line (each a key of the tasks' ``defaults``), with their help.
TASK_OPTION_HELP = {
    "train_size": "training examples used (0 = the whole split)",
    "val_size": "validation examples (0 = the whole split)",
    "test_size": "test examples (0 = the whole split)",
    "max_length": "tokens per sentence (text tasks)",
    "image_size": "image side in pixels (image tasks)",
    "hidden": "hidden width of the MLP",
    "eval_size": "validation examples scored at each point of the curve (the whole split is scored at the end)",
}
TASK_OPTIONS = tuple(TASK_OPTION_HELP)


def task_defaults(key: str) -> str:
    """"default: minilm-rt 60, lite0-fmnist 200" for a task option (the tasks that have it)."""
    values = [f"{name} {cls.defaults[key]:g}" if isinstance(cls.defaults[key], float) else
              f"{name} {cls.defaults[key]}" for name, cls in TASKS.items() if key in cls.defaults]
    return "default: " + ", ".join(values)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that suggests the closest known option for an unknown one."""

    def _all_options(self) -> list:
        options = []
        for action in self._actions:
            options += action.option_strings
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    options += [s for a in sub._actions for s in a.option_strings]
        return options

    def error(self, message):
        if "unrecognized arguments" in message:
            unknown = message.split(":", 1)[1].split()
            known = self._all_options()
            hints = []
            for opt in unknown:
                if opt.startswith("-"):
                    close = difflib.get_close_matches(opt.split("=")[0], known, n=1)
                    if close:
                        hints.append(f"{opt}: did you mean {close[0]}?")
            message = f"unknown option(s): {' '.join(unknown)}" + ("\n  " + "\n  ".join(hints) if hints else "")
            message += f"\n  see `{self.prog} compress --help` for every option"
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _word_or_positive_int(words: tuple, value: str):
    """``value`` if it is one of ``words``, else a positive int (argparse type helper)."""
    if value in words:
        return value
    expected = ", ".join(repr(w) for w in words)
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected} or a positive int, got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be {expected} or a positive int, got {value!r}")
    return k


def _mask_update(value: str):
    return _word_or_positive_int(("step", "once"), value)


def _nm(value: str):
    try:
        n, m = (int(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like N:M (e.g. 2:4), got {value!r}") from None
    return n, m


def _seeds(value: str):
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated ints (e.g. 0,1,2), got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"must be distinct comma-separated ints, got {value!r}")
    return seeds


def _methods(value: str):
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in METHOD_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(METHOD_NAMES)}, got {value!r}")
    return names


def _threads(value: str):
    return _word_or_positive_int(("auto",), value)


def _fraction(value: str):
    x = float(value)
    if not 0.0 < x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value!r}")
    return x


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="vcon", description="VCON compression of real pretrained models, "
                            "compared with one-shot and gradual compression at equal training budget.")
    sub = parser.add_subparsers(dest="command", parser_class=ArgumentParser)
    p = sub.add_parser("compress", help="compress a model three ways and print the comparison table",
                       description="Fine-tune the dense model (cached), then compress it with each method at the "
                       "same budget (or, with --from pretrained, compress the pretrained model while it learns the "
                       "task); print and save the comparison (table, CSV/JSON, PNG plot).")
    g = p.add_argument_group("task")
    g.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS), help=f"default {DEFAULT_TASK}")
    for opt, text in TASK_OPTION_HELP.items():
        g.add_argument("--" + opt.replace("_", "-"), type=int, default=None, help=f"{text}; {task_defaults(opt)}")
    g = p.add_argument_group("compression")
    g.add_argument("--method", default="prune", choices=COMPRESSIONS, help="default prune")
    g.add_argument("--sparsity", type=float, default=0.9, help="pruning: fraction removed (default 0.9)")
    g.add_argument("--granularity", default="layer", choices=("layer", "row", "nm"),
                   help="pruning granularity (default layer: the largest |W| of the whole matrix)")
    g.add_argument("--nm", type=_nm, default=(2, 4), help="N:M pattern for --granularity nm (default 2:4)")
    g.add_argument("--mask-update", type=_mask_update, default="step",
                   help="pruning mask: step (re-derived every call, as the paper), once (frozen), or K steps")
    g.add_argument("--bits", type=int, default=4, choices=(8, 4, 2, 1),
                   help="quantization bits (1 = binary; default 4)")
    g.add_argument("--quant-granularity", default="channel", choices=("channel", "group", "tensor"),
                   help="quantization scales: one per output channel (default), per group, or one per tensor")
    g.add_argument("--group-size", type=int, default=128, help="weights per scale with --quant-granularity group "
                   "(default 128)")
    g.add_argument("--rank", type=int, default=None, help="low rank: rank of every layer (default 16)")
    g.add_argument("--rank-ratio", type=float, default=None, help="low rank: rank = ratio * min(N, K) instead")
    g.add_argument("--grad", default="ste", choices=("ste", "exact"), help="gradient mode (default ste)")
    g.add_argument("--lowrank-init", default=None, choices=LOWRANK_INITS,
                   help="low rank: factors from the SVD as U S, V^T (reference, default: the authors' code; with "
                   "--grad exact it reproduces it) or U sqrt(S), sqrt(S) V^T (split)")
    g.add_argument("--shared-batchnorm", action="store_true",
                   help="one BatchNorm for the blend of a conv that feeds a BatchNorm (default: each path its "
                   "own BatchNorm, see the README's BatchNorm section)")
    g = p.add_argument_group("training (the same budget for every method)")
    g.add_argument("--methods", type=_methods, default=list(METHOD_NAMES), help="default oneshot,gradual,vcon")
    g.add_argument("--from", dest="start", default="finetuned", choices=START_POINTS,
                   help="finetuned (default): fine-tune the dense model first (cached), then compress it; "
                   "pretrained: the paper's protocol, compress the pretrained model while it learns the task "
                   "(the dense row is then the pretrained model fine-tuned at the same budget)")
    g.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps of each compression run; {task_defaults('steps')}")
    g.add_argument("--vcon-steps", type=int, default=None,
                   help="transition length Q (VCON beta 1 -> 0; also the gradual window); default --transition")
    g.add_argument("--transition", type=_fraction, default=0.3,
                   help="Q as a fraction of --steps when --vcon-steps is not given (default 0.3)")
    g.add_argument("--schedule", default="linear", choices=SCHEDULES, help="VCON beta schedule")
    g.add_argument("--prune-every", type=int, default=None, help="gradual pruning: steps between sparsity updates")
    g.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate; {task_defaults('lr')}")
    g.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                   help="cosine decay to 0 after the warm-up (default) or constant")
    g.add_argument("--warmup", type=float, default=None,
                   help=f"linear warm-up, fraction of the steps; {task_defaults('warmup')}")
    g.add_argument("--clip", type=float, default=None,
                   help=f"max gradient norm (0 = none); {task_defaults('clip')}")
    g.add_argument("--batch-size", type=int, default=None, help=f"{task_defaults('batch_size')}")
    g.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between validation points of the curve; {task_defaults('eval_every')}")
    g.add_argument("--dense-steps", type=int, default=None,
                   help=f"steps of the dense fine-tune (--from finetuned); {task_defaults('dense_steps')}")
    g.add_argument("--dense-lr", type=float, default=None,
                   help=f"learning rate of the dense fine-tune (--from finetuned); {task_defaults('dense_lr')}")
    g.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated run seeds (default 0)")
    g = p.add_argument_group("output and machine")
    g.add_argument("--out", default=None, help="output folder (default out/<task>)")
    g.add_argument("--cache-dir", default=None, help="where the fine-tuned dense model is cached (default OUT/cache)")
    g.add_argument("--no-cache", action="store_true", help="always fine-tune the dense model")
    g.add_argument("--save-model", action="store_true",
                   help="save the finalized VCON model (last seed) in OUT/vcon-model: Hugging Face tasks as "
                   "hf.save_pretrained_compressed (config + tokenizer; load with hf.from_pretrained_compressed), "
                   "others as vk.save_compressed (load with vk.load_compressed)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=_threads, default="auto",
                   help="torch CPU threads; auto (default): 1 when the machine is already busy (load average "
                   ">= cores: parallel threads then mostly wait for each other), else torch's default")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.compress_parser = p
    return parser


def check_args(parser: ArgumentParser, args) -> None:
    """Cross-option checks argparse cannot express."""
    fail = parser.compress_parser.error

    if args.method in ("prune", "prune+quantize") and args.granularity != "nm" and not 0.0 <= args.sparsity < 1.0:
        fail(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.rank is not None and args.rank_ratio is not None:
        fail("give --rank or --rank-ratio, not both")
    if args.method != "lowrank" and (args.rank is not None or args.rank_ratio is not None):
        fail(f"--rank/--rank-ratio apply to --method lowrank, not {args.method}")
    if args.method != "lowrank" and args.lowrank_init is not None:
        fail(f"--lowrank-init applies to --method lowrank, not {args.method}")
    if args.start == "pretrained":
        if not TASKS[args.task].pretrained:
            fail(f"--from pretrained: task {args.task} has no pretrained model (its dense model is trained from "
                 "scratch); use --from finetuned")
        given = [o for o in ("dense_steps", "dense_lr", "cache_dir") if getattr(args, o) is not None]
        given += ["no_cache"] if args.no_cache else []
        if given:
            names = ", ".join("--" + o.replace("_", "-") for o in given)
            fail(f"--from pretrained trains no dense model first, so {names} would be ignored; drop them or use "
                 "--from finetuned")
    task_cls = TASKS[args.task]
    for opt in TASK_OPTIONS:
        if getattr(args, opt) is not None and opt not in task_cls.defaults:
            known = sorted("--" + o.replace("_", "-") for o in TASK_OPTIONS if o in task_cls.defaults)
            fail(f"--{opt.replace('_', '-')} is not an option of task {args.task} (its options: {', '.join(known)})")
    for name in ("steps", "dense_steps", "batch_size", "vcon_steps", "prune_every", "eval_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def config_from_args(args) -> vk.VCONConfig:
    """The ``vk`` config the options describe (config constructors validate the values)."""
    prune = None
    if args.method in ("prune", "prune+quantize"):
        if args.granularity == "nm":
            n, m = args.nm
            prune = vk.Prune(granularity="nm", n=n, m=m, update=args.mask_update, grad=args.grad)
        else:
            prune = vk.Prune(sparsity=args.sparsity, granularity=args.granularity, update=args.mask_update,
                             grad=args.grad)
    quant = None
    if args.method in ("quantize", "prune+quantize"):
        group_size = args.group_size if args.quant_granularity == "group" else None
        quant = vk.Quantize(bits=args.bits, granularity=args.quant_granularity, group_size=group_size,
                            grad=args.grad)
    if args.method == "lowrank":
        init = args.lowrank_init or vk.LowRank.init
        if args.rank_ratio is not None:
            return vk.LowRank(rank_ratio=args.rank_ratio, grad=args.grad, init=init)
        return vk.LowRank(rank=args.rank if args.rank is not None else 16, grad=args.grad, init=init)
    if prune is not None and quant is not None:
        return vk.Compose(prune, quant)
    return prune if prune is not None else quant


def describe_config(config: vk.VCONConfig) -> str:
    """A short human label, e.g. "prune 90% per layer" or "int4 per-channel"."""
    if isinstance(config, vk.Compose):
        return f"{describe_config(config.prune)} + {describe_config(config.quantize)}"
    if isinstance(config, vk.Prune):
        if config.granularity == "nm":
            return f"prune {config.n}:{config.m}"
        return f"prune {100 * config.sparsity:g}% per {config.granularity}"
    if isinstance(config, vk.Quantize):
        name = "binary" if config.bits == 1 else f"int{config.bits}"
        gran = {"channel": "per-channel", "tensor": "per-tensor"}.get(config.granularity,
                                                                      f"groups of {config.group_size}")
        return f"{name} {gran}"
    if isinstance(config, vk.LowRank):
        text = f"low rank r={config.rank}" if config.rank is not None else f"low rank {config.rank_ratio:g} min(N,K)"
        return text + (", S in U (reference init)" if config.init == "reference" else "")
    return repr(config)


def task_options(args) -> dict:
    return {opt: getattr(args, opt) for opt in TASK_OPTIONS if getattr(args, opt) is not None}


__all__ = ["COMPRESSIONS", "TASK_OPTION_HELP", "ArgumentParser", "build_parser", "check_args", "config_from_args",
           "describe_config", "task_defaults", "task_options"]

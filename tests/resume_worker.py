"""The legs of the checkpoint/resume test (``test_resume.py``); ``second`` runs as its own process.

    python resume_worker.py full   OUT            # steps 0 .. STEPS-1 without interruption
    python resume_worker.py first  OUT CKPT STOP  # steps 0 .. STOP-1, then save a checkpoint and exit
    python resume_worker.py second OUT CKPT STOP  # fresh process: build, load CKPT, steps STOP .. STEPS-1

The run uses AdamW, a cosine LR schedule, dropout (so the RNG state matters), gradient
accumulation and the VCON scheduler. ``second`` builds its model from a *different* seed, so
that anything the checkpoint failed to restore (a frozen mask, U and V, beta) would show.
OUT receives the losses, the layer states before every step and the final state dict.
"""

import sys

import torch
from training_setup import STEPS
from training_setup import layer_states
from training_setup import make_model
from training_setup import make_scheduler
from training_setup import train


def build(seed):
    model = make_model(seed=seed, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return model, opt, lr_sched, make_scheduler(model)


def main(mode, out, ckpt=None, stop=None):
    """Run one leg with one intra-op thread (bit-identical results need the same reduction order)."""
    torch.set_num_threads(1)
    stop = None if stop is None else int(stop)
    result = {}
    if mode in ("full", "first"):
        torch.manual_seed(1234)
        model, opt, lr_sched, sched = build(seed=0)
        losses, states = train(model, opt, sched, steps=STEPS if mode == "full" else stop, lr_sched=lr_sched)
        if mode == "first":
            checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                          "lr_scheduler": lr_sched.state_dict(), "vcon_scheduler": sched.state_dict(),
                          "rng": torch.get_rng_state()}
            torch.save(checkpoint, ckpt)
    else:
        model, opt, lr_sched, sched = build(seed=1)
        result["before_load"] = layer_states(model)
        state = torch.load(ckpt)  # weights_only=True: a checkpoint of plain state dicts needs nothing more
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        sched.load_state_dict(state["vcon_scheduler"])
        torch.set_rng_state(state["rng"])
        losses, states = train(model, opt, sched, first_step=stop, lr_sched=lr_sched)
    result.update(losses=losses, states=states, final=model.state_dict(), t=sched.t)
    torch.save(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:])

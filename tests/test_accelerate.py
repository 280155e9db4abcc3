"""The README's Hugging Face Accelerate recipe (gradient accumulation), against a plain loop.

Skipped when ``accelerate`` is not installed (it is not a dependency of this package):
``pip install accelerate`` to run it. With ``gradient_accumulation_steps=2``, Accelerate
skips ``optimizer.step()`` on non-sync micro-batches; the VCON scheduler is not an Accelerate
object, so the recipe steps it only when ``accelerator.sync_gradients`` is True. The result
must equal a hand-written accumulation loop that steps the scheduler once per optimizer step.
"""

import pytest
import torch
from training_setup import STEPS
from training_setup import batch
from training_setup import make_model
from training_setup import make_optimizer
from training_setup import make_scheduler

accelerate = pytest.importorskip("accelerate")

ACCUM = 2


def micro_batches():
    for step in range(STEPS):
        for micro in range(ACCUM):
            yield batch(step, micro)


def test_accelerate_gradient_accumulation_matches_plain_loop():
    # The plain loop: loss / accum, optimizer and scheduler step every ACCUM micro-batches.
    model = make_model(seed=0)
    opt, sched = make_optimizer(model), make_scheduler(model)
    for i, (x, y) in enumerate(micro_batches()):
        loss = torch.nn.functional.cross_entropy(model(x), y) / ACCUM
        loss.backward()
        if (i + 1) % ACCUM == 0:
            opt.step()
            opt.zero_grad()
            sched.step()
    expected = model.state_dict()

    # The README recipe.
    accelerator = accelerate.Accelerator(gradient_accumulation_steps=ACCUM, cpu=True)
    model = make_model(seed=0)
    optimizer = make_optimizer(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    vcon_sched = make_scheduler(model)
    betas = []
    for x, y in micro_batches():
        with accelerator.accumulate(model):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            vcon_sched.step()
        betas.append(vcon_sched.t)
    assert betas == [(i + 1) // ACCUM for i in range(STEPS * ACCUM)]
    assert vcon_sched.finished
    got = accelerator.unwrap_model(model).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")

"""The rewind learning-rate schedule (restart at every mask update) and its recipe checks."""

from __future__ import annotations

import pytest
import torch

from sparsify.schedules import rewind_factor, rewind_schedule


def test_rewind_factor_by_hand():
    f = lambda t: rewind_factor(t, updates=[0, 10, 20], total=40, floor=0.2)  # noqa: E731
    assert [f(t) for t in (0, 5, 10, 15, 19, 20, 30, 39, 40)] == pytest.approx(
        [1.0, 0.6, 1.0, 0.6, 1.0 - 0.8 * 0.9, 1.0, 0.5, 0.05, 0.0])
    # an update after step 0: the first interval decays from step 0 too; warmup multiplies the first steps
    g = lambda t: rewind_factor(t, updates=[4, 8], total=12, floor=0.0, warmup=2)  # noqa: E731
    assert [g(t) for t in (0, 1, 2, 4, 6, 8, 10)] == pytest.approx([0.0, 0.5 * 0.75, 0.5, 1.0, 0.5, 1.0, 0.5])


def test_rewind_schedule_drives_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = rewind_schedule(opt, updates=[3], total=6, floor=0.5)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1 * (1 - 0.5 / 3), 0.1 * (1 - 1 / 3), 0.1, 0.1 * 2 / 3, 0.1 / 3])


def test_rewind_needs_a_pruning_technique(make_recipe, capsys):
    from sparsify.cli import main

    recipe = make_recipe(training={"lr_schedule": "rewind"})
    assert main(["recipe", "check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "training.lr_schedule" in err and "needs a pruning technique" in err

"""The shared training loop on a small torch model: schedule, determinism, resume, time guard."""

from __future__ import annotations

import pytest
import torch

from corpusforge.encoding.encoder import seed_everything
from corpusforge.train.core import (CHECKPOINT, LoopConfig, TrainingBudgetExceeded, TrainLoop,
                                    warmup_linear_decay)


def _task(seed: int):
    """A small regression task with dropout (so the RNG matters) and its epoch batches."""
    seed_everything(seed, threads=1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, generator=g)
    y = x.sum(dim=1, keepdim=True)

    def epoch_batches(epoch: int):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(1000 + epoch)).tolist()
        return [order[i:i + 8] for i in range(0, 40, 8)]

    def step(batch):
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        loss.backward()
        return float(loss.detach())

    return model, epoch_batches, step


def _loop(model, tmp_path=None, **kw):
    cfg = LoopConfig(name="toy", epochs=3, learning_rate=1e-2, **kw)
    return TrainLoop(cfg, model.parameters(), {"model": model}, tmp_path)


def test_schedule_warms_up_then_decays_to_zero():
    f = warmup_linear_decay(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_same_seed_same_losses_and_weights():
    runs = []
    for _ in range(2):
        model, batches, step = _task(3)
        loop = _loop(model)
        loop.plan(5)
        log = loop.run(batches, step)
        runs.append((log, torch.cat([p.flatten() for p in model.parameters()])))
    (a, wa), (b, wb) = runs
    assert a["steps"] == b["steps"] == a["planned_steps"] == 15 and a["truncated"] is False
    assert a["losses"] == b["losses"] and torch.equal(wa, wb)
    assert sum(a["losses"][-5:]) < sum(a["losses"][:5])  # it learns: last epoch below the first
    assert not model.training  # left in eval mode


def test_epochs_of_different_sizes_are_planned_step_for_step():
    """Packing without a document twice gives epochs of different sizes: the plan (and so the
    schedule, which reaches zero at the last step) counts every epoch's own batches."""
    model, _, step = _task(3)
    sizes = [5, 4, 3]

    def uneven(epoch: int):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(1000 + epoch)).tolist()
        return [order[i * 8:i * 8 + 8] for i in range(sizes[epoch])]

    loop = _loop(model)
    assert loop.plan(sizes) == 12
    log = loop.run(uneven, step)
    assert log["steps"] == log["planned_steps"] == 12 and log["truncated"] is False
    assert loop.sched.get_last_lr()[0] == 0.0  # decayed to zero exactly at the last step
    with pytest.raises(ValueError, match="2 epoch sizes for 3 epochs"):
        _loop(model).plan([5, 4])


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    model, batches, step = _task(4)
    ref = _loop(model)
    ref.plan(5)
    ref_log = ref.run(batches, step)
    ref_w = torch.cat([p.flatten() for p in model.parameters()])

    model, batches, step = _task(4)
    loop = _loop(model, tmp_path, checkpoint_every=3)
    loop.plan(5)

    def crash(s, loss):
        if s == 8:
            raise KeyboardInterrupt  # killed after step 8; the last checkpoint is step 6

    with pytest.raises(KeyboardInterrupt):
        loop.run(batches, step, on_step=crash)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["state"]["step"] == 6

    model, batches, step = _task(99)  # a fresh process: other initial weights and RNG state
    resumed = _loop(model, tmp_path, checkpoint_every=3)
    resumed.plan(5)
    assert resumed.restore()
    log = resumed.run(batches, step)
    assert log["losses"] == ref_log["losses"]
    assert torch.equal(torch.cat([p.flatten() for p in model.parameters()]), ref_w)


def test_selection_points_at_epoch_ends_and_where_a_capped_run_stops():
    model, batches, step = _task(5)
    seen = []
    loop = _loop(model, max_steps=7)
    loop.plan(5)
    log = loop.run(batches, step, on_selection=lambda: seen.append(loop.state["step"]))
    assert log["steps"] == log["planned_steps"] == 7 and seen == [5, 7]


def test_time_guard_fails_with_a_clear_error_or_stops_truncated():
    model, batches, step = _task(6)
    loop = _loop(model, max_seconds=1e-9)
    loop.plan(5)
    with pytest.raises(TrainingBudgetExceeded, match=r"toy: time guard max_train_seconds=1e-09 reached after 1 of 15"):
        loop.run(batches, step)

    model, batches, step = _task(6)
    loop = _loop(model, max_seconds=1e-9, on_budget="stop")
    loop.plan(5)
    seen = []
    log = loop.run(batches, step, on_selection=lambda: seen.append(loop.state["step"]))
    assert log["truncated"] is True and log["steps"] == 1 and log["planned_steps"] == 15
    assert seen == [1]  # the truncated model still gets its selection point


def test_steps_defined_recipe_runs_across_epochs():
    model, batches, step = _task(7)
    loop = TrainLoop(LoopConfig(name="toy", epochs=None, max_steps=12, learning_rate=1e-2), model.parameters(),
                     {"model": model})
    loop.plan(5)
    log = loop.run(batches, step)
    assert log["steps"] == 12 and loop.state["epoch"] == 2 and loop.state["batch"] == 2
    with pytest.raises(ValueError, match="needs max_steps"):
        TrainLoop(LoopConfig(name="toy", epochs=None), model.parameters(), {"model": model}).plan(5)

"""The one training loop of corpusforge: the bi-encoder, the reranker and the query tower all run it.

A trainer supplies its parameters, a step function (forward and backward of one batch, returning
the loss) and the batches of each epoch; `TrainLoop` does the rest, the same way for all three:

* AdamW, a linear warmup over ``warmup_ratio`` of the steps then a linear decay to zero, the
  gradient norm clipped to ``clip_norm``;
* a recipe defined by its epochs (or steps) and its seed: the number of steps is fixed before
  the first one, so the same spec, seed and hardware give the same model whatever the machine's
  load;
* a time budget (``max_seconds``) that is only a guard: reaching it raises
  `TrainingBudgetExceeded`, or with ``on_budget="stop"`` ends training there and marks the result
  ``truncated`` (the caller records it and keeps the model from promotion);
* checkpoints (model and optimiser states, schedule, every RNG state, the position in the epoch)
  every ``checkpoint_every`` steps and at each epoch end, written atomically, that a killed run
  resumes from with the same result as an uninterrupted one;
* a training log: steps, planned steps, losses, examples/s, seconds, truncation.

Only step time counts towards the budget and examples/s (evaluation and checkpoint writes do not).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

log = logging.getLogger("corpusforge.train")

CHECKPOINT = "checkpoint.pt"


class TrainingBudgetExceeded(RuntimeError):
    """Training reached its time guard (``max_train_seconds``) before the recipe's last step."""


@dataclass
class LoopConfig:
    """How a `TrainLoop` runs.

    Attributes:
        name: the model's name in logs and messages ('bi-encoder', 'reranker', ...).
        epochs: passes over the epoch batches; None trains for ``max_steps`` steps, epoch after epoch.
        max_steps: stop after this many steps in total (0: none; required when ``epochs`` is None).
        learning_rate: AdamW peak learning rate (parameter groups may scale it with their own ``lr``).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the steps with a linear warmup.
        clip_norm: gradient norm clip.
        checkpoint_every: steps between checkpoints (0: only at epoch ends); needs a checkpoint dir.
        max_seconds: time guard on the summed step time (0: none).
        on_budget: at the guard, 'fail' (raise `TrainingBudgetExceeded`) or 'stop' (truncate).
        log_every: steps between progress log lines (0: about ten per run).
    """

    name: str
    epochs: int | None = 1
    max_steps: int = 0
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    clip_norm: float = 1.0
    checkpoint_every: int = 0
    max_seconds: float = 0.0
    on_budget: Literal["fail", "stop"] = "fail"
    log_every: int = 0


def warmup_linear_decay(total: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate multiplier of step s: linear warmup to 1, then linear decay to 0 at `total`.

    Args:
        total: the number of optimiser steps.
        warmup_ratio: share of them spent warming up (at least one step).

    Returns:
        ``s -> multiplier`` for `torch.optim.lr_scheduler.LambdaLR`.
    """
    warm = max(1, int(warmup_ratio * total))
    return lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))


def _rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class TrainLoop:
    """Runs a trainer's step function over its batches under one `LoopConfig`; resumable.

    Args:
        cfg: how to run.
        param_groups: AdamW parameter groups (dicts with ``params`` and optional ``lr``), or parameters.
        modules: the modules whose states a checkpoint holds, by name (also switched to train
            mode while training and back to eval mode after).
        checkpoint_dir: where ``checkpoint.pt`` goes; None: no checkpoints.
        state: trainer-owned entries to keep in the loop state (saved and restored with it).
    """

    def __init__(self, cfg: LoopConfig, param_groups: Iterable[Any], modules: dict[str, torch.nn.Module],
                 checkpoint_dir: str | Path | None = None, state: dict[str, Any] | None = None):
        self.cfg = cfg
        groups = list(param_groups)
        self.optim = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.params = [p for g in self.optim.param_groups for p in g["params"]]
        self.modules = modules
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "losses": [], "examples": 0,
                                      "train_seconds": 0.0, "truncated": False, **(state or {})}
        self.sched: torch.optim.lr_scheduler.LambdaLR | None = None
        self.total = 0

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint file, or None when this loop keeps none."""
        return self.checkpoint_dir / CHECKPOINT if self.checkpoint_dir is not None else None

    def plan(self, batches_per_epoch: int | Sequence[int]) -> int:
        """Fix the number of steps and build the schedule (before `restore` and `run`).

        Args:
            batches_per_epoch: batches in one epoch, or in each epoch (for an epoch-defined recipe
                whose epochs differ in size, e.g. batches packed without a document twice).

        Returns:
            The planned number of steps: the steps `run` takes unless a guard stops it.
        """
        cfg = self.cfg
        if cfg.epochs is None:
            if not cfg.max_steps:
                raise ValueError(f"{cfg.name}: a steps-defined recipe needs max_steps")
            total = cfg.max_steps
        else:
            sizes = [batches_per_epoch] * cfg.epochs if isinstance(batches_per_epoch, int) else batches_per_epoch
            if len(sizes) != cfg.epochs:
                raise ValueError(f"{cfg.name}: {len(sizes)} epoch sizes for {cfg.epochs} epochs")
            total = int(sum(sizes))
            total = min(total, cfg.max_steps) if cfg.max_steps else total
        self.total = total
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, warmup_linear_decay(total, cfg.warmup_ratio))
        self.state["planned_steps"] = total
        return total

    def restore(self) -> bool:
        """Load the checkpoint when there is one (after `plan`).

        Returns:
            True when training resumes from a checkpoint.
        """
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        ck = torch.load(path, map_location="cpu", weights_only=False)
        for name, module in self.modules.items():
            module.load_state_dict(ck["modules"][name])
        self.optim.load_state_dict(ck["optim"])
        self.sched.load_state_dict(ck["sched"])
        _set_rng_states(ck["rng"])
        self.state = ck["state"]
        log.info("%s: resumed from step %d (epoch %d, batch %d)", self.cfg.name, self.state["step"],
                 self.state["epoch"], self.state["batch"])
        return True

    def save_checkpoint(self) -> None:
        """Write the checkpoint atomically (a kill leaves the previous one)."""
        path = self.checkpoint_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"state": self.state, "optim": self.optim.state_dict(), "sched": self.sched.state_dict(),
                    "modules": {n: m.state_dict() for n, m in self.modules.items()}, "rng": _rng_states()}, tmp)
        os.replace(tmp, path)

    def run(self, epoch_batches: Callable[[int], Sequence[Any]], step: Callable[[Any], float],
            on_step: Callable[[int, float], None] | None = None,
            on_selection: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train from the current state to the planned step (after `plan` and `restore`).

        Args:
            epoch_batches: epoch -> its batches, deterministic for an epoch (a resumed run rebuilds
                the epoch it stopped in).
            step: forward and backward of one batch (gradients accumulate); returns the loss.
            on_step: called with (step, loss) after every optimiser step.
            on_selection: called after every epoch and where training ends mid-epoch (before the
                checkpoint of that point), e.g. to measure dev and keep the best model.

        Returns:
            The training log (`log`).

        Raises:
            TrainingBudgetExceeded: the time guard was reached with ``on_budget='fail'``.
        """
        cfg, s = self.cfg, self.state
        total = self.total
        log_every = cfg.log_every or max(1, total // 10)
        for module in self.modules.values():
            module.train()
        while s["step"] < total and (cfg.epochs is None or s["epoch"] < cfg.epochs) and not s["truncated"]:
            batches = epoch_batches(s["epoch"])
            if not batches:
                raise ValueError(f"{cfg.name}: epoch {s['epoch']} has no batches")
            while s["batch"] < len(batches) and s["step"] < total:
                batch = batches[s["batch"]]
                t0 = time.perf_counter()
                self.optim.zero_grad(set_to_none=True)
                loss = float(step(batch))
                torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_norm)
                self.optim.step()
                self.sched.step()
                s["train_seconds"] += time.perf_counter() - t0
                s["examples"] += len(batch)
                s["step"] += 1
                s["batch"] += 1
                s["losses"].append(loss)
                if on_step:
                    on_step(s["step"], loss)
                if s["step"] % log_every == 0:
                    log.info("%s: step %d/%d, loss %.4f, %.2f steps/s", cfg.name, s["step"], total, loss,
                             s["step"] / s["train_seconds"] if s["train_seconds"] else 0.0)
                if cfg.checkpoint_every and s["step"] % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.max_seconds and s["train_seconds"] >= cfg.max_seconds and s["step"] < total:
                    self._budget_reached()
                    break
            if s["batch"] >= len(batches):
                s["epoch"] += 1
                s["batch"] = 0
                if on_selection:
                    on_selection()
                s["selected_at"] = s["step"]
                self.save_checkpoint()
            else:
                break  # max_steps or the budget ended it mid-epoch
        if on_selection and s["step"] and s.get("selected_at") != s["step"]:
            on_selection()  # a run that ended mid-epoch still gets its selection point
            s["selected_at"] = s["step"]
            self.save_checkpoint()
        for module in self.modules.values():
            module.eval()
        return self.log()

    def _budget_reached(self) -> None:
        cfg, s = self.cfg, self.state
        message = (f"{cfg.name}: time guard max_train_seconds={cfg.max_seconds:g} reached after {s['step']} of "
                   f"{self.total} steps ({s['train_seconds']:.1f} s of training). The recipe is its steps, "
                   "not its time: raise max_train_seconds, or set on_budget: stop to keep a truncated model "
                   "(recorded as truncated, never promoted)")
        if cfg.on_budget == "fail":
            raise TrainingBudgetExceeded(message)
        log.warning("%s; stopping here (on_budget: stop)", message)
        s["truncated"] = True

    def log(self) -> dict[str, Any]:
        """The training log so far.

        Returns:
            steps, planned_steps, truncated, losses, examples, train_seconds and examples_per_s.
        """
        s = self.state
        return {"steps": s["step"], "planned_steps": s.get("planned_steps", self.total),
                "truncated": bool(s["truncated"]), "losses": list(s["losses"]), "examples": s["examples"],
                "train_seconds": s["train_seconds"],
                "examples_per_s": s["examples"] / s["train_seconds"] if s["train_seconds"] else 0.0}

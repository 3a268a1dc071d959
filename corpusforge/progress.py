"""Progress bars and console output shared by every long step (rich)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

T = TypeVar("T")

console = Console(stderr=True, soft_wrap=True)  # a message is one line, however long its paths


class RateColumn(ProgressColumn):
    """Items per second, with the unit of the task (docs/s, chunks/s, ...)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"- {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {unit}/s", style="progress.data.speed")


def make_progress(transient: bool = False) -> Progress:
    """A rich Progress with description, bar, count, rate, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not sys.stderr.isatty() and not _force_progress(),
    )


def _force_progress() -> bool:
    import os

    return os.environ.get("CORPUSFORGE_PROGRESS", "") == "1"


def track(items: Iterable[T], description: str, total: int | None = None, unit: str = "it",
          enabled: bool = True) -> Iterator[T]:
    """Iterate with a progress bar showing counts and rate.

    Args:
        items: the iterable to walk.
        description: the label shown left of the bar.
        total: the expected count (None when unknown: the bar shows a pulse).
        unit: the unit shown in the rate column (docs, chunks, ...).
        enabled: False walks the items with no bar.

    Returns:
        An iterator over `items`.
    """
    if not enabled:
        yield from items
        return
    with make_progress() as progress:
        task = progress.add_task(description, total=total, unit=unit)
        for item in items:
            yield item
            progress.advance(task)


def download_progress(enabled: bool = True) -> Progress:
    """A rich Progress for byte transfers: bar, bytes done of total, speed and remaining time.

    Args:
        enabled: False shows nothing (the bar is also hidden off a terminal, unless
            ``CORPUSFORGE_PROGRESS=1``).

    Returns:
        The Progress (a context manager).
    """
    from rich.progress import DownloadColumn, TransferSpeedColumn

    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or (not sys.stderr.isatty() and not _force_progress()),
    )


# Environment variables that turn off the progress bars of the libraries the stages use.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def quiet_library_progress() -> None:
    """Turn off third-party progress bars (tqdm, Hugging Face Hub, transformers) in this process.

    Orchestrators capture stderr into task logs, where each bar refresh becomes a line (Airflow
    shows them as red ERROR lines). Sets `QUIET_ENV` for libraries not imported yet (and the
    processes this one starts), and switches off the bars of those already imported.
    """
    import os

    os.environ.update(QUIET_ENV)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

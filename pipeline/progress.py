"""Progress bars for long work (rich), quiet when CMDS_AD_QUIET is set (tests).

rich is imported on first use, so a quiet run never loads it and a stage module's import
stays cheap (benchmarks/imports.py)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from functools import cache
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")


@cache
def console() -> Console:
    """The one stderr console of this process."""
    from rich.console import Console

    return Console(stderr=True)


def _quiet() -> bool:
    return os.environ.get("CMDS_AD_QUIET", "") not in ("", "0")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr."""
    if _quiet():
        yield from items
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console(), transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def info(message: str) -> None:
    if not _quiet():
        console().print(message)

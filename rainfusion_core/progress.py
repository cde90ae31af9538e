"""Progress bars for anything a user waits on for more than a few seconds.

Bars go to stderr through ``tqdm``. They are shown when stderr is a terminal,
hidden otherwise (logs, pipes, CI), and ``RAINFUSION_PROGRESS=0`` or ``=1``
hides or forces them everywhere.
"""
from __future__ import annotations

import os
import sys


def enabled() -> bool:
    """Whether bars are drawn: ``RAINFUSION_PROGRESS`` if set (``0``/``1``), else whether stderr is a TTY."""
    setting = os.environ.get("RAINFUSION_PROGRESS", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr.isatty()


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """``iterable`` wrapped in a progress bar (or a bar to ``update()`` by hand when ``iterable`` is None)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(),
                leave=False, dynamic_ncols=True)

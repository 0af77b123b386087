"""One progress bar per long loop: tqdm on stderr, shown only when stderr is a terminal.

Logging carries results (one line per outcome); progress over items goes here, so a log file or a
CI transcript is not filled with "rendered 7/36" lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """tqdm over `iterable` (or a manual bar with total=...) on stderr; disabled when stderr is not a TTY
    (tqdm's disable=None) or, under torchrun, on ranks other than 0. kwargs go to tqdm (desc, total, unit)."""
    quiet = os.environ.get("RANK", "0") != "0"
    return tqdm(iterable, file=sys.stderr, disable=True if quiet else None, dynamic_ncols=True, leave=False,
                **kwargs)

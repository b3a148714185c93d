"""Progress lines for the long first calls (kernel tuning, torch.compile), on stderr.

A cold start can take minutes where the caller sees nothing: every launch candidate of a
kernel is compiled and timed once per shape, and `torch.compile` compiles on the first call.
Each such piece of work says what it is doing and, when done, what it chose or how long it
took, as "[fastsam] ..." lines. FASTSAM_QUIET=1 silences them.
"""

from __future__ import annotations

import os
import sys


def quiet() -> bool:
    """Whether FASTSAM_QUIET asks for no progress lines (any value but "", "0")."""
    return os.environ.get("FASTSAM_QUIET", "") not in ("", "0")


def note(message: str) -> None:
    """`message` as one "[fastsam] ..." line on stderr, unless quiet()."""
    if not quiet():
        print(f"[fastsam] {message}", file=sys.stderr, flush=True)

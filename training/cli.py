"""Entry-point wrapper: user errors become one clear line on stderr and exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable

from training.common import TrainingError

# Errors that mean "the input is wrong", as opposed to bugs (which keep their traceback).
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, TrainingError)


def run_cli(main: Callable[[], None]) -> int:
    try:
        main()
    except USER_ERRORS as exc:
        if os.environ.get("T2I_DISTILL_DEBUG"):
            raise
        print(f"error: {exc}\n(set T2I_DISTILL_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0

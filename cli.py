"""Shared entry-point behaviour: user errors become one clear line, stops an exit code.

Exit codes: 0 done; 1 a `UserError` (bad config, data, checkpoint or device; the
message says what to fix); 128 + N when signal N stopped a training run after it
saved its state (143 for SIGTERM, 130 for SIGINT or Ctrl-C); anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import signal
import sys

from utils.errors import StopRequested, UserError


def run_cli(main) -> int:
    """Run `main(argv)` and return the process exit code (see the module docstring)."""
    try:
        main(sys.argv[1:])
    except StopRequested as stop:  # state saved, resumable; every rank stops together
        from utils.comm import launch_rank
        if launch_rank() == 0:
            sys.stderr.write(f"{stop}\n")
        return stop.exit_code
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing to save
        sys.stderr.write("interrupted\n")
        return 128 + signal.SIGINT
    return 0

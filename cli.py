"""Shared entry-point behaviour: expected failures become one clear message."""
from __future__ import annotations

import sys

# Errors whose message already says what to fix; no traceback is needed.
EXPECTED_ERRORS = ("ConfigError", "DatasetError", "BadImageError", "CheckpointError",
                   "CheckpointMismatchError", "RunFolderError", "NonFiniteLossError",
                   "PretrainedWeightsUnavailable", "UnsupportedTorchError", "LeakAuditError")


def run_cli(main) -> int:
    """Run `main(argv)`; exit 0 on success or a requested stop, 1 on an expected error."""
    try:
        main(sys.argv[1:])
    except Exception as err:  # noqa: BLE001 - reported and turned into an exit code
        name = type(err).__name__
        if name == "StopRequested":  # SIGTERM/SIGINT: state saved, resumable
            sys.stderr.write(f"{err}\n")
            return 0
        if name not in EXPECTED_ERRORS:
            raise
        sys.stderr.write(f"error: {err}\n")
        return 1
    return 0

"""Evaluate a trained run on the test split.

    python test.py --config_file logs/<dataset>/<name>/configs.yaml [checkpoint=PATH] [key=value ...]
"""
from __future__ import annotations

import argparse
import sys

CONFIG_HELP = ("the run's saved configs.yaml, whose folder is the run folder, or an experiment "
               "file, whose run folder is the one it trains into (further files add only the "
               "keys they set)")


def parse_args(argv=None) -> argparse.Namespace:
    from utils.arguments import parse_run_args
    return parse_run_args(argv, "Evaluate a run folder on the test split.", CONFIG_HELP,
                          usage_notes="checkpoint=PATH scores another checkpoint than the run's "
                                      "best.pth; eval.i2t=true adds image-to-text retrieval.")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from utils.misc import require_torch
    require_torch()
    from processor.runner import run_test
    from utils.comm import launch_rank
    from utils.config import load_config
    from utils.logger import setup_logger
    setup_logger(None, rank=launch_rank())  # before load_config, whose warnings are logged too
    cfg = load_config(args.config_file, args.opts)
    return run_test(cfg, args.config_file[0])


if __name__ == "__main__":
    from cli import run_cli
    sys.exit(run_cli(main))

"""Evaluate a trained run on the test split.

    python test.py --config_file logs/<dataset>/<name>/configs.yaml [checkpoint=PATH] [key=value ...]
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a run folder on the test split.")
    parser.add_argument("--config_file", required=True, help="the run's saved configs.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="key=value overrides, e.g. checkpoint=logs/.../last.pth eval.i2t=true")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from utils.misc import require_torch
    require_torch()
    from processor.runner import run_test
    from utils.config import load_config
    cfg = load_config(args.config_file, args.opts)
    return run_test(cfg, args.config_file)


if __name__ == "__main__":
    from cli import run_cli
    sys.exit(run_cli(main))

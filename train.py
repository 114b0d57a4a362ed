"""Train a retrieval model.

    python train.py --config_file configs/CUHK-PEDES/comoe.yaml [key=value ...]
    torchrun --nproc_per_node=N train.py --config_file ...
    python train.py --config_file logs/<dataset>/<name>/configs.yaml resume=true
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a text-based person retrieval model.")
    parser.add_argument("--config_file", required=True, help="experiment YAML file")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="key=value overrides with dotted keys, e.g. solver.lr=3e-6")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from utils.misc import require_torch
    require_torch()
    from processor.runner import run_training
    from utils.config import load_config
    cfg = load_config(args.config_file, args.opts)
    return run_training(cfg)


if __name__ == "__main__":
    from cli import run_cli
    sys.exit(run_cli(main))

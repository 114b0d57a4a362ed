"""Train a retrieval model.

    python train.py --config_file configs/CUHK-PEDES/comoe.yaml [key=value ...]
    python train.py --config_file configs/demo.yaml configs/ablations/no_coar.yaml
    torchrun --nproc_per_node=N train.py --config_file ...
    python train.py --config_file logs/<dataset>/<name>/configs.yaml resume=true
"""
from __future__ import annotations

import argparse
import sys

CONFIG_HELP = ("experiment YAML file(s): the first with its _BASE_ chain, each further one "
               "with only the keys it sets (e.g. configs/demo.yaml configs/ablations/no_coar.yaml "
               "runs that ablation on the demo)")


def parse_args(argv=None) -> argparse.Namespace:
    from utils.arguments import parse_run_args
    return parse_run_args(argv, "Train a text-based person retrieval model.", CONFIG_HELP)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from utils.misc import require_torch
    require_torch()
    from processor.runner import follow_moved_run, run_training
    from utils.comm import launch_rank
    from utils.config import load_config
    from utils.logger import setup_logger
    setup_logger(None, rank=launch_rank())  # before load_config, whose warnings are logged too
    cfg = load_config(args.config_file, args.opts)
    follow_moved_run(cfg, args.config_file, args.opts)
    return run_training(cfg)


if __name__ == "__main__":
    from cli import run_cli
    sys.exit(run_cli(main))

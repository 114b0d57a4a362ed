"""Look at a trained run: rankings of test queries and expert routing.

    python visualize.py --config_file logs/<dataset>/<name>/configs.yaml \
        [--num_queries 4] [--seed 0] [--indices 12 345] [--query "a man in a red coat"] \
        [--topk 10] [--checkpoint PATH] [--out DIR] [key=value ...]
    python visualize.py --config_file RUN/configs.yaml --routing
    python visualize.py --config_file RUN_A/configs.yaml --compare RUN_B [RUN_C ...]

Rankings: one PNG per query with the caption on top and the top-K test
gallery images in rank order (green border: the query's identity, red:
another; grey for free-text queries, which have no ground truth) and the rank
of the first correct match over the whole gallery. Test captions are picked
by index (--indices) or at random (--num_queries with --seed); --query adds
free text. Without --indices/--query/--routing/--compare, 4 random captions.

--routing: expert usage and normalised entropy per layer from the run's
test_metrics.json. --compare: the same statistics of this run and other run
folders side by side. Figures go to RUN/vis/ (or --out); their paths are printed.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

DEFAULT_NUM_QUERIES = 4
OWN_VALUE_OPTIONS = ("--config_file", "--checkpoint", "--num_queries", "--query", "--seed",
                     "--topk", "--out")


def parse_args(argv=None) -> argparse.Namespace:
    from utils.arguments import split_overrides
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv),
                                     OWN_VALUE_OPTIONS)
    parser = argparse.ArgumentParser(description="Ranking and expert-routing figures of a run.")
    parser.add_argument("--config_file", default=None,
                        help="the run's saved configs.yaml (or the experiment file it was "
                             "trained from)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file (default: the run's best.pth, else last.pth)")
    parser.add_argument("--num_queries", type=int, default=None,
                        help=f"random test captions to rank (default {DEFAULT_NUM_QUERIES} when "
                             f"nothing else is asked for)")
    parser.add_argument("--indices", type=int, nargs="+", default=[],
                        help="test captions to rank, by index in the test split")
    parser.add_argument("--query", action="append", default=[],
                        help="a free-text query ranked against the test gallery (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random caption choice")
    parser.add_argument("--topk", type=int, default=10, help="gallery images shown per query")
    parser.add_argument("--routing", action="store_true",
                        help="expert usage / entropy figure from RUN/test_metrics.json")
    parser.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                        help="other run folders whose routing is compared with this run's")
    parser.add_argument("--out", default=None, help="output folder (default: RUN/vis)")
    args = parser.parse_args(own)
    if args.config_file is None and len(args.compare) < 2:
        parser.error("--config_file is required (or give --compare two or more run folders)")
    if args.topk < 1:
        parser.error(f"--topk {args.topk}: must be at least 1")
    if args.num_queries is not None and args.num_queries < 0:
        parser.error(f"--num_queries {args.num_queries}: must be >= 0")
    if args.num_queries is None:
        asked_else = args.indices or args.query or args.routing or args.compare
        args.num_queries = 0 if asked_else else DEFAULT_NUM_QUERIES
    needs_run = args.num_queries or args.indices or args.query or args.routing
    if args.config_file is None and needs_run:
        parser.error("rankings and --routing need --config_file")
    args.opts = overrides
    return args


def _run_dir(path: str) -> Path:
    """A --compare run folder given as the folder itself or a file in it (configs.yaml,
    test_metrics.json)."""
    path = Path(path).resolve()
    return path.parent if path.is_file() else path


def main(argv=None) -> dict:
    """{"queries": [RankedQuery...], "figures": [paths], "routing": path?, "compare": path?}."""
    args = parse_args(argv)
    from utils.misc import require_torch
    require_torch()
    from processor.runner import run_folder_of
    from utils import visualization as vis
    from utils.config import load_config

    cfg = load_config(args.config_file, args.opts) if args.config_file else None
    run_dir = run_folder_of(args.config_file, cfg) if cfg else _run_dir(args.compare[0])
    out_dir = Path(args.out) if args.out else run_dir / "vis"
    result: dict = {"queries": [], "figures": [], "routing": None, "compare": None}

    if args.num_queries or args.indices or args.query:
        result["queries"] = _rank_queries(args, cfg, run_dir, out_dir, result["figures"])
    if args.routing:
        path = vis.plot_routing(vis.read_expert_stats(run_dir), out_dir / "routing.png",
                                title=f"expert routing on the test split: {run_dir.name}")
        result["routing"] = path
        result["figures"].append(path)
    if args.compare:
        runs = list(dict.fromkeys(
            ([run_dir] if args.config_file else []) + [_run_dir(p) for p in args.compare]))
        if len(runs) < 2:
            from utils.config import ConfigError
            raise ConfigError(f"--compare needs runs other than {run_dir} to compare with")
        labels = vis.run_labels(runs)
        path = vis.plot_routing_comparison(
            [(label, vis.read_expert_stats(r)) for label, r in zip(labels, runs)],
            out_dir / "routing_compare.png")
        result["compare"] = path
        result["figures"].append(path)
    for path in result["figures"]:
        print(path)
    return result


def _rank_queries(args, cfg, run_dir: Path, out_dir: Path, figures: list) -> list:
    from processor.runner import load_dataset
    from utils.config import ConfigError
    from utils.visualization import (MAX_FIGURE_COLUMNS, check_queries, load_run,
                                     rank_split_queries, render_query, slugify)

    run = load_run(cfg, run_dir, args.checkpoint)
    check_queries(args.query, run.cfg.dataset.text_length)
    split = load_dataset(run.cfg).test
    num_captions = len(split.captions)
    bad = [i for i in args.indices if not 0 <= i < num_captions]
    if bad:
        raise ConfigError(f"--indices {' '.join(map(str, bad))}: the test split of "
                          f"{run.cfg.dataset.name} has captions 0..{num_captions - 1}")
    indices = list(args.indices)
    if args.num_queries:
        chosen = set(indices)
        rest = [i for i in range(num_captions) if i not in chosen]
        indices += random.Random(args.seed).sample(rest, min(args.num_queries, len(rest)))
    queries = rank_split_queries(run.model, split, run.cfg, run.device, indices, args.query,
                                 args.topk)
    columns = min(args.topk, MAX_FIGURE_COLUMNS)
    for q in queries:
        name = f"query_{q.index}.png" if q.index is not None else f"text_{slugify(q.caption)}.png"
        figures.append(render_query(q, out_dir / name, columns, math.ceil(len(q.paths) / columns)))
    return queries


if __name__ == "__main__":
    from cli import run_cli
    from utils.logger import setup_logger
    setup_logger(None)
    sys.exit(run_cli(main))

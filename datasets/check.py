"""Check a dataset folder before training on it.

    python -m datasets.check --root data --dataset CUHK-PEDES

Prints identities / images / captions per split as in the annotation file,
then (if it loads) per split as used for training and evaluation (with the
held-out val identities), then every problem found. Exit status 1 if there
is any problem, 0 otherwise.
"""
from __future__ import annotations

import argparse
import collections
import sys
from typing import Sequence

from prettytable import PrettyTable

from datasets.pedes import DatasetError, Report
from datasets.registry import DATASETS


def _file_table(report: Report, splits: Sequence[str]) -> PrettyTable:
    ids, images, captions = collections.defaultdict(set), collections.Counter(), collections.Counter()
    for entry in report.entries:
        ids[entry.split].add(entry.pid)
        images[entry.split] += 1
        captions[entry.split] += len(entry.captions)
    table = PrettyTable(["split", "ids", "images", "captions"])
    for split in splits:
        table.add_row([split, len(ids[split]), images[split], captions[split]])
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a text-based person retrieval dataset folder.")
    parser.add_argument("--root", required=True, help="folder that holds the dataset folder")
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--val_ids", type=int, default=None,
                        help="training identities to hold out for validation (default: the dataset's own rule)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the held-out identities: the run's `seed` (default 1, as in "
                             "configs/defaults.yaml), so that the splits shown are the run's")
    parser.add_argument("--verify_images", action="store_true",
                        help="also decode every image (slow) to find corrupt or truncated files")
    args = parser.parse_args(argv)
    from datasets.build import build_dataset, statistics_table
    from datasets.transforms import read_image

    cls = DATASETS[args.dataset]
    try:
        report = cls.inspect(args.root, check_images=True)
    except DatasetError as err:
        print(f"{args.dataset}: cannot read the annotations\n  - {err}")
        print("1 problem found.")
        return 1
    problems = list(report.problems)
    if args.verify_images:
        for entry in report.entries:
            try:
                read_image(f"{report.image_dir}/{entry.path}")
            except DatasetError as err:
                if "file not found" not in str(err):  # missing files are already reported
                    problems.append(str(err))

    print(f"{args.dataset}: {report.annotation_file}")
    print("As in the annotation file:")
    print(_file_table(report, cls.splits))
    if not report.problems:
        try:
            dataset = build_dataset(args.dataset, args.root, val_ids=args.val_ids, seed=args.seed)
            held = "" if args.val_ids is None and cls.default_val_ids is None else \
                f" (val: {len(dataset.val_pids)} training identities held out, seed {args.seed})"
            print(f"As loaded{held}:")
            print(statistics_table(dataset))
        except (DatasetError, ValueError) as err:
            problems.append(str(err))
    for warning in report.warnings:
        print(f"warning: {warning}")
    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} found:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("No problems found.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Search your own folder of person crops with a sentence.

    python retrieve.py --config_file logs/<dataset>/<name>/configs.yaml --gallery DIR \
        --query "a woman in a red coat and black trousers" [--query ...] [--topk 10] \
        [--checkpoint PATH] [--out DIR] [--cache_dir DIR] [key=value ...]

Every image under DIR (nested folders, jpg/jpeg/png/bmp/webp, any size) is
embedded once; the embeddings are cached under the run folder,
RUN/gallery_cache/<gallery>-<hash>/<key>/ (or under --cache_dir; key: the
checkpoint file, the image settings and the precision), and only new or changed files are embedded
on later calls. Caches of checkpoint files that have since changed are removed.
Prints rank, score and path of the top-K images and writes a figure per query,
retrieval_<slug>.png, to --out (default: the run's vis/ folder; not DIR, whose
images would otherwise grow by the figures), showing all K in rows of up to 20.
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from pathlib import Path

OWN_VALUE_OPTIONS = ("--config_file", "--gallery", "--query", "--topk", "--checkpoint", "--out",
                     "--cache_dir")


def parse_args(argv=None) -> argparse.Namespace:
    from utils.arguments import split_overrides
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv),
                                     OWN_VALUE_OPTIONS)
    parser = argparse.ArgumentParser(description="Rank a folder of images by a text query.")
    parser.add_argument("--config_file", required=True,
                        help="the run's saved configs.yaml (or the experiment file it was "
                             "trained from)")
    parser.add_argument("--gallery", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--query", action="append", required=True,
                        help="a description of the person (repeat for several queries)")
    parser.add_argument("--topk", type=int, default=10, help="images to print and draw per query")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint file (default: the run's best.pth, else last.pth)")
    parser.add_argument("--out", default=None, help="folder for the figures (default: RUN/vis)")
    parser.add_argument("--cache_dir", default=None,
                        help="where the embedding caches go (default: RUN/gallery_cache)")
    args = parser.parse_args(own)
    if args.topk < 1:
        parser.error(f"--topk {args.topk}: must be at least 1")
    args.opts = overrides  # key=value config overrides, e.g. device=cpu eval.batch_size=64
    return args


def main(argv=None) -> dict:
    """{"queries": [{"query", "matches": [(path, score)], "figure"}], "gallery": stats}."""
    args = parse_args(argv)
    from utils.misc import require_torch
    require_torch()
    from datasets.transforms import build_eval_transform
    from processor.runner import run_folder_of
    from utils.config import load_config
    from utils.gallery import encode_queries, index_gallery, search_gallery
    from utils.tokenizer import tokenize
    from utils.visualization import (MAX_FIGURE_COLUMNS, check_queries, load_run,
                                     render_ranking, slugify)

    cfg = load_config(args.config_file, args.opts)
    run = load_run(cfg, run_folder_of(args.config_file, cfg), args.checkpoint)
    check_queries(args.query, cfg.dataset.text_length)
    image_size = tuple(cfg.input.size)
    embeddings = encode_queries(run.model, args.query,
                                partial(tokenize, context_length=cfg.dataset.text_length),
                                run.device, cfg.solver.precision)  # Q, D
    index = index_gallery(
        run.model, args.gallery,
        build_eval_transform(image_size, interpolation=cfg.input.interpolation),
        checkpoint=run.checkpoint,
        settings=(image_size, cfg.model.embed, cfg.input.interpolation),
        cache_dir=args.cache_dir or run.run_dir / "gallery_cache", embed_dim=embeddings.shape[1],
        batch_size=cfg.eval.batch_size, num_workers=cfg.dataset.num_workers, device=run.device,
        precision=cfg.solver.precision)
    stats = index.stats
    print(f"gallery {args.gallery}: {len(index)} images ({stats['embedded']} embedded now, "
          f"{stats['reused']} from the cache, {len(stats['unreadable'])} unreadable)")
    results = search_gallery(index, embeddings, args.topk)
    out_dir = Path(args.out) if args.out else run.run_dir / "vis"
    columns = min(args.topk, MAX_FIGURE_COLUMNS)
    queries = []
    for text, matches in zip(args.query, results):
        print(f"\nquery: {text}")
        for rank, m in enumerate(matches, start=1):
            print(f"{rank:4d}  {m.score:.4f}  {m.path}")
        figure = render_ranking(out_dir / f"retrieval_{slugify(text)}.png", text,
                                [m.path for m in matches], [m.score for m in matches],
                                num_columns=columns, num_rows=math.ceil(len(matches) / columns),
                                status=f"top {len(matches)} of {len(index)} images in "
                                       f"{args.gallery}",
                                labels=[Path(m.path).name[:22] for m in matches])
        print(f"figure: {figure}")
        queries.append({"query": text, "matches": [(m.path, m.score) for m in matches],
                        "figure": str(figure)})
    return {"queries": queries, "gallery": stats}


if __name__ == "__main__":
    from cli import run_cli
    from utils.logger import setup_logger
    setup_logger(None)
    sys.exit(run_cli(main))

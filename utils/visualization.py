"""Figures for looking at a trained run, and the helpers the scripts share.

- `render_ranking`: one query's caption above its top-K images in rank order,
  each with its rank, similarity and a border (green: same identity as the
  query, red: another identity, grey: no ground truth).
- `plot_routing`: expert usage per CoMoE layer (images and text side by side)
  and the normalised usage entropy per layer, from a run's test_metrics.json.
- `plot_routing_comparison`: the same statistics for several runs in one figure.
- `load_run`: rebuild a run's model from its config and a checkpoint.
- `rank_split_queries`: rank captions (from the test split or free text)
  against the test gallery.

Figures are drawn on matplotlib `Figure` objects (Agg canvas, no pyplot state)
with a fixed size and dpi, so a PNG's pixel size depends only on its layout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from utils.config import is_number

logger = logging.getLogger(__name__)

DPI = 100
COLUMN_WIDTH_IN = 1.5      # one ranked image per column
SIDE_MARGIN_IN = 0.25
RANKING_HEIGHT_IN = 5.0    # caption band and one row of images
CAPTION_BAND_IN = 1.8      # from the top of the figure to the first row's images
IMAGE_BAND_IN = 2.75       # height of a row's images
ROW_STEP_IN = 3.4          # from one row's images to the next (titles and labels between)
CAPTION_LINES = 4          # longer captions are cut with an ellipsis
MAX_FIGURE_COLUMNS = 20    # a ranking figure shows at most this many images
MATCH_COLOUR = "#2ca02c"
MISMATCH_COLOUR = "#d62728"
NEUTRAL_COLOUR = "#9e9e9e"
MODALITY_COLOURS = {"image": "#1f77b4", "text": "#ff7f0e"}
THUMBNAIL_SIZE = (256, 512)  # width, height bound of a displayed image (memory, not layout)
METRICS_FILE = "test_metrics.json"


# -- small helpers -------------------------------------------------------------

def slugify(text: str, max_chars: int = 40) -> str:
    """A file-name-safe short form of `text` plus a hash, so different texts never collide."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_chars].strip("-")
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:6]
    return f"{words or 'query'}_{digest}"


def ranking_figure_size(num_columns: int, num_rows: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of a `render_ranking` PNG of `num_rows` rows of `num_columns`."""
    width_in = 2 * SIDE_MARGIN_IN + COLUMN_WIDTH_IN * num_columns
    return round(width_in * DPI), round((RANKING_HEIGHT_IN + ROW_STEP_IN * (num_rows - 1)) * DPI)


def _wrap_caption(caption: str, chars_per_line: int) -> str:
    lines = textwrap.wrap(" ".join(caption.split()), width=max(chars_per_line, 20)) or [""]
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][:max(chars_per_line - 1, 1)].rstrip() + "\u2026"
    return "\n".join(lines)


def _thumbnail(path: str) -> Image.Image | None:
    """The image at `path` shrunk for display, or None if it cannot be read any more."""
    from datasets.transforms import read_image
    from datasets.pedes import BadImageError
    try:
        image = read_image(path)
    except BadImageError as err:
        logger.warning("cannot show %s: %s", path, err)
        return None
    image.thumbnail(THUMBNAIL_SIZE)
    return image


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": the pixel size stays fixed
    return path


# -- ranking figure -------------------------------------------------------------

def render_ranking(path: str | os.PathLike, caption: str, image_paths: Sequence[str],
                   scores: Sequence[float], *, num_columns: int = 10, num_rows: int = 1,
                   matches: Sequence[bool] | None = None, status: str = "",
                   status_colour: str = "black", labels: Sequence[str] | None = None) -> Path:
    """Write one query's ranking as a PNG of `ranking_figure_size(num_columns, num_rows)` pixels.

    Args:
        caption: the query text, wrapped on top (at most CAPTION_LINES lines).
        image_paths, scores: the ranked gallery images (best first) and their
            cosine similarities; at most `num_columns * num_rows` are drawn, row by row.
        matches: per image, True (same identity: green border) or False (red);
            None draws neutral grey borders (no ground truth).
        status: a line under the caption, e.g. "first correct match: rank 3".
        labels: a short text under each image (an identity, a file name).
    """
    width_in = 2 * SIDE_MARGIN_IN + COLUMN_WIDTH_IN * num_columns
    height_in = RANKING_HEIGHT_IN + ROW_STEP_IN * (num_rows - 1)
    fig = _new_figure(width_in, height_in)
    chars_per_line = int((width_in - 2 * SIDE_MARGIN_IN) * 72 / (11 * 0.55))
    fig.text(SIDE_MARGIN_IN / width_in, 1 - 0.125 / height_in,
             _wrap_caption(caption, chars_per_line), ha="left", va="top", fontsize=11)
    if status:
        fig.text(SIDE_MARGIN_IN / width_in, 1 - 1.325 / height_in, status, ha="left", va="top",
                 fontsize=11, fontweight="bold", color=status_colour)
    column = COLUMN_WIDTH_IN / width_in
    pad = 0.06 * column
    for i in range(min(num_columns * num_rows, len(image_paths))):
        row, col = divmod(i, num_columns)
        top = height_in - CAPTION_BAND_IN - row * ROW_STEP_IN  # inches from the bottom
        ax = fig.add_axes((SIDE_MARGIN_IN / width_in + col * column + pad,
                           (top - IMAGE_BAND_IN) / height_in, column - 2 * pad,
                           IMAGE_BAND_IN / height_in))
        colour = NEUTRAL_COLOUR if matches is None else (
            MATCH_COLOUR if matches[i] else MISMATCH_COLOUR)
        image = _thumbnail(image_paths[i])
        if image is None:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=9,
                    transform=ax.transAxes)
        else:
            ax.imshow(image, aspect="equal", interpolation="bilinear")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
        ax.set_title(f"#{i + 1}  {scores[i]:.3f}", fontsize=10, color="black", pad=4)
        if labels is not None:
            ax.set_xlabel(labels[i], fontsize=8, labelpad=3)
    return _save(fig, path)


# -- routing figures -----------------------------------------------------------

def read_expert_stats(run_dir: str | os.PathLike) -> dict:
    """The "experts" entry of `{run_dir}/test_metrics.json` (written by test.py / train.py)."""
    from processor.runner import RunFolderError
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunFolderError(f"{path} not found: evaluate the run first "
                             f"(python test.py --config_file {Path(run_dir) / 'configs.yaml'})")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}); rerun test.py to rewrite "
                             f"it") from err
    experts = metrics.get("experts") if isinstance(metrics, dict) else None
    if not experts:
        raise RunFolderError(f"{path} has no 'experts' entry: the run has no CoMoE head "
                             f"(model.head=none), so there is no routing to plot")
    problem = _expert_stats_problem(experts)
    if problem:
        raise RunFolderError(f"{path}: {problem}; rerun test.py to rewrite it")
    return experts


def _expert_stats_problem(experts) -> str | None:
    """What is wrong with an "experts" entry, or None: {"image"|"text": {"usage": one list
    of per-expert shares per layer, "entropy": one number per layer}}."""
    if not isinstance(experts, dict) or not set(experts) & {"image", "text"}:
        return f"'experts' must map image/text to statistics, got {experts!r:.80}"
    for modality, stats in experts.items():
        where = f"experts.{modality}"
        if not isinstance(stats, dict) or not {"usage", "entropy"} <= set(stats):
            return f"'{where}' must hold 'usage' and 'entropy', got {stats!r:.80}"
        usage, entropy = stats["usage"], stats["entropy"]
        if not (isinstance(usage, list) and usage and all(
                isinstance(layer, list) and layer and all(map(is_number, layer))
                for layer in usage)):
            return f"'{where}.usage' must be a list of per-layer lists of numbers, got {usage!r:.80}"
        if not (isinstance(entropy, list) and len(entropy) == len(usage)
                and all(map(is_number, entropy))):
            return (f"'{where}.entropy' must be a list of {len(usage)} numbers (one per layer), "
                    f"got {entropy!r:.80}")
    return None


def _usage_bars(ax, groups: Sequence[tuple[str, Sequence[float], str]], title: str) -> None:
    """Grouped bars: one group per expert, one bar per (label, usage, colour)."""
    num_experts = max(len(usage) for _, usage, _ in groups)
    width = 0.8 / len(groups)
    for g, (label, usage, colour) in enumerate(groups):
        xs = [e - 0.4 + width * (g + 0.5) for e in range(len(usage))]
        ax.bar(xs, usage, width=width, color=colour, label=label)
    ax.axhline(1.0 / num_experts, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(num_experts))
    ax.set_xticklabels([str(e) for e in range(num_experts)])
    ax.set_xlabel("expert")
    ax.set_ylim(0, max(1.0 / num_experts, *(max(u) for _, u, _ in groups)) * 1.2)
    ax.set_title(title, fontsize=10)


def _entropy_lines(ax, lines: Sequence[tuple[str, Sequence[float], str, str]], title: str) -> None:
    """Normalised entropy per layer: one line per (label, entropy, colour, linestyle)."""
    num_layers = max(len(entropy) for _, entropy, _, _ in lines)
    for label, entropy, colour, style in lines:
        ax.plot(range(1, len(entropy) + 1), entropy, marker="o", color=colour, linestyle=style,
                label=label)
    ax.set_xticks(range(1, num_layers + 1))
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot_routing(experts: dict, path: str | os.PathLike, title: str = "") -> Path:
    """One PNG: per layer, the share of top-k selections each expert received
    (image and text bars side by side; the dashed line is uniform use), and
    the usage entropy divided by log(E) per layer (1 = even, 0 = one expert).

    `experts` is the evaluator's {"image": {"usage": [[...] per layer],
    "entropy": [...]}, "text": {...}}.
    """
    modalities = [m for m in ("image", "text") if m in experts]
    if not modalities:
        raise ValueError(f"expert statistics without 'image' or 'text' entries: {sorted(experts)}")
    num_layers = max(len(experts[m]["usage"]) for m in modalities)
    fig = _new_figure(3.2 * (num_layers + 1), 3.6)
    axes = fig.subplots(1, num_layers + 1, squeeze=False)[0]
    for layer in range(num_layers):
        groups = [(m, experts[m]["usage"][layer], MODALITY_COLOURS[m]) for m in modalities
                  if layer < len(experts[m]["usage"])]
        _usage_bars(axes[layer], groups, f"layer {layer + 1}: expert usage")
        if layer == 0:
            axes[layer].set_ylabel("share of selections")
            axes[layer].legend(fontsize=8)
    _entropy_lines(axes[-1], [(m, experts[m]["entropy"], MODALITY_COLOURS[m], "-")
                              for m in modalities], "normalised entropy")
    axes[-1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_routing_comparison(runs: Sequence[tuple[str, dict]], path: str | os.PathLike) -> Path:
    """Several runs' routing in one PNG: a row per modality; per layer, usage
    bars grouped by run, and a last column with each run's entropy per layer.

    `runs` holds (label, experts) pairs, `experts` as in `plot_routing`.
    """
    if not runs:
        raise ValueError("plot_routing_comparison needs at least one run")
    modalities = [m for m in ("image", "text") if any(m in experts for _, experts in runs)]
    num_layers = max(len(experts[m]["usage"]) for _, experts in runs for m in modalities
                     if m in experts)
    from matplotlib import colormaps
    palette = colormaps["tab10"]
    colours = [palette(i % 10) for i in range(len(runs))]
    fig = _new_figure(3.2 * (num_layers + 1), 3.2 * len(modalities))
    axes = fig.subplots(len(modalities), num_layers + 1, squeeze=False)
    for row, modality in enumerate(modalities):
        for layer in range(num_layers):
            groups = [(label, experts[modality]["usage"][layer], colour)
                      for (label, experts), colour in zip(runs, colours)
                      if modality in experts and layer < len(experts[modality]["usage"])]
            ax = axes[row][layer]
            if groups:
                _usage_bars(ax, groups, f"{modality}, layer {layer + 1}: usage")
            else:
                ax.set_axis_off()
        _entropy_lines(axes[row][-1], [(label, experts[modality]["entropy"], colour, "-")
                                       for (label, experts), colour in zip(runs, colours)
                                       if modality in experts],
                       f"{modality}: normalised entropy")
        axes[row][0].set_ylabel("share of selections")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, with their parent prepended where two runs share a name."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


# -- loading a run -------------------------------------------------------------

@dataclass
class LoadedRun:
    cfg: object            # the resolved config (EasyDict)
    model: torch.nn.Module  # eval mode, on `device`
    device: torch.device
    run_dir: Path
    checkpoint: Path


def resolve_checkpoint(run_dir: Path, checkpoint: str | os.PathLike | None) -> Path:
    """`checkpoint` if given, else run_dir/best.pth, else run_dir/last.pth (with a warning)."""
    from utils.checkpoint import CheckpointError
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        return path
    if (run_dir / "best.pth").is_file():
        return run_dir / "best.pth"
    if (run_dir / "last.pth").is_file():
        logger.warning("%s has no best.pth; using last.pth", run_dir)
        return run_dir / "last.pth"
    existing = sorted(p.name for p in run_dir.glob("*.pth"))
    raise CheckpointError(
        f"{run_dir} holds no best.pth or last.pth"
        + (f" (it has {', '.join(existing)}; pass one with --checkpoint PATH)" if existing
           else "; train the run first or pass --checkpoint PATH"))


def load_run(cfg, run_dir: Path, checkpoint: str | os.PathLike | None = None) -> LoadedRun:
    """The model of the run in `run_dir` (`processor.runner.run_folder_of`), built from
    its resolved config `cfg`, with the weights of a checkpoint (as test.py loads one).

    The checkpoint is `checkpoint`, else the config's `checkpoint.path`, else
    best.pth of the run folder, else last.pth. `num_classes` and every weight come
    from the checkpoint (model.pretrain is not read), the device from the config's
    `device`.
    """
    from processor.runner import configure_backends, load_for_evaluation
    from utils.misc import resolve_device
    path = resolve_checkpoint(run_dir, checkpoint or cfg.checkpoint.path or None)
    device = resolve_device(cfg.device)
    configure_backends(cfg)
    model, _ = load_for_evaluation(cfg, path, device)
    return LoadedRun(cfg, model.eval(), device, run_dir, path)


# -- ranking test-split queries ------------------------------------------------

def check_queries(queries: Sequence[str], context_length: int) -> None:
    """Refuse queries without words (ConfigError); warn about those longer than the
    model's `context_length` tokens, which only count up to there."""
    from utils.config import ConfigError
    from utils.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    for text in queries:
        ids = tokenizer.encode(text)
        if not ids:
            raise ConfigError(f"--query {text!r} has no words to rank images by; describe "
                              f"the person, e.g. --query \"a woman in a red coat\"")
        if len(ids) + 2 > context_length:  # + start and end of text
            kept = tokenizer.decode(ids[:context_length - 2]).strip()
            logger.warning("--query has %d tokens but the model reads %d (dataset.text_length): "
                           "only \"%s\" is used", len(ids) + 2, context_length, kept)


@dataclass
class RankedQuery:
    """One caption ranked against a gallery (paths and scores best first)."""
    caption: str
    index: int | None            # caption index in the split; None for free text
    pid: int | None              # the caption's identity; None for free text
    paths: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    # 1-based rank of the first same-identity image over the whole gallery;
    # None: the identity is not in the gallery, or no ground truth (free text).
    first_correct: int | None = None

    @property
    def matches(self) -> list[bool] | None:
        return None if self.pid is None else [p == self.pid for p in self.pids]

    def status(self, num_shown: int) -> tuple[str, str]:
        """The line under the caption and its colour (green: a correct match is among the
        `num_shown` images drawn)."""
        if self.pid is None:
            return "free-text query (no ground truth)", "black"
        if self.first_correct is None:
            return f"identity {self.pid}: no image of it in the gallery", MISMATCH_COLOUR
        colour = MATCH_COLOUR if self.first_correct <= num_shown else MISMATCH_COLOUR
        return (f"identity {self.pid}, first correct match: rank {self.first_correct}", colour)


@torch.no_grad()
def rank_split_queries(model, split, cfg, device: torch.device, indices: Sequence[int],
                       free_text: Sequence[str], topk: int) -> list[RankedQuery]:
    """Rank captions `split.captions[i]` for i in `indices`, then `free_text`,
    against every image of `split` (an EvalSplit), using the evaluator's
    chunked encoders. Ranking ties go to the lower gallery index, as in the metrics.
    """
    from torch.utils.data import DataLoader

    from datasets import TextDataset
    from processor.evaluator import encode_loader
    from processor.runner import eval_loaders
    precision = cfg.solver.precision
    image_loader, _ = eval_loaders(cfg, split, device)
    gallery, gallery_pids = encode_loader(model, image_loader, "image", device,
                                          precision)  # G, D ; G
    gallery_pids = gallery_pids.cpu()
    captions = [split.captions[i] for i in indices] + list(free_text)
    caption_pids = [split.caption_pids[i] for i in indices] + [-1] * len(free_text)
    texts = DataLoader(TextDataset(captions, caption_pids, cfg.dataset.text_length),
                       batch_size=cfg.eval.batch_size, shuffle=False)
    queries, _ = encode_loader(model, texts, "text", device, precision)  # Q, D
    out = []
    for q, caption in enumerate(captions):
        sim = (queries[q:q + 1] @ gallery.T)[0].float().cpu()  # G
        order = torch.sort(sim, descending=True, stable=True).indices
        ranked_pids = gallery_pids[order]
        top = order[:topk].tolist()
        is_query = q < len(indices)
        pid = int(caption_pids[q]) if is_query else None
        first = None
        if is_query:
            hits = (ranked_pids == pid).nonzero()
            first = int(hits[0, 0]) + 1 if len(hits) else None
        out.append(RankedQuery(caption, int(indices[q]) if is_query else None, pid,
                               [split.image_paths[i] for i in top], sim[top].tolist(),
                               [int(gallery_pids[i]) for i in top], first))
    return out


def render_query(query: RankedQuery, path: str | os.PathLike, num_columns: int,
                 num_rows: int = 1) -> Path:
    status, colour = query.status(num_columns * num_rows)
    labels = None if query.pid is None else [f"id {p}" for p in query.pids]
    caption = query.caption if query.index is None else f"[{query.index}] {query.caption}"
    return render_ranking(path, caption, query.paths, query.scores, num_columns=num_columns,
                          num_rows=num_rows, matches=query.matches, status=status,
                          status_colour=colour, labels=labels)


"""Annotation files of the person-description datasets, as users have them on disk.

Each dataset is a folder ``{root}/{FOLDER}`` with one JSON annotation file (a
list of entries, one per image) and the images under ``{root}/{FOLDER}/imgs/``.
An entry holds the split, the identity, the image path relative to ``imgs/``
and one or more captions. Loading checks every entry and reports all problems
at once, naming the file, the entry index and the field.

Items follow IRRA: training has one item per (image, caption) pair, with
identities remapped to 0..N-1 and ``image_id`` the index of the image (the
captions of one image share it); evaluation splits list every image once and
every caption once, with the dataset's original identities.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from utils.errors import UserError

logger = logging.getLogger(__name__)

MAX_LISTED = 5          # examples shown for one kind of problem
MAX_PROBLEMS_IN_ERROR = 20


class DatasetError(UserError):
    """A dataset cannot be loaded as it is on disk. The message says where and why."""


class BadImageError(DatasetError):
    """An image file is missing or cannot be decoded.

    ``message`` lets a DataLoader worker's copy of the error be rebuilt in the
    main process with its full text (torch re-raises with ``message=``).
    """
    message = "image file cannot be read"

    def __init__(self, path: str = "", reason: str = "", *, message: str | None = None):
        self.path = path
        if message is None:
            message = f"Cannot read image {path}" + (f": {reason}" if reason else "")
        super().__init__(message)


class TrainItem(NamedTuple):
    pid: int        # identity, remapped to 0..num_train_pids-1
    image_id: int   # index of the image in the training set (shared by its captions)
    path: str       # absolute image path
    caption: str


@dataclass
class EvalSplit:
    """A retrieval split: every image once (gallery), every caption once (queries)."""
    image_pids: list[int]      # original dataset identities
    image_paths: list[str]     # absolute image paths
    caption_pids: list[int]
    captions: list[str]

    @property
    def num_ids(self) -> int:
        return len(set(self.image_pids) | set(self.caption_pids))


@dataclass
class Annotation:
    """One checked entry of an annotation file."""
    index: int                 # position in the JSON list
    split: str
    pid: int                   # original identity
    path: str                  # relative to imgs/
    captions: list[str]


@dataclass
class Report:
    """What loading an annotation file found."""
    annotation_file: str
    image_dir: str
    entries: list[Annotation] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _json_entry_error(path: str, text: str, err: json.JSONDecodeError) -> str:
    """Describe a JSON syntax error by the index of the list entry it is in."""
    where = f"line {err.lineno}, column {err.colno}"
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos:pos + 1] != "[":
        return f"{path} is not valid JSON ({err.msg} at {where}); expected a list of entries."
    pos += 1
    index = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if text[pos:pos + 1] == "]":
            break
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if text[pos:pos + 1] != ",":
            index += 1
            break
        pos += 1
        index += 1
    return (f"{path} is not valid JSON: {err.msg} at {where}, in entry {index} of the list "
            f"(0-based). Fix or re-export that entry.")


def _stays_inside(rel: str) -> bool:
    """Whether image path `rel`, joined to the image folder, names something inside it.

    Decided on the normalised path (the one that is opened), with backslashes read
    as separators and drive letters refused, so `CUHK01/../../x.png` is outside.
    Symbolic links placed inside the folder are the user's own layout and are followed.
    """
    posix = rel.replace("\\", "/")
    if ("\x00" in rel or os.path.isabs(rel) or posixpath.isabs(posix)
            or re.match(r"[A-Za-z]:", posix)):
        return False
    normal = posixpath.normpath(posix)
    return normal not in (".", "..") and not normal.startswith("../")


def _list_examples(items: Sequence, limit: int = MAX_LISTED) -> str:
    shown = ", ".join(str(x) for x in list(items)[:limit])
    return shown + (", ..." if len(items) > limit else "")


class PedesDataset:
    """One text-based person retrieval dataset in its original on-disk format.

    Subclasses set the folder name, the annotation file name(s), the name of
    the image-path field and the splits the file may contain.

    Args:
        root: folder that holds the dataset folder (``{root}/{folder}/...``).
        val_ids: None: the file's own val split (none for a dataset without
            one, unless ``default_val_ids`` is set, as for ICFG-PEDES); N > 0:
            hold out N training identities as val (replacing a native val
            split), chosen by ``seed``; 0: no val split.
        seed: chooses the held-out identities.
        check_images: check that every image file exists (one stat per image).

    Attributes: ``train`` (list of TrainItem), ``val`` (EvalSplit or None),
    ``test`` (EvalSplit), ``num_train_pids``, ``val_pids`` (original ids of
    the val split), ``annotation_file``, ``image_dir``.
    """
    name: str = ""
    folder: str = ""
    annotation_files: tuple[str, ...] = ()
    path_field: str = ""
    splits: tuple[str, ...] = ("train", "val", "test")
    default_val_ids: int | None = None   # identities held out when val_ids is None

    def __init__(self, root: str | os.PathLike, val_ids: int | None = None, seed: int = 0,
                 check_images: bool = True):
        root = os.fspath(root)
        self.root = root
        report = self.inspect(root, check_images=check_images)
        if report.problems:
            raise DatasetError(self._problem_text(report))
        for warning in report.warnings:
            logger.warning("%s: %s", self.name, warning)
        self.annotation_file = report.annotation_file
        self.image_dir = report.image_dir
        self._build_splits(report.entries, val_ids, seed)

    # -- reading and checking -------------------------------------------------------------
    @classmethod
    def dataset_dir(cls, root: str) -> str:
        return os.path.join(root, cls.folder)

    @classmethod
    def expected_layout(cls, root: str) -> str:
        folder = cls.dataset_dir(root)
        names = " or ".join(cls.annotation_files)
        return (f"{folder}/{names} (a JSON list of entries with fields "
                f"{', '.join(cls.required_fields())}) and the images under {folder}/imgs/<{cls.path_field}>")

    @classmethod
    def required_fields(cls) -> tuple[str, ...]:
        return ("split", "captions", cls.path_field, "id")

    @classmethod
    def find_annotation_file(cls, root: str) -> str:
        """Path of the annotation file; DatasetError saying where it was looked for if missing."""
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetError(f"Dataset root {root!r} does not exist. Expected layout: {cls.expected_layout(root)}.")
        folder = cls.dataset_dir(root)
        candidates = [os.path.join(folder, name) for name in cls.annotation_files]
        found = [c for c in candidates if os.path.isfile(c)]
        if len(found) > 1:
            logger.warning("%s: both %s exist; reading %s", cls.name, " and ".join(found), found[0])
        if found:
            return found[0]
        hint = ""
        if any(os.path.isfile(os.path.join(root, name)) for name in cls.annotation_files):
            hint = (f" The annotation file is directly in {root!r}: pass the folder that contains "
                    f"{cls.folder}/ as the root, not the dataset folder itself.")
        elif not os.path.isdir(folder):
            hint = f" There is no folder {cls.folder!r} in {root!r}."
        raise DatasetError(f"{cls.name} annotation file not found: looked for {' and '.join(candidates)}. "
                           f"Expected layout: {cls.expected_layout(root)}.{hint}")

    @classmethod
    def inspect(cls, root: str, check_images: bool = True) -> Report:
        """Read and check the annotation file without building splits.

        File-level failures (missing root or file, broken JSON, not a list)
        raise DatasetError; entry-level problems are collected in the report.
        """
        root = os.fspath(root)
        path = cls.find_annotation_file(root)
        report = Report(annotation_file=path, image_dir=os.path.join(cls.dataset_dir(root), "imgs"))
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise DatasetError(f"Cannot read {path}: {err}") from err
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(_json_entry_error(path, text, err)) from None
        if not isinstance(data, list):
            raise DatasetError(f"{path} holds a JSON {type(data).__name__}; expected a list of entries "
                               f"(layout: {cls.expected_layout(root)}).")
        if not data:
            raise DatasetError(f"{path} is an empty list; it has no entries.")
        for index, raw in enumerate(data):
            entry = cls._check_entry(path, index, raw, report.problems, report.warnings)
            if entry is not None:
                report.entries.append(entry)
        cls._check_splits(path, report, entries_complete=not report.problems)
        if check_images:
            cls._check_images(report)
        return report

    @classmethod
    def _check_entry(cls, path: str, index: int, raw, problems: list[str], warnings: list[str]) -> Annotation | None:
        where = f"{os.path.basename(path)} entry {index}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected an object with fields {', '.join(cls.required_fields())}, "
                            f"got {type(raw).__name__}")
            return None
        missing = [name for name in cls.required_fields() if name not in raw]
        if missing:
            problems.append(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(repr(m) for m in missing)} (has: {', '.join(sorted(map(str, raw)))})")
            return None
        before = len(problems)
        split, pid, image, captions = raw["split"], raw["id"], raw[cls.path_field], raw["captions"]
        if split not in cls.splits:
            problems.append(f"{where}: field 'split' is {split!r}; {cls.name} splits are {', '.join(cls.splits)}")
        if not isinstance(pid, int) or isinstance(pid, bool):
            problems.append(f"{where}: field 'id' must be an integer, got {pid!r}")
        elif not -2**63 <= pid < 2**63:  # identities become int64 tensors
            problems.append(f"{where}: field 'id' is {pid}, outside the 64-bit integer range")
        if not isinstance(image, str) or not image:
            problems.append(f"{where}: field {cls.path_field!r} must be a non-empty path, got {image!r}")
        elif not _stays_inside(image):
            problems.append(f"{where}: field {cls.path_field!r} is {image!r}, which points outside "
                            f"{cls.folder}/imgs/; image paths must be relative to that folder "
                            f"and stay in it")
        if not isinstance(captions, list) or not captions:
            problems.append(f"{where}: field 'captions' must be a non-empty list of strings, got {captions!r:.80}")
        elif not all(isinstance(c, str) for c in captions):
            bad = next(i for i, c in enumerate(captions) if not isinstance(c, str))
            problems.append(f"{where}: field 'captions' item {bad} is {type(captions[bad]).__name__}, not a string")
        elif any(not c.strip() for c in captions):
            warnings.append(f"{where}: an empty caption")
        if len(problems) > before:
            return None
        return Annotation(index=index, split=split, pid=pid, path=image, captions=list(captions))

    @classmethod
    def _check_splits(cls, path: str, report: Report, entries_complete: bool) -> None:
        ids = collections.defaultdict(set)
        for entry in report.entries:
            ids[entry.split].add(entry.pid)
        name = os.path.basename(path)
        if entries_complete:  # otherwise the split may only look empty because its entries are broken
            for split in cls.splits:
                if split != "val" and not ids.get(split):
                    report.problems.append(f"{name}: no entries in the {split!r} split")
        present = [s for s in cls.splits if ids.get(s)]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                shared = sorted(ids[a] & ids[b])
                if shared:
                    report.problems.append(
                        f"{name}: {len(shared)} identit{'y is' if len(shared) == 1 else 'ies are'} in both "
                        f"{a} and {b} (ids {_list_examples(shared)}); identities must not be shared between splits")
        seen = {}
        duplicates = []
        for entry in report.entries:
            if entry.path in seen:
                duplicates.append(f"{entry.path} (entries {seen[entry.path]} and {entry.index})")
            else:
                seen[entry.path] = entry.index
        if duplicates:
            report.warnings.append(f"{name}: {len(duplicates)} image path(s) appear more than once: "
                                   f"{_list_examples(duplicates)}")

    @classmethod
    def _check_images(cls, report: Report) -> None:
        missing = [e.path for e in report.entries if not os.path.isfile(os.path.join(report.image_dir, e.path))]
        if missing:
            report.problems.append(
                f"{len(missing)} of {len(report.entries)} image files are missing under {report.image_dir}/ "
                f"(first {min(len(missing), MAX_LISTED)}: {_list_examples(missing)})")

    def _problem_text(self, report: Report) -> str:
        problems = report.problems
        shown = problems[:MAX_PROBLEMS_IN_ERROR]
        more = len(problems) - len(shown)
        lines = [f"{self.name} at {report.annotation_file} has {len(problems)} problem(s):"]
        lines += [f"  - {p}" for p in shown]
        if more:
            lines.append(f"  ... and {more} more (python -m datasets.check --root {self.root} "
                         f"--dataset {self.name} lists them all)")
        return "\n".join(lines)

    # -- splits ---------------------------------------------------------------------------
    def _build_splits(self, entries: list[Annotation], val_ids: int | None, seed: int) -> None:
        by_split = collections.defaultdict(list)
        for entry in entries:
            by_split[entry.split].append(entry)
        train = by_split["train"]
        train_ids = sorted({e.pid for e in train})
        if val_ids is None:
            val_ids = self.default_val_ids
            if val_ids is not None and val_ids >= len(train_ids):
                raise DatasetError(
                    f"{self.name} has no val split, so {val_ids} training identities are held out for validation "
                    f"by default, but {self.annotation_file} has only {len(train_ids)} training identities. "
                    f"Pass a smaller val_ids (config key dataset.val_ids; --val_ids of datasets.check).")
        if val_ids is None:
            val = by_split.get("val", [])
            held_out: set[int] = set()
        else:
            if not isinstance(val_ids, int) or isinstance(val_ids, bool) or val_ids < 0:
                raise ValueError(f"val_ids={val_ids!r}: expected None or an integer >= 0.")
            if val_ids >= len(train_ids):
                raise DatasetError(f"val_ids={val_ids}: {self.annotation_file} has only {len(train_ids)} training "
                                   f"identities; at least one must stay for training.")
            rng = np.random.default_rng(seed)
            held_out = set(rng.choice(np.asarray(train_ids), size=val_ids, replace=False).tolist())
            val = [e for e in train if e.pid in held_out]
            train = [e for e in train if e.pid not in held_out]
        self.val_pids = sorted({e.pid for e in val})
        self.train, self.num_train_pids, self.train_pid_map = self._train_items(train)
        self.val = self._eval_split(val) if val else None
        self.test = self._eval_split(by_split["test"])
        logger.debug("%s: train %d ids / %d images / %d captions; val %s; test %d ids / %d images / %d captions",
                    self.name, self.num_train_pids, len({t.image_id for t in self.train}), len(self.train),
                    f"{len(self.val_pids)} ids" + (" (held out of train)" if held_out else "") if val else "none",
                    self.test.num_ids, len(self.test.image_paths), len(self.test.captions))

    def _abs_path(self, rel: str) -> str:
        return os.path.abspath(os.path.join(self.image_dir, rel))

    def _train_items(self, entries: list[Annotation]) -> tuple[list[TrainItem], int, dict[int, int]]:
        pid_map = {pid: i for i, pid in enumerate(sorted({e.pid for e in entries}))}
        items = []
        for image_id, entry in enumerate(entries):
            path = self._abs_path(entry.path)
            for caption in entry.captions:
                items.append(TrainItem(pid_map[entry.pid], image_id, path, caption))
        return items, len(pid_map), pid_map

    def _eval_split(self, entries: list[Annotation]) -> EvalSplit:
        split = EvalSplit([], [], [], [])
        for entry in entries:
            split.image_pids.append(entry.pid)
            split.image_paths.append(self._abs_path(entry.path))
            for caption in entry.captions:
                split.caption_pids.append(entry.pid)
                split.captions.append(caption)
        return split

    def __repr__(self) -> str:
        val = f"{len(self.val.image_paths)} images" if self.val else "none"
        return (f"{type(self).__name__}(root={self.root!r}, train={len(self.train)} captions of "
                f"{self.num_train_pids} ids, val={val}, test={len(self.test.image_paths)} images)")

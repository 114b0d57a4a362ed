"""Resuming with changed settings: what a running run can take, what it cannot.

`resume=true` continues from last.pth, whose config is the one the run was
trained with. The requested config (the run's configs.yaml plus overrides, or
another file) is compared with it key by key:

- keys in `APPLIED` change how the rest of the run is carried out, not what was
  trained so far; they take effect from the next step and are logged;
- `solver.num_epoch` is applied too, if it is not below the epochs already
  trained. The warm-up + cosine lr is a pure function of the step and the total
  number of steps, so the schedule is that of a fresh run of the new length from
  the next step on: extending a run in its cosine phase raises the lr to what the
  longer schedule has at that step (a warm restart when the old schedule had
  already decayed to its minimum); shortening lowers it;
- every other difference is refused, with the reason, before anything is written.

`record_resume` appends each resume and its differences to resumes.yaml in the
run folder; configs.yaml is then rewritten to the config in effect.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from utils.config import ConfigError, FREE_FORM_KEYS

RESUMES_FILE = "resumes.yaml"

# Not part of what a run is: the action flag and test.py's checkpoint choice.
IGNORED = {"resume", "checkpoint.path"}

# Keys a running run can change, and why that is safe.
_WHERE = "where files are or go; the run itself does not change"
_HOW = "how the remaining steps are computed or reported, not what they compute"
APPLIED = {
    "name": _WHERE, "output_dir": _WHERE, "dataset.root_dir": _WHERE,
    "dataset.cache_dir": _WHERE, "model.cache_dir": _WHERE,
    "model.pretrain": "not read on resume: every weight comes from last.pth",
    "device": _HOW, "deterministic": _HOW, "dataset.num_workers": _HOW,
    "dataset.pin_memory": _HOW, "dataset.persistent_workers": _HOW,
    "dataset.image_cache": "the same augmentation distribution from the same sample seeds",
    "dataset.skip_bad_images": "applies to the images read from now on",
    "model.grad_checkpointing": _HOW, "solver.compile": _HOW, "solver.compile_mode": _HOW,
    "solver.tf32": _HOW, "solver.optimizer_kernel": _HOW,
    "solver.precision": "weights stay fp32; a grad scaler starts afresh when switching to fp16",
    "solver.grad_clip": "applies to the steps from now on",
    "solver.max_nonfinite_steps": "applies to the steps from now on",
    "solver.log_period": _HOW, "checkpoint.every_n_steps": _HOW,
    "eval.period": "applies to the epochs from now on", "eval.batch_size": _HOW,
    "eval.i2t": _HOW,
    "solver.num_epoch": "the cosine schedule is recomputed for the new length",
}

_REFUSED_WHY = (
    (("model.", "moe.", "loss."), "it changes the model or its losses, so the weights "
                                  "and results so far would belong to another run"),
    (("solver.lr", "solver.lr_factor", "solver.bias_lr_factor", "solver.weight_decay",
      "solver.betas", "solver.eps", "solver.optimizer"),
     "the optimizer's settings come back with its state from last.pth"),
    (("solver.warmup_epochs", "solver.warmup_factor", "solver.min_lr_factor"),
     "it changes the lr schedule of the steps already taken"),
    (("solver.batch_size", "solver.accumulation_steps", "dataset.", "input.", "seed"),
     "it changes the data of the remaining steps (splits, batch order or augmentation), so "
     "the run could not continue where it stopped"),
)


@dataclass
class Difference:
    key: str
    saved: Any     # last.pth's value (None: the key is not in its config)
    requested: Any
    note: str      # what applying it means, or why it is refused

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.requested!r} ({self.note})"


def _flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in FREE_FORM_KEYS:
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = list(value) if isinstance(value, tuple) else value
    return out


def _refusal(key: str) -> str:
    for keys, why in _REFUSED_WHY:
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys):
            return why
    return "it is not known to be safe to change in a running run"


def compare_for_resume(saved: Mapping, requested: Mapping, epochs_done: int,
                       source: str) -> list[Difference]:
    """The differences a resume applies; raises ConfigError listing every one it cannot.

    Args:
        saved, requested: resolved configs as plain dicts (last.pth's, and this call's).
        epochs_done: epochs already trained (last.pth's `epoch`).
        source: the checkpoint, for the message.
    """
    old, new = _flatten(saved), _flatten(requested)
    applied, refused = [], []
    for key in sorted(set(old) | set(new)):
        if key in IGNORED or old.get(key) == new.get(key):
            continue
        if key not in new:  # a key this version of the code no longer has
            applied.append(Difference(key, old[key], None, "no longer a setting; ignored"))
        elif key not in old:  # a key added since the run started
            applied.append(Difference(key, None, new[key], "not a setting when the run "
                                                           "started; the value given is used"))
        elif key == "solver.num_epoch" and new[key] < epochs_done:
            refused.append(Difference(key, old[key], new[key], f"the run has already trained "
                                                               f"{epochs_done} epochs"))
        elif key in APPLIED:
            applied.append(Difference(key, old[key], new[key], APPLIED[key]))
        else:
            refused.append(Difference(key, old[key], new[key], _refusal(key)))
    if refused:
        raise ConfigError(
            f"resume=true cannot honour {len(refused)} change(s) against the config in "
            f"{source}:\n" + "\n".join(f"  {d}" for d in refused) +
            "\nDrop them to resume this run, or start a new run (name=...) with them. "
            "Nothing was changed.")
    return applied


def record_resume(run_dir: Path, position: Mapping[str, int],
                  differences: list[Difference]) -> Path:
    """Append this resume (when, from where, what changed) to {run_dir}/resumes.yaml."""
    entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
             "from": dict(position),
             "changes": {d.key: {"from": d.saved, "to": d.requested, "note": d.note}
                         for d in differences}}
    path = Path(run_dir) / RESUMES_FILE
    with open(path, "a", encoding="utf-8") as f:
        yaml.safe_dump([entry], f, sort_keys=False)
    return path

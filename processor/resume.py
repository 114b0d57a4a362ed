"""Resuming with changed settings: what a running run can take, what it cannot.

`resume=true` continues from last.pth, whose config is the one the run was
trained with. The requested config (the run's configs.yaml plus overrides, or
another file) is compared with it key by key. `RULES` classifies every key of
configs/defaults.yaml (a free-form mapping, such as model.arch, as one key):

- ignored: not part of what a run is (the action flag, test.py's checkpoint);
- applied: it changes how the rest of the run is carried out, not what was
  trained so far; it takes effect from the next step and is logged;
- `solver.num_epoch` is applied too, if it is not below the epochs already
  trained. The warm-up + cosine lr is a pure function of the step and the total
  number of steps, so the schedule is that of a fresh run of the new length from
  the next step on: extending a run in its cosine phase raises the lr to what the
  longer schedule has at that step (a warm restart when the old schedule had
  already decayed to its minimum); shortening lowers it;
- refused, with the reason, before anything is written.

A key that is not in last.pth's config was added to the code after the run
started; the run was trained as its default value behaves. An applied key takes
any value; any other key only its default, since another value would change the
run from here on. A key in last.pth's config that the code no longer has is
ignored.

`record_resume` appends each resume and its differences to resumes.yaml in the
run folder; configs.yaml is then rewritten to the config in effect.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from utils.config import ConfigError, FREE_FORM_KEYS, load_config, to_plain

RESUMES_FILE = "resumes.yaml"

IGNORE, APPLY, REFUSE = "ignored", "applied", "refused"

_NOT_A_SETTING = "not part of what a run is"
_WHERE = "where files are or go; the run itself does not change"
_HOW = "how the remaining steps are computed or reported, not what they compute"
_EVAL = "how the validations and the final test are computed or reported"
_MODEL = ("it changes the model or its losses, so the weights and results so far would belong "
          "to another run")
_OPTIMIZER = "the optimizer's settings come back with its state from last.pth"
_GROUPS = ("it changes which lr and weight decay each parameter gets, but the optimizer's "
           "state in last.pth holds its parameter groups as they were")
_SCHEDULE = "it changes the lr schedule of the steps already taken"
_DATA = ("it changes the data of the remaining steps (splits, batch order or augmentation), so "
         "the run could not continue where it stopped")

# Every key of configs/defaults.yaml: (what a resume does with a new value, why).
RULES: dict[str, tuple[str, str]] = {
    "name": (APPLY, _WHERE),
    "output_dir": (APPLY, _WHERE),
    "seed": (REFUSE, _DATA),
    "device": (APPLY, _HOW),
    "resume": (IGNORE, _NOT_A_SETTING),
    "deterministic": (APPLY, _HOW),
    "dataset.name": (REFUSE, _DATA),
    "dataset.root_dir": (APPLY, _WHERE),
    "dataset.val_ids": (REFUSE, _DATA),
    "dataset.generate": (REFUSE, "it decides whether the training data may be generated "
                                 "rather than read"),
    "dataset.generate_num_ids": (REFUSE, _DATA),
    "dataset.sampler": (REFUSE, _DATA),
    "dataset.num_instance": (REFUSE, _DATA),
    "dataset.num_workers": (APPLY, _HOW),
    "dataset.pin_memory": (APPLY, _HOW),
    "dataset.persistent_workers": (APPLY, _HOW),
    "dataset.text_length": (REFUSE, _DATA),
    "dataset.skip_bad_images": (APPLY, "applies to the images read from now on"),
    "dataset.load_truncated_images": (REFUSE, _DATA),
    "dataset.drop_last": (REFUSE, _DATA),
    "dataset.image_cache": (APPLY, "the same augmentation distribution from the same sample "
                                   "seeds"),
    "dataset.cache_dir": (APPLY, _WHERE),
    "input.size": (REFUSE, _DATA),
    "input.interpolation": (REFUSE, _DATA),
    "input.flip": (REFUSE, _DATA),
    "input.padding": (REFUSE, _DATA),
    "input.erasing": (REFUSE, _DATA),
    "input.text_aug": (REFUSE, _DATA),
    "input.text_mask_prob": (REFUSE, _DATA),
    "input.text_replace_prob": (REFUSE, _DATA),
    "input.text_delete_prob": (REFUSE, _DATA),
    "model.pretrain": (APPLY, "not read on resume: every weight comes from last.pth"),
    "model.cache_dir": (APPLY, _WHERE),
    "model.grad_checkpointing": (APPLY, _HOW),
    **{f"model.{key}": (REFUSE, _MODEL) for key in (
        "stride", "arch", "head", "embed", "temperature", "freeze_backbone", "cmt_depth",
        "cmt_style")},
    **{f"moe.{key}": (REFUSE, _MODEL) for key in (
        "layers", "heads", "num_experts", "topk", "reduction", "mlp_ratio", "dropout",
        "expert_dropout", "gate", "aux_input", "mix_init", "combine", "balance")},
    **{f"loss.{key}": (REFUSE, _MODEL) for key in (
        "names", "sdm_weight", "itc_weight", "coar_weight", "lambda_align", "id_weight",
        "cmpm_weight", "mlm_weight", "mlm_select_prob", "mlm_mask_prob", "mlm_random_prob",
        "mlm_fallback", "mlm_masks_captions")},
    "solver.batch_size": (REFUSE, _DATA),
    "solver.accumulation_steps": (REFUSE, "it changes the micro-batches the contrastive "
                                          "losses see"),
    "solver.num_epoch": (APPLY, "the cosine schedule is recomputed for the new length"),
    **{f"solver.{key}": (REFUSE, _OPTIMIZER) for key in (
        "optimizer", "lr", "lr_factor", "bias_lr_factor", "weight_decay", "betas", "eps")},
    "solver.optimizer_kernel": (APPLY, _HOW),
    "solver.param_rules": (REFUSE, _GROUPS),
    "solver.module_lr_factors": (REFUSE, _GROUPS),
    **{f"solver.{key}": (REFUSE, _SCHEDULE) for key in (
        "warmup_epochs", "warmup_factor", "min_lr_factor", "lr_update")},
    "solver.precision": (APPLY, "weights stay fp32; a grad scaler starts afresh when "
                                "switching to fp16"),
    "solver.fp16_weights": (REFUSE, "it changes the weights' dtype and the arithmetic of their "
                                    "updates, and the optimizer's state in last.pth is in the "
                                    "weights' dtype"),
    "solver.grad_clip": (APPLY, "applies to the steps from now on"),
    "solver.compile": (APPLY, _HOW),
    "solver.compile_mode": (APPLY, _HOW),
    "solver.tf32": (APPLY, _HOW),
    "solver.log_period": (APPLY, _HOW),
    "solver.max_nonfinite_steps": (APPLY, "applies to the steps from now on"),
    "eval.period": (APPLY, "applies to the epochs from now on"),
    **{f"eval.{key}": (APPLY, _EVAL) for key in (
        "batch_size", "i2t", "audit", "audit_samples", "audit_tolerance")},
    "checkpoint.path": (IGNORE, _NOT_A_SETTING),
    "checkpoint.every_n_steps": (APPLY, _HOW),
}


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


def default_values() -> dict[str, Any]:
    """Every key of configs/defaults.yaml (dotted, free-form mappings whole) and its default."""
    return _flatten(to_plain(load_config(None)))


def compare_for_resume(saved: Mapping, requested: Mapping, epochs_done: int,
                       source: str) -> list[Difference]:
    """The differences a resume applies; raises ConfigError listing every one it cannot.

    Args:
        saved, requested: resolved configs as plain dicts (last.pth's, and this call's).
        epochs_done: epochs already trained (last.pth's `epoch`).
        source: the checkpoint, for the message.
    """
    old, new = _flatten(saved), _flatten(requested)
    defaults = default_values()
    applied, refused = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key not in new:  # a key this version of the code no longer has
            applied.append(Difference(key, old[key], None, "no longer a setting; ignored"))
            continue
        action, why = RULES[key]
        if action == IGNORE:
            continue
        if key not in old:  # a key added since the run started, which trained as its default
            added = f"not a setting when the run started, which trained as {defaults[key]!r} does"
            if action == APPLY:
                applied.append(Difference(key, None, new[key], f"{added}; {why}"))
            elif new[key] == defaults[key]:
                applied.append(Difference(key, None, new[key], added))
            else:
                refused.append(Difference(key, None, new[key], f"{added}; {why}"))
        elif key == "solver.num_epoch" and new[key] < epochs_done:
            refused.append(Difference(key, old[key], new[key], f"the run has already trained "
                                                               f"{epochs_done} epochs"))
        elif action == APPLY:
            applied.append(Difference(key, old[key], new[key], why))
        else:
            refused.append(Difference(key, old[key], new[key], why))
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

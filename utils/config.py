"""YAML configuration: one commented defaults file, `_BASE_` inheritance and
`key=value` overrides, with unknown keys, wrong types and out-of-range values
rejected by name.

Resolution order: configs/defaults.yaml; the first config file after its
`_BASE_` chain (one file or a list, merged in order, each file once); each
further config file with only the keys written in it (its own `_BASE_` is not
followed, so an ablation file applies its one change on top of any experiment);
then the `key=value` overrides. Paths are made absolute against the working
directory, so a saved config means the same thing from any directory.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml
from easydict import EasyDict

from .errors import UserError, UserInputWarning

DEFAULTS_PATH = Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml"
BASE_KEY = "_BASE_"
# Keys whose default is a mapping of free-form entries (not validated one by one).
# Files and dotted overrides (model.arch.vision_layers=2) update single entries; a
# whole mapping given on the command line (model.arch={...}) replaces the mapping.
FREE_FORM_KEYS = {"model.arch", "solver.module_lr_factors"}
# Keys holding file or folder paths ("" = a default location; model.pretrain only
# when it names an existing file rather than a model).
PATH_KEYS = ("output_dir", "dataset.root_dir", "dataset.cache_dir", "model.cache_dir",
             "checkpoint.path")


class ConfigError(UserError, ValueError):
    """A config file or override that does not match configs/defaults.yaml."""


class ConfigWarning(UserInputWarning):
    """A valid config that probably does not do what was meant."""


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                          f"offset {err.start}); save it as UTF-8") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_number(value: Any) -> bool:
    """An int or float (YAML's numbers), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Keys whose default is null, with the type they take when set.
_NULLABLE_TYPES = {"dataset.val_ids": int}


def _coerce(key: str, default: Any, value: Any, source: str) -> Any:
    """Check `value` against the type of `default`; ints are accepted for floats."""
    if default is None:
        expected = _NULLABLE_TYPES.get(key)
        if value is None or expected is None or (isinstance(value, expected)
                                                 and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{source}: key '{key}' expects null or {expected.__name__}, "
                          f"got {_type_name(value)} {value!r}")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = is_number(value)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
        if ok and default and all(is_number(d) for d in default):
            integers = all(isinstance(d, int) for d in default)
            ok = len(value) == len(default) and all(
                isinstance(v, int) and not isinstance(v, bool) if integers else is_number(v)
                for v in value)
            value = value if integers or not ok else [float(v) for v in value]
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{source}: key '{key}' expects {_type_name(default)} like {default!r}, "
            f"got {_type_name(value)} {value!r}")
    return value


# Keys restricted to a fixed set of values.
CHOICES = {
    "dataset.sampler": ("random", "identity"),
    "model.head": ("comoe", "none"),
    "model.embed": ("sum", "global", "mean"),
    "model.cmt_style": ("project", "irra"),
    "input.interpolation": ("bicubic", "bilinear"),
    "loss.mlm_fallback": ("random", "first"),
    "moe.gate": ("modality+aux", "modality", "shared"),
    "moe.aux_input": ("prompt", "context", "token"),
    "moe.combine": ("renorm", "prob"),
    "moe.balance": ("joint", "per_modality"),
    "solver.optimizer": ("adamw", "adam"),
    "solver.optimizer_kernel": ("auto", "fused", "foreach"),
    "solver.compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "solver.precision": ("fp32", "bf16", "fp16"),
    "solver.param_rules": ("project", "irra"),
    "solver.lr_update": ("step", "epoch"),
}


# Allowed range of every numeric key (each entry of a numeric list), checked after
# merging: ">= a", "> a", or an interval "[a, b]", "[a, b)", "(a, b)", "(a, b]".
# Floats must also be finite. tests/test_config.py checks every numeric key of
# defaults.yaml has an entry here.
RANGES = {
    "seed": "[0, 4294967295]",
    "dataset.val_ids": ">= 0",
    "dataset.generate_num_ids": ">= 3",
    "dataset.num_instance": ">= 1",
    "dataset.num_workers": ">= 0",
    "dataset.text_length": ">= 2",
    "input.size": ">= 1",
    "input.padding": ">= 0",
    "input.erasing": "[0, 1]",
    "input.text_mask_prob": "[0, 1]",
    "input.text_replace_prob": "[0, 1]",
    "input.text_delete_prob": "[0, 1]",
    "model.stride": ">= 1",
    "model.temperature": "> 0",
    "model.cmt_depth": ">= 1",
    "moe.layers": ">= 1",
    "moe.heads": ">= 1",
    "moe.num_experts": ">= 0",
    "moe.topk": ">= 1",
    "moe.reduction": ">= 1",
    "moe.mlp_ratio": "> 0",
    "moe.dropout": "[0, 1)",
    "moe.expert_dropout": "[0, 1)",
    "moe.mix_init": "(0, 1)",
    "loss.sdm_weight": ">= 0",
    "loss.itc_weight": ">= 0",
    "loss.coar_weight": ">= 0",
    "loss.lambda_align": ">= 0",
    "loss.id_weight": ">= 0",
    "loss.cmpm_weight": ">= 0",
    "loss.mlm_weight": ">= 0",
    "loss.mlm_select_prob": "(0, 1]",
    "loss.mlm_mask_prob": "[0, 1]",
    "loss.mlm_random_prob": "[0, 1]",
    "solver.batch_size": ">= 1",
    "solver.accumulation_steps": ">= 1",
    "solver.num_epoch": ">= 1",
    "solver.lr": "> 0",
    "solver.lr_factor": "> 0",
    "solver.bias_lr_factor": "> 0",
    "solver.weight_decay": ">= 0",
    "solver.betas": "[0, 1)",
    "solver.eps": "> 0",
    "solver.warmup_epochs": ">= 0",
    "solver.warmup_factor": "[0, 1]",
    "solver.min_lr_factor": "[0, 1]",
    "solver.grad_clip": ">= 0",
    "solver.log_period": ">= 1",
    "solver.max_nonfinite_steps": ">= 0",
    "eval.period": ">= 1",
    "eval.batch_size": ">= 1",
    "eval.audit_samples": ">= 1",
    "eval.audit_tolerance": ">= 0",
    "checkpoint.every_n_steps": ">= 0",
}


def in_range(value: float, rule: str) -> bool:
    """Whether `value` satisfies a RANGES rule (and, for floats, is finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    low, high = (float(x) for x in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def _lookup(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_device(cfg: Mapping) -> str | None:
    device = cfg["device"]
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return None
    return f"key 'device' must be auto, cpu, cuda or cuda:N; got {device!r}"


def _check_cuda_graphs_accumulation(cfg: Mapping) -> str | None:
    solver = cfg["solver"]
    if not (solver["compile"] and solver["compile_mode"] == "reduce-overhead"
            and solver["accumulation_steps"] > 1):
        return None
    # The first micro-batch's gradients live in the CUDA graphs' memory pool and
    # the next replay reuses it: PyTorch either fails or silently loses part of the
    # accumulated gradient (pytorch/pytorch#169545).
    return (f"solver.compile_mode=reduce-overhead (CUDA graphs) cannot be combined "
            f"with solver.accumulation_steps={solver['accumulation_steps']}: CUDA graphs reuse "
            f"the memory that holds the gradients between micro-batches. Use "
            f"solver.compile_mode=default, or solver.accumulation_steps=1 with a smaller "
            f"solver.batch_size")


def _check_comoe(cfg: Mapping) -> str | None:
    """Settings of a CoMoE head that train something other than what they name."""
    model, moe = cfg["model"], cfg["moe"]
    if model["head"] != "comoe":
        return None
    if model["embed"] == "global":
        return ("model.embed=global with model.head=comoe leaves the head out of the "
                "embeddings, so the retrieval losses never train it (and DDP stops on its unused "
                "parameters). Use model.embed=sum or mean, or model.head=none")
    num_experts, topk = moe["num_experts"], moe["topk"]
    if num_experts == 0:
        if "coar" in (name.strip() for name in cfg["loss"]["names"].split("+")):
            return (f"loss.names={cfg['loss']['names']} has coar, which regularises the routers "
                    f"of the MoE layers, but moe.num_experts=0 builds a head without experts "
                    f"(and without routers). Drop coar from loss.names, or set "
                    f"moe.num_experts >= 1")
        return None
    if topk == 1 and moe["combine"] == "renorm":
        return ("moe.combine=renorm with moe.topk=1 gives every token the combine weight "
                "softmax(one logit) = 1, so the task losses send no gradient to the router (only "
                "CoAR, if used, trains it). Use moe.combine=prob (the selected expert's router "
                "probability)")
    if topk == num_experts:
        warnings.warn(ConfigWarning(
            f"moe.topk = moe.num_experts = {topk}: every token uses every expert (dense "
            f"routing), and the CoAR balance term is the constant 1. An ablation of the number "
            f"of experts or of k should keep moe.topk < moe.num_experts"), stacklevel=5)
    return None


def _check_topk(cfg: Mapping) -> str | None:
    moe = cfg["moe"]
    if cfg["model"]["head"] != "comoe" or not moe["num_experts"] or \
            moe["topk"] <= moe["num_experts"]:
        return None
    return (f"key 'moe.topk' must be at most moe.num_experts={moe['num_experts']} "
            f"(experts per token out of the pool); got {moe['topk']}")


def _check_arch(cfg: Mapping) -> str | None:
    from model.clip_model import ARCH_KEYS  # the CLIP's own list, imported when a config loads
    for key, value in cfg["model"]["arch"].items():
        if key not in ARCH_KEYS:
            close = difflib.get_close_matches(str(key), sorted(ARCH_KEYS), n=1, cutoff=0.6)
            guess = f"; did you mean model.arch.{close[0]}?" if close else ""
            return (f"unknown key 'model.arch.{key}'{guess} (architecture keys: "
                    f"{', '.join(sorted(ARCH_KEYS))})")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"key 'model.arch.{key}' must be an integer >= 1; got {value!r}"
    return None


def _check_text_length(cfg: Mapping) -> str | None:
    context = cfg["model"]["arch"].get("context_length", 77)
    if cfg["dataset"]["text_length"] <= context:
        return None
    return (f"key 'dataset.text_length' must be at most the text encoder's context length "
            f"{context}; got {cfg['dataset']['text_length']}")


def _check_probability_sums(cfg: Mapping) -> str | None:
    for keys in (("input.text_mask_prob", "input.text_replace_prob", "input.text_delete_prob"),
                 ("loss.mlm_mask_prob", "loss.mlm_random_prob")):
        values = [_lookup(cfg, key) for key in keys]
        if sum(values) > 1:
            return (f"keys {', '.join(keys)} are shares of the same tokens and must sum to at "
                    f"most 1; got {' + '.join(f'{v:g}' for v in values)} = {sum(values):g}")
    return None


def _check_module_lr_factors(cfg: Mapping) -> str | None:
    for pattern, factor in cfg["solver"]["module_lr_factors"].items():
        if not isinstance(pattern, str) or not is_number(factor) or factor < 0:
            return (f"key 'solver.module_lr_factors' maps module-name patterns to lr factors "
                    f">= 0, e.g. {{'head.blocks.*.moe': 2.0}}; got {pattern!r}: {factor!r}")
    return None


def _check_fp16_weights(cfg: Mapping) -> str | None:
    solver = cfg["solver"]
    if not solver["fp16_weights"]:
        return None
    if solver["precision"] != "fp32":
        # Autocast and the grad scaler exist to keep fp32 master weights while computing in
        # half precision; with the weights themselves in fp16 there is nothing to keep.
        return (f"solver.fp16_weights=true (IRRA's legacy fp16 weights, updated in fp16) "
                f"cannot be combined with solver.precision={solver['precision']}: autocast and "
                f"the grad scaler assume fp32 weights. Use solver.precision=fp32 with it, or "
                f"solver.fp16_weights=false for mixed precision")
    if solver["optimizer_kernel"] == "fused":
        return ("solver.optimizer_kernel=fused computes the Adam update in fp32 inside the "
                "kernel, while solver.fp16_weights=true reproduces IRRA's update made of fp16 "
                "operations; use solver.optimizer_kernel=auto or foreach")
    return None


def _check_drop_last(cfg: Mapping) -> str | None:
    dataset = cfg["dataset"]
    if dataset["drop_last"] or dataset["sampler"] != "identity":
        return None
    return ("dataset.drop_last=false keeps the random sampler's last incomplete batch; the "
            "identity sampler has none (it completes its last batch of P identities with "
            "identities from the start of the epoch). Use dataset.drop_last=true with "
            "dataset.sampler=identity")


def _check_mlm_masks_captions(cfg: Mapping) -> str | None:
    loss_names = [name.strip() for name in cfg["loss"]["names"].split("+")]
    if cfg["loss"]["mlm_masks_captions"] and "mlm" not in loss_names:
        return (f"loss.mlm_masks_captions=true needs the mlm loss in loss.names "
                f"(got {cfg['loss']['names']!r})")
    return None


# Rules that involve more than one key or more than a range; each returns an error
# message (naming the keys) or None.
VALUE_RULES: list[Callable[[Mapping], str | None]] = [
    _check_device, _check_cuda_graphs_accumulation, _check_topk, _check_arch, _check_text_length,
    _check_probability_sums, _check_module_lr_factors, _check_fp16_weights,
    _check_mlm_masks_captions, _check_comoe, _check_drop_last,
]


def _validate(cfg: Mapping, source: str) -> None:
    """Choices, numeric ranges and VALUE_RULES over a fully merged config."""
    for dotted, allowed in CHOICES.items():
        value = _lookup(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{source}: key '{dotted}' must be one of {', '.join(allowed)}; "
                              f"got {value!r}")
    for dotted, rule in RANGES.items():
        value = _lookup(cfg, dotted)
        values = value if isinstance(value, list) else [value]
        if any(v is not None and not in_range(v, rule) for v in values):
            what = rule if rule[0] == ">" else f"in {rule}"
            each = " (each entry)" if isinstance(value, list) else ""
            finite = " and finite" if any(isinstance(v, float) for v in values) else ""
            raise ConfigError(f"{source}: key '{dotted}' must be {what}{each}{finite}; "
                              f"got {value!r}")
    for rule in VALUE_RULES:
        message = rule(cfg)
        if message is not None:
            raise ConfigError(f"{source}: {message}")


def _dotted_keys(cfg: Mapping, prefix: str = "") -> list[str]:
    """Every key of a config as a dotted name, sections included, in file order."""
    out = []
    for key, value in cfg.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, dict) and f"{prefix}{key}" not in FREE_FORM_KEYS:
            out.extend(_dotted_keys(value, f"{prefix}{key}."))
    return out


def suggest_keys(dotted: str, known: Sequence[str]) -> list[str]:
    """Known keys a mistyped or unqualified `dotted` key probably meant: those with the
    same last part (batch_size -> solver.batch_size, eval.batch_size), else close
    spellings."""
    leaf = dotted.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != dotted]
    if same_leaf:
        return same_leaf
    leaves = {k.rsplit(".", 1)[-1]: k for k in known}
    close = difflib.get_close_matches(dotted, known, n=3, cutoff=0.75)
    close += [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.75)]
    return list(dict.fromkeys(close))


def _merge(base: dict, update: Mapping, source: str, known: Sequence[str], prefix: str = "",
           replace: Sequence[str] = ()) -> None:
    """Merge `update` into `base` in place, validating every key against `base`.

    `known` (every dotted key of the defaults) feeds the suggestions for unknown keys;
    free-form mappings named in `replace` are replaced instead of updated.
    """
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key == BASE_KEY:
            continue
        if key not in base:
            here = ", ".join(sorted(k for k in base if k != BASE_KEY))
            guesses = suggest_keys(dotted, known)
            guess = f"; did you mean {' or '.join(guesses)}?" if guesses else ""
            raise ConfigError(f"{source}: unknown key '{dotted}'{guess} (known keys here: {here})")
        if dotted in FREE_FORM_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{dotted}' expects a mapping, got {value!r}")
            kept = {} if dotted in replace else base[key]
            base[key] = {**kept, **copy.deepcopy(value)}
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{dotted}' is a section; set its entries, "
                                  f"e.g. {dotted}.<key>=value")
            _merge(base[key], value, source, known, prefix=f"{dotted}.", replace=replace)
        else:
            base[key] = _coerce(dotted, base[key], value, source)


def _base_paths(path: Path, data: dict) -> list[Path]:
    bases = data.get(BASE_KEY) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names, "
                          f"got {data[BASE_KEY]!r}")
    out = []
    for base in bases:
        base_path = Path(base) if os.path.isabs(base) else path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} '{base}' not found (looked at {base_path})")
        out.append(base_path.resolve())
    return out


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The file after its `_BASE_` ancestors, oldest first. With several bases, each
    base's chain follows the previous one; a file reached twice (a shared ancestor)
    is merged once, at its first place."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    data = _read_yaml(path)
    chain: list[tuple[Path, dict]] = []
    for base_path in _base_paths(path, data):
        if base_path != DEFAULTS_PATH:
            chain += _file_chain(base_path, seen + (path,))
    chain.append((path, data))
    unique: dict[Path, dict] = {}
    for file_path, file_data in chain:
        unique.setdefault(file_path, file_data)
    return list(unique.items())


# Command-line shorthands: `checkpoint=PATH` sets `checkpoint.path`.
OVERRIDE_ALIASES = {"checkpoint": "checkpoint.path"}


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", parsed YAML value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. solver.lr=3e-6)")
    key, raw = item.split("=", 1)
    key = OVERRIDE_ALIASES.get(key.strip(), key.strip())
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 3e-6 as a string; accept scientific notation as a float.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in "e.") else value
        except ValueError:
            pass
    return key, value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _to_easydict(data: dict) -> EasyDict:
    return EasyDict(copy.deepcopy(data))


def to_plain(cfg: Mapping) -> dict:
    """A plain nested dict (for YAML, checkpoints and comparisons)."""
    return {k: to_plain(v) if isinstance(v, Mapping) else (list(v) if isinstance(v, tuple) else v)
            for k, v in cfg.items()}


def _absolute_paths(cfg: dict) -> None:
    """Make the path keys absolute against the working directory (in place)."""
    for dotted in PATH_KEYS:
        section, _, key = dotted.rpartition(".")
        node = _lookup(cfg, section) if section else cfg
        if node[key]:
            node[key] = os.path.abspath(os.path.expanduser(node[key]))
    pretrain = os.path.expanduser(cfg["model"]["pretrain"])
    if os.path.isfile(pretrain):
        cfg["model"]["pretrain"] = os.path.abspath(pretrain)


def load_config(path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                overrides: Iterable[str] = ()) -> EasyDict:
    """Resolve defaults <- `_BASE_` chain <- file(s) <- overrides into one config.

    Args:
        path: an experiment YAML file, or several: the first with its `_BASE_`
            chain, the others with only the keys they write (None: the defaults).
        overrides: `key=value` strings with dotted keys, applied last.
    """
    overrides = list(overrides)
    paths = [] if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    cfg = _read_yaml(DEFAULTS_PATH)
    known = _dotted_keys(cfg)
    for i, file in enumerate(paths):
        files = _file_chain(Path(file)) if i == 0 else [(Path(file), _read_yaml(Path(file)))]
        for file_path, data in files:
            _merge(cfg, data, str(file_path), known)
    for item in overrides:
        key, value = parse_override(item)
        _merge(cfg, _nest(key, value), f"command-line override '{item}'", known, replace=[key])
    _validate(cfg, f"config {' + '.join(map(str, paths)) or DEFAULTS_PATH} "
                   f"with overrides {overrides}")
    _absolute_paths(cfg)
    return _to_easydict(cfg)


def dump_config(cfg: Mapping) -> str:
    """The resolved config as YAML text, in the order of configs/defaults.yaml."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False)


def save_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write the resolved config (no `_BASE_`) so it alone rebuilds the run."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    os.replace(tmp, path)


def config_diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        dotted = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping) and dotted not in FREE_FORM_KEYS:
            out.extend(config_diff(va, vb, f"{dotted}."))
        elif to_plain({"v": va}) != to_plain({"v": vb}):
            out.append(f"{dotted}: {va!r} != {vb!r}")
    return out

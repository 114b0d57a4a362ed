"""YAML configuration: one commented defaults file, `_BASE_` inheritance and
`key=value` overrides, with unknown keys and wrong types rejected by name."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from easydict import EasyDict

from .errors import UserError

DEFAULTS_PATH = Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml"
BASE_KEY = "_BASE_"
# Keys whose default is a mapping of free-form entries (not validated one by one).
FREE_FORM_KEYS = {"model.arch"}


class ConfigError(UserError, ValueError):
    """A config file or override that does not match configs/defaults.yaml."""


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


def _is_number(value: Any) -> bool:
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
        ok = _is_number(value)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
        if ok and default and all(_is_number(d) for d in default):
            ok = len(value) == len(default) and all(_is_number(v) for v in value)
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
    "moe.gate": ("modality+aux", "modality", "shared"),
    "moe.aux_input": ("token", "prompt"),
    "solver.optimizer": ("adamw", "adam"),
    "solver.optimizer_kernel": ("auto", "fused", "foreach"),
    "solver.compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "solver.precision": ("fp32", "bf16", "fp16"),
}


def _check_choices(cfg: Mapping, source: str) -> None:
    for dotted, allowed in CHOICES.items():
        node: Any = cfg
        for part in dotted.split("."):
            node = node[part]
        if node not in allowed:
            raise ConfigError(f"{source}: key '{dotted}' must be one of {', '.join(allowed)}; "
                              f"got {node!r}")
    device = cfg["device"]
    if not (device in ("auto", "cpu", "cuda") or
            (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"{source}: key 'device' must be auto, cpu, cuda or cuda:N; got {device!r}")
    solver = cfg["solver"]
    if solver["compile"] and solver["compile_mode"] == "reduce-overhead" \
            and solver["accumulation_steps"] > 1:
        # The first micro-batch's gradients live in the CUDA graphs' memory pool and
        # the next replay reuses it: PyTorch either fails or silently loses part of the
        # accumulated gradient (pytorch/pytorch#169545).
        raise ConfigError(
            f"{source}: solver.compile_mode=reduce-overhead (CUDA graphs) cannot be combined "
            f"with solver.accumulation_steps={solver['accumulation_steps']}: CUDA graphs reuse "
            f"the memory that holds the gradients between micro-batches. Use "
            f"solver.compile_mode=default, or solver.accumulation_steps=1 with a smaller "
            f"solver.batch_size")


def _merge(base: dict, update: Mapping, source: str, prefix: str = "") -> None:
    """Merge `update` into `base` in place, validating every key against `base`."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key == BASE_KEY:
            continue
        if key not in base:
            known = ", ".join(sorted(k for k in base if k != BASE_KEY))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known keys here: {known})")
        if dotted in FREE_FORM_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{dotted}' expects a mapping, got {value!r}")
            base[key] = copy.deepcopy(value)
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key '{dotted}' is a section; set its entries, "
                                  f"e.g. {dotted}.<key>=value")
            _merge(base[key], value, source, prefix=f"{dotted}.")
        else:
            base[key] = _coerce(dotted, base[key], value, source)


def _file_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The file and its `_BASE_` ancestors, oldest first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    data = _read_yaml(path)
    chain: list[tuple[Path, dict]] = []
    base = data.get(BASE_KEY)
    if base:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        if not base_path.is_file():
            raise ConfigError(f"{path}: {BASE_KEY} '{base}' not found (looked at {base_path})")
        if base_path.resolve() != DEFAULTS_PATH:
            chain = _file_chain(base_path, seen + (path,))
    return chain + [(path, data)]


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


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> EasyDict:
    """Resolve defaults <- `_BASE_` chain <- file <- overrides into one config.

    Args:
        path: an experiment YAML file (None: the defaults alone).
        overrides: `key=value` strings with dotted keys, applied last.
    """
    overrides = list(overrides)
    cfg = _read_yaml(DEFAULTS_PATH)
    if path is not None:
        for file_path, data in _file_chain(Path(path)):
            _merge(cfg, data, str(file_path))
    for item in overrides:
        key, value = parse_override(item)
        _merge(cfg, _nest(key, value), f"command-line override '{item}'")
    _check_choices(cfg, f"config {path or DEFAULTS_PATH} with overrides {list(overrides)}")
    return _to_easydict(cfg)


def save_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write the resolved config (no `_BASE_`) so it alone rebuilds the run."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_plain(cfg), f, sort_keys=False)
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

"""Command lines of the entry points: config files plus `key=value` overrides.

Imports nothing heavy, so `--help` answers at once: the scripts parse their
arguments with this module before they import torch.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from typing import Sequence

from utils.config import DEFAULTS_PATH

OVERRIDE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")

# IRRA's command-line flags (utils/options.py of IRRA) and the override that does the
# same here; "{}" stands for the flag's value. Text in parentheses: no direct equivalent.
IRRA_FLAGS = {
    "--name": "name={}",
    "--output_dir": "output_dir={}",
    "--log_period": "solver.log_period={}",
    "--eval_period": "eval.period={}",
    "--val_dataset": "(checkpoints are chosen on the validation split; dataset.val_ids=N holds "
                     "out N training identities)",
    "--resume_ckpt_file": "resume=true (with --config_file RUN/configs.yaml; continues RUN/last.pth)",
    "--pretrain_choice": "model.pretrain={}",
    "--temperature": "model.temperature={}",
    "--cmt_depth": "model.cmt_depth={}",
    "--masked_token_rate": "loss.mlm_mask_prob={}",
    "--masked_token_unchanged_rate": "(loss.mlm_random_prob sets the share replaced by a "
                                     "random token; the rest of the selected tokens is kept)",
    "--lr_factor": "solver.lr_factor={}",
    "--loss_names": "loss.names={}",
    "--mlm_loss_weight": "loss.mlm_weight={}",
    "--id_loss_weight": "loss.id_weight={}",
    "--img_size": "input.size=[H,W]",
    "--stride_size": "model.stride={}",
    "--text_length": "dataset.text_length={}",
    "--vocab_size": "(the vocabulary is CLIP's, 49408 tokens)",
    "--optimizer": "solver.optimizer=adam|adamw",
    "--lr": "solver.lr={}",
    "--bias_lr_factor": "solver.bias_lr_factor={}",
    "--momentum": "(no SGD; solver.optimizer=adam|adamw)",
    "--weight_decay": "solver.weight_decay={}",
    "--weight_decay_bias": "(biases, norms and embeddings get no weight decay)",
    "--alpha": "solver.betas=[{},0.999]",
    "--beta": "solver.betas=[0.9,{}]",
    "--num_epoch": "solver.num_epoch={}",
    "--milestones": "(the schedule is linear warm-up then cosine)",
    "--gamma": "(the schedule is linear warm-up then cosine)",
    "--warmup_factor": "solver.warmup_factor={}",
    "--warmup_epochs": "solver.warmup_epochs={}",
    "--warmup_method": "(the warm-up is linear)",
    "--lrscheduler": "(the schedule is cosine; solver.min_lr_factor sets its floor)",
    "--target_lr": "solver.min_lr_factor=TARGET_LR/LR",
    "--power": "(the schedule is cosine)",
    "--dataset_name": "dataset.name={}",
    "--sampler": "dataset.sampler={}",
    "--num_instance": "dataset.num_instance={}",
    "--root_dir": "dataset.root_dir={}",
    "--batch_size": "solver.batch_size={}",
    "--test_batch_size": "eval.batch_size={}",
    "--num_workers": "dataset.num_workers={}",
    "--local_rank": "(torchrun sets LOCAL_RANK; no flag needed)",
}
# IRRA's flags that take no value.
IRRA_SWITCHES = {
    "--resume": "resume=true",
    "--img_aug": "(augmentation is on by default: input.flip, input.padding, input.erasing)",
    "--MLM": "loss.names=...+mlm",
    "--test": "(python test.py --config_file RUN/configs.yaml)",
}


def split_overrides(argv: Sequence[str],
                    value_options: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Separate `key=value` config overrides from a script's own arguments.

    Overrides may stand anywhere (also after an option taking several values);
    a token right after one of `value_options` (e.g. --query) is always that
    option's value, so a query text containing "=" stays a query.
    """
    own, overrides = [], []
    previous = None
    for token in argv:
        if previous not in value_options and OVERRIDE_PATTERN.match(token):
            overrides.append(token)
        else:
            own.append(token)
        previous = token
    return own, overrides


def translate_irra_flags(argv: Sequence[str]) -> str | None:
    """One line translating the IRRA-style flags in `argv` into overrides, or None."""
    parts = []
    tokens = list(argv)
    for i, token in enumerate(tokens):
        flag, has_value, value = token.partition("=")
        if flag in IRRA_SWITCHES:
            parts.append(f"{flag} -> {IRRA_SWITCHES[flag]}")
        elif flag in IRRA_FLAGS:
            if not has_value:
                following = tokens[i + 1] if i + 1 < len(tokens) else ""
                value = "" if following.startswith("--") else following
            parts.append(f"{(flag + ' ' + value).strip()} -> "
                         f"{IRRA_FLAGS[flag].replace('{}', value or 'VALUE')}")
    if not parts:
        return None
    return ("IRRA-style flags are key=value overrides here: " + "; ".join(parts)
            + " (every key: --help)")


def config_keys_help(width: int = 100) -> str:
    """Every key of configs/defaults.yaml as `section.key=default  comment`, by section."""
    line_pattern = re.compile(r"^( *)([A-Za-z_]\w*):\s*([^#]*?)\s*(?:#\s?(.*))?$")
    entries = []  # (dotted key or section header, default, comment)
    section = ""
    for line in DEFAULTS_PATH.read_text(encoding="utf-8").splitlines():
        match = line_pattern.match(line)
        if match is None:
            continue
        indent, key, value, comment = match.groups()
        if not indent:
            section = "" if value else key
            if not value:
                entries.append((f"{key}:", "", ""))
                continue
        entries.append((f"{section}.{key}" if indent else key, value, comment or ""))
    column = max(len(f"{k}={v}") for k, v, c in entries if c) + 4
    lines = [f"config keys and their defaults, from {DEFAULTS_PATH.parent.name}/"
             f"{DEFAULTS_PATH.name} (which explains each);",
             "set any of them with key=value after the config file(s):"]
    for key, value, comment in entries:
        if not comment:
            lines += ["", key]
            continue
        setting = f"  {key}={value}"
        wrapped = textwrap.wrap(comment, max(width - column, 30), break_on_hyphens=False) or [""]
        lines.append(f"{setting:<{column}}{wrapped[0]}")
        lines.extend(" " * column + more for more in wrapped[1:])
    return "\n".join(lines)


def parse_run_args(argv: Sequence[str] | None, description: str, config_help: str,
                   usage_notes: str = "") -> argparse.Namespace:
    """`--config_file FILE [FILE ...]` and `key=value` overrides (anywhere on the line).

    Returns a namespace with `config_file` (a list of paths) and `opts` (overrides).
    IRRA-style flags are refused with the overrides that do the same.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(usage_notes + "\n\n" if usage_notes else "") + config_keys_help())
    parser.add_argument("--config_file", nargs="+", required=True, metavar="YAML", help=config_help)
    parser.add_argument("opts", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, applied last (e.g. solver.lr=3e-6 "
                             "model.arch.vision_layers=2)")
    if "-h" not in own and "--help" not in own:
        irra = translate_irra_flags(own)
        if irra is not None:
            parser.error(irra)
    args = parser.parse_args(own)
    args.opts = overrides + args.opts
    return args

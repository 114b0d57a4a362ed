import glob
import warnings
from pathlib import Path

import pytest
import yaml

from utils.config import ConfigError, ConfigWarning, config_diff, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_every_key_is_commented():
    lines = (ROOT / "configs" / "defaults.yaml").read_text().splitlines()
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # blank, comment, or section header
        assert "#" in line, f"defaults.yaml key without a comment: {line!r}"


def test_base_inheritance_and_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", "_BASE_: %s\nname: parent\nsolver:\n  lr: 2.0e-5\n"
                 % (ROOT / "configs" / "defaults.yaml"))
    child = write(tmp_path / "child.yaml", "_BASE_: base.yaml\nname: child\nsolver:\n"
                  "  batch_size: 8\n")
    cfg = load_config(child, ["solver.lr=3e-6", "dataset.root_dir=/data", "moe.topk=3"])
    assert cfg.name == "child"
    assert cfg.solver.batch_size == 8          # from the child
    assert cfg.solver.lr == pytest.approx(3e-6)  # the override wins over the parent
    assert cfg.dataset.root_dir == "/data"
    assert cfg.moe.topk == 3
    assert cfg.solver.num_epoch == 60          # untouched default


def test_unknown_key_names_key_and_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "solver:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'solver\.learning_rate'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown key 'moe.expertz'"):
        load_config(None, ["moe.expertz=3"])


@pytest.mark.parametrize("override, key", [
    ("solver.batch_size=abc", "solver.batch_size"),
    ("solver.batch_size=1.5", "solver.batch_size"),
    ("model.freeze_backbone=3", "model.freeze_backbone"),
    ("input.size=[384]", "input.size"),
    ("solver.precision=fp8", "solver.precision"),
    ("moe.gate=magic", "moe.gate"),
])
def test_wrong_type_or_value_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_malformed_override_and_missing_base(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["solver.lr"])
    child = write(tmp_path / "c.yaml", "_BASE_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(child)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "CUHK-PEDES" / "comoe.yaml", ["seed=7"])
    save_config(cfg, tmp_path / "configs.yaml")
    assert "_BASE_" not in (tmp_path / "configs.yaml").read_text()
    again = load_config(tmp_path / "configs.yaml")
    assert config_diff(cfg, again) == []
    assert config_diff(cfg, load_config(tmp_path / "configs.yaml", ["moe.topk=3"])) == \
        ["moe.topk: 2 != 3"]


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "**" / "*.yaml"),
                                                  recursive=True)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.dataset.name in ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if Path(path).name != "defaults.yaml":
        assert "_BASE_" in raw, f"{path} should inherit the defaults through _BASE_"


def test_comoe_settings_that_would_not_train_what_they_name_are_refused():
    with pytest.raises(ConfigError, match=r"moe\.combine=renorm with moe\.topk=1.*no gradient.*"
                                          r"moe\.combine=prob"):
        load_config(None, ["moe.topk=1"])
    assert load_config(None, ["moe.topk=1", "moe.combine=prob"]).moe.combine == "prob"
    with pytest.raises(ConfigError, match=r"model\.embed=global with model\.head=comoe"):
        load_config(None, ["model.embed=global"])
    # Without a head (or without experts) the MoE settings do not matter.
    load_config(None, ["model.head=none", "model.embed=global", "moe.topk=1", "loss.names=sdm"])
    load_config(None, ["moe.num_experts=0", "moe.topk=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config(None, ["moe.num_experts=8", "moe.topk=2"])
    with pytest.warns(ConfigWarning, match=r"moe\.topk = moe\.num_experts = 2.*dense"):
        load_config(None, ["moe.num_experts=2"])


def test_ablations_differ_from_the_base_and_route_sparsely():
    base = load_config(ROOT / "configs" / "CUHK-PEDES" / "comoe.yaml")
    assert (base.moe.aux_input, base.moe.combine, base.moe.balance) == ("prompt", "renorm", "joint")
    paths = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)
            cfg = load_config(path)
        assert [d for d in config_diff(base, cfg) if not d.startswith("name:")], \
            f"{path.name} equals the base config"
        assert cfg.moe.topk < cfg.moe.num_experts, path.name

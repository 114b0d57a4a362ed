import glob
import re
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


def test_base_list_is_merged_in_order_and_a_shared_base_once(tmp_path):
    write(tmp_path / "common.yaml", "_BASE_: %s\nsolver:\n  batch_size: 8\nmoe:\n  layers: 2\n"
          % (ROOT / "configs" / "defaults.yaml"))
    write(tmp_path / "a.yaml", "_BASE_: common.yaml\nname: a\nsolver:\n  lr: 2.0e-5\n")
    write(tmp_path / "b.yaml", "_BASE_: common.yaml\nname: b\nmoe:\n  topk: 1\n  combine: prob\n")
    child = write(tmp_path / "child.yaml", "_BASE_: [a.yaml, b.yaml]\nseed: 5\n")
    cfg = load_config(child)
    assert cfg.name == "b"                       # the later base wins
    assert cfg.solver.lr == pytest.approx(2e-5)  # not reverted by common.yaml via b.yaml
    assert (cfg.solver.batch_size, cfg.moe.layers, cfg.moe.topk, cfg.seed) == (8, 2, 1, 5)
    with pytest.raises(ConfigError, match=r"bad\.yaml: _BASE_ must be a file name or a list"):
        load_config(write(tmp_path / "bad.yaml", "_BASE_: {a: 1}\n"))


@pytest.mark.parametrize("ablation", sorted((ROOT / "configs" / "ablations").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_an_ablation_after_the_demo_changes_only_its_own_keys(ablation):
    """`--config_file configs/demo.yaml configs/ablations/X.yaml`: the demo's data, tiny
    model and recipe, with the ablation's change (not its base's ViT-B/16 recipe)."""
    demo = load_config(ROOT / "configs" / "demo.yaml")
    combined = load_config([ROOT / "configs" / "demo.yaml", ablation])
    own = yaml.safe_load(ablation.read_text())
    own_keys = {f"{section}.{key}" if isinstance(values, dict) else section
                for section, values in own.items() if section != "_BASE_"
                for key in (values if isinstance(values, dict) else [None])}
    changed = {line.split(":")[0] for line in config_diff(demo, combined)}
    assert changed and changed <= own_keys
    assert combined.model.pretrain == "none" and combined.solver.lr == demo.solver.lr
    assert combined.output_dir == demo.output_dir
    for key in own_keys:
        section, _, leaf = key.partition(".")
        assert (combined[section][leaf] if leaf else combined[section]) == \
            (own[section][leaf] if leaf else own[section])


def test_dotted_override_updates_one_entry_of_a_mapping(tmp_path):
    demo = load_config(ROOT / "configs" / "demo.yaml")
    one = load_config(ROOT / "configs" / "demo.yaml", ["model.arch.vision_layers=2"])
    assert one.model.arch == {**demo.model.arch, "vision_layers": 2}
    # A file updates entries too; a whole mapping on the command line replaces it.
    child = write(tmp_path / "c.yaml", f"_BASE_: {ROOT / 'configs' / 'demo.yaml'}\n"
                  "model:\n  arch:\n    text_layers: 1\n")
    assert load_config(child).model.arch == {**demo.model.arch, "text_layers": 1}
    assert load_config(child, ["model.arch={vision_layers: 2}"]).model.arch == {"vision_layers": 2}


@pytest.mark.parametrize("override, suggestion", [
    ("batch_size=64", "did you mean solver.batch_size or eval.batch_size"),
    ("moe.expertz=3", "did you mean moe.num_experts"),
    ("solver.warmup_epoch=2", "did you mean solver.warmup_epochs"),
])
def test_unknown_key_suggests_the_closest_known_one(override, suggestion):
    with pytest.raises(ConfigError, match=suggestion):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [
    ("eval.period=0", "eval.period"),
    ("solver.log_period=0", "solver.log_period"),
    ("solver.num_epoch=0", "solver.num_epoch"),
    ("solver.lr=.inf", "solver.lr"),
    ("solver.lr=.nan", "solver.lr"),
    ("solver.lr=0", "solver.lr"),
    ("input.erasing=-0.5", "input.erasing"),
    ("input.erasing=1.5", "input.erasing"),
    ("moe.dropout=1.0", "moe.dropout"),
    ("moe.mix_init=0", "moe.mix_init"),
    ("loss.coar_weight=-1", "loss.coar_weight"),
    ("solver.betas=[0.9, 1.0]", "solver.betas"),
    ("solver.batch_size=0", "solver.batch_size"),
    ("dataset.num_workers=-1", "dataset.num_workers"),
    ("dataset.val_ids=-3", "dataset.val_ids"),
    ("input.size=[0, 128]", "input.size"),
    ("input.size=[38.4, 128]", "input.size"),
    ("seed=-1", "seed"),
    ("moe.topk=8", "moe.topk"),
    ("dataset.text_length=78", "dataset.text_length"),
    ("loss.mlm_mask_prob=0.95", "loss.mlm_random_prob"),
    ("input.text_mask_prob=0.95", "input.text_delete_prob"),
])
def test_out_of_range_values_are_refused_at_load_time_by_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_every_numeric_key_has_a_range():
    from utils.config import _NULLABLE_TYPES, RANGES

    def numeric_keys(node, prefix=""):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from numeric_keys(value, f"{dotted}.")
            elif _NULLABLE_TYPES.get(dotted) in (int, float) or (
                    isinstance(value, (int, float, list)) and not isinstance(value, bool)
                    and all(isinstance(v, (int, float)) for v in ([value] if not
                                                                   isinstance(value, list)
                                                                   else value))):
                yield dotted
    defaults = yaml.safe_load((ROOT / "configs" / "defaults.yaml").read_text())
    assert sorted(numeric_keys(defaults)) == sorted(RANGES)


def test_paths_are_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.pt").write_bytes(b"")
    cfg = load_config(None, ["dataset.root_dir=data/x", "output_dir=runs", "model.pretrain=weights.pt",
                             "dataset.cache_dir=~/cache", "checkpoint.path=runs/a/last.pth"])
    assert cfg.dataset.root_dir == str(tmp_path / "data" / "x")
    assert cfg.output_dir == str(tmp_path / "runs")
    assert cfg.model.pretrain == str(tmp_path / "weights.pt")
    assert cfg.dataset.cache_dir == str(Path("~/cache").expanduser())
    assert cfg.checkpoint.path == str(tmp_path / "runs" / "a" / "last.pth")
    assert cfg.model.cache_dir == ""  # "" keeps its default location
    assert load_config(None).model.pretrain == "ViT-B/16"  # a model name, not a path


def test_demo_runs_go_to_their_own_folder():
    from processor.runner import run_folder
    cfg = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "ablations" / "no_coar.yaml"])
    assert run_folder(cfg) == Path.cwd() / "logs" / "demo" / "CUHK-PEDES" / "abl_no_coar"


def test_comoe_settings_that_would_not_train_what_they_name_are_refused():
    with pytest.raises(ConfigError, match=r"moe\.combine=renorm with moe\.topk=1.*no gradient.*"
                                          r"moe\.combine=prob"):
        load_config(None, ["moe.topk=1"])
    assert load_config(None, ["moe.topk=1", "moe.combine=prob"]).moe.combine == "prob"
    with pytest.raises(ConfigError, match=r"model\.embed=global with model\.head=comoe"):
        load_config(None, ["model.embed=global"])
    # Without a head (or without experts) the MoE settings do not matter.
    load_config(None, ["model.head=none", "model.embed=global", "moe.topk=1", "loss.names=sdm"])
    load_config(None, ["moe.num_experts=0", "moe.topk=1", "loss.names=sdm+itc"])
    with pytest.raises(ConfigError, match=r"loss\.names=sdm\+itc\+coar has coar.*moe\.num_experts=0"):
        load_config(None, ["moe.num_experts=0"])
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

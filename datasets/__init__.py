"""Text-based person retrieval datasets: loaders for the on-disk formats of
CUHK-PEDES, ICFG-PEDES and RSTPReid, a generator of synthetic data in those
formats, transforms, DDP-aware batch samplers and DataLoader builders.

The names below are imported from their modules on first use, so that
`python -m datasets.check` and `python -m datasets.synth` parse their arguments
(and answer --help) without importing torch.
"""
import importlib

_EXPORTS = {
    "ImageDataset": "bases", "ImageTextDataset": "bases", "TextDataset": "bases",
    "build_dataset": "build", "build_eval_loaders": "build", "build_train_loader": "build",
    "seed_worker": "build", "statistics_table": "build",
    "DATASETS": "registry", "get_dataset_class": "registry",
    "CUHKPEDES": "cuhkpedes", "ICFGPEDES": "icfgpedes", "RSTPReid": "rstpreid",
    "BadImageError": "pedes", "DatasetError": "pedes", "EvalSplit": "pedes",
    "PedesDataset": "pedes", "TrainItem": "pedes",
    "IdentityBatchSampler": "sampler", "RandomBatchSampler": "sampler",
    "CLIP_MEAN": "transforms", "CLIP_STD": "transforms", "ImageAugment": "transforms",
    "TextAugment": "transforms", "augment_caption": "transforms",
    "build_eval_transform": "transforms", "build_train_transform": "transforms",
    "read_image": "transforms",
    "generate": "synth", "ensure_synthetic": "synth",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"datasets.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value

"""Text-based person retrieval datasets: loaders for the on-disk formats of
CUHK-PEDES, ICFG-PEDES and RSTPReid, a generator of synthetic data in those
formats, transforms, DDP-aware batch samplers and DataLoader builders."""
from datasets.bases import ImageDataset, ImageTextDataset, TextDataset
from datasets.build import (DATASETS, build_dataset, build_eval_loaders, build_train_loader,
                            get_dataset_class, seed_worker)
from datasets.cuhkpedes import CUHKPEDES
from datasets.icfgpedes import ICFGPEDES
from datasets.pedes import BadImageError, DatasetError, EvalSplit, PedesDataset, TrainItem
from datasets.rstpreid import RSTPReid
from datasets.sampler import IdentityBatchSampler, RandomBatchSampler
from datasets.transforms import (CLIP_MEAN, CLIP_STD, ImageAugment, TextAugment, augment_caption,
                                 build_eval_transform, build_train_transform, read_image)

__all__ = [
    "DATASETS", "build_dataset", "build_train_loader", "build_eval_loaders", "get_dataset_class", "seed_worker",
    "CUHKPEDES", "ICFGPEDES", "RSTPReid", "PedesDataset", "TrainItem", "EvalSplit", "DatasetError",
    "BadImageError", "ImageTextDataset", "ImageDataset", "TextDataset", "RandomBatchSampler",
    "IdentityBatchSampler", "ImageAugment", "TextAugment", "CLIP_MEAN", "CLIP_STD", "augment_caption",
    "build_train_transform", "build_eval_transform", "read_image", "generate", "ensure_synthetic",
]


def __getattr__(name: str):
    # The generator is imported on first use so that `python -m datasets.synth`
    # does not find its own module already imported by the package.
    if name in ("generate", "ensure_synthetic"):
        from datasets import synth
        return getattr(synth, name)
    raise AttributeError(f"module 'datasets' has no attribute {name!r}")

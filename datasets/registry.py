"""The dataset classes by name. Imports no torch, so that `python -m datasets.check
--help` answers at once."""
from __future__ import annotations

from datasets.cuhkpedes import CUHKPEDES
from datasets.icfgpedes import ICFGPEDES
from datasets.pedes import DatasetError, PedesDataset
from datasets.rstpreid import RSTPReid

DATASETS = {"CUHK-PEDES": CUHKPEDES, "ICFG-PEDES": ICFGPEDES, "RSTPReid": RSTPReid}


def get_dataset_class(name: str) -> type[PedesDataset]:
    if name not in DATASETS:
        raise DatasetError(f"Unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")
    return DATASETS[name]

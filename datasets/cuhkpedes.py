"""CUHK-PEDES: ``CUHK-PEDES/reid_raw.json``, images under ``CUHK-PEDES/imgs/<file_path>``.

Entries: ``{"split": "train"|"val"|"test", "captions": [...], "file_path": "CUHK01/0363004.png",
"processed_tokens": [[...], ...], "id": 1-based int}``; usually two captions per image.
``processed_tokens`` is not used (captions are tokenized with the CLIP tokenizer).
"""
from datasets.pedes import PedesDataset


class CUHKPEDES(PedesDataset):
    name = "CUHK-PEDES"
    folder = "CUHK-PEDES"
    annotation_files = ("reid_raw.json",)
    path_field = "file_path"
    splits = ("train", "val", "test")

"""ICFG-PEDES: ``ICFG-PEDES/ICFG_PEDES.json`` (or ``ICFG-PEDES.json``), images under
``ICFG-PEDES/imgs/<file_path>``.

Entries: ``{"split": "train"|"test", "captions": [one caption], "file_path":
"test/0001/0001_....jpg", "processed_tokens": [[...]], "id": int}``. There is no
val split: unless ``val_ids`` says otherwise, 200 training identities are held
out (chosen by ``seed``) so that checkpoint selection never sees the test split.
"""
from datasets.pedes import PedesDataset


class ICFGPEDES(PedesDataset):
    name = "ICFG-PEDES"
    folder = "ICFG-PEDES"
    annotation_files = ("ICFG_PEDES.json", "ICFG-PEDES.json")
    path_field = "file_path"
    splits = ("train", "test")
    default_val_ids = 200

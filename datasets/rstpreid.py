"""RSTPReid: ``RSTPReid/data_captions.json``, images under ``RSTPReid/imgs/<img_path>``.

Entries: ``{"split": "train"|"val"|"test", "captions": [two captions], "img_path":
"3901_c14_0007.jpg", "id": int}``.
"""
from datasets.pedes import PedesDataset


class RSTPReid(PedesDataset):
    name = "RSTPReid"
    folder = "RSTPReid"
    annotation_files = ("data_captions.json",)
    path_field = "img_path"
    splits = ("train", "val", "test")

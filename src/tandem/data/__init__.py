"""Data sets for tandem: the embedded animals, image folders, .npz arrays; dedupe and split. Torch-free.

    from tandem.data import load_dataset, split_dataset
    data = load_dataset("photos/", 64, 3, resize="crop")   # folders: decoded in a process pool, then cached
    print(data.describe_decode())                          # "decoded 5000 images in 41.2 s with 2 processes"
    splits = split_dataset(data, val_fraction=0.1, test_fraction=0.1, seed=0)
"""

from tandem.data.sources import ANIMAL_CLASSES, Dataset, load_dataset
from tandem.data.split import Splits, split_dataset

__all__ = ["ANIMAL_CLASSES", "Dataset", "Splits", "load_dataset", "split_dataset"]

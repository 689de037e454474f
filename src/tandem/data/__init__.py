"""Data sets for tandem: the embedded animals, image folders, .npz arrays; dedupe and split. Torch-free.

    from tandem.data import load_dataset, split_dataset
    splits = split_dataset(load_dataset("animals", 28, 1), val_fraction=0.1, test_fraction=0.1, seed=0)
"""

from tandem.data.sources import ANIMAL_CLASSES, Dataset, load_dataset
from tandem.data.split import Splits, split_dataset

__all__ = ["ANIMAL_CLASSES", "Dataset", "Splits", "load_dataset", "split_dataset"]

"""Data: image folders, the DINO multi-crop recipe and augmentation, the CPU loader.

The on-device loaders (fastdino.data.dali, fastdino.data.gpu_decode) are imported on their own, since DALI is an
optional package; so is the demo dataset (fastdino.data.demo_dataset), which is also a command.
"""
from fastdino.data.augment import DataAugmentationDINO
from fastdino.data.datasets import IMAGE_EXTENSIONS, DatasetError, ImageFolderDataset, find_images
from fastdino.data.recipe import IMAGENET_MEAN, IMAGENET_STD, MultiCropRecipe
from fastdino.data.torch_loader import MultiCropLoader, epoch_batches, sample_seed

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MultiCropRecipe", "DataAugmentationDINO",
    "IMAGE_EXTENSIONS", "DatasetError", "ImageFolderDataset", "find_images",
    "MultiCropLoader", "epoch_batches", "sample_seed",
]

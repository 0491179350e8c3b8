"""fastdino: fast DINO self-supervised pretraining of vision transformers."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastdino")  # setup.py's, as installed: the version is written in one place
except PackageNotFoundError:  # a checkout used without installing it (torch.hub's source="local")
    __version__ = "unknown (not installed)"

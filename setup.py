"""Install fastdino; `fastdino.kernels` is the top-level `kernels/` folder."""
from setuptools import setup

setup(
    name="fastdino",
    version="0.1.0",
    description="Fast DINO self-supervised pretraining of vision transformers",
    python_requires=">=3.10",
    packages=["fastdino", "fastdino.models", "fastdino.data", "fastdino.eval", "fastdino.kernels"],
    package_dir={"fastdino": "fastdino", "fastdino.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "torchvision",
        "timm",
        "safetensors",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "scikit-learn",
        "scikit-image",
    ],
    entry_points={"console_scripts": ["fastdino = fastdino.cli:main"]},
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        "test": ["pytest"],
    },
)

"""Install fastdino; `fastdino.kernels` is the top-level `kernels/` folder."""
from setuptools import setup

# `pip install -e .` (what `make` runs) maps the packages to this checkout with an import hook that setuptools appends
# to sys.meta_path, after Python's path finder. Run from the folder that holds a checkout named `fastdino/`, the path
# finder takes that folder (no __init__.py) for a namespace package and the hook is never asked: `fastdino.data` was
# the checkout's data/ folder, `fastdino.train` its train.py. One more .pth file, read after setuptools' own (.pth
# files are read in sorted order, and "f" sorts after "_"), moves the hook ahead of the path finder. The hook answers
# only for names of fastdino, so every other import is found as before, and it reads the checkout's folders at import
# time, so edits and new files there still take effect without reinstalling. `_select_strategy` is setuptools'
# internal hook (setuptools >= 64); tests/test_install.py fails if a setuptools release stops calling it.
HOOK_FIRST_PTH = "fastdino_editable_hook_first.pth"
HOOK_FIRST = (  # one line, run by site.py in a function's scope: no comprehension may read the names it sets
    "import sys; from importlib.machinery import PathFinder; "
    "hook = tuple(filter(lambda f: getattr(f, '__module__', '').startswith('__editable___fastdino_'), sys.meta_path)); "
    "list(map(sys.meta_path.remove, hook)); "
    "i = sys.meta_path.index(PathFinder) if PathFinder in sys.meta_path else len(sys.meta_path); "
    "sys.meta_path[i:i] = hook\n"
)

cmdclass = {}
try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: no PEP 660 editable wheels
    pass
else:
    class _HookFirst:
        """setuptools' editable strategy, plus the .pth file above in the editable wheel."""

        def __init__(self, strategy):
            self.strategy = strategy

        def __enter__(self):
            self.strategy.__enter__()
            return self

        def __exit__(self, *exc_info):
            return self.strategy.__exit__(*exc_info)

        def __call__(self, wheel, files, mapping):
            self.strategy(wheel, files, mapping)
            wheel.writestr(HOOK_FIRST_PTH, HOOK_FIRST.encode())

    class EditableWheel(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _HookFirst(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = EditableWheel

setup(
    name="fastdino",
    version="0.1.0",
    description="Fast DINO self-supervised pretraining of vision transformers",
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=["fastdino", "fastdino.models", "fastdino.data", "fastdino.eval", "fastdino.kernels"],
    package_dir={"fastdino": "fastdino", "fastdino.kernels": "kernels"},
    cmdclass=cmdclass,
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

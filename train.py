"""`python train.py ...` in a checkout: the same command as `fastdino train` (see fastdino/train.py)."""
import sys

from fastdino.train import main

if __name__ == "__main__":
    sys.exit(main())

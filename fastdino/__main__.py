"""`python -m fastdino ...`: the `fastdino` command without its console script."""
import sys

from fastdino.cli import main

sys.exit(main())

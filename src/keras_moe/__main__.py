"""`python -m keras_moe`: the same as the `keras-moe` command."""

import sys

from keras_moe.cli import main

if __name__ == "__main__":
    sys.exit(main())

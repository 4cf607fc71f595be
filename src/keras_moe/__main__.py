"""`python -m keras_moe`: the `keras-moe` command, on the backend Keras is
configured with (`KERAS_BACKEND`); the command itself (`keras_moe_cli`) also
picks an installed one when nothing names one."""

import sys

from keras_moe.cli import main

if __name__ == "__main__":
    sys.exit(main())

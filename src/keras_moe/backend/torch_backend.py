"""keras-moe's fast paths for the torch backend (see `keras_moe.backend`)."""

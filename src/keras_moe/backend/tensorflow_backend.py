"""keras-moe's fast paths for the tensorflow backend (see `keras_moe.backend`)."""

"""keras-moe's fast paths for the jax backend (see `keras_moe.backend`)."""

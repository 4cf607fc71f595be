"""Keras's layer harness, called the same way by every layer's tests."""


def run_harness(
    test,
    layer_class,
    init_kwargs,
    shapes,
    counts,
    supports_masking=True,
    **options,
):
    """Runs `test.run_layer_test` (serialisation, build, symbolic and eager
    calls, a training step, mixed precision) on `layer_class(**init_kwargs)`.

    Args:
        test: The `keras.src.testing.TestCase` that runs it.
        layer_class: The layer class.
        init_kwargs: Its arguments.
        shapes: `(input_shape, expected_output_shape)`.
        counts: The expected numbers of `(trainable weights, non-trainable
            weights, seed generators, losses)` (`None`: not checked).
        supports_masking: The expected `supports_masking`.
        **options: Any other `run_layer_test` arguments.
    """
    input_shape, output_shape = shapes
    trainable, non_trainable, seed_generators, losses = counts
    test.run_layer_test(
        layer_class,
        init_kwargs=init_kwargs,
        input_shape=input_shape,
        expected_output_shape=output_shape,
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable,
        expected_num_seed_generators=seed_generators,
        expected_num_losses=losses,
        supports_masking=supports_masking,
        **options,
    )

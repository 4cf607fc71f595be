"""The experiments behind the `keras-moe` command: cifar10, jacobian, mnist1d.

Each experiment module holds the science (`run(args)` builds, trains and
measures) and declares its own command-line options (`add_arguments(parser)`);
`keras_moe.cli` only dispatches. Nothing here is imported by `keras_moe`
itself, so the layers never depend on matplotlib, Pillow or mnist1d.
"""

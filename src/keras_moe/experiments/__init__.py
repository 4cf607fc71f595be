"""The experiments behind the `keras-moe` command: cifar10, jacobian, mnist1d, routing, upcycling.

Each experiment module holds the science (`run(args)` builds, trains and
measures), declares its own command-line options (`add_arguments(parser)`)
and checks them before any work (`prepare(args)`, with the shared checks of
`checks`); `keras_moe.cli` only dispatches. Nothing here is imported by
`keras_moe` itself, so the layers never depend on matplotlib, Pillow or mnist1d.
"""

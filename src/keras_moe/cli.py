"""The `keras-moe` command (also `python -m keras_moe`): the experiments.

Every subcommand is one module with `DESCRIPTION`, `add_arguments(parser)`,
`prepare(args)` (applies `--quick` and checks every argument, before any
work) and `run(args)`. To add one, add its module to `SUBCOMMANDS`. Every
subcommand gets `--out DIR` (default `results/<name>`; with `--quick` a folder
under the temporary directory, so smoke runs never overwrite `results/`) and
`--quick`. A bad argument, or a run that cannot go ahead for a reason the user
can fix, is one line on stderr (`keras-moe SUBCOMMAND: error: ...`) and exit
status 2, never a traceback; the checks are in `keras_moe.experiments.checks`.
"""

import argparse
import importlib
import os
import sys
import tempfile

# Smoke runs never overwrite the committed results/.
QUICK_OUT = os.path.join(tempfile.gettempdir(), "keras-moe-quick")

SUBCOMMANDS = {
    "cifar10": "keras_moe.experiments.cifar10",
    "jacobian": "keras_moe.experiments.jacobian",
    "mnist1d": "keras_moe.experiments.mnist1d",
    "routing": "keras_moe.experiments.routing",
    "upcycling": "keras_moe.experiments.upcycling",
}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line: what is wrong (`--help`
    shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it tells something: not for
    on/off flags (a `--no-x` flag's default `True` reads as the opposite)
    nor for `None` (options whose help says what happens without them)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    parser = _ArgumentParser(
        prog="keras-moe",
        description=(
            "Experiments with keras-moe's mixture-of-experts layers. The Keras "
            "backend is KERAS_BACKEND's, else the Keras config's, else the first "
            "installed of JAX, PyTorch and TensorFlow."
        ),
    )
    from keras_moe.version import __version__

    parser.add_argument("--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(
        dest="subcommand", metavar="SUBCOMMAND", required=True
    )
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        subparser = subparsers.add_parser(
            name,
            help=module.DESCRIPTION.splitlines()[0],
            description=module.DESCRIPTION,
            formatter_class=_HelpFormatter,
        )
        subparser.add_argument(
            "--out",
            default=None,
            help=f"folder for results.json, the plots and summary.md (default: "
            f"results/{name}, with --quick {QUICK_OUT}/{name})",
        )
        subparser.add_argument(
            "--quick",
            action="store_true",
            help="a smoke run of well under a minute on 2 CPU cores (tiny settings)",
        )
        module.add_arguments(subparser)
        subparser.set_defaults(prepare=module.prepare, run=module.run, parser=subparser)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from keras_moe.experiments import checks
    from keras_moe.experiments.common import ExperimentError
    from keras_moe.experiments.common import command_line

    args.command_line = command_line(argv)
    if args.out is None:
        quick = getattr(args, "quick", False)
        base = QUICK_OUT if quick else "results"
        args.out = os.path.join(base, args.subcommand)
    created = []
    try:
        # Every argument, then the output folder, before any data or model.
        args.prepare(args)
        created = checks.output_folder(args.out)
        args.run(args)
    except ExperimentError as error:
        # What failed, in one line, with argparse's prefix and exit status;
        # no traceback and no usage.
        args.parser.exit(2, f"{args.parser.prog}: error: {error}\n")
    finally:
        checks.remove_if_empty(created)  # a run that failed before writing
    return 0

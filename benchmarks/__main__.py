"""`python -m benchmarks`: the whole suite on JAX, PyTorch and TensorFlow.

Each backend runs in its own process (Keras fixes the backend at import);
comparisons are made within one process and merged into
`benchmarks/results/benchmarks.{json,md}` and `expert_sweep.png`.
"""

import argparse
import json
import pathlib
import sys

from benchmarks import cases


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--backends",
        default="jax,torch,tensorflow",
        help="comma-separated Keras backends (default: all three)",
    )
    parser.add_argument(
        "--cases",
        default="",
        help=f"comma-separated cases (default: all): {', '.join(cases.CASES)}",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes (checks the code, not speed)"
    )
    parser.add_argument(
        "--out",
        default=str(pathlib.Path(__file__).parent / "results"),
        help="output folder (default: benchmarks/results)",
    )
    parser.add_argument(
        "--torch-mode",
        choices=("eager", "compile"),
        default="eager",
        help="PyTorch steps eager (Keras's default on torch) or torch.compile",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved timed samples per variant (default: jax 5, torch 3, "
        "tensorflow 3)",
    )
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [n for n in args.cases.split(",") if n]
    unknown = sorted(set(names) - set(cases.CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {list(cases.CASES)}")

    if args.worker:
        from benchmarks import harness
        from benchmarks import suite

        result = suite.run_backend(
            names or None,
            tiny=args.tiny,
            repeats=args.repeats,
            log=lambda m: print(m, flush=True),
        )
        payload = {"cases": result, "torch_mode": harness.torch_mode()}
        pathlib.Path(args.worker).write_text(json.dumps(payload))
        return 0

    from benchmarks import suite

    command = "python -m benchmarks " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    backends = [b for b in args.backends.split(",") if b]
    suite.run_all(
        backends,
        names,
        args.tiny,
        args.out,
        command.strip(),
        args.torch_mode,
        repeats=args.repeats,
    )
    print(f"wrote {args.out}/benchmarks.json, benchmarks.md, expert_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

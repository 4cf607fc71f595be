"""Timing harness: compiled steps on the current Keras backend, interleaved.

A comparison is a list of variants (a name and a function that builds a
Keras layer or model and its inputs). For each variant and each mode
(`"forward"` or `"forward_backward"`) the harness builds one step function
compiled the way the backend trains under `jit_compile=True`:

- JAX: `jax.jit` of `layer.stateless_call` (and of `jax.value_and_grad` of a
  loss on it), results waited for with `jax.block_until_ready`.
- TensorFlow: `tf.function(jit_compile=True)` (XLA), `tf.GradientTape` for the
  backward; results pulled to NumPy.
- PyTorch: `"eager"` (default; what Keras's torch trainer runs for
  `jit_compile="auto"`), or `"compile"` (environment variable
  `KERAS_MOE_BENCH_TORCH=compile`, `python -m benchmarks --torch-mode
  compile`): `torch.compile` of the step, as Keras's torch trainer does for
  `jit_compile=True` (`keras/src/backend/torch/trainer.py`), with the
  `.backward()` inside the compiled function as in `train_step`. Compiling
  takes ~15 s per step on a small CPU, too long for the whole suite.

Every variant is warmed up, then the variants are timed in turn, repeat
after repeat (interleaved, so that noise from other processes on the
machine falls on all of them alike), and summarised by medians and ratios
against a baseline variant. The forward+backward step computes gradients of
a loss with respect to every trainable weight (and adds the layers'
auxiliary losses in training); it applies no optimizer.

Peak memory: JAX reports the compiled program's buffers
(`compiled.memory_analysis()`: arguments, outputs and temporaries);
TensorFlow reports `tf.config.experimental.get_memory_info` only on GPU;
PyTorch reports `torch.cuda.max_memory_allocated` only on CUDA. Elsewhere the
result says `None` with the reason.
"""

import argparse
import dataclasses
import inspect
import os
import statistics
import time
from collections.abc import Callable

import keras
import numpy as np

BACKEND = keras.backend.backend()
MODES = ("forward", "forward_backward")
ALL_MODES = MODES + ("train_step",)


@dataclasses.dataclass
class Variant:
    """One contender in a comparison.

    Attributes:
        name: Short label used in tables and JSON.
        build: Callable with no arguments returning `(layer, inputs)`:
            a built or unbuilt Keras layer/model and a NumPy array (or a
            tuple/list of arrays) it is called on.
        loss: Optional `loss(outputs) -> scalar` (keras.ops) for the backward;
            default: mean of squared outputs.
        note: Free text for the table (e.g. what the variant is).
        train_step: When true, `build` returns `(model, (x, y))` for a model
            compiled with `jit_compile=True`, and the variant is timed in the
            single mode `"train_step"`: `model.train_on_batch(x, y)`, exactly
            what `fit` runs per batch (forward, backward, optimizer update).
    """

    name: str
    build: Callable
    loss: Callable | None = None
    note: str = ""
    train_step: bool = False


def mean_square(outputs):
    if isinstance(outputs, list | tuple):  # e.g. (outputs, router_logits)
        outputs = outputs[0]
    return keras.ops.mean(keras.ops.square(outputs))


def _as_tuple(inputs):
    return tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)


def _call(layer, inputs, training):
    if len(inputs) == 1:
        return layer(inputs[0], training=training)
    return layer(list(inputs), training=training)


def _build(layer, inputs):
    if not layer.built:
        _call(layer, inputs, False)


def count_params(layer):
    return int(sum(np.prod(v.shape) for v in layer.trainable_variables))


# --------------------------------------------------------------------- JAX
def _jax_steps(layer, inputs, loss):
    import jax

    inputs = tuple(jax.numpy.asarray(x) for x in inputs)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    # `stateless_call` passes `training` straight to `call`, which Keras's
    # own layers (Dense, Conv) do not all accept.
    takes_training = "training" in inspect.signature(layer.call).parameters

    def stateless(tv, ntv, xs, training):
        xs = xs[0] if len(xs) == 1 else list(xs)
        kwargs = {"training": training} if takes_training else {}
        outputs, ntv, losses = layer.stateless_call(
            tv, ntv, xs, return_losses=True, **kwargs
        )
        return outputs, ntv, losses

    def forward(tv, ntv, xs):
        return stateless(tv, ntv, xs, False)[0]

    def objective(tv, ntv, xs):
        outputs, ntv, losses = stateless(tv, ntv, xs, True)
        value = loss(outputs)
        for extra in losses:
            value = value + extra
        return value, ntv

    functions = {
        "forward": forward,
        "forward_backward": jax.value_and_grad(objective, has_aux=True),
    }

    def runner(mode):
        # Compiled ahead of time (and only for the modes asked for), so that
        # the compiled program can report its memory.
        jitted = jax.jit(functions[mode])
        executable = jitted.lower(trainable, non_trainable, inputs).compile()

        def run():
            return jax.block_until_ready(executable(trainable, non_trainable, inputs))

        return run, _jax_memory(executable)

    return runner


def _jax_memory(compiled):
    try:
        analysis = compiled.memory_analysis()
    except Exception as error:
        return {"peak_bytes": None, "why": f"memory_analysis failed: {error}"}
    if analysis is None:
        return {"peak_bytes": None, "why": "memory_analysis() returned None"}
    sizes = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
    }
    sizes["peak_bytes"] = sum(sizes.values())
    sizes["why"] = "XLA compiled memory_analysis (arguments + outputs + temporaries)"
    return sizes


# -------------------------------------------------------------- TensorFlow
def _to_numpy(tensor):
    # Gradients of a gather arrive as IndexedSlices.
    return getattr(tensor, "values", tensor).numpy()


def _tf_steps(layer, inputs, loss):
    import tensorflow as tf

    inputs = tuple(tf.convert_to_tensor(x) for x in inputs)

    @tf.function(jit_compile=True)
    def forward(*xs):
        return _call(layer, xs, False)

    @tf.function(jit_compile=True)
    def forward_backward(*xs):
        with tf.GradientTape() as tape:
            outputs = _call(layer, xs, True)
            value = loss(outputs)
            if layer.losses:
                value = value + tf.add_n(layer.losses)
        return value, tape.gradient(value, layer.trainable_variables)

    functions = {"forward": forward, "forward_backward": forward_backward}
    on_gpu = bool(tf.config.list_logical_devices("GPU"))

    def runner(mode):
        fn = functions[mode]

        def run():
            return tf.nest.map_structure(_to_numpy, fn(*inputs))

        memory = {"peak_bytes": None, "why": "TensorFlow reports memory only on GPU"}
        if on_gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
            run()
            memory = {
                "peak_bytes": int(
                    tf.config.experimental.get_memory_info("GPU:0")["peak"]
                ),
                "why": "tf.config.experimental.get_memory_info('GPU:0')['peak']",
            }
        return run, memory

    return runner


# ----------------------------------------------------------------- PyTorch
def torch_mode():
    """`"compile"` (as `fit(jit_compile=True)`) or `"eager"`; env override."""
    return os.environ.get("KERAS_MOE_BENCH_TORCH", "eager")


def _torch_steps(layer, inputs, loss):
    import torch

    device = (
        keras.backend.get_device() if hasattr(keras.backend, "get_device") else None
    )
    inputs = tuple(torch.as_tensor(x, device=device) for x in inputs)
    variables = layer.trainable_variables

    def forward(*xs):
        with torch.no_grad():
            return _call(layer, xs, False)

    def forward_backward(*xs):
        for v in variables:
            v.value.grad = None
        outputs = _call(layer, xs, True)
        value = loss(outputs)
        for extra in layer.losses:
            value = value + extra
        value.backward()
        return value.detach()

    functions = {"forward": forward, "forward_backward": forward_backward}
    if torch_mode() == "compile":
        functions = {k: torch.compile(f) for k, f in functions.items()}
    on_cuda = torch.cuda.is_available()

    def runner(mode):
        fn = functions[mode]

        def run():
            out = fn(*inputs)
            if on_cuda:
                torch.cuda.synchronize()
            return out

        memory = {"peak_bytes": None, "why": "PyTorch reports memory only on CUDA"}
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
            run()
            memory = {
                "peak_bytes": int(torch.cuda.max_memory_allocated()),
                "why": "torch.cuda.max_memory_allocated()",
            }
        return run, memory

    return runner


_STEPS = {"jax": _jax_steps, "tensorflow": _tf_steps, "torch": _torch_steps}


def compile_steps(layer, inputs, loss=None):
    """Returns `runner(mode) -> (run, memory)` for `layer` on `inputs`.

    `run()` executes one compiled step and waits for its result; `memory` is
    a dict with `peak_bytes` (or `None`) and `why`.
    """
    inputs = _as_tuple(inputs)
    _build(layer, inputs)
    return _STEPS[BACKEND](layer, inputs, loss or mean_square)


def train_step_runner(model, data):
    """`runner` for `model.train_on_batch(*data)` (mode `"train_step"`)."""
    x, y = data

    def runner(mode):
        def run():
            return model.train_on_batch(x, y)

        why = "not measured for train steps (see the forward_backward cases)"
        return run, {"peak_bytes": None, "why": why}

    return runner


def _time_once(run, inner):
    start = time.perf_counter()
    for _ in range(inner):
        run()
    return (time.perf_counter() - start) / inner


def compare(
    variants,
    baseline,
    modes=MODES,
    repeats=7,
    warmup=2,
    min_sample_s=0.02,
    log=None,
):
    """Times every variant in every mode, interleaved; returns a dict.

    Args:
        variants: List of `Variant`.
        baseline: Name of the variant the ratios are taken against.
        modes: Subset of `MODES`.
        repeats: Timed samples per variant and mode (median reported).
        warmup: Untimed calls after compiling.
        min_sample_s: Each sample repeats the step `inner` times so that one
            sample lasts at least this long (calibrated once per variant).
        log: Optional `print`-like callable for progress.

    Returns:
        `{"backend", "baseline", "variants": {name: {"note", "params",
        mode: {"median_s", "samples_s", "inner", "ratio", "compile_s",
        "memory"}}}}`; a variant that fails to build or compile records
        `{"error": message}` instead of its modes.
    """
    names = [v.name for v in variants]
    if baseline not in names:
        raise ValueError(f"`baseline` must be one of {names}. Received: {baseline!r}")
    result = {"backend": BACKEND, "baseline": baseline, "variants": {}}
    if BACKEND == "torch":
        result["torch_mode"] = torch_mode()
    runs = {}
    for variant in variants:
        entry = {"note": variant.note}
        result["variants"][variant.name] = entry
        try:
            layer, inputs = variant.build()
            start = time.perf_counter()
            if variant.train_step:
                runner = train_step_runner(layer, inputs)
            else:
                runner = compile_steps(layer, inputs, variant.loss)
            entry["params"] = count_params(layer)
            for mode in ("train_step",) if variant.train_step else modes:
                run, memory = runner(mode)
                t0 = time.perf_counter()
                run()  # first call: compiles where compilation is lazy
                first = time.perf_counter() - t0
                for _ in range(warmup):
                    run()
                once = _time_once(run, 1)
                inner = max(1, int(np.ceil(min_sample_s / max(once, 1e-9))))
                inner = min(inner, 1000)
                entry[mode] = {"inner": inner, "memory": memory, "first_call_s": first}
                runs[(variant.name, mode)] = (run, inner)
            entry["build_and_compile_s"] = time.perf_counter() - start
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {error}"[:500]
            if log:
                log(f"  {variant.name}: FAILED {entry['error']}")
    samples = {key: [] for key in runs}
    for _ in range(repeats):
        for key, (run, inner) in runs.items():
            samples[key].append(_time_once(run, inner))
    for (name, mode), values in samples.items():
        entry = result["variants"][name][mode]
        entry["samples_s"] = values
        entry["median_s"] = statistics.median(values)
    if any(v.train_step for v in variants):
        modes = ("train_step",)
    for mode in modes:
        base = result["variants"][baseline].get(mode, {}).get("median_s")
        for name in names:
            entry = result["variants"][name].get(mode)
            if entry is not None and "median_s" in entry:
                entry["ratio"] = entry["median_s"] / base if base else None
    if log:
        for mode in modes:
            line = ", ".join(
                f"{name} {result['variants'][name][mode]['ratio']:.2f}x"
                for name in names
                if result["variants"][name].get(mode, {}).get("ratio") is not None
            )
            log(f"  {mode}: {line}")
    return result


def script_arguments(doc, argv, repeats, size, size_help):
    """Parses the command line of a script that runs one comparison.

    Args:
        doc: The script's docstring; its first paragraph describes it.
        argv: The arguments (`None`: `sys.argv`).
        repeats: The default of `--repeats`.
        size: The default of `--size`, comma-separated integers.
        size_help: What `--size`'s numbers are.

    Returns:
        `(args, size)`: the parsed arguments and `--size` as a tuple of ints.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument(
        "--min-sample-s",
        type=float,
        default=0.2,
        help="each timed sample repeats the step for at least this long",
    )
    parser.add_argument("--size", default=size, help=size_help)
    args = parser.parse_args(argv)
    return args, tuple(int(v) for v in args.size.split(","))


def print_ratios(result):
    """Prints each mode's ratios of a `compare` result, a line per mode."""
    for mode in MODES:
        ratios = {
            name: entry.get(mode, {}).get("ratio", float("nan"))
            for name, entry in result["variants"].items()
        }
        print(f"{mode:17s} " + "  ".join(f"{n} {r:.3f}" for n, r in ratios.items()))

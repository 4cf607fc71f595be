"""A native grouped matmul for XLA:CPU: the experiment behind issue #3's JAX targets.

`DenseMoE(top_k=2)` of 64 experts (4096 x 256 -> 256) runs each expert on its
own tokens in a batched matmul over a capacity buffer (`routing`), and stays
4-5x a `Dense(512)` forward+backward on JAX/CPU where the issue asks for 2.5x.
XLA:CPU has no fast grouped matmul (`jax.lax.ragged_dot` is a dense emulation
there), so this script tries the one lever left, a native one:
`native_grouped_matmul`, an XLA custom call (`jax.ffi`, the CPU custom-call
API with an opaque string) into OpenBLAS's `cblas_sgemm_batch` (the
`scipy-openblas64` wheel, 0.3.34 or later: 0.3.31's batch path, bundled with
NumPy 2.4, crashes on small matrices), one product per expert on the exact
sorted rows (no padding), with a `jax.custom_vjp` whose backward is two more
batched calls.

Compared side by side in one process (`benchmarks.harness.compare`,
interleaved medians, JAX only), forward and forward+backward:

- `kernel`: 8192 rows in 64 groups of 128, 256 -> 256: `native` (this
  kernel), `xla_batched` (the same rows as the `(64, 128, 256)` batched einsum
  of the layer's capacity path, at an exact fit) and `dense` (4096 x 256 ->
  512, the same FLOPs in one matmul: the baseline).
- `layer`: `DenseMoE(top_k=2)` as shipped, `native` (the same layer whose
  dropless path runs this kernel on the sorted rows, `routing.RowLayout`) and
  `Dense(512)` (the baseline); and two floors that do not compute the layer's
  function, to show what is left besides the experts' products:
  `ideal_kernel` (the grouped product replaced by one 2-D matmul of its FLOPs,
  a perfect grouped matmul) and `routing_only` (the product replaced by a
  free elementwise op: top-k, sort, gathers, combine and their gradients).

    python -m benchmarks.native_grouped_matmul            # KERAS_BACKEND=jax

keras-moe does not ship the kernel: see benchmarks/README.md ("Sparse top-k")
for what it measured.
"""

import argparse
import concurrent.futures
import contextlib
import ctypes
import functools
import glob
import importlib.metadata
import os
import sys

import keras
import numpy as np

from benchmarks import harness
from keras_moe import DenseMoE
from keras_moe import routing

MOE = {"expert_activation": "relu", "gating_activation": "softmax"}
TARGET = "keras_moe_bench_grouped_matmul"
MIN_OPENBLAS = (0, 3, 34)
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
FLOAT_BYTES = 4
if hasattr(os, "sched_getaffinity"):
    THREADS = max(1, len(os.sched_getaffinity(0)))
else:
    THREADS = max(1, os.cpu_count() or 1)


def _require_jax():
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "benchmarks.native_grouped_matmul is an XLA:CPU custom call and runs "
            "on the JAX backend only. Received: "
            f"KERAS_BACKEND={keras.backend.backend()!r}"
        )


@functools.cache
def _sgemm_batch():
    """OpenBLAS's `cblas_sgemm_batch` (ILP64) from the scipy-openblas64 wheel."""
    try:
        version = importlib.metadata.version("scipy-openblas64")
        import scipy_openblas64
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            "benchmarks.native_grouped_matmul needs the scipy-openblas64 wheel "
            "(>= 0.3.34; `pip install -r requirements-dev.txt`). Received: not "
            "installed"
        ) from None
    if tuple(int(p) for p in version.split(".")[:3]) < MIN_OPENBLAS:
        raise RuntimeError(
            "benchmarks.native_grouped_matmul needs scipy-openblas64 >= 0.3.34 "
            f"(older batch GEMMs crash on small matrices). Received: {version}"
        )
    pattern = os.path.join(
        scipy_openblas64.get_lib_dir(), f"*{scipy_openblas64.get_library()}*"
    )
    paths = sorted(p for p in glob.glob(pattern) if not p.endswith(".a"))
    if not paths:
        raise RuntimeError(f"No OpenBLAS library matches {pattern!r}")
    library = ctypes.CDLL(paths[0])
    # One OpenBLAS thread per call, the products split over our own threads
    # (`_batch`): OpenBLAS's idle workers spin after each call and slowed the
    # XLA ops around the custom call (benchmarks/README.md, "Sparse top-k").
    library.scipy_openblas_set_num_threads64_(1)
    function = library.scipy_cblas_sgemm_batch64_
    function.restype = None
    function.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13
    function.argtypes += [ctypes.c_int64, ctypes.c_void_p]
    return function


def _batch(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc):
    """`C_i = op(A_i) op(B_i)` for every address `i` of `a`, `b` and `c`
    (sizes and strides: ints or arrays)."""
    count = len(a)
    if count == 0:
        return

    def ints(value):
        return np.ascontiguousarray(np.broadcast_to(value, (count,)), np.int64)

    arrays = [
        np.full(count, trans_a, np.int32),
        np.full(count, trans_b, np.int32),
        ints(m),
        ints(n),
        ints(k),
        np.ones(count, np.float32),
        np.ascontiguousarray(a, np.uint64),
        ints(lda),
        np.ascontiguousarray(b, np.uint64),
        ints(ldb),
        np.zeros(count, np.float32),
        np.ascontiguousarray(c, np.uint64),
        ints(ldc),
    ]
    work = np.cumsum(arrays[2] * arrays[3] * arrays[4], dtype=np.float64)
    cuts = np.searchsorted(work, work[-1] * np.arange(1, THREADS) / THREADS)
    inner = np.unique(np.clip(cuts + 1, 1, max(1, count - 1))).tolist()
    bounds = [0, *(b for b in inner if 0 < b < count), count]
    parts = list(zip(bounds[:-1], bounds[1:]))
    pending = [_pool().submit(_batch_part, arrays, lo, hi) for lo, hi in parts[1:]]
    _batch_part(arrays, *parts[0])
    for job in pending:
        job.result()


@functools.cache
def _pool():
    return concurrent.futures.ThreadPoolExecutor(max(1, THREADS - 1))


def _batch_part(arrays, lo, hi):
    """Products `lo:hi` of a prepared batch, on the calling thread (ctypes
    releases the GIL during the call)."""
    if hi <= lo:
        return
    item = [v.itemsize for v in arrays]
    addresses = [v.ctypes.data + lo * size for v, size in zip(arrays, item)]
    group_sizes = np.ones(hi - lo, np.int64)
    _sgemm_batch()(ROW_MAJOR, *addresses, hi - lo, group_sizes.ctypes.data)


def _parse(opaque, opaque_len):
    """`(mode, rows, d, m, e)` from the custom call's opaque string."""
    mode, *dims = ctypes.string_at(opaque, opaque_len).decode().split(",")
    return (mode, *(int(v) for v in dims))


def _execute(out, ins, opaque, opaque_len):
    """The custom call: `forward` y = x W_e per group; `backward` dx and dW."""
    mode, rows, d, m, e = _parse(opaque, opaque_len)
    ends_pointer = ctypes.cast(ins[2], ctypes.POINTER(ctypes.c_int32))
    ends = np.ctypeslib.as_array(ends_pointer, (e,)).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    sizes = ends - starts
    used = np.nonzero(sizes > 0)[0]
    x, w = ins[0], ins[1]
    total = int(ends[-1])
    x_rows = x + starts[used] * d * FLOAT_BYTES
    w_experts = w + used * d * m * FLOAT_BYTES
    if mode == "forward":
        y = out
        y_rows = y + starts[used] * m * FLOAT_BYTES
        _batch(
            NO_TRANS, NO_TRANS, sizes[used], m, d, x_rows, d, w_experts, m, y_rows, m
        )
        ctypes.memset(y + total * m * FLOAT_BYTES, 0, (rows - total) * m * FLOAT_BYTES)
        return
    outs = ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))
    dx, dw = outs[0], outs[1]
    dy_rows = ins[3] + starts[used] * m * FLOAT_BYTES
    dx_rows = dx + starts[used] * d * FLOAT_BYTES
    dw_experts = dw + used * d * m * FLOAT_BYTES
    # dx = dy W_e^T; dW_e = x_e^T dy_e.
    _batch(NO_TRANS, TRANS, sizes[used], d, m, dy_rows, m, w_experts, m, dx_rows, d)
    ctypes.memset(dx + total * d * FLOAT_BYTES, 0, (rows - total) * d * FLOAT_BYTES)
    _batch(TRANS, NO_TRANS, d, m, sizes[used], x_rows, d, dy_rows, m, dw_experts, m)
    for expert in np.nonzero(sizes == 0)[0]:
        ctypes.memset(dw + int(expert) * d * m * FLOAT_BYTES, 0, d * m * FLOAT_BYTES)


def _guarded(out, ins, opaque, opaque_len, status):
    # An exception cannot cross into XLA: report it and poison the output.
    try:
        _execute(out, ins, opaque, opaque_len)
    except BaseException as error:  # noqa: BLE001
        print(f"{TARGET} failed: {error!r}", file=sys.stderr)
        _poison(out, opaque, opaque_len)


def _poison(out, opaque, opaque_len):
    mode, rows, d, m, e = _parse(opaque, opaque_len)
    if mode == "forward":
        buffers = [(out, rows * m)]
    else:
        outs = ctypes.cast(out, ctypes.POINTER(ctypes.c_void_p))
        buffers = [(outs[0], rows * d), (outs[1], e * d * m)]
    for address, count in buffers:
        array = (ctypes.c_float * count).from_address(address)
        np.frombuffer(array, np.float32)[:] = np.nan


_CALLBACK_TYPE = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
)
_CALLBACK = _CALLBACK_TYPE(_guarded)


@functools.cache
def _register():
    import jax

    _require_jax()
    _sgemm_batch()
    capsule = jax.ffi.pycapsule(_CALLBACK)
    jax.ffi.register_ffi_target(TARGET, capsule, platform="cpu", api_version=0)


def _custom_call(mode, results, *operands, dims):
    import jax

    _register()
    # API version 3: `fn(out, in, opaque, opaque_len, status)` on CPU.
    call = jax.ffi.ffi_call(
        TARGET,
        results,
        custom_call_api_version=3,
        legacy_backend_config=",".join(str(v) for v in (mode, *dims)),
        vmap_method="sequential",
    )
    return call(*operands)


def _native(x, kernel, group_ends):
    import jax

    rows, d = x.shape
    e, _, m = kernel.shape
    result = jax.ShapeDtypeStruct((rows, m), x.dtype)
    return _custom_call("forward", result, x, kernel, group_ends, dims=(rows, d, m, e))


@functools.cache
def _grouped_matmul_vjp():
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def grouped(x, kernel, group_ends):
        return _native(x, kernel, group_ends)

    def forward(x, kernel, group_ends):
        return grouped(x, kernel, group_ends), (x, kernel, group_ends)

    def backward(saved, dy):
        x, kernel, group_ends = saved
        rows, d = x.shape
        e, _, m = kernel.shape
        results = (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
        )
        dx, dkernel = _custom_call(
            "backward",
            results,
            x,
            kernel,
            group_ends,
            jnp.asarray(dy, x.dtype),
            dims=(rows, d, m, e),
        )
        return dx, dkernel, None

    grouped.defvjp(forward, backward)
    return grouped


def native_grouped_matmul(x, kernel, group_ends):
    """`routing`'s grouped matmul contract through OpenBLAS: float32 rows
    `(r, d)` sorted by group, `kernel` `(g, d, m)`, `group_ends` `(g,)`
    cumulative row counts; rows past `group_ends[-1]` come out zero."""
    import jax.numpy as jnp

    _require_jax()
    if x.dtype != jnp.float32:
        raise TypeError(
            f"native_grouped_matmul computes in float32. Received: x.dtype={x.dtype}"
        )
    kernel = jnp.asarray(kernel, jnp.float32)
    group_ends = jnp.asarray(group_ends, jnp.int32)
    return _grouped_matmul_vjp()(x, kernel, group_ends)


@contextlib.contextmanager
def grouped_matmul_in_routing(function):
    """Makes `routing`'s dropless path use `function` (its `RowLayout`)."""
    names = ("grouped_matmul", "grouped_matmul_usable")
    saved = {name: routing._BACKEND_FUNCTIONS.get(name) for name in names}
    routing._BACKEND_FUNCTIONS["grouped_matmul"] = function
    routing._BACKEND_FUNCTIONS["grouped_matmul_usable"] = None
    try:
        yield
    finally:
        routing._BACKEND_FUNCTIONS.update(saved)


def _free_product(x, kernel, group_ends):
    # Not the experts' function: a floor, the routing without the products.
    return x[:, : kernel.shape[2]] * kernel[0, 0, 0]


def _one_matmul(x, kernel, group_ends):
    # Not the experts' function: every row times expert 0's kernel, one 2-D
    # matmul of the grouped product's FLOPs (what a perfect kernel would cost).
    return keras.ops.matmul(x, kernel[0])


class NativeDenseMoE(DenseMoE):
    """`DenseMoE` whose dropless sparse path runs `grouped_matmul`
    (`native_grouped_matmul`, or a floor: `_free_product`, `_one_matmul`)."""

    grouped_matmul = staticmethod(native_grouped_matmul)

    def call(self, inputs, mask=None, training=None):
        with grouped_matmul_in_routing(type(self).grouped_matmul):
            return super().call(inputs, mask=mask, training=training)


class RoutingOnlyDenseMoE(NativeDenseMoE):
    grouped_matmul = staticmethod(_free_product)


class IdealKernelDenseMoE(NativeDenseMoE):
    grouped_matmul = staticmethod(_one_matmul)


class GroupedProduct(keras.layers.Layer):
    """`rows (r, d)` in `groups` equal groups times a `(groups, d, m)` kernel."""

    def __init__(self, groups, units, native, **kwargs):
        super().__init__(**kwargs)
        self.groups, self.units, self.native = groups, units, native

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(self.groups, input_shape[-1], self.units), name="kernel"
        )

    def call(self, rows):
        if self.native:
            per = rows.shape[0] // self.groups
            ends = np.arange(1, self.groups + 1, dtype="int32") * per
            return native_grouped_matmul(rows, self.kernel, ends)
        x = keras.ops.reshape(rows, (self.groups, -1, rows.shape[-1]))
        y = keras.ops.einsum("ecd,edm->ecm", x, self.kernel)
        return keras.ops.reshape(y, (-1, self.units))


def kernel_variants(rows, dim, units, groups):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim)).astype("float32")
    half = x[: rows // 2]
    return [
        harness.Variant("dense", lambda: (keras.layers.Dense(2 * units), half)),
        harness.Variant("native", lambda: (GroupedProduct(groups, units, True), x)),
        harness.Variant(
            "xla_batched", lambda: (GroupedProduct(groups, units, False), x)
        ),
    ]


def layer_variants(batch, dim, units, experts, k):
    x = np.random.default_rng(0).standard_normal((batch, dim)).astype("float32")
    return [
        harness.Variant("dense", lambda: (keras.layers.Dense(k * units), x)),
        harness.Variant(
            "shipped", lambda: (DenseMoE(units, experts, top_k=k, **MOE), x)
        ),
        harness.Variant(
            "native", lambda: (NativeDenseMoE(units, experts, top_k=k, **MOE), x)
        ),
        harness.Variant(
            "ideal_kernel",
            lambda: (IdealKernelDenseMoE(units, experts, top_k=k, **MOE), x),
        ),
        harness.Variant(
            "routing_only",
            lambda: (RoutingOnlyDenseMoE(units, experts, top_k=k, **MOE), x),
        ),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--min-sample-s", type=float, default=0.2)
    parser.add_argument(
        "--size",
        default="4096,256,256,64,2",
        help="batch,dim,units,experts,k (default: the suite's dense_topk case)",
    )
    args = parser.parse_args(argv)
    _require_jax()
    batch, dim, units, experts, k = (int(v) for v in args.size.split(","))
    results = {}
    comparisons = {
        "kernel": kernel_variants(batch * k, dim, units, experts),
        "layer": layer_variants(batch, dim, units, experts, k),
    }
    for name, variants in comparisons.items():
        results[name] = harness.compare(
            variants, "dense", repeats=args.repeats, min_sample_s=args.min_sample_s
        )
    print(
        f"JAX, {batch} tokens, {dim}->{units}, {experts} experts, top-{k}; "
        f"medians of {args.repeats}, ratios against `dense`"
    )
    for name, result in results.items():
        for mode in harness.MODES:
            cells = []
            for variant, entry in result["variants"].items():
                timing = entry.get(mode, {})
                ms = 1e3 * timing.get("median_s", float("nan"))
                cells.append(f"{variant} {ms:.1f} ms ({timing.get('ratio', 0):.2f})")
            print(f"{name:6s} {mode:17s} " + "  ".join(cells))
    return results


if __name__ == "__main__":
    main()

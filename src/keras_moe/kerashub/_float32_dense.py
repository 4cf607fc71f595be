"""What a KerasHub router `Dense` computes, computed in float32.

`sparsify(model, router_dtype="float32")` routes on the model's own router
`Dense` layers in float32 under any dtype policy. A router `Dense` may be
quantized (`model.quantize("int8")`, before or after `sparsify`) or carry
LoRA factors (`enable_lora`): its output is then not `x . kernel + bias`
but the dequantized product plus the LoRA term. Rather than re-deriving
that arithmetic, `float32_dense` runs Keras's own `Dense` code for the
layer's mode on a view of the layer whose compute dtype is float32, with the
variables read as stored: the same steps (input quantizer, integer matmul,
scales, unpacking, LoRA, bias, custom gradients) in float32. In a float32
policy it is therefore the layer's own computation.
"""

import keras
from keras import ops
from keras.src.backend import AutocastScope

# The quantization modes whose `Dense` code `float32_dense` runs in float32
# (None: a float layer). float8 updates its scales through its gradients and
# GPTQ/AWQ are calibrated for the compute dtype: those are refused.
FLOAT32_MODES = (None, "int8", "int4")


def full_precision(variable):
    """A variable's own value, not cast to the compute dtype.

    Inside a mixed-precision layer's call, reading a variable casts it to the
    compute dtype (Keras's autocast); a float32 router needs it as stored.
    Read inside the scope: on TensorFlow a converted Keras variable is read
    later, under the layer's autocast."""
    with AutocastScope(None):
        return variable.value


class _Float32View:
    """A `keras.layers.Dense` seen with a float32 compute dtype.

    Every attribute is the layer's (its variables, quantizer, LoRA factors)
    except `compute_dtype`, and `kernel`, which is Keras's `Dense.kernel`
    property computed on the view (its LoRA-merged kernel in float32). Keras's
    `Dense` methods called with the view as `self` compute what the layer
    computes, in float32."""

    compute_dtype = "float32"

    def __init__(self, layer):
        self._layer = layer

    def __getattr__(self, name):
        return getattr(self._layer, name)

    @property
    def kernel(self):
        return keras.layers.Dense.kernel.fget(self)


def check_float32_dense(dense):
    """Raises a `ValueError` unless `float32_dense` can compute `dense`."""
    mode = dense.quantization_mode
    if type(dense) is not keras.layers.Dense or mode not in FLOAT32_MODES:
        raise ValueError(
            '`router_dtype="float32"` computes a router `Dense` layer in '
            "float32 with Keras's own code for a float, int8 or int4 `Dense` "
            "(LoRA included); it cannot reproduce this router in float32: use "
            '`router_dtype="compute"`. Received: router_dtype="float32", layer '
            f"{dense.path!r} of type {type(dense).__name__} with "
            f"quantization_mode={mode!r}"
        )


def float32_dense(dense, inputs):
    """`dense(inputs)` computed in float32 (see the module's docstring).

    Decided at each call, so a router quantized after `sparsify` is
    computed as quantized.

    Args:
        dense: A built `keras.layers.Dense`, float, int8 or int4, with or
            without LoRA.
        inputs: `(n, d)` tensor of any float dtype.

    Returns:
        `(n, units)` float32 tensor.
    """
    check_float32_dense(dense)
    mode = dense.quantization_mode
    # As `Layer.quantized_call` picks `_int8_call` or `_int4_call`.
    call = getattr(keras.layers.Dense, "call" if mode is None else f"_{mode}_call")
    with AutocastScope(None):
        return call(_Float32View(dense), ops.cast(inputs, "float32"))

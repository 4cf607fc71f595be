"""The one routing core of keras-moe.

Every layer computes its experts' inputs and its gate logits and hands both to
this module, which owns the mixture: gate logits -> gate weights -> combine.
No layer re-derives any of it.

Router arithmetic (logits, activations, auxiliary losses) runs in float32
whatever the layer's dtype policy; the mixed expert outputs are cast back to
the layer's compute dtype.

Einsum legend: `n` tokens (flattened leading axes), `e` experts, `u` units,
`b` batch, `s` flattened spatial positions, `f` filters, `k` experts per filter.
"""

from keras import ops


def gate_logits(inputs, kernel, bias=None):
    """Router logits `z = x . V + b` in float32.

    Args:
        inputs: `(n, d)` tensor, any float dtype.
        kernel: `(d, g)` float32 gating kernel (`g` gates).
        bias: optional `(g,)` float32 gating bias.

    Returns:
        `(n, g)` float32 logits.
    """
    logits = ops.matmul(ops.cast(inputs, "float32"), ops.cast(kernel, "float32"))
    if bias is not None:
        logits = logits + ops.cast(bias, "float32")
    return logits


def gate_values(logits, activation):
    """The gate values `g(z)` of the soft mixture, in float32.

    `activation` acts on the last axis (the experts), so `"softmax"` gives
    gates that sum to one over the experts of each token or filter.
    """
    return ops.cast(activation(ops.cast(logits, "float32")), "float32")


def soft_mixture(expert_outputs, gates):
    """Soft mixture over all experts: `y[n, u] = sum_e g[n, e] * h[n, e, u]`.

    Args:
        expert_outputs: `(n, e, u)` expert outputs in the compute dtype.
        gates: `(n, e)` gate values.
    """
    gates = ops.cast(gates, expert_outputs.dtype)
    return ops.einsum("neu,ne->nu", expert_outputs, gates)


def soft_mixture_per_filter(expert_outputs, gates):
    """Per-filter soft mixture of convolutional experts.

    `y[b, s, f] = sum_k g[b, (s,) f, k] * h[b, s, f, k]`.

    Args:
        expert_outputs: `(b, s, f, k)` expert outputs in the compute dtype.
        gates: `(b, f, k)` gates shared by every position, or `(b, s, f, k)`
            gates per position.
    """
    gates = ops.cast(gates, expert_outputs.dtype)
    if len(gates.shape) == 3:
        return ops.einsum("bsfk,bfk->bsf", expert_outputs, gates)
    return ops.sum(expert_outputs * gates, axis=-1)

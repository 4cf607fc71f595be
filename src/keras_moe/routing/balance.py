"""Loss-free load balancing by a router bias (DeepSeek-V3, Wang et al. 2024).

A non-trainable per-expert bias `b` is added to the router logits `z` for
choosing the experts only: token `t` goes to the `top_k` experts of largest
`z[t] + b`, with gate weights from the unbiased `z` (the softmax over the
chosen experts' `z`, or the full softmax of `z` at them). After every
training step each expert's bias moves by

    b_e <- b_e + rate * sign(mean load - load_e)

(`load_e` the assignments expert `e` got in the step), so an overloaded
expert becomes less attractive and an idle one more, with no loss term and
outside the optimizer: it works with any optimizer, with a learning rate of
0, and with `load_balance_weight=0`.

A router uses it in three places: `balanced_top_k_gates` instead of
`gates.top_k_gates`, `update_balance_bias` in training after counting the
assignments, and the bias variable (non-trainable, float32, zeros) saved
with its other variables.
"""

from keras import ops


def balanced_top_k_gates(logits, bias, top_k, normalize_top_k=True):
    """Top-k selection on `logits + bias`, weights from the unbiased logits.

    `bias=None` is `gates.top_k_gates(logits, top_k, normalize_top_k)`.

    Args:
        logits: `(n, E)` gate logits.
        bias: `(E,)` balance bias (no gradient flows into it), or None.
        top_k: Python int, experts per token.
        normalize_top_k: Python bool: the chosen experts' weights are the
            softmax over their (unbiased) logits if `True`, the full softmax's
            values at them if `False`.

    Returns:
        `(weights, experts, probs)`: `(n, top_k)` weights, `(n, top_k)` int32
        experts (best biased score first) and the `(n, E)` full softmax of
        the unbiased logits, the first and last in the logits' dtype.
    """
    logits = ops.convert_to_tensor(logits)
    probs = ops.softmax(logits, axis=-1)
    scores = logits
    if bias is not None:
        scores = logits + ops.stop_gradient(ops.cast(bias, logits.dtype))
    _, experts = ops.top_k(scores, top_k)
    experts = ops.cast(experts, "int32")
    chosen = ops.take_along_axis(logits, experts, axis=-1)
    if normalize_top_k and top_k == 1:
        weights = ops.ones_like(chosen)
    elif normalize_top_k:
        weights = ops.softmax(chosen, axis=-1)
    else:
        weights = ops.take_along_axis(probs, experts, axis=-1)
    return weights, experts, probs


def balance_bias_delta(counts, rate):
    """`rate * sign(mean(counts) - counts)`, `(E,)` float32.

    Computed as `sign(sum(counts) - E * counts)`: exact for integer counts
    (below 2**24), so an expert exactly at the mean does not move. No
    assignment at all (every token masked) moves nothing.
    """
    counts = ops.cast(counts, "float32")
    n_experts = counts.shape[-1]
    return rate * ops.sign(ops.sum(counts) - n_experts * counts)


def update_balance_bias(bias, counts, rate):
    """Moves the bias variable by `balance_bias_delta(counts, rate)`.

    Called by the router inside its training call (after it counted the
    step's assignments), so the update is part of the training step: it
    survives `jit_compile` and JAX's stateless step, as the routing
    statistics do.

    Args:
        bias: the `(E,)` float32 non-trainable bias variable.
        counts: `(E,)` assignments per expert in this step (unmasked tokens).
        rate: Python float, the step size.
    """
    delta = ops.stop_gradient(balance_bias_delta(counts, rate))
    bias.assign(bias.value + delta)

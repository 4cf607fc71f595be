"""Soft MoE's routing (Puigcerver et al. 2023): slots that mix the tokens.

Per sequence `X` `(n, d)`: logits `L = X . Phi` `(n, s)` over `s` slots,
dispatch weights `D = softmax(L)` over the tokens (each slot's input is a
convex combination of the tokens, `D^T X`) and combine weights
`C = softmax(L)` over the slots (each token's output is a convex
combination of the slots' outputs). With normalisation (the paper's, for
large `d`), `L = scale * l2n(X) . l2n(Phi)`, each token and each slot's
column scaled to unit norm. All of it in float32.

Einsum legend: `b` sequences, `n` tokens, `s` slots, `d` features.
"""

from keras import ops

from keras_moe.routing.losses import masked_mean

# Added to the squared norm under the square root, as in the paper's code.
NORMALIZE_EPSILON = 1e-6

# Below any float32 logit, and finite: `LOWEST - LOWEST` is 0.
LOWEST = -1e30


def l2_normalize(x, axis=-1, epsilon=NORMALIZE_EPSILON):
    """`x / sqrt(sum(x^2, axis) + epsilon)`."""
    return x * ops.rsqrt(ops.sum(ops.square(x), axis=axis, keepdims=True) + epsilon)


def soft_slot_logits(inputs, kernel, scale=None):
    """Float32 logits `(b, n, s)` of `(b, n, d)` inputs and a `(d, s)` kernel.

    `X . Phi` when `scale` is None, else `scale * l2n(X) . l2n(Phi)` (rows of
    `X`, columns of `Phi` normalised).
    """
    inputs = ops.cast(inputs, "float32")
    kernel = ops.cast(kernel, "float32")
    if scale is not None:
        inputs = l2_normalize(inputs, axis=-1)
        kernel = ops.cast(scale, "float32") * l2_normalize(kernel, axis=0)
    return ops.einsum("bnd,ds->bns", inputs, kernel)


def soft_slot_weights(logits, mask=None):
    """Dispatch and combine weights `(b, n, s)` of float32 logits.

    Args:
        logits: `(b, n, s)` slot logits.
        mask: optional `(b, n)` bool; masked tokens take no part in any
            slot's input (zero dispatch weight) and get zero combine
            weights. A slot of a sequence without an unmasked token gets a
            zero input.

    Returns:
        `(dispatch, combine)`: `dispatch` sums to one over the (unmasked)
        tokens of each slot, `combine` to one over the slots of each
        (unmasked) token.
    """
    logits = ops.cast(logits, "float32")
    combine = ops.softmax(logits, axis=-1)
    if mask is None:
        return ops.softmax(logits, axis=1), combine
    valid = ops.expand_dims(ops.cast(mask, "bool"), -1)
    # Softmax over the unmasked tokens only, shifted by their largest logit
    # (`LOWEST` in an all-masked or empty sequence: a reduction with an
    # initial value, so that empty batches and sequences need no special
    # case). Masked logits are replaced by the shift before the exponential
    # (no overflow, so no NaN in the gradient of `where`), and an all-masked
    # sequence divides zero by one.
    unmasked = ops.where(valid, logits, LOWEST)
    shift = ops.max(unmasked, axis=1, keepdims=True, initial=LOWEST)
    shift = ops.stop_gradient(shift)
    logits = ops.where(valid, logits, shift)
    exp = ops.where(valid, ops.exp(logits - shift), 0.0)
    total = ops.sum(exp, axis=1, keepdims=True)
    dispatch = exp / ops.where(total > 0, total, 1.0)
    return dispatch, ops.where(valid, combine, 0.0)


def soft_slot_statistics(combine, n_experts, mask=None):
    """Soft MoE's routing statistics, float32 without gradient: the
    `expert_load`, `dropped_fraction` and `router_entropy` of
    `routing.RoutingStatistics`.

    Every token reaches every expert, so the load of expert `e` is its share
    of the combine weights (`sum` over its slots, mean over the unmasked
    tokens; the shares sum to one), the dropped fraction is 0, and the
    entropy is the mean over the tokens of the entropy (nats) of those
    per-expert shares (`log E` when a token mixes all experts evenly).

    Args:
        combine: `(b, n, E * slots_per_expert)` combine weights, slot `j` of
            expert `e` at `e * slots_per_expert + j`.
        n_experts: Python int.
        mask: optional `(b, n)` bool.
    """
    combine = ops.cast(combine, "float32")
    shares = ops.sum(
        ops.reshape(combine, (-1, n_experts, combine.shape[-1] // n_experts)), axis=-1
    )
    flat_mask = None if mask is None else ops.reshape(mask, (-1,))
    load = masked_mean(shares, flat_mask)
    load = load / ops.maximum(ops.sum(load), 1e-30)
    entropy = -ops.sum(shares * ops.log(ops.maximum(shares, 1e-30)), axis=-1)
    return {
        "expert_load": ops.stop_gradient(load),
        "dropped_fraction": ops.zeros((), "float32"),
        "router_entropy": ops.stop_gradient(masked_mean(entropy, flat_mask)),
    }

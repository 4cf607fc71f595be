"""Auxiliary losses and routing statistics, in float32, over unmasked tokens.

A batch without any (unmasked) token gives zero losses and statistics, as an
empty batch gives `Dense` an empty output.
"""

from keras import ops


def _token_weights(mask, n):
    if mask is None:
        return None
    return ops.cast(ops.reshape(mask, (n,)), "float32")


def masked_mean(values, mask=None):
    """Mean over the tokens (axis 0) of the unmasked tokens; 0 for none."""
    values = ops.cast(values, "float32")
    if mask is None:
        count = ops.cast(ops.shape(values)[0], "float32")
        return ops.sum(values, axis=0) / ops.maximum(count, 1.0)
    weights = _token_weights(mask, ops.shape(values)[0])
    if len(values.shape) > 1:
        weights = ops.expand_dims(weights, -1)
    total = ops.sum(values * weights, axis=0)
    return total / ops.maximum(ops.sum(weights), 1.0)


def load_balance_loss(probs, group_sizes, mask=None):
    """Load-balancing loss `E * sum_i f_i * P_i`, in float32 (1.0 at balance).

    `f_i` is expert `i`'s share of the `tokens * k` assignments and `P_i` the
    mean full-softmax probability of expert `i`, both over unmasked tokens
    only. Only `P` carries a gradient.

    Args:
        probs: `(n, e)` full softmax of the gate logits.
        group_sizes: `(e,)` assignments per expert (unmasked tokens only).
        mask: optional `(n,)` bool mask, `False` for tokens to ignore.
    """
    n_experts = probs.shape[-1]
    group_sizes = ops.stop_gradient(ops.cast(group_sizes, "float32"))
    f = group_sizes / ops.maximum(ops.sum(group_sizes), 1.0)
    p = masked_mean(probs, mask)
    return n_experts * ops.sum(f * p)


def router_z_loss(logits, mask=None):
    """Router z-loss (ST-MoE): mean over tokens of `logsumexp(z)^2`, float32."""
    z = ops.logsumexp(ops.cast(logits, "float32"), axis=-1)
    return masked_mean(ops.square(z), mask)


def router_entropy(logits, mask=None):
    """Mean over tokens of the entropy (nats) of the full softmax, float32."""
    logits = ops.cast(logits, "float32")
    entropy = -ops.sum(ops.softmax(logits) * ops.log_softmax(logits), axis=-1)
    return masked_mean(entropy, mask)


def expert_counts(experts, n_experts, mask=None):
    """`(e,)` int32 assignments per expert of `(n, k)` chosen experts.

    A segment sum over the `n * k` assignments (no one-hot over the experts);
    masked tokens count for no expert.
    """
    ones = ops.ones_like(experts)
    if mask is not None:
        ones = ones * ops.cast(ops.expand_dims(ops.reshape(mask, (-1,)), 1), "int32")
    return ops.cast(
        ops.segment_sum(
            ops.reshape(ones, (-1,)),
            ops.reshape(experts, (-1,)),
            num_segments=n_experts,
        ),
        "int32",
    )

"""keras-moe's fast paths for the torch backend (see `keras_moe.backend`)."""


def batch_jacobian(fn, x):
    """Per-sample Jacobians `(batch, *out, *in)` of a function applied row-wise.

    `fn` maps a batch `(batch, *in)` to `(batch, *out)` with every output row
    depending only on its own input row (a layer without cross-sample
    interaction). PyTorch: `torch.func.jacrev` (a vmap over the backward pass)
    of the output summed over the batch, which by that independence holds each
    sample's Jacobian; the forward pass runs once, outside any vmap, so a layer
    may still build (draw its initial weights) inside.
    """
    import torch

    x = torch.as_tensor(x)
    jacobian = torch.func.jacrev(lambda x: fn(x).sum(0))(x)
    return jacobian.movedim(jacobian.ndim - x.ndim, 0)


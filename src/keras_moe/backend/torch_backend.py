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


def _grouped_mm_available():
    import torch

    return hasattr(torch, "_grouped_mm")


if _grouped_mm_available():

    def grouped_matmul(x, kernel, group_ends):
        """Rows sorted by group times their group's kernel: `(r, d) -> (r, m)`.

        `kernel` is `(g, d, m)` and `group_ends` the `(g,)` cumulative row
        counts; rows past `group_ends[-1]` are left undefined. PyTorch:
        `torch._grouped_mm` (no padding, no weight copies), with `d` and `m`
        zero-padded to its 16-byte alignment where needed.
        """
        import torch

        x = torch.as_tensor(x)
        kernel = torch.as_tensor(kernel, dtype=x.dtype, device=x.device)
        align = max(1, 16 // x.element_size())
        d, m = kernel.shape[1], kernel.shape[2]
        pad_d, pad_m = -d % align, -m % align
        if pad_d:
            x = torch.nn.functional.pad(x, (0, pad_d))
            kernel = torch.nn.functional.pad(kernel, (0, 0, 0, pad_d))
        if pad_m:
            kernel = torch.nn.functional.pad(kernel, (0, pad_m))
        offsets = torch.as_tensor(group_ends, device=x.device).to(torch.int32)
        y = torch._grouped_mm(x.contiguous(), kernel.contiguous(), offs=offsets)
        y = _ContiguousGrad.apply(y)
        return y[:, :m] if pad_m else y

    def grouped_matmul_available():
        """Whether `grouped_matmul` can run now: not under `torch.compile`,
        whose CPU meta kernel of `torch._grouped_mm` accepts bfloat16 only."""
        import torch

        return not torch.compiler.is_compiling()

    def _contiguous_grad_function():
        import torch

        class ContiguousGrad(torch.autograd.Function):
            # `torch._grouped_mm`'s backward rejects broadcast (stride-0)
            # gradients, such as the gradient of a sum.
            @staticmethod
            def forward(ctx, y):
                return y.view_as(y)

            @staticmethod
            def backward(ctx, grad):
                return grad.contiguous()

        return ContiguousGrad

    _ContiguousGrad = _contiguous_grad_function()

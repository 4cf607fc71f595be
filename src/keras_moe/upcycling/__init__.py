"""Sparse upcycling: a mixture of experts started from a trained dense network.

Every expert starts as a copy of the dense feed-forward block, behind a new
router whose top-k weights sum to one, so the upcycled model computes what
the dense one computed and training continues from its quality
(Komatsuzaki et al., 2022).

- `upcycle_feed_forward` (`feed_forward.py`): a dense feed-forward block,
  given by its kernels or `Dense` layers, into an `MoEFeedForward`;
  `expert_copies` the copies of one kernel.
- `keras_moe.upcycling.kerashub` (needs keras-hub, the `kerashub` extra; not
  imported here): `upcycle(backbone, n_experts)`, a dense KerasHub backbone
  (Mistral, Llama, Qwen3) into KerasHub's MoE backbone of the same family,
  with its target configs in `kerashub_targets.py`;
  `kerashub_causal_lm.upcycle_causal_lm`, the same for a `CausalLM` with its
  preprocessor. Both are also `keras_moe.kerashub.upcycle` and
  `keras_moe.kerashub.upcycle_causal_lm`.
"""

from keras_moe.upcycling.feed_forward import expert_copies
from keras_moe.upcycling.feed_forward import upcycle_feed_forward

__all__ = ["expert_copies", "upcycle_feed_forward"]

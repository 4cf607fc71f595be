"""KerasHub models with keras-moe's sparse routing (the `kerashub` extra).

`sparsify(model)` makes the MoE blocks of a KerasHub model (Mixtral,
Qwen1.5/2-MoE, Qwen3-MoE, Qwen3.5-MoE, GPT-OSS, Gemma 4) run each token's
top-k experts only, on the model's own weights, with the same outputs. Needs
keras-hub 0.32 (`pip install keras-moe[kerashub]`); `import keras_moe` does
not import this package or keras-hub.

`upcycle(backbone, n_experts)` turns a dense KerasHub backbone (Mistral,
Llama, Qwen3) into its MoE sibling (Mixtral, Qwen3-MoE) with the same outputs
at initialisation; `upcycle_causal_lm` does it for a task model with its
preprocessor (both live with the rest of the upcycling code, in
`keras_moe.upcycling`).
"""

from keras_moe.kerashub.sparsify import SUPPORTED_KERAS_HUB
from keras_moe.kerashub.sparsify import sparsify
from keras_moe.upcycling.kerashub import upcycle
from keras_moe.upcycling.kerashub_causal_lm import upcycle_causal_lm

__all__ = ["SUPPORTED_KERAS_HUB", "sparsify", "upcycle", "upcycle_causal_lm"]

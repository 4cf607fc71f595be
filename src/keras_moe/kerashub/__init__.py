"""KerasHub models with keras-moe's sparse routing (the `kerashub` extra).

`sparsify(model)` makes the MoE blocks of a KerasHub model (Mixtral,
Qwen1.5/2-MoE, Qwen3-MoE, Qwen3.5-MoE, GPT-OSS, Gemma 4) run each token's
top-k experts only, on the model's own weights, with the same outputs. Needs
keras-hub 0.32 (`pip install keras-moe[kerashub]`); `import keras_moe` does
not import this package or keras-hub.
"""

from keras_moe.kerashub.sparsify import SUPPORTED_KERAS_HUB
from keras_moe.kerashub.sparsify import sparsify

__all__ = ["SUPPORTED_KERAS_HUB", "sparsify"]

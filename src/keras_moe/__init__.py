"""keras-moe: mixture-of-experts layers for Keras 3 on JAX, PyTorch and TensorFlow."""

from keras_moe import blocks
from keras_moe import callbacks
from keras_moe import compat
from keras_moe import routing
from keras_moe import upcycling
from keras_moe.distribution import expert_parallel_layout_map
from keras_moe.layers import Conv1DMoE
from keras_moe.layers import Conv2DMoE
from keras_moe.layers import Conv3DMoE
from keras_moe.layers import DenseMoE
from keras_moe.layers import FeedForwardExperts
from keras_moe.layers import MoEFeedForward
from keras_moe.layers import SharedExpert
from keras_moe.layers import SoftMoE
from keras_moe.version import __version__

__all__ = [
    "Conv1DMoE",
    "Conv2DMoE",
    "Conv3DMoE",
    "DenseMoE",
    "FeedForwardExperts",
    "MoEFeedForward",
    "SharedExpert",
    "SoftMoE",
    "__version__",
    "blocks",
    "callbacks",
    "compat",
    "expert_parallel_layout_map",
    "routing",
    "upcycling",
]

from keras_moe.layers.conv1d_moe import Conv1DMoE
from keras_moe.layers.conv2d_moe import Conv2DMoE
from keras_moe.layers.conv3d_moe import Conv3DMoE
from keras_moe.layers.dense_moe import DenseMoE
from keras_moe.layers.feed_forward_experts import FeedForwardExperts
from keras_moe.layers.moe_feed_forward import MoEFeedForward
from keras_moe.layers.shared_expert import SharedExpert
from keras_moe.layers.soft_moe import SoftMoE

__all__ = [
    "Conv1DMoE",
    "Conv2DMoE",
    "Conv3DMoE",
    "DenseMoE",
    "FeedForwardExperts",
    "MoEFeedForward",
    "SharedExpert",
    "SoftMoE",
]

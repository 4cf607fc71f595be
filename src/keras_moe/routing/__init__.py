"""The one routing core of keras-moe.

Every layer computes its experts' inputs and its gate logits and hands both
to this package, which owns the mixture: gate logits -> gate weights ->
combine. No layer re-derives any of it.

- `gates`: router logits, gate values, the soft mixtures, top-k selection.
- `losses`: the balancing losses and routing statistics.
- `layouts`: the sorted assignments and the dispatch layouts.
- `dispatch`: `sparse_mixture`, which runs each token through its chosen
  experts only.
- `groups`: GShard's routing groups under a `keras.distribution`.
- `router`: `TopKRouter`, the sublayer of the sparse layers.
- `expert_choice`: expert-choice routing (each expert picks its tokens) and
  `ExpertChoiceRouter`.
- `balance`: loss-free balancing by a router bias (DeepSeek-V3).
- `soft_slots`: Soft MoE's slots, the routing of `SoftMoE`.
- `statistics`: routing statistics kept in a layer's variables.
"""

from keras_moe.routing.balance import balance_bias_delta
from keras_moe.routing.balance import balanced_top_k_gates
from keras_moe.routing.balance import update_balance_bias
from keras_moe.routing.dispatch import DROPLESS_CAPACITY_FACTORS
from keras_moe.routing.dispatch import LAYOUTS
from keras_moe.routing.dispatch import sparse_mixture
from keras_moe.routing.expert_choice import ExpertChoiceLayout
from keras_moe.routing.expert_choice import ExpertChoiceRouter
from keras_moe.routing.expert_choice import expert_choice_capacity
from keras_moe.routing.expert_choice import expert_choice_gates
from keras_moe.routing.expert_choice import expert_choice_mixture
from keras_moe.routing.expert_choice import expert_choice_statistics
from keras_moe.routing.gates import gate_logits
from keras_moe.routing.gates import gate_values
from keras_moe.routing.gates import noisy_logits
from keras_moe.routing.gates import soft_mixture
from keras_moe.routing.gates import soft_mixture_per_filter
from keras_moe.routing.gates import top_k_gates
from keras_moe.routing.groups import distribution_groups
from keras_moe.routing.layouts import Assignments
from keras_moe.routing.layouts import BlockLayout
from keras_moe.routing.layouts import CapacityLayout
from keras_moe.routing.layouts import EmptyLayout
from keras_moe.routing.layouts import Layout
from keras_moe.routing.layouts import RowLayout
from keras_moe.routing.layouts import default_block_size
from keras_moe.routing.layouts import expert_capacity
from keras_moe.routing.losses import expert_counts
from keras_moe.routing.losses import load_balance_loss
from keras_moe.routing.losses import router_entropy
from keras_moe.routing.losses import router_z_loss
from keras_moe.routing.losses import routing_statistics
from keras_moe.routing.router import TopKRouter
from keras_moe.routing.soft_slots import soft_slot_logits
from keras_moe.routing.soft_slots import soft_slot_statistics
from keras_moe.routing.soft_slots import soft_slot_weights

__all__ = [
    "DROPLESS_CAPACITY_FACTORS",
    "LAYOUTS",
    "Assignments",
    "BlockLayout",
    "CapacityLayout",
    "EmptyLayout",
    "ExpertChoiceLayout",
    "ExpertChoiceRouter",
    "Layout",
    "RowLayout",
    "TopKRouter",
    "balance_bias_delta",
    "balanced_top_k_gates",
    "default_block_size",
    "distribution_groups",
    "expert_capacity",
    "expert_choice_capacity",
    "expert_choice_gates",
    "expert_choice_mixture",
    "expert_choice_statistics",
    "expert_counts",
    "gate_logits",
    "gate_values",
    "load_balance_loss",
    "noisy_logits",
    "router_entropy",
    "router_z_loss",
    "routing_statistics",
    "soft_mixture",
    "soft_mixture_per_filter",
    "soft_slot_logits",
    "soft_slot_statistics",
    "soft_slot_weights",
    "sparse_mixture",
    "top_k_gates",
    "update_balance_bias",
]

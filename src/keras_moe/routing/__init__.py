"""The one routing core of keras-moe.

Every layer computes its experts' inputs and its gate logits and hands both
to this package, which owns the mixture: gate logits -> gate weights ->
dispatch -> the expert bank -> combine. No layer re-derives any of it.

- `base_router`: `BaseRouter`, what every router has (kernel, bias, logits
  in float32, losses, statistics, config).
- `top_k_router`: `TopKRouter`, token choice (each token picks its experts).
- `expert_choice_router`: `ExpertChoiceRouter`, expert choice (each expert
  picks its tokens); `expert_choice` its functions.
- `gates`: router logits, gate values, the soft mixtures, top-k selection.
- `losses`: the balancing losses.
- `balance`: loss-free balancing by a router bias (DeepSeek-V3).
- `statistics`: `RoutingStatistics`, the routing statistics sublayer.
- `dispatch`: `choose_layout` (which layout runs), `plan_dispatch` and
  `sparse_mixture` (running each token through its chosen experts only).
- `layouts`: the sorted assignments and the dispatch layouts, and the
  `Layout` interface an expert bank runs on.
- `groups`: GShard's routing groups under a `keras.distribution`.
- `soft_slots`: Soft MoE's slots, the routing of `SoftMoE`.
"""

from keras_moe.routing.balance import balance_bias_delta
from keras_moe.routing.balance import balanced_top_k_gates
from keras_moe.routing.balance import update_balance_bias
from keras_moe.routing.base_router import BaseRouter
from keras_moe.routing.dispatch import DROPLESS_CAPACITY_FACTORS
from keras_moe.routing.dispatch import LAYOUTS
from keras_moe.routing.dispatch import TieredPlan
from keras_moe.routing.dispatch import choose_layout
from keras_moe.routing.dispatch import plan_dispatch
from keras_moe.routing.dispatch import sparse_mixture
from keras_moe.routing.expert_choice import ExpertChoiceLayout
from keras_moe.routing.expert_choice import expert_choice_capacity
from keras_moe.routing.expert_choice import expert_choice_gates
from keras_moe.routing.expert_choice import expert_choice_mixture
from keras_moe.routing.expert_choice import expert_choice_statistics
from keras_moe.routing.expert_choice_router import ExpertChoiceRouter
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
from keras_moe.routing.soft_slots import soft_slot_logits
from keras_moe.routing.soft_slots import soft_slot_statistics
from keras_moe.routing.soft_slots import soft_slot_weights
from keras_moe.routing.statistics import RoutingStatistics
from keras_moe.routing.top_k_router import TopKRouter

__all__ = [
    "DROPLESS_CAPACITY_FACTORS",
    "LAYOUTS",
    "Assignments",
    "BaseRouter",
    "BlockLayout",
    "CapacityLayout",
    "EmptyLayout",
    "ExpertChoiceLayout",
    "ExpertChoiceRouter",
    "Layout",
    "RoutingStatistics",
    "RowLayout",
    "TieredPlan",
    "TopKRouter",
    "balance_bias_delta",
    "balanced_top_k_gates",
    "choose_layout",
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
    "plan_dispatch",
    "router_entropy",
    "router_z_loss",
    "soft_mixture",
    "soft_mixture_per_filter",
    "soft_slot_logits",
    "soft_slot_statistics",
    "soft_slot_weights",
    "sparse_mixture",
    "top_k_gates",
    "update_balance_bias",
]

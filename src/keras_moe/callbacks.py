"""Callbacks that watch sparse mixture-of-experts layers while they train."""

import csv
import os

import keras
import numpy as np

from keras_moe import routing
from keras_moe.layers.soft_moe import SoftMoE

# Every layer that keeps its own routing statistics: the routers (any
# `BaseRouter`, custom ones included) and Soft MoE.
_ROUTING_LAYERS = (routing.BaseRouter, SoftMoE)


def layer_paths(model):
    """`{path: layer}` for every layer inside `model`, depth first, in order.

    A layer's path is the names from the model down to it joined by `/`
    (`"encoder/moe"` for the layer `moe` of the sub-model `encoder`; a layer
    directly in the model goes by its name). Keras names hold no `/`, so a
    path names one place; sibling layers given one name (which Keras allows
    in a subclassed layer) get `_2`, `_3`, ... after the later ones' paths.
    A layer reached twice (a shared sub-model) keeps its first path.
    """
    paths, seen = {}, set()

    def visit(layer, prefix):
        for child in layer._flatten_layers(include_self=False, recursive=False):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = base = f"{prefix}{child.name}"
            number = 2
            while path in paths:
                path, number = f"{base}_{number}", number + 1
            paths[path] = child
            visit(child, f"{path}/")

    visit(model, "")
    return paths


def sparse_routers(model):
    """`{path: router}` for every built router of `model` (a
    `routing.BaseRouter`: `TopKRouter`, `ExpertChoiceRouter` or a custom
    one) and every built `SoftMoE`, keyed by their paths in the model (see
    `layer_paths`).

    A router that is a layer's `router` sublayer (as in `DenseMoE` with
    `top_k` and `MoEFeedForward`) goes by that layer's path, any other by
    its own.
    """
    paths = layer_paths(model)
    hosts = {}
    for path, layer in paths.items():
        router = getattr(layer, "router", None)
        if isinstance(router, _ROUTING_LAYERS):
            hosts.setdefault(id(router), path)
    return {
        hosts.get(id(layer), path): layer
        for path, layer in paths.items()
        if isinstance(layer, _ROUTING_LAYERS) and layer.built
    }


class ExpertUsage(keras.callbacks.Callback):
    """Records each sparse MoE layer's expert usage per epoch.

    At the end of every epoch it reads, for each sparse `DenseMoE`,
    `MoEFeedForward` (any router) and `SoftMoE` of the model, and any other
    router (a `routing.BaseRouter`), the mean routing statistics
    of that epoch's training steps (`layer.routing_stats_mean()`), adds them
    to the epoch's `logs` (so `History`, `CSVLogger` and the like that come
    after it see them), appends them to a CSV file and redraws a heatmap of
    every expert's load per epoch (PNG): a collapsed router shows as one
    bright row. (An expert-choice router's load is even by construction;
    its `dropped_fraction` is the share of tokens no expert took. Soft MoE's
    load is each expert's share of the combine weights.)

    Each layer goes by its path in the model: its name for a layer directly
    in the model (`"ffn"`), the names from the model down to it joined by
    `/` for one inside a sub-model or another layer (`"encoder/moe"`), so
    that layers of one name in different sub-models are reported apart (a
    sparse layer's router sublayer is reported as that layer).

    Logged per layer `name` (its path): `name_max_load` (the busiest expert's share of
    the assignments times `n_experts`: 1.0 is perfect balance, `n_experts`
    total collapse), `name_dropped_fraction` and `name_router_entropy`; for
    a router with `balance_bias_rate`, `name_balance_bias_range` (largest
    minus smallest bias), its bias at each epoch's end kept in
    `balance_biases[name]` `(epochs, E)` as `loads[name]` keeps the loads.

    The statistics live in each layer's non-trainable variables, updated
    inside the training step, so this works under `jit_compile` on every
    backend. (Keras 3 has no `add_metric`, and metrics updated inside a layer's
    `call` are lost in JAX's stateless training step, so they are not
    `keras.metrics.Metric` objects.)

    Args:
        csv_path: Optional path of the CSV file (one row per layer and epoch:
            `epoch, layer, steps, dropped_fraction, router_entropy, max_load,
            load_0 ... load_{E-1}`). Overwritten when training begins.
        heatmap_path: Optional path of the PNG heatmap, redrawn every epoch.

    Example:

    >>> import numpy as np, keras
    >>> from keras_moe import MoEFeedForward
    >>> from keras_moe.callbacks import ExpertUsage
    >>> model = keras.Sequential([keras.Input((4, 8)), MoEFeedForward(16, 4)])
    >>> model.compile("adam", "mse")
    >>> usage = ExpertUsage()
    >>> history = model.fit(np.ones((8, 4, 8)), np.ones((8, 4, 8)),
    ...                     epochs=2, verbose=0, callbacks=[usage])
    >>> usage.loads[model.layers[0].name].shape  # (epochs, experts)
    (2, 4)
    """

    def __init__(self, csv_path=None, heatmap_path=None):
        super().__init__()
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        self.heatmap_path = None if heatmap_path is None else os.fspath(heatmap_path)
        self.loads = {}
        self.balance_biases = {}
        self.epochs = []

    def on_train_begin(self, logs=None):
        self._routers = sparse_routers(self.model)
        self.loads = {
            name: np.zeros((0, router.n_experts))
            for name, router in self._routers.items()
        }
        self.balance_biases = {}
        self.epochs = []
        if self.csv_path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.csv_path)), exist_ok=True)
            width = max([r.n_experts for r in self._routers.values()], default=0)
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(
                    [
                        "epoch",
                        "layer",
                        "steps",
                        "dropped_fraction",
                        "router_entropy",
                        "max_load",
                    ]
                    + [f"load_{i}" for i in range(width)]
                )

    def on_epoch_begin(self, epoch, logs=None):
        for router in self._routers.values():
            router.reset_routing_stats()

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        rows = []
        for name, router in self._routers.items():
            stats = router.routing_stats_mean()
            if stats is None:
                continue
            load = np.asarray(stats["expert_load"], "float64")
            max_load = float(load.max() * router.n_experts)
            logs[f"{name}_max_load"] = max_load
            logs[f"{name}_dropped_fraction"] = stats["dropped_fraction"]
            logs[f"{name}_router_entropy"] = stats["router_entropy"]
            self.loads[name] = np.vstack([self.loads[name], load])
            if "balance_bias" in stats:
                bias = np.asarray(stats["balance_bias"], "float64")[None]
                previous = self.balance_biases.get(name, bias[:0])
                self.balance_biases[name] = np.vstack([previous, bias])
                logs[f"{name}_balance_bias_range"] = float(np.ptp(bias))
            rows.append(
                [
                    epoch,
                    name,
                    stats["steps"],
                    stats["dropped_fraction"],
                    stats["router_entropy"],
                    max_load,
                ]
                + [float(v) for v in load]
            )
        self.epochs.append(epoch)
        if self.csv_path is not None and rows:
            with open(self.csv_path, "a", newline="") as f:
                csv.writer(f).writerows(rows)
        if self.heatmap_path is not None and rows:
            self.plot(self.heatmap_path)

    def plot(self, path):
        """Draws every layer's expert load per epoch to `path` (PNG)."""
        # The object-oriented API with the Agg canvas: no pyplot global state.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = [name for name, load in self.loads.items() if len(load)]
        figure = Figure(
            figsize=(max(4.5, 2.0 + 0.4 * len(self.epochs)), 0.8 + 2.4 * len(names))
        )
        FigureCanvasAgg(figure)
        for i, name in enumerate(names):
            load = self.loads[name]
            n_experts = load.shape[1]
            ax = figure.add_subplot(len(names), 1, i + 1)
            image = ax.imshow(
                load.T * n_experts,
                aspect="auto",
                cmap="viridis",
                vmin=0.0,
                interpolation="nearest",
            )
            ax.set_title(f"{name}: expert load x n_experts (1 = balanced)", fontsize=8)
            ax.set_ylabel("expert")
            ax.set_xlabel("epoch")
            ax.set_xticks(range(len(load)))
            ax.set_xticklabels([str(e + 1) for e in self.epochs[-len(load) :]])
            figure.colorbar(image, ax=ax)
        figure.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=100)

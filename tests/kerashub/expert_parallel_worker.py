"""Run by test_expert_parallel.py in its own process: JAX, 8 simulated CPU
devices. For two families, a tiny sparsified backbone built under
`ModelParallel(expert_parallel_layout_map(...))` on a (2 batch, 4 expert)
mesh: its expert weights split along the experts over the expert axis, and
its outputs as those of the same weights on one device. Writes a JSON
report `{family: {"ok": bool, "detail": str}}` to `argv[1]`."""

import json
import sys
import traceback

import jax
import keras
import numpy as np

from keras_moe import expert_parallel_layout_map
from keras_moe.kerashub import sparsify
from tests.kerashub import families

EXPERT_SHARDS = 4
# Two kinds of sparsified block: a block with its expert bank (Mixtral's,
# as the Qwen families' and GPT-OSS's), and a router and an expert bank of
# their own in the decoder (Gemma 4). About a minute each, loaded machine.
FAMILIES = ["mixtral", "gemma4"]


def check(family):
    x = families.inputs(family)
    keras.distribution.set_distribution(None)
    one = families.backbone(family)
    families.randomize(one)
    weights = one.get_weights()
    sparsify(one)
    expected = keras.ops.convert_to_numpy(one(x))

    mesh = keras.distribution.DeviceMesh(
        (2, EXPERT_SHARDS), ["batch", "expert"], devices=jax.devices()
    )
    distribution = keras.distribution.ModelParallel(
        layout_map=expert_parallel_layout_map(mesh), batch_dim_name="batch"
    )
    with distribution.scope():
        model = families.backbone(family)
        model.set_weights(weights)
        sparsify(model)
        banks = [
            layer
            for layer in model._flatten_layers()
            if hasattr(layer, "expert_weight_axes")
        ]
        sharded = []
        for bank in banks:
            names = bank.expert_weight_axes()
            for variable in bank.weights:
                if variable.path.rpartition("/")[2] not in names:
                    continue
                shard = variable.value.sharding.shard_shape(tuple(variable.shape))
                if shard[0] * EXPERT_SHARDS != variable.shape[0]:
                    raise AssertionError(
                        f"{variable.path}: shard {shard} of {variable.shape}"
                    )
                sharded.append(variable.path)
        if not sharded:
            raise AssertionError("no expert weight found")
        actual = keras.ops.convert_to_numpy(model(x))
    keras.distribution.set_distribution(None)
    error = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max())
    if not error <= 1e-5 * scale:
        raise AssertionError(f"max error {error} of scale {scale}")
    return f"{len(sharded)} expert weights sharded; max error {error:.2e}"


def main(path):
    assert len(jax.devices()) == 8, jax.devices()
    report = {}
    for family in FAMILIES:
        try:
            report[family] = {"ok": True, "detail": check(family)}
        except Exception:
            report[family] = {"ok": False, "detail": traceback.format_exc()[-3000:]}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

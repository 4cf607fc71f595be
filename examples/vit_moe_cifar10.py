"""A small V-MoE style vision transformer on CIFAR-10, with the expert-usage heatmap.

Every other transformer block's feed-forward is a sparse `MoEFeedForward`
(top-2 of 8 experts, dropless, with the load-balancing loss), as in V-MoE
(Riquelme et al. 2021). `ExpertUsage` records each MoE layer's per-expert load
every epoch and draws it as a heatmap: a collapsed router shows as one bright
row.

    python examples/vit_moe_cifar10.py --quick          # a few minutes on a CPU
    python examples/vit_moe_cifar10.py --epochs 10 --train-size 20000

Data: `../shared/data/cifar10-jpeg.tar.gz` (an image-folder archive,
`train/<class>/*.jpg`, `test/<class>/*.jpg`) by default, read with
`keras_moe.experiments.data.load_cifar10`; `--data keras` downloads
`keras.datasets.cifar10` instead. Outputs go to `--out` (default
`results/vit_moe_cifar10/`): `expert_usage.csv`, `expert_usage.png`,
`history.json`.
"""

import argparse
import json
import pathlib

import keras
import numpy as np

from keras_moe import MoEFeedForward
from keras_moe.callbacks import ExpertUsage
from keras_moe.experiments.data import load_cifar10

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def transformer_block(x, dim, heads, mlp_dim, moe, index, dropout):
    h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    h = keras.layers.MultiHeadAttention(heads, dim // heads, dropout=dropout)(h, h)
    x = x + h
    h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    if moe:
        h = MoEFeedForward(
            mlp_dim,
            n_experts=moe["n_experts"],
            top_k=moe["top_k"],
            activation="gelu",
            load_balance_weight=moe["load_balance_weight"],
            name=f"moe_ffn_{index}",
        )(h)
    else:
        h = keras.layers.Dense(mlp_dim, activation="gelu")(h)
        h = keras.layers.Dense(dim)(h)
    return x + keras.layers.Dropout(dropout)(h)


def build_vit_moe(
    image_size=32,
    patch_size=4,
    dim=64,
    depth=4,
    heads=4,
    mlp_dim=128,
    n_experts=8,
    top_k=2,
    load_balance_weight=0.01,
    dropout=0.0,
    num_classes=10,
):
    """ViT with MoE feed-forwards in every other block (the odd ones)."""
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(dim, patch_size, strides=patch_size, name="patches")(x)
    n_patches = (image_size // patch_size) ** 2
    x = keras.layers.Reshape((n_patches, dim))(x)
    positions = keras.layers.Embedding(n_patches, dim, name="positions")(
        keras.ops.arange(n_patches)
    )
    x = x + positions
    moe = {
        "n_experts": n_experts,
        "top_k": top_k,
        "load_balance_weight": load_balance_weight,
    }
    for i in range(depth):
        x = transformer_block(
            x, dim, heads, mlp_dim, moe if i % 2 else None, i, dropout
        )
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="vit_moe")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="archive, folder or 'keras'"
    )
    parser.add_argument("--out", default=str(REPO / "results" / "vit_moe_cifar10"))
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="1024 train / 256 test images, 2 epochs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.epochs = 1024, 256, 2
        args.batch_size = 64
    return args


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    data = load_cifar10(
        None if args.data == "keras" else args.data,
        train_size=args.train_size,
        test_size=args.test_size,
        seed=args.seed,
    )
    print(
        f"CIFAR-10 from {data.source}: {len(data.x_train)} train, {len(data.x_test)} test"
    )
    model = build_vit_moe(n_experts=args.n_experts, top_k=args.top_k)
    model.compile(
        keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    out = pathlib.Path(args.out)
    usage = ExpertUsage(out / "expert_usage.csv", out / "expert_usage.png")
    history = model.fit(
        data.x_train.astype("float32"),
        data.y_train,
        validation_data=(data.x_test.astype("float32"), data.y_test),
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=[usage],
        verbose=2,
    )
    logs = {k: [float(v) for v in values] for k, values in history.history.items()}
    (out / "history.json").write_text(json.dumps(logs, indent=1))
    for name, load in usage.loads.items():
        print(
            f"{name}: last-epoch load x n_experts = {np.round(load[-1] * load.shape[1], 2)}"
        )
    print(
        f"val accuracy {logs['val_accuracy'][-1]:.3f}; heatmap: {out / 'expert_usage.png'}"
    )


if __name__ == "__main__":
    main()

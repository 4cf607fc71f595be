"""Sparse upcycling of a byte-level language model trained on Python's own sources.

Every machine has the data: the top-level modules of the Python standard
library (`pathlib.Path(os.__file__).parent.glob("*.py")`, sorted; every 10th
file is held out for validation), read as bytes (vocabulary 256, nothing is
downloaded or tokenized). A tiny Mistral-style decoder (KerasHub's
`MistralBackbone`: 2 layers, width 64, 4 query and 2 key/value heads, SwiGLU
feed-forward of 128) learns to predict the next byte of random 128-byte
windows. It trains dense for `--dense-steps`; then, from that checkpoint,
(a) `dense` continues as it is and (b) `upcycled` is the same model turned by
`keras_moe.upcycling.kerashub` into a `MixtralBackbone` whose every
feed-forward block is 8 copies of itself, top-2 (run sparse by
`keras_moe.kerashub.sparsify`); both train `--continue-steps` more steps on
the same batches, each with a fresh Adam of the same settings. Validation
loss (bits per byte) is recorded against steps and against training FLOPs
(analytic, 6 x the active multiply-adds per token: an MoE token runs top-k
experts and the router). `--repeats` repeats the whole protocol with seeds
seed+r (initialisation, batches, routers). At the upcycling point the
upcycled model's validation loss equals the dense one's (recorded).
"""

import math
import os
import pathlib
import sys
import time

import keras
import numpy as np

from keras_moe.experiments import checks
from keras_moe.experiments import common

DESCRIPTION = __doc__
QUERY_HEADS = 4
KEY_VALUE_HEADS = 2
ARMS = ("dense", "upcycled")
LABELS = {
    "pretrain": "dense, first phase",
    "dense": "dense, continued",
    "upcycled": "upcycled to MoE",
}


def add_arguments(parser):
    parser.add_argument("--dense-steps", type=common.positive_int, default=300)
    parser.add_argument("--continue-steps", type=common.positive_int, default=300)
    parser.add_argument("--experts", type=common.positive_int, default=8)
    parser.add_argument(
        "--top-k",
        type=common.positive_int,
        default=2,
        help="experts per token, at most --experts",
    )
    parser.add_argument(
        "--expert-noise",
        type=common.nonnegative_float,
        default=0.0,
        help="relative noise on the expert copies (breaks exactness)",
    )
    parser.add_argument("--layers", type=common.positive_int, default=2)
    parser.add_argument(
        "--hidden-dim",
        type=common.positive_int,
        default=64,
        help=f"model width, a multiple of {2 * QUERY_HEADS} ({QUERY_HEADS} heads of "
        "an even size, as the rotary embedding needs)",
    )
    parser.add_argument("--intermediate-dim", type=common.positive_int, default=128)
    parser.add_argument(
        "--sequence-length",
        type=common.positive_int,
        default=128,
        help="bytes per window; a window and its next byte must fit the "
        "validation bytes",
    )
    common.add_optimizer_arguments(parser, batch_size=16, learning_rate=3e-3)
    parser.add_argument(
        "--eval-every", type=common.positive_int, default=50, help="steps"
    )
    parser.add_argument(
        "--eval-windows",
        type=common.positive_int,
        default=64,
        help="validation windows (fixed, evenly spaced)",
    )
    parser.add_argument(
        "--all-experts",
        action="store_true",
        help="run KerasHub's Mixtral block as it is (every expert on every "
        "token) instead of keras_moe.kerashub.sparsify",
    )
    common.add_repeats_argument(parser, 1, "runs per arm")
    common.add_seed_argument(parser)


def stdlib_files():
    """The standard library's top-level modules, sorted, and their folder."""
    folder = pathlib.Path(os.__file__).parent
    files = sorted(folder.glob("*.py"))
    if len(files) < 20:
        raise common.ExperimentError(
            f"expected the standard library's modules in {folder}, found "
            f"{len(files)} .py files"
        )
    return folder, files


def _is_validation(index):
    return index % 10 == 0


def stdlib_sizes():
    """`(train bytes, validation bytes)` of `load_stdlib_bytes`, from the
    files' sizes alone (nothing is read)."""
    sizes = {True: [], False: []}
    for i, path in enumerate(stdlib_files()[1]):
        sizes[_is_validation(i)].append(path.stat().st_size)
    # The files are joined with one newline between two.
    return tuple(sum(s) + len(s) - 1 for s in (sizes[False], sizes[True]))


def load_stdlib_bytes():
    """(train bytes, validation bytes, description) of the standard library."""
    folder, files = stdlib_files()
    train, val = [], []
    for i, path in enumerate(files):
        (val if _is_validation(i) else train).append(path.read_bytes())
    train = np.frombuffer(b"\n".join(train), dtype=np.uint8).astype("int32")
    val = np.frombuffer(b"\n".join(val), dtype=np.uint8).astype("int32")
    info = {
        "source": f"{folder}/*.py (Python {sys.version.split()[0]})",
        "files": len(files),
        "validation_files": "every 10th file, sorted by name",
        "train_bytes": int(train.size),
        "validation_bytes": int(val.size),
    }
    return train, val, info


def prepare(args):
    """Applies `--quick`'s settings, then checks what argparse cannot: all
    before any data is read or model built."""
    common.apply_quick(
        args, dense_steps=4, continue_steps=4, eval_every=2, eval_windows=8
    )
    checks.at_most(args, "--top-k", "--experts")
    checks.multiple_of(
        args,
        "--hidden-dim",
        2 * QUERY_HEADS,
        f"{QUERY_HEADS} attention heads of an even size for the rotary embedding",
    )
    # A window and the byte after it (the last label) fit in either split.
    longest = min(stdlib_sizes()) - 2
    if args.sequence_length > longest:
        checks.fail(
            "--sequence-length",
            f"at most {longest} (a window and its next byte must fit the "
            "standard library's validation bytes)",
            args,
        )
    checks.seeds(args, lambda seed: seed + args.repeats - 1)


def windows(data, starts, length):
    """`(x, y)`: the model's inputs and next-byte labels of each window."""
    index = np.asarray(starts)[:, None] + np.arange(length + 1)[None, :]
    tokens = data[index]
    x = {
        "token_ids": tokens[:, :-1],
        "padding_mask": np.ones((len(starts), length), "int32"),
    }
    return x, tokens[:, 1:]


def training_batches(data, rng, steps, args):
    starts = rng.integers(
        0, data.size - args.sequence_length - 1, (steps, args.batch_size)
    )
    return windows(data, starts.reshape(-1), args.sequence_length)


def forward_macs_per_token(args, experts=None, top_k=None):
    """Active multiply-adds per token of the forward pass (no embedding lookup)."""
    d, m, t = args.hidden_dim, args.intermediate_dim, args.sequence_length
    heads, kv_heads = QUERY_HEADS, KEY_VALUE_HEADS
    head_dim = d // heads
    attention = d * heads * head_dim + 2 * d * kv_heads * head_dim
    attention += heads * head_dim * d
    # Scores and mixing over the causal context, (t + 1) / 2 on average.
    attention += 2 * heads * head_dim * (t + 1) / 2
    ffn = 3 * d * m
    if experts is not None:
        ffn = top_k * 3 * d * m + d * experts
    return args.layers * (attention + ffn) + d * 256


def build_dense(args):
    import keras_hub

    backbone = keras_hub.models.MistralBackbone(
        vocabulary_size=256,
        num_layers=args.layers,
        num_query_heads=QUERY_HEADS,
        num_key_value_heads=KEY_VALUE_HEADS,
        hidden_dim=args.hidden_dim,
        intermediate_dim=args.intermediate_dim,
        sliding_window=None,
    )
    return keras_hub.models.MistralCausalLM(backbone, preprocessor=None)


def compile_model(model, args):
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )


def bits_per_byte(model, val_x, val_y):
    return float(model.evaluate(val_x, val_y, batch_size=64, verbose=0)) / math.log(2)


def train(model, x, y, args, val, first_step, history, timer):
    """Trains on `(x, y)` in chunks of `--eval-every` steps, evaluating after each."""
    steps = len(y) // args.batch_size
    for start in range(0, steps, args.eval_every):
        stop = min(start + args.eval_every, steps)
        rows = slice(start * args.batch_size, stop * args.batch_size)
        model.fit(
            {k: v[rows] for k, v in x.items()},
            y[rows],
            batch_size=args.batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[timer],
        )
        history["step"].append(first_step + stop)
        history["val_bits_per_byte"].append(bits_per_byte(model, *val))


def run_repeat(args, train_data, val, repeat):
    from keras_moe.kerashub import sparsify
    from keras_moe.upcycling.kerashub_causal_lm import upcycle_causal_lm

    seed = common.seed_run(args, repeat)
    rng = np.random.default_rng(seed)
    dense = build_dense(args)
    compile_model(dense, args)
    runs = {name: {"step": [], "val_bits_per_byte": []} for name in LABELS}
    timers = {name: common.StepTimer() for name in LABELS}
    start = time.perf_counter()
    runs["pretrain"]["step"].append(0)
    runs["pretrain"]["val_bits_per_byte"].append(bits_per_byte(dense, *val))
    x, y = training_batches(train_data, rng, args.dense_steps, args)
    train(dense, x, y, args, val, 0, runs["pretrain"], timers["pretrain"])
    runs["pretrain"]["seconds"] = time.perf_counter() - start
    at_upcycling = runs["pretrain"]["val_bits_per_byte"][-1]

    moe = upcycle_causal_lm(
        dense,
        args.experts,
        top_k=args.top_k,
        expert_noise=args.expert_noise,
        seed=seed,
    )
    if not args.all_experts:
        sparsify(moe)
    probe = {k: v[:8] for k, v in val[0].items()}
    dense_logits = keras.ops.convert_to_numpy(dense(probe))
    moe_logits = keras.ops.convert_to_numpy(moe(probe))
    exactness = float(
        np.max(np.abs(moe_logits - dense_logits)) / np.max(np.abs(dense_logits))
    )
    x, y = training_batches(train_data, rng, args.continue_steps, args)
    for name, model in (("dense", dense), ("upcycled", moe)):
        start = time.perf_counter()
        compile_model(model, args)
        runs[name]["step"].append(args.dense_steps)
        runs[name]["val_bits_per_byte"].append(bits_per_byte(model, *val))
        train(model, x, y, args, val, args.dense_steps, runs[name], timers[name])
        runs[name]["seconds"] = time.perf_counter() - start
    for name in runs:
        runs[name]["median_step_seconds"] = timers[name].median_step_seconds()
    runs["upcycling"] = {
        "val_bits_per_byte_dense": at_upcycling,
        "val_bits_per_byte_upcycled": runs["upcycled"]["val_bits_per_byte"][0],
        "max_relative_logit_difference": exactness,
        "params_dense": common.count_params(dense),
        "params_upcycled": common.count_params(moe),
    }
    return runs


def run(args):
    out = common.output_dir(args.out)
    train_data, val_data, data_info = load_stdlib_bytes()
    starts = np.linspace(
        0, val_data.size - args.sequence_length - 2, args.eval_windows
    ).astype("int64")
    val = windows(val_data, starts, args.sequence_length)
    print(
        f"Python standard library: {data_info['train_bytes']:,} training and "
        f"{data_info['validation_bytes']:,} validation bytes"
    )
    tokens = args.batch_size * args.sequence_length
    flops = {
        "dense": 6 * forward_macs_per_token(args) * tokens,
        "upcycled": 6 * forward_macs_per_token(args, args.experts, args.top_k) * tokens,
    }
    results = common.new_results(
        "upcycling",
        args,
        data=data_info,
        training_flops_per_step=flops,
        tokens_per_step=tokens,
    )
    repeats = []
    for repeat in range(args.repeats):
        print(f"== run {repeat + 1}/{args.repeats}", flush=True)
        runs = run_repeat(args, train_data, val, repeat)
        repeats.append(runs)
        for name in LABELS:
            print(
                f"   {name}: {runs[name]['val_bits_per_byte'][-1]:.4f} bits/byte, "
                f"{runs[name]['median_step_seconds'] * 1000:.0f} ms/step",
                flush=True,
            )
    for name in LABELS:
        curves = np.array([r[name]["val_bits_per_byte"] for r in repeats])
        mean, se = common.mean_se(curves)
        steps = np.array(repeats[0][name]["step"])
        pretrain_flops = flops["dense"] * np.minimum(steps, args.dense_steps)
        arm_flops = flops.get(name, flops["dense"])
        final = [float(c[-1]) for c in curves]
        results["models"][name] = {
            "label": LABELS[name],
            "step": steps,
            "training_flops": pretrain_flops
            + arm_flops * np.maximum(steps - args.dense_steps, 0),
            "val_bits_per_byte_mean": mean,
            "val_bits_per_byte_se": se,
            "final_val_bits_per_byte": float(np.mean(final)),
            "final_val_bits_per_byte_se": float(common.mean_se(final)[1]),
            "final_val_bits_per_byte_runs": final,
            "seconds": [r[name]["seconds"] for r in repeats],
            "median_step_seconds": [r[name]["median_step_seconds"] for r in repeats],
            "history": [
                {
                    "step": r[name]["step"],
                    "val_bits_per_byte": r[name]["val_bits_per_byte"],
                }
                for r in repeats
            ],
        }
    results["upcycling_point"] = [r["upcycling"] for r in repeats]
    results["comparisons"] = [
        common.welch(
            results["models"]["upcycled"]["final_val_bits_per_byte_runs"],
            results["models"]["dense"]["final_val_bits_per_byte_runs"],
            "upcycled",
            "dense",
        )
    ]
    paths = common.write_outputs(out, results, plot, "upcycling_val_loss.png", summary)
    common.report_written(paths)
    return results


def plot(results, path):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for model in results["models"].values():
        mean = np.asarray(model["val_bits_per_byte_mean"])
        se = np.asarray(model["val_bits_per_byte_se"])
        for ax, x in zip(axes, (model["step"], model["training_flops"])):
            x = np.asarray(x, dtype="float64")
            (line,) = ax.plot(x, mean, label=model["label"], marker=".", ms=3)
            ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.25)
    settings = results["settings"]
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].axvline(settings["dense_steps"], ls="--", lw=1, color="gray")
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training FLOPs (analytic, active)")
    axes[1].set_xscale("log")
    axes[0].set_ylabel("validation loss (bits per byte)")
    axes[0].legend(loc="upper right")
    fig.suptitle(
        f"Byte-level LM on the Python standard library: dense, continued vs upcycled "
        f"to {settings['experts']} experts (top-{settings['top_k']}); mean ± s.e. of "
        f"{settings['repeats']} run(s), {results['backend']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def models_table(results):
    """The markdown table of each arm's steps, FLOPs, last loss and step time."""
    repeats = results["settings"]["repeats"]
    flops = results["training_flops_per_step"]
    rows = []
    for name, m in results["models"].items():
        loss = f"{m['final_val_bits_per_byte']:.4f}"
        if repeats > 1:
            loss += f" ± {m['final_val_bits_per_byte_se']:.4f}"
        step_ms = 1000 * float(np.median(m["median_step_seconds"]))
        rows.append(
            [
                f"`{name}` {m['label']}",
                str(m["step"][-1]),
                f"{flops.get(name, flops['dense']):.3g}",
                f"{m['training_flops'][-1]:.3g}",
                loss,
                f"{step_ms:.0f}",
            ]
        )
    return common.markdown_table(
        [
            "model",
            "steps",
            "training FLOPs per step",
            "training FLOPs in all",
            "validation bits/byte, last",
            "ms per step (median)",
        ],
        rows,
    )


def summary(results):
    settings = results["settings"]
    repeats = settings["repeats"]
    table = models_table(results)
    point = results["upcycling_point"]
    params = point[0]
    gap = max(
        abs(p["val_bits_per_byte_upcycled"] - p["val_bits_per_byte_dense"])
        for p in point
    )
    logits = max(p["max_relative_logit_difference"] for p in point)
    comparison = results["comparisons"][0]
    ci = comparison["ci95"]
    ci_text = "n/a" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
    p_text = "n/a" if comparison["p_value"] is None else f"{comparison['p_value']:.3g}"
    execution = (
        "every expert on every token (KerasHub's block as it is)"
        if settings["all_experts"]
        else "sparse (`keras_moe.kerashub.sparsify`)"
    )
    data = results["data"]
    return (
        "# Sparse upcycling: a byte-level LM on the Python standard library\n\n"
        f"`{results['command']}`\n\n"
        # Markers for docs/upcycling.md (pymdownx.snippets sections), hidden here.
        "<!-- --8<-- [start:results] -->\n"
        f"Backend {results['backend']}, {results['date']}. Data: {data['source']}, "
        f"{data['files']} files, {data['train_bytes']:,} training and "
        f"{data['validation_bytes']:,} validation bytes ({data['validation_files']}). "
        f"Model: KerasHub `MistralBackbone`, {settings['layers']} layers, width "
        f"{settings['hidden_dim']}, feed-forward {settings['intermediate_dim']}, "
        f"{params['params_dense']:,} parameters; upcycled: `MixtralBackbone`, "
        f"{settings['experts']} experts, top-{settings['top_k']}, "
        f"{params['params_upcycled']:,} parameters, experts run {execution}. "
        f"{settings['dense_steps']} dense steps, then {settings['continue_steps']} "
        f"steps of each arm on the same batches of {settings['batch_size']} x "
        f"{settings['sequence_length']} bytes; Adam {settings['learning_rate']:g} "
        "(global norm clipped to 1), a fresh one per arm; validation on "
        f"{settings['eval_windows']} fixed windows; {repeats} run(s), "
        "mean ± s.e.\n\n"
        f"{table}\n\n"
        f"At the upcycling point the upcycled model's validation loss differs from "
        f"the dense one's by at most {gap:.2g} bits/byte and its logits by at most "
        f"{logits:.2g} (relative): upcycling is exact at initialisation.\n\n"
        "Last validation loss, upcycled − dense (bits/byte, Welch's 95% CI and "
        "t-test over the runs):\n\n"
        + common.markdown_table(
            ["difference", "bits/byte", "95% CI (Welch)", "Welch's t-test p", "runs"],
            [
                [
                    "`upcycled` − `dense`",
                    f"{comparison['difference']:+.4f}",
                    ci_text,
                    p_text,
                    f"{comparison['n_a']} / {comparison['n_b']}",
                ]
            ],
        )
        + "\n<!-- --8<-- [end:results] -->\n\n"
        "![validation loss](upcycling_val_loss.png)\n"
    )

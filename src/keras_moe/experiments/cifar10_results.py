"""CIFAR-10 results: runs assembled into results.json, statistics, tables, plot.

`keras-moe cifar10` (`keras_moe.experiments.cifar10`) trains the runs; this
module turns the finished runs of an output folder into `results.json`,
`summary.md` and the plot, with each model's mean and standard error per
epoch and Welch comparisons of the last epoch.
"""

import numpy as np

from keras_moe.experiments import common
from keras_moe.experiments import runs

MODELS = ("cnn", "moe", "moe-pooled", "cnn-wide-dense", "cnn-wide")
# The original repository's reported result (README of mixture-of-experts).
ORIGINAL = {
    "train_images": 50_000,
    "epochs": 16,
    "test_accuracy": {"MoE": 0.73, "CNN": 0.72},
}


def assemble(out, head):
    """results.json's content from every finished run under `out`."""
    records = runs.finished_records(out)
    results = {**head, "models": {}}
    order = {name: i for i, name in enumerate(MODELS)}
    for name in sorted(records, key=lambda n: order.get(n, 99)):
        by_repeat = records[name]
        results["models"][name] = summarize_model(
            [by_repeat[r] for r in sorted(by_repeat)]
        )
    results["comparisons"] = compare(results["models"])
    return results


def summarize_model(records):
    epochs = min(len(r["history"]["val_accuracy"]) for r in records)
    val = np.array([r["history"]["val_accuracy"][:epochs] for r in records])
    mean, se = common.mean_se(val)
    final = val[:, -1]
    first = records[0]
    return {
        "label": first["label"],
        "params": first["params"],
        "gating_params": first["gating_params"],
        "width_factor": first["width_factor"],
        "runs": len(records),
        "repeats": [r["repeat"] for r in records],
        "test_accuracy": float(final.mean()),
        "test_accuracy_se": float(common.mean_se(final)[1]),
        "test_accuracy_runs": final,
        "best_epoch_test_accuracy": float(mean.max()),
        "val_accuracy_mean": mean,
        "val_accuracy_se": se,
        "step_seconds_median": float(
            np.median([r["step_seconds_median"] for r in records])
        ),
        "fit_seconds": [r["fit_seconds"] for r in records],
        "history": [r["history"] for r in records],
    }


def compare(models):
    """Last-epoch differences with 95% CIs and Welch's t-test (SciPy).

    Every model against the CNN, and the MoE against every other model.
    """
    pairs = [(name, "cnn") for name in models if name != "cnn"]
    pairs += [("moe", name) for name in models if name not in ("cnn", "moe")]
    return [
        common.welch(
            models[a]["test_accuracy_runs"], models[b]["test_accuracy_runs"], a, b
        )
        for a, b in pairs
        if a in models and b in models
    ]


def write_outputs(results, out):
    return [
        common.write_json(out, results),
        plot(results, out / "cifar10_val_accuracy.png"),
        common.write_text(out, "summary.md", summary(results)),
    ]


def print_table(results, out):
    print()
    print(results_table(results))
    print(f"\nplot: {out / 'cifar10_val_accuracy.png'}; summary: {out / 'summary.md'}")


def plot(results, path):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model in results["models"].values():
        mean = np.asarray(model["val_accuracy_mean"])
        se = np.asarray(model["val_accuracy_se"])
        epochs = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(
            epochs, mean, marker="o", ms=3, label=f"{model['label']} ({model['runs']})"
        )
        ax.fill_between(
            epochs, mean - se, mean + se, color=line.get_color(), alpha=0.25
        )
    if results["data"]["train_images"] == ORIGINAL["train_images"]:
        for name, accuracy in ORIGINAL["test_accuracy"].items():
            ax.axhline(accuracy, color="gray", ls=":", lw=1)
            ax.annotate(
                f"original {name}, {ORIGINAL['epochs']} epochs: {accuracy:.0%}",
                (1, accuracy),
                fontsize=7,
                color="gray",
                va="bottom" if name == "MoE" else "top",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test (validation) accuracy")
    ax.set_title(
        f"CIFAR-10, {results['data']['train_images']} training images, "
        "mean ± s.e. of (n) runs"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.replace_atomically(path, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
    return path


def results_table(results):
    rows = []
    for name, m in results["models"].items():
        accuracy = f"{m['test_accuracy']:.4f}"
        if m["runs"] > 1:
            accuracy += f" ± {m['test_accuracy_se']:.4f}"
        rows.append(
            [
                f"`{name}` {m['label']}",
                f"{m['params']:,}",
                f"{m['gating_params']:,}",
                f"{1000 * m['step_seconds_median']:.0f}",
                str(m["runs"]),
                accuracy,
                f"{m['best_epoch_test_accuracy']:.4f}",
            ]
        )
    return common.markdown_table(
        [
            "model",
            "parameters",
            "of them gating",
            "train step (ms, median)",
            "runs",
            "test accuracy, last epoch (mean ± s.e.)",
            "best epoch (mean)",
        ],
        rows,
    )


def epochs_table(results):
    models = results["models"]
    epochs = max((len(m["val_accuracy_mean"]) for m in models.values()), default=0)
    rows = []
    for epoch in range(epochs):
        row = [str(epoch + 1)]
        for m in models.values():
            if epoch < len(m["val_accuracy_mean"]):
                row.append(
                    f"{m['val_accuracy_mean'][epoch]:.4f} ± "
                    f"{m['val_accuracy_se'][epoch]:.4f}"
                )
            else:
                row.append("")
        rows.append(row)
    return common.markdown_table(["epoch", *(f"`{n}`" for n in models)], rows)


def summary(results):
    commands = [part["command"] for part in results.get("parts", [])]
    commands.append(results["command"])
    text = (
        "# CIFAR-10: CNN against MoE\n\n"
        + "".join(f"`{command}`\n\n" for command in commands)
        + f"Backend {results['backend']}, {results['date']}. Data: "
        f"{results['data']['source']}. Protocol: {results['protocol']}. "
        "Step times are wall-clock medians of `fit`'s training steps on the "
        "machine that ran it (shared CPU cores: compare within this table only).\n\n"
        f"{results_table(results)}\n\n"
    )
    if results.get("comparisons"):
        text += (
            "Differences of the last epoch's test accuracy (percentage points; "
            "a 95% confidence interval and p-value need 2 runs of each model):"
            f"\n\n{common.comparisons_table(results['comparisons'])}\n\n"
        )
    text += (
        "Test accuracy per epoch, mean ± s.e. over the runs:\n\n"
        f"{epochs_table(results)}\n\n"
        "![validation accuracy](cifar10_val_accuracy.png)\n"
    )
    return text

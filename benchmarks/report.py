"""Markdown tables and the n_experts plot from the merged benchmark JSON."""

BACKENDS = ("jax", "torch", "tensorflow")
MODE_LABELS = {
    "forward": "fwd",
    "forward_backward": "fwd+bwd",
    "train_step": "train step",
}


def _cell(entry, mode):
    if entry is None:
        return "–"
    if "error" in entry:
        return "error"
    m = entry.get(mode)
    if not m or "median_s" not in m:
        return "–"
    return f"{m['median_s'] * 1e3:.2f} ms ({m['ratio']:.2f}x)"


def _memory(entry, mode):
    m = (entry or {}).get(mode) or {}
    peak = (m.get("memory") or {}).get("peak_bytes")
    return "–" if peak is None else f"{peak / 2**20:.1f}"


def markdown(results):
    """The whole report: one table per case, then the targets."""
    meta = results["meta"]
    lines = [
        "# keras-moe benchmarks",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['versions']}  ",
        f"Times: median over {meta['repeats']} interleaved repeats, ms per step; "
        "(ratio) against the case's baseline on the same backend. "
        f"PyTorch steps: {meta.get('torch_mode', '?')}. "
        "Memory: JAX's compiled buffers (MiB); other backends report none on CPU.",
        "",
    ]
    targets = []
    for per_backend in results["cases"].values():
        any_result = next(iter(per_backend.values()))
        lines += [f"## {any_result['title']}", ""]
        backends = [b for b in BACKENDS if b in per_backend]
        modes = any_result["modes"]
        header = ["variant"]
        for b in backends:
            header += [f"{b} {MODE_LABELS[m]}" for m in modes]
        if "jax" in backends and "train_step" not in modes:
            header.append("jax fwd+bwd MiB")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + " --- |" * len(header))
        for variant in any_result["variants"]:
            row = [f"{variant}: {any_result['variants'][variant].get('note', '')}"]
            for b in backends:
                entry = per_backend[b]["variants"].get(variant)
                row += [_cell(entry, m) for m in modes]
            if "jax" in backends and "train_step" not in modes:
                row.append(
                    _memory(
                        per_backend["jax"]["variants"].get(variant), "forward_backward"
                    )
                )
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for b in backends:
            for t in per_backend[b].get("checked_targets", []):
                targets.append((b, any_result["title"], t))
    lines += ["## Targets", "", "| backend | case | target | measured | met |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for backend, title, t in targets:
        bound = (
            f"<= {t['max_ratio']}"
            if t["max_ratio"] is not None
            else f">= {t['min_ratio']}"
        )
        what = f"{t['variant']} / {t['over']} ({MODE_LABELS[t['mode']]}) {bound}"
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "**no**", None: "–"}[t["passed"]]
        lines.append(f"| {backend} | {title} | {what} | {value} | {met} |")
    lines.append("")
    return "\n".join(lines)


def plot_sweep(results, path):
    """Time (ms) against n_experts, soft and top-2, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_backend = results["cases"].get("expert_sweep")
    if not per_backend:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"jax": "tab:blue", "torch": "tab:red", "tensorflow": "tab:orange"}
    for backend, result in per_backend.items():
        if "variants" not in result:
            continue
        mode = "forward_backward"
        for kind, marker, dash in (("soft", "o", "-"), ("top2", "s", "--")):
            points = []
            for name, entry in result["variants"].items():
                if name.startswith(kind + "_") and "median_s" in entry.get(mode, {}):
                    points.append((int(name.split("_")[1]), entry[mode]["median_s"]))
            if points:
                points.sort()
                ax.plot(
                    [p[0] for p in points],
                    [p[1] * 1e3 for p in points],
                    dash,
                    marker=marker,
                    color=styles.get(backend),
                    label=f"{backend} {kind}",
                )
        dense = result["variants"].get("dense", {}).get(mode, {}).get("median_s")
        if dense:
            ax.axhline(dense * 1e3, color=styles.get(backend), lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n_experts")
    ax.set_ylabel("forward+backward, ms (dotted: Dense)")
    ax.set_title(next(iter(per_backend.values()))["title"], fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

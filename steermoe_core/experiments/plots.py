"""PNG plots of router statistics (``router_stats``), with matplotlib's file-only Agg backend."""

from __future__ import annotations

from pathlib import Path

from steermoe_core.atomic import atomic_file
from steermoe_core.errors import UsageError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the plots need matplotlib: pip install 'steermoe[analysis]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    return path


def _heatmap(ax, values: list[list[float]], title: str, plt) -> None:
    rows, cols = len(values), len(values[0])
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(max(r) for r in values) or 1.0)
    ax.set_title(title)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows) if rows <= 40 else range(0, rows, max(1, rows // 16)))
    if rows * cols <= 400:
        top = max(max(r) for r in values) or 1.0
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 * top else "black")
    plt.colorbar(im, ax=ax)


def plot_router(stats: dict, out: Path) -> list[Path]:
    """router_heatmap.png (layer x expert: mean gate, top-1 share), router_entropy.png (per layer,
    per prompt, against the uniform log E), steering_norm.png (absolute and relative to the hidden
    state). Returns the paths written."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    layers = stats["layers"]
    ckpt = Path(stats["checkpoint"])
    title = f"{ckpt.parent.name}/{ckpt.name} on {Path(stats['data']).name} ({stats['examples']} clips)"
    paths = []

    h = max(3.0, 0.32 * len(layers) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4.0, 0.55 * stats["num_experts"] + 2.0), h), layout="constrained")
    _heatmap(axes[0], [r["mean_gate"] for r in layers], "mean gate weight", plt)
    _heatmap(axes[1], [r["top1_frequency"] for r in layers], "top-1 frequency", plt)
    fig.suptitle(f"router: {title}")
    paths.append(_save(fig, out / "router_heatmap.png"))
    plt.close(fig)

    x = [r["layer"] for r in layers]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), layout="constrained")
    ax.plot(x, [r["entropy"] for r in layers], "o-", lw=2, color="black", label="all clips")
    groups = stats.get("by_prompt", {})
    if len(groups) > 1:
        for prompt, g in groups.items():
            ax.plot(x, [r["entropy"] for r in g["layers"]], ".--", label=f"{prompt[:40]} ({g['examples']})")
    ax.axhline(layers[0]["max_entropy"], color="grey", ls=":", label=f"uniform (log {stats['num_experts']})")
    ax.set_ylim(0, layers[0]["max_entropy"] * 1.08)
    ax.set_xlabel("layer")
    ax.set_ylabel("gate entropy (nats)")
    ax.set_xticks(x)
    ax.set_title(f"gate entropy per layer: {title}", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "router_entropy.png"))
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    a1.bar(x, [r["steering_norm"] for r in layers], color="tab:blue")
    a1.set_title("steering norm ||s_l g V_l|| (mean per frame)", fontsize=9)
    a2.bar(x, [100 * r["relative_steering"] for r in layers], color="tab:orange")
    a2.set_title("relative to the hidden state's norm (%)", fontsize=9)
    for a in (a1, a2):
        a.set_xlabel("layer")
        a.set_xticks(x)
    fig.suptitle(f"steering: {title}", fontsize=10)
    paths.append(_save(fig, out / "steering_norm.png"))
    plt.close(fig)
    return paths

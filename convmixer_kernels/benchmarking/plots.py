"""Figures for the bench results (matplotlib, optional: without it the figures are skipped)."""
from __future__ import annotations


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def throughput_chart(results, title: str, path: str) -> bool:
    plt = _pyplot()
    ok = [r for r in results if not r.error]
    if plt is None or not ok:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(ok) + 1.5))
    names = [r.contender for r in ok]
    values = [r.images_per_s for r in ok]
    colors = ["tab:orange" if n.startswith("fused") else "tab:gray" for n in names]
    ax.barh(names, values, color=colors)
    for i, r in enumerate(ok):
        ax.text(values[i], i, f" {values[i]:.0f} ({r.speedup:.2f}x)", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("training images/s (higher is better)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(values) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def convergence_chart(curves, path: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(curves.eager, label="eager (fused=False)", alpha=0.8)
    ax.plot(curves.fused, label="fused=True", alpha=0.8, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"same init, same batches: smoothed gap {curves.smoothed_gap:.3g} "
                 f"vs noise {curves.noise:.3g}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

"""PNG report of an allocation: rank per layer (allocated vs uniform at the
same budget) and the whitened singular-value spectra."""

from __future__ import annotations


def plot_allocation(compressed, path: str, title: str | None = None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the allocation plot needs matplotlib: pip install matplotlib") from None
    info = compressed.info
    ranks, uniform = info["ranks"], info.get("uniform_ranks")
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(len(ranks)))
    w = 0.4
    ax0.bar([x - w / 2 for x in xs], ranks, w, label=f"allocated ({info['config']['allocation']})")
    if uniform:
        ax0.bar([x + w / 2 for x in xs], uniform, w, label="uniform, same budget")
    ax0.set_xlabel("layer")
    ax0.set_ylabel("rank r")
    ax0.set_title("rank per layer")
    ax0.legend()
    for i, spec in enumerate(info["spectra"]):
        ax1.semilogy(range(1, len(spec) + 1), [max(s, 1e-30) for s in spec], label=f"layer {i}" if len(ranks) <= 12 else None)
        ax1.axvline(ranks[i], color=ax1.lines[-1].get_color(), linestyle=":", linewidth=0.8)
    ax1.set_xlabel("singular value index")
    ax1.set_ylabel("sigma (whitened)")
    ax1.set_title("joint [W_q | W_k | W_v] spectra (dotted: kept rank)")
    if len(ranks) <= 12:
        ax1.legend(fontsize=7)
    b = info["config"]["budget"]
    a = info["achieved"]
    fig.suptitle(title or f"budget {b['kind'].upper()} = {b['value']:g}: R1 {a['r1']:.1%}, R2 {a['r2']:.1%}, "
                 f"mean rank {a['mean_rank']:.0f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

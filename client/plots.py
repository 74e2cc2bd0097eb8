"""Training curves of a run as a PNG (``psctl plot``): a pure function from metrics to a figure.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global state, no display needed).
Panels, 2x2: train loss against wall time and against clock, one line per rank; test accuracy and
test loss (eval points of rank 0) against wall time and against clock; for a binary (CTR) model,
whose evaluations carry a ROC AUC, the test AUC too, and its test loss is labelled log-loss; for a
regression (no accuracy), the test loss alone. Time is
seconds since the run started (or was created, while pending).

``psctl simulate --plot``: the predicted time per clock under each bound (against the measured one)
and each rank's idle share under each bound, from ``simulate.report``'s dict.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, BinaryIO

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from paramserver.v1 import paramserver_pb2 as pb

from .facts import counted

__all__ = ["curves_figure", "image_format", "save_curves", "save_simulation", "simulation_figure"]


def _t(p: pb.MetricPoint, t0: float) -> float:
    return float(p.time.ToNanoseconds()) / 1e9 - t0


def _auc(p: pb.MetricPoint) -> float:
    """The point's AUC, NaN when it has none (0 or NaN on the wire: not a binary model)."""
    return p.eval_auc if math.isfinite(p.eval_auc) and p.eval_auc else math.nan


def _eval_panel(ax: Axes, xs: list[float], acc: list[float], loss: list[float], xlabel: str,
                auc: list[float] | None = None) -> None:
    """Test accuracy (and AUC, given a binary model's) on the left axis, the test loss on the right;
    a run whose evaluations have neither (a regression's) has its test loss alone, on the left."""
    scored = bool(auc) or any(math.isfinite(a) for a in acc)
    what, loss_name = (("test AUC and log-loss", "test log-loss") if auc else
                       ("test accuracy and test loss", "test loss") if scored or not xs else ("test loss", "test loss"))
    ax.set_xlabel(xlabel)
    ax.set_title(f"{what} vs {xlabel.split(' ')[0]}")
    if not xs:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
        return
    ax.grid(alpha=0.3)
    if not scored:
        ax.plot(xs, loss, "s--", color="tab:red", label=loss_name)
        ax.set_ylabel(loss_name)
        if all(v > 0 for v in loss):  # (a regression's falls by orders of magnitude, as the train loss)
            ax.set_yscale("log")
        return
    handles = []
    if auc:
        handles += ax.plot(xs, auc, "D-", color="tab:blue", label="test AUC")
    if any(math.isfinite(a) for a in acc):
        handles += ax.plot(xs, acc, "o-", color="tab:green", label="test accuracy")
    scores = [a for a in [*acc, *(auc or [])] if math.isfinite(a)]
    ax.set_ylabel("test AUC / accuracy" if auc else "test accuracy")
    lo = min(scores)
    ax.set_ylim(max(0.0, lo - 0.1 * (1.0 - lo) - 0.01), 1.005)  # zoom in on the range that moved
    twin = ax.twinx()
    handles += twin.plot(xs, loss, "s--", color="tab:red", label=loss_name)
    twin.set_ylabel(loss_name)
    ax.legend(handles=handles, loc="center right", fontsize="small")


def curves_figure(run: pb.Run, metrics: pb.GetMetricsResponse) -> Figure:
    """Build the 2x2 figure of ``run``'s training and evaluation curves."""
    t0 = (run.started if run.started.seconds else run.created).ToNanoseconds() / 1e9
    by_rank: dict[int, list[pb.MetricPoint]] = defaultdict(list)
    evals: list[pb.MetricPoint] = []
    for p in metrics.points:
        (evals if p.eval else by_rank[p.rank]).append(p)
    evals.sort(key=lambda p: p.clock)
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    (loss_t, loss_c), (eval_t, eval_c) = fig.subplots(2, 2)
    for rank in sorted(by_rank):
        pts = sorted(by_rank[rank], key=lambda p: p.clock)
        loss_t.plot([_t(p, t0) for p in pts], [p.loss for p in pts], lw=1, label=f"rank {rank}")
        loss_c.plot([p.clock for p in pts], [p.loss for p in pts], lw=1, label=f"rank {rank}")
    for ax, xlabel in ((loss_t, "time (s)"), (loss_c, "clock (iterations)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train loss (minibatch)")
        ax.set_title(f"train loss vs {xlabel.split(' ')[0]}")
        ax.grid(alpha=0.3)
        if by_rank:
            ax.legend(fontsize="small", ncol=2)
            if all(p.loss > 0 for pts in by_rank.values() for p in pts):
                ax.set_yscale("log")
    acc = [p.eval_accuracy for p in evals]
    loss = [p.eval_loss for p in evals]
    auc = [_auc(p) for p in evals]
    binary = auc if any(math.isfinite(a) for a in auc) else None  # a CTR model's run
    _eval_panel(eval_t, [_t(p, t0) for p in evals], acc, loss, "time (s)", binary)
    _eval_panel(eval_c, [float(p.clock) for p in evals], acc, loss, "clock (iterations)", binary)
    s = run.spec.staleness
    stale = "BSP" if s == 0 else "ASP" if s < 0 else f"SSP s={s}"
    fig.suptitle(f"{run.run_id}  {run.spec.name}  ({counted(run.spec.num_workers, 'worker')}, {stale})")
    return fig


def image_format(path: str, flag: str) -> str:
    """The image format ``path``'s extension names, as savefig takes it (png for a name without
    one: the file is written under the name given); ValueError naming ``flag`` when matplotlib
    cannot write it."""
    ext = os.path.splitext(path)[1][1:].lower()
    if not ext:
        return "png"
    if ext not in FigureCanvasAgg.get_supported_filetypes():
        raise ValueError(f"{flag} {path!r}: cannot draw a .{ext} image; name a .png, .svg or .pdf file (or "
                         f"{', '.join(sorted(FigureCanvasAgg.get_supported_filetypes()))})")
    return ext


def save_curves(run: pb.Run, metrics: pb.GetMetricsResponse, out: BinaryIO, fmt: str) -> None:
    """Write the figure into ``out`` as ``fmt`` (``image_format``)."""
    curves_figure(run, metrics).savefig(out, format=fmt, dpi=100)


def simulation_figure(doc: dict[str, Any]) -> Figure:
    """Left: predicted time per clock per bound, the measured one as a line. Right: a heat strip,
    one row per bound (and the recording's), one column per rank, coloured by its idle share."""
    rows = [doc["recorded"], *doc["predictions"]]
    labels = [f"recorded ({_bound(doc['recorded']['staleness'])})", *(_bound(f["staleness"]) for f in doc["predictions"])]
    fig = Figure(figsize=(12, 1.5 + 0.45 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    bars, strip = fig.subplots(1, 2, width_ratios=(1, 2))
    ys = list(range(len(rows)))
    per_clock = [f["time_per_clock_s"] * 1e3 for f in rows]
    bars.barh(ys, per_clock, color=["tab:gray", *(["tab:blue"] * (len(rows) - 1))])
    bars.axvline(per_clock[0], color="tab:red", ls="--", lw=1, label="measured")
    for y, ms in zip(ys, per_clock, strict=True):
        bars.text(ms, y, f" {ms:.1f}", va="center", fontsize="small")
    bars.set_xlim(0, max(per_clock) * 1.15)  # room for the labels
    bars.set_yticks(ys, labels)
    bars.invert_yaxis()
    bars.set_xlabel("time per clock (ms)")
    bars.set_title("predicted time per clock")
    bars.legend(fontsize="small", loc="upper right")
    image = strip.imshow([f["idle_share"] for f in rows], aspect="auto", cmap="magma_r", vmin=0.0, vmax=1.0,
                         interpolation="nearest")
    strip.set_yticks(ys, labels)
    strip.set_xlabel("rank")
    strip.xaxis.set_major_locator(MaxNLocator(integer=True))
    strip.set_title("idle share (parked / run time) per rank")
    fig.colorbar(image, ax=strip, label="idle share")
    fig.suptitle(f"{doc['run_id']}: what-if replay of {counted(doc['ranks'], 'rank')} x {counted(doc['clocks'], 'clock')} "
                 f"(replay of the recorded bound {doc['replay']['error']:+.1%} off)")
    return fig


def save_simulation(doc: dict[str, Any], out: BinaryIO, fmt: str) -> None:
    simulation_figure(doc).savefig(out, format=fmt, dpi=100)


def _bound(s: int) -> str:
    return "s=inf" if s < 0 else f"s={s}"

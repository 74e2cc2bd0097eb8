"""What psctl draws: pure functions from protobuf messages to rich renderables.

Nothing here talks to a server or prints: ``cli`` fetches, these functions shape, ``cli`` prints.
The numbers come from ``facts`` (the same ones ``--json`` prints).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from paramserver.v1 import paramserver_pb2 as pb

from .facts import (
    counted,
    fmt,
    fmt_age,
    param_texts,
    recent,
    run_facts,
    shard_rows,
    staleness_text,
    train_loss,
    worker_rows,
)

__all__ = ["NO_WRAP_WIDTH", "console", "launch_progress", "progress_fields", "runs_table", "simulation_view", "sparkline",
           "status_view"]

NO_WRAP_WIDTH = 10_000
"""A console's width when it is not a terminal (a pipe, a file): a line is as long as its content,
never wrapped or cut at 80 columns in the middle of a field (rich's default for a non-terminal)."""


def console(stderr: bool = False, **kwargs: Any) -> Console:
    """The console every psctl command prints through: a terminal's own width, or no wrapping."""
    out = Console(stderr=stderr, **kwargs)
    if not out.is_terminal:
        out.width = NO_WRAP_WIDTH
    return out


_STATE_STYLE = {"pending": "yellow", "running": "cyan", "completed": "green", "stopped": "magenta", "failed": "red"}
_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 40, log: bool = False) -> str:
    """Unicode block sparkline of the finite ``values`` (log scale if asked and all positive),
    resampled to at most ``width`` bars."""
    vals = [v for v in values if math.isfinite(v)]
    if log and vals and min(vals) > 0:
        vals = [math.log(v) for v in vals]
    if not vals:
        return ""
    if len(vals) > width:
        step = len(vals) / width
        vals = [vals[int(i * step)] for i in range(width - 1)] + [vals[-1]]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_BLOCKS[min(len(_BLOCKS) - 1, int((v - lo) / span * len(_BLOCKS)))] for v in vals)


# ---------------------------------------------------------------------------------------- views
def _state_text(state: str) -> Text:
    return Text(state.upper(), style=f"bold {_STATE_STYLE.get(state, '')}")


def runs_table(runs: Sequence[pb.Run], now: float | None = None) -> Table:
    """``psctl runs``: one row per run; the name column gives way first on a narrow terminal."""
    header = ("id", "name", "state", "workers", "staleness", "progress", "accuracy", "age")
    rows = []
    for run in runs:
        f = run_facts(run, now)
        acc = f"AUC {fmt(f['test_auc'])}" if f["test_auc"] is not None else (
            fmt(f["test_accuracy"]) if f["test_accuracy"] is not None else (
                f"test loss {fmt(f['test_loss'])}" if f["test_loss"] is not None else "-"))
        live = f["state"] in ("pending", "running")
        s = f["staleness"]
        rows.append((f["run_id"], f["name"], f["state"].upper(),
                     f"{f['workers_active']}/{f['workers']}" if live else str(f["workers"]),
                     "BSP" if s == 0 else "ASP" if s < 0 else f"SSP {s}", f"{f['min_clock']}/{f['iterations']}",
                     acc, fmt_age(f["age_seconds"])))
    table = Table(title="runs (newest first)", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  padding=(0, 0), pad_edge=False)
    for i, col in enumerate(header):
        width = max([len(col), *(len(r[i]) for r in rows)])
        table.add_column(col, justify="right" if col in ("workers", "progress", "accuracy", "age") else "left",
                         no_wrap=True, overflow="ellipsis", min_width=8 if col == "name" else width)
    for r in rows:
        cells = [Text(c) for c in r]  # Text, not str: a run name is data, never markup
        cells[2].stylize(f"bold {_STATE_STYLE.get(r[2].lower(), '')}")
        table.add_row(*cells)
    return table


def _size(nbytes: int) -> str:
    """Bytes in the largest unit that keeps a digit before the point (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _shards_table(rows: Sequence[dict[str, Any]]) -> Table:
    """One line per server holding a shard of the run (``psctl status`` of a sharded run)."""
    table = Table(title="shards", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in ("shard", "address", "state", "held", "clocks", "pushes", "pushes/s", "RSS", "note"):
        table.add_column(col, justify="left" if col in ("address", "state", "note") else "right")
    for s in rows:
        table.add_row(str(s["index"]), Text(s["address"]), s["state"], _size(s["bytes_held"]),
                      f"{s['min_clock']}-{s['max_clock']}", str(s["pushes_applied"]), f"{s['pushes_per_second']:.0f}",
                      f"{s['rss_bytes'] / 2**20:.0f} MiB" if s["rss_bytes"] else "-", Text(s["error"] or s.get("held_because") or ""))
    return table


def _kv(*pairs: tuple[str, Any]) -> Text:
    text = Text()
    for i, (key, value) in enumerate(pairs):
        text.append(("   " if i else "") + key + " ", style="dim")
        text.append(str(value))
    return text


def _scaled(f: dict[str, Any]) -> str:
    """A staleness-aware rate: divided by each push's staleness, and the mean factor so far."""
    mean = f["lr_scale_mean"]
    return " / staleness" + (f" (mean x{mean:.2f})" if mean is not None else "")


def status_view(run: pb.Run, metrics: pb.GetMetricsResponse | None, now: float | None = None) -> RenderableType:
    """The ``psctl status`` / ``psctl watch`` screen."""
    now = time.time() if now is None else now
    f, hist = run_facts(run, now), recent(metrics)
    head = Text.assemble((f["run_id"], "bold"), "  ", (f["name"], "italic"), "  ", _state_text(f["state"]))
    if f["message"]:
        head.append(f"  {f['message']}")
    parts: list[RenderableType] = [head]
    parts.append(_kv(("model", f["model"] or "?"), ("dataset", f["dataset"] or "?"), ("optimizer", f["optimizer"]),
                     ("lr", f"{f['lr']:g}" + (_scaled(f) if f["staleness_aware_lr"] else "")),
                     ("staleness", staleness_text(f["staleness"])),
                     ("batch", f["batch_size"]), ("iterations", f["iterations"]), ("workers", f["workers"]),
                     *((("compress", f["compress"]),) if f["compress"] != "none" else ())))
    if f["tables"] or f["requires"]:  # a sparse (CTR) model: which params are tables, what workers it needs
        parts.append(_kv(("params", ", ".join(param_texts(run))),
                         *((("requires", ", ".join(f["requires"])),) if f["requires"] else ())))
    scores = (("test AUC", fmt(f["test_auc"])), ("test log-loss", fmt(f["test_loss"])),
              ("test accuracy", fmt(f["test_accuracy"]))) if f["test_auc"] is not None else (
        (("test loss", fmt(f["test_loss"])),) if f["test_accuracy"] is None and f["test_loss"] is not None else (
            ("test accuracy", fmt(f["test_accuracy"])), ("test loss", fmt(f["test_loss"]))))  # (a regression: no accuracy)
    parts.append(_kv(("min clock", f["min_clock"]), ("max clock", f["max_clock"]),
                     ("progress", f"{100 * f['progress']:.0f}%"), ("age", fmt_age(f["age_seconds"])), *scores))
    if f["waiting_for"]:
        parts.append(Text.assemble(("waiting: ", "bold yellow"), (f["waiting_for"], "yellow")))
    if f["slowest"]:
        parts.append(_kv(("slowest", ", ".join(f"rank {s['rank']} (clock {s['clock']}, {s['lag']} behind)"
                                                for s in f["slowest"])),))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    rows = worker_rows(run, now)
    for col in ("rank", "state", "inc", "clock", "lag", "heartbeat", "pushes", "skipped", "waiting", "name"):
        # who is where never gives way on a narrow terminal (a lag None is "-"): the other columns do
        whole = max([len(col), *(len(str(w[col] if w[col] is not None else "-")) for w in rows)]) \
            if col in ("rank", "state", "clock", "lag") else None
        table.add_column(col, justify="left" if col in ("state", "waiting", "name") else "right", min_width=whole,
                         no_wrap=whole is not None)
    for w in rows:
        waiting = "-"
        if w["waiting"]:
            need = ("the run to start" if w["needs_start"] else
                    "all ranks done" if w["needs_min_clock"] == run.spec.iterations else
                    "nothing (ASP)" if w["needs_min_clock"] is None else f"min clock ≥ {w['needs_min_clock']}")
            waiting = f"pull {w['waiting_pull_clock']}: {need}"
        table.add_row(str(w["rank"]), w["state"], str(w["incarnation"]), str(w["clock"]),
                      "-" if w["lag"] is None else str(w["lag"]), fmt_age(w["heartbeat_seconds_ago"]),
                      str(w["pushes"]), str(w["pulls_skipped"]),
                      waiting, Text(w["worker_name"]))  # a worker's name is data, never markup
    parts += [Text(""), table, Text("")]
    shards = shard_rows(run)
    if shards:
        parts += [_shards_table(shards), Text("")]
    parts.append(_kv(("pushes", f"{f['pushes_applied']} applied / {f['pushes_duplicate']} duplicate / "
                                f"{f['pushes_rejected']} rejected"),
                     ("pulls", f"{f['pulls_served']} served / {f['pulls_parked']} parked / "
                               f"{f['pulls_skipped']} skipped")))
    parts.append(_kv(("bytes", f"{f['bytes_pushed'] / 1e6:.1f} MB pushed / {f['bytes_pulled'] / 1e6:.1f} MB pulled"),
                     ("staleness", f"mean {f['staleness_mean']:.2f} max {f['staleness_max']}")))
    planes = Counter(w["data_plane"] for w in worker_rows(run, now) if w["data_plane"])
    if planes:  # which ranks push over the TCP data plane and which over gRPC (slower: fell back?)
        parts.append(_kv(("data plane", ", ".join(f"{name} ({n} rank{'s' * (n > 1)})" for name, n in sorted(planes.items()))),))
    parts.append(_kv(("parked", f"{f['parked_seconds']:.1f} s in all"),
                     ("updates", f["updates_applied"]), ("evictions", f["evictions"])))
    if hist["train_loss"]:
        last = [v for v in hist["last_train_loss"].values() if v is not None]
        parts.append(_kv(("train loss (log)", sparkline(hist["train_loss"], log=True)),
                         ("last", fmt(sum(last) / len(last)) if last else "-")))
    if hist["eval"]:
        evals = Table(title="evaluations (rank 0, test split)", title_justify="left", box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False)
        binary = any(e["test_auc"] is not None for e in hist["eval"])  # log-loss, and an AUC column
        scored = binary or any(e["test_accuracy"] is not None for e in hist["eval"])  # (a regression's are not)
        cols = ("clock", "test log-loss" if binary else "test loss", *(("test AUC",) if binary else ()),
                *(("test accuracy",) if scored else ()), "train loss")
        for col in cols:
            evals.add_column(col, justify="right")
        for e in hist["eval"]:
            cells = (fmt(e["test_loss"]), *((fmt(e["test_auc"]),) if binary else ()),
                     *((fmt(e["test_accuracy"]),) if scored else ()))
            evals.add_row(str(e["clock"]), *cells, fmt(e["train_loss"]))
        parts += [Text(""), evals]
    if hist["events"]:
        parts.append(Text("\nrecent events", style="bold"))
        for e in hist["events"]:
            when = fmt_age(now - e["time"]) + " ago" if e["time"] else ""
            parts.append(Text.assemble(f"  {when:>10}  ", (f"{e['kind']:<10}", "cyan"), f" {e['message']}"))
    return Group(*parts)


# ---------------------------------------------------------------------------------------- progress
class _ScoreColumn(ProgressColumn):
    """'test acc 0.961', a binary model's 'test AUC 0.791', a regression's 'test loss 0.012': the task's
    fields ``metric`` (default "acc") and ``acc``."""

    def render(self, task: Task) -> Text:
        return Text(f"test {task.fields.get('metric', 'acc')} {task.fields.get('acc', '-')}", no_wrap=True)


class _EtaColumn(TimeRemainingColumn):
    """'ETA 0:01:23': the label and the time in one column, left out together."""

    def render(self, task: Task) -> Text:
        return Text.assemble("ETA ", super().render(task))


_BAR_MIN = 5
"""Cells under which the bar is left out: it would say nothing the M/N beside it does not."""


class _FittingProgress(Progress):
    """A progress line too long for the terminal leaves out whole columns, ``drop`` (their indices)
    in that order, until it fits; rich would cut every column short instead ('epoch 12…', 'train
    loss 0.…', 'test acc 0.…' at 60 columns, their values lost). The bar counts as ``_BAR_MIN``; a
    line the kept columns alone overflow cuts the first one short."""

    def __init__(self, *columns: ProgressColumn, drop: Sequence[int], **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._drop = drop

    def make_tasks_table(self, tasks: Iterable[Task]) -> Table:
        columns = [c for c in self.columns if isinstance(c, ProgressColumn)]
        rows = [[column(task) for column in columns] for task in tasks if task.visible]
        if not rows:  # (rich's __init__ draws the table before the console is there to measure)
            return super().make_tasks_table([])

        def width(i: int) -> int:
            if isinstance(columns[i], BarColumn):
                return _BAR_MIN
            options = self.console.options
            return max((Measurement.get(self.console, options, row[i]).maximum for row in rows), default=0)

        widths = {i: width(i) for i in range(len(columns))}
        kept = list(widths)

        def excess() -> int:
            return sum(widths[k] for k in kept) + len(kept) - 1 - self.console.width

        for i in self._drop:
            if excess() <= 0:
                break
            kept.remove(i)
        table_columns = [columns[i].get_table_column().copy() for i in kept]
        if excess() > 0:  # still too wide: the first column (the state) is cut, not the numbers after it
            table_columns[0].max_width = max(1, widths[kept[0]] - excess())
        table = Table.grid(*table_columns, padding=(0, 1), expand=self.expand)
        for row in rows:
            table.add_row(*(row[i] for i in kept))
        return table


def _bound_text(s: int) -> str:
    return "inf" if s < 0 else str(s)


def simulation_view(doc: dict[str, Any]) -> RenderableType:
    """``psctl simulate``: the run as recorded, the replay of its bound (and its error against the
    measurement), then one row per bound asked for; from ``simulate.report``'s dict."""
    table = Table(title=f"{doc['run_id']}: {counted(doc['ranks'], 'rank')} x {counted(doc['clocks'], 'clock')}, replayed under each bound",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col in ("staleness", "time/clock", "run time", "pushes/s", "mean idle", "most idle"):
        table.add_column(col, justify="left" if col == "staleness" else "right", no_wrap=True)

    def row(label: str, f: dict[str, Any], style: str = "", error: float | None = None) -> None:
        per_clock = f"{f['time_per_clock_s'] * 1e3:.2f} ms" + (f" ({error:+.1%})" if error is not None else "")
        table.add_row(label, per_clock, f"{f['run_seconds']:.2f} s", f"{f['pushes_per_second']:.0f}",
                      f"{f['idle_share_mean']:.1%}", f"rank {f['most_idle_rank']} {f['most_idle_share']:.1%}",
                      style=style)

    recorded, replayed = doc["recorded"], doc["replay"]
    row(f"recorded, {_bound_text(recorded['staleness'])}", recorded, "bold")
    row(f"replay of {_bound_text(replayed['staleness'])}", replayed, "dim", replayed["error"])
    for f in doc["predictions"]:
        row(_bound_text(f["staleness"]), f)
    notes = [Text(f"the replay of the recorded bound is {replayed['error']:+.1%} off the measured time per clock "
                  "(idle: share of the run's time a rank's pull was parked)", style="dim")]
    notes += [Text("note: " + n, style="yellow") for n in doc["notes"]]
    return Group(table, *notes)


def launch_progress(**kwargs: Any) -> Progress:
    """Progress bar for ``launch --wait``: min clock/iterations, epoch, train loss (the ranks' latest
    minibatch losses, averaged), test accuracy (a binary model's: test AUC), ETA.

    One line, its columns never cut short: the bar takes the room the others leave, and a terminal
    too narrow for them all (60 columns, or 80 with a run of many ranks pending) leaves out the bar,
    then the epoch, the ETA, the score and the train loss, in that order; the state and the min
    clock/iterations stay. The elapsed time is in the summary line printed at the end."""
    def text(template: str) -> TextColumn:
        return TextColumn(template, table_column=Column(no_wrap=True))

    return _FittingProgress(
        text("[bold]{task.description}"), BarColumn(bar_width=None),
        MofNCompleteColumn(table_column=Column(no_wrap=True)), text("epoch {task.fields[epoch]}"),
        text("train loss {task.fields[loss]}"), _ScoreColumn(table_column=Column(no_wrap=True)),
        _EtaColumn(table_column=Column(no_wrap=True)),
        drop=(1, 3, 6, 5, 4), **kwargs,
    )


def progress_fields(run: pb.Run, metrics: pb.GetMetricsResponse | None, per_epoch: int | None) -> dict[str, Any]:
    """Keyword arguments for ``Progress.update`` from a run snapshot (and recent metrics)."""
    f, loss = run_facts(run), train_loss(run, metrics)
    epoch = f"{f['min_clock'] / per_epoch:.1f}" if per_epoch else "-"
    joined = sum(w.state != pb.WORKER_STATE_VACANT for w in run.workers)
    state = f"pending: {joined}/{f['workers']} joined" if f["state"] == "pending" else f["state"]
    return {
        "completed": f["min_clock"], "total": f["iterations"] or None,
        "description": state, "epoch": epoch, "loss": fmt(loss, 3),
        **_score(f),
    }


def _score(f: dict[str, Any]) -> dict[str, str]:
    """The progress bar's score: test accuracy; a binary model's AUC; a regression's test loss (it has
    no accuracy)."""
    if f["test_auc"] is not None:
        return {"metric": "AUC", "acc": fmt(f["test_auc"], 3)}
    if f["test_accuracy"] is None and f["test_loss"] is not None:
        return {"metric": "loss", "acc": fmt(f["test_loss"], 3)}
    return {"metric": "acc", "acc": fmt(f["test_accuracy"], 3)}

"""The facts psctl shows, computed once from protobuf messages: plain values and JSON-able dicts.

``run_facts`` is the single source of every derived number (progress, accuracy, timings, mean
staleness, lags); the rich views (``render``) and every ``--json`` output are built from it, so
the two never disagree. No rich, no I/O here. Floats that are NaN or missing (the accuracy of a
regression, a run without an evaluation yet) are ``None`` in dicts and ``-`` in text.

A binary (CTR) model's evaluations carry a ROC AUC (``MetricPoint.eval_auc``) and their test loss
is the log-loss; an AUC of 0 or NaN (dense models, older servers) means none (``auc``), and the
views then read exactly as they do without one.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from paramserver.v1 import paramserver_pb2 as pb

__all__ = [
    "auc",
    "bounds_in_force",
    "clock_records",
    "counted",
    "enum_text",
    "eval_history",
    "event_rows",
    "finite",
    "fmt",
    "fmt_age",
    "launch_result",
    "message_to_dict",
    "param_texts",
    "progress_line",
    "pull_lead",
    "recent",
    "run_facts",
    "shard_rows",
    "run_headline",
    "seconds",
    "staleness_text",
    "state_name",
    "status_dict",
    "summary_line",
    "train_loss",
    "worker_rows",
]


def state_name(state: int) -> str:
    """RUN_STATE_COMPLETED -> 'completed'."""
    return str(enum_text(pb.RunState.DESCRIPTOR, pb.RunState.Name(state)))


def _worker_state(state: int) -> str:
    return str(enum_text(pb.WorkerState.DESCRIPTOR, pb.WorkerState.Name(state)))


def seconds(ts: Timestamp) -> float | None:
    return ts.ToNanoseconds() / 1e9 if ts.seconds or ts.nanos else None


def finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def fmt(x: float | None, digits: int = 4) -> str:
    """``digits`` decimals; in exponent form beyond 1e4, and for a number they would show as zero (about
    as wide: 0.0003 with 3 digits is 3e-04, not 0.000)."""
    if x is None or not math.isfinite(x):
        return "-"
    fixed = f"{x:.{digits}f}"
    if abs(x) >= 1e4:
        return f"{x:.{digits - 1}e}"
    if x != 0 and not fixed.strip("-0."):
        return f"{x:.{max(0, digits - 3)}e}"
    return fixed


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d"


def counted(n: int, noun: str, plural: str = "") -> str:
    """'1 worker', '4 workers', '2 pushes' (``plural``): a count and its noun, in the singular for one."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def staleness_text(s: int) -> str:
    return "0 (BSP)" if s == 0 else "inf (ASP)" if s < 0 else f"{s} (SSP)"


def message_to_dict(msg: Message) -> dict[str, Any]:
    """A message as psctl's JSON: proto JSON (field names as in the .proto, zeros included, 64-bit
    ints as numbers (strings beyond 2**53, which a double would round), unset message fields left
    out), with the values in the form every other psctl JSON uses: an enum value as its short
    lower-case name (RUN_STATE_COMPLETED -> "completed", as ``state_name``), a Timestamp as Unix
    seconds, a Duration as seconds, NaN or infinity as null."""
    doc = json_format.MessageToDict(msg, always_print_fields_with_no_presence=True, preserving_proto_field_name=True,
                                    unquote_int64_if_possible=True)
    return dict(_plain_message(msg, dict(doc)))


_NOT_A_NUMBER = ("NaN", "Infinity", "-Infinity")
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def enum_text(enum: EnumDescriptor, name: Any) -> Any:
    """'RUN_STATE_COMPLETED' of RunState -> 'completed' (buf's lint prefixes every value with its
    enum's name); a number (a value this psctl does not know) stays a number."""
    if not isinstance(name, str):
        return name
    prefix = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", enum.name).upper() + "_"
    return name.removeprefix(prefix).lower()


def _plain_message(msg: Message, doc: dict[str, Any]) -> Any:
    full_name = msg.DESCRIPTOR.full_name
    if full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return msg.ToNanoseconds() / 1e9
    for field in msg.DESCRIPTOR.fields:
        if field.name in doc:
            doc[field.name] = _plain_field(field, getattr(msg, field.name), doc[field.name])
    return doc


def _plain_field(field: FieldDescriptor, value: Any, doc: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entry = field.message_type.fields_by_name["value"]
        if entry.message_type is not None:
            return {k: _plain_message(value[key], v) for key, (k, v) in zip(value, doc.items(), strict=True)}
        return {k: _plain_scalar(entry, v) for k, v in doc.items()}
    if field.is_repeated:
        if field.message_type is not None:
            return [_plain_message(m, d) for m, d in zip(value, doc, strict=True)]
        return [_plain_scalar(field, v) for v in doc]
    if field.message_type is not None:
        return _plain_message(value, doc)
    return _plain_scalar(field, doc)


def _plain_scalar(field: FieldDescriptor, doc: Any) -> Any:
    if field.enum_type is not None:
        return enum_text(field.enum_type, doc)
    if field.type in _FLOATS and doc in _NOT_A_NUMBER:
        return None
    return doc


def _spec_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _model_text(spec: pb.RunSpec) -> str | None:
    """``mlp:64:relu``, ``fm:8:rows=N``...; None when the spec does not say (a ListRuns summary)."""
    m = _spec_json(spec.model_spec_json)
    if m.get("kind") == "mlp":
        return f"mlp:{','.join(map(str, m.get('hidden', [])))}:{m.get('activation', 'relu')}"
    rows = f":rows={m['rows']}" if "rows" in m else ""
    if m.get("kind") == "fm":
        return f"fm:{m.get('factors', '?')}{rows}"
    if m.get("kind") == "mf":
        return f"mf:{m.get('factors', '?')}" + (f":reg={m['reg']:g}" if m.get("reg") else "")
    if m.get("kind") == "logistic":
        return f"logistic{rows}"
    return str(m["kind"]) if "kind" in m else None


def _data_text(spec: pb.RunSpec) -> str | None:
    d = _spec_json(spec.data_spec_json)
    if "kind" not in d:
        return None
    return f"{d['kind']}:{d.get('path')}" if d["kind"] in ("npz", "libsvm") else str(d["kind"])


def _optimizer_text(opt: pb.OptimizerSpec) -> tuple[str, float]:
    kind = opt.WhichOneof("kind") or "?"
    if kind == "momentum" and opt.momentum.nesterov:
        return f"nesterov (momentum {opt.momentum.momentum:g})", opt.momentum.learning_rate
    if kind == "momentum":
        return f"momentum {opt.momentum.momentum:g}", opt.momentum.learning_rate
    if kind == "ftrl":  # beta 0 on the wire is the server's default, 1
        f = opt.ftrl
        return f"ftrl (l1 {f.l1:g}, l2 {f.l2:g}, beta {f.beta or 1.0:g})", f.learning_rate
    lr = getattr(opt, kind).learning_rate if kind != "?" else float("nan")
    return kind, lr


def _eval(run: pb.Run) -> pb.MetricPoint | None:
    return run.last_eval if run.HasField("last_eval") and run.last_eval.eval else None


def auc(point: pb.MetricPoint) -> float | None:
    """An evaluation's ROC AUC, or None when it has none (0 or NaN: not a binary model, an older server)."""
    value = finite(point.eval_auc)
    return value if value else None


def param_texts(run: pb.Run, limit: int = 4) -> list[str]:
    """'fm.table (1048576 x 9, table)', one per parameter (tables first), at most ``limit`` of them
    and then 'and N more'."""
    params = sorted(run.spec.params, key=lambda p: not p.table)
    texts = [f"{p.name} ({' x '.join(map(str, p.shape)) or 'scalar'}{', table' if p.table else ''})"
             for p in params[:limit]]
    return texts + ([f"and {len(params) - limit} more"] if len(params) > limit else [])


def compression_text(c: pb.Compression) -> str:
    """A run's compression as ``psctl launch --compress`` takes it: "none", "fp16", "topk:0.01,bf16"."""
    half = {pb.DATA_TYPE_FLOAT16: "fp16", pb.DATA_TYPE_BFLOAT16: "bf16"}.get(c.dtype)
    parts = ([f"topk:{c.topk_ratio:g}"] if c.topk_ratio else []) + ([half] if half else [])
    return ",".join(parts) or "none"


def run_facts(run: pb.Run, now: float | None = None) -> dict[str, Any]:
    """Derived numbers shared by every view: progress, accuracy, timings, staleness, lags."""
    now = time.time() if now is None else now
    c, spec, ev = run.counters, run.spec, _eval(run)
    created, started, finished = seconds(run.created), seconds(run.started), seconds(run.finished)
    end = finished or now
    live = [w for w in run.workers if w.state in (pb.WORKER_STATE_ACTIVE, pb.WORKER_STATE_DONE, pb.WORKER_STATE_STOPPED)]
    # The ranks holding the others back: those at the min clock (at most 3), when some are ahead.
    slowest = [w for w in live if w.clock == run.min_clock][:3] if run.max_clock > run.min_clock else []
    optimizer, lr = _optimizer_text(spec.optimizer)
    return {
        "run_id": run.run_id,
        "name": spec.name,
        "state": state_name(run.state),
        "message": run.message,
        "model": _model_text(spec),
        "dataset": _data_text(spec),
        "optimizer": optimizer,
        "lr": lr,
        "staleness": spec.staleness,
        "compress": compression_text(spec.compression),
        "staleness_aware_lr": spec.staleness_aware_lr,
        "lr_scale_mean": c.lr_scale_sum / c.lr_scaled if c.lr_scaled else None,
        "batch_size": spec.batch_size,
        "iterations": spec.iterations,
        "workers": spec.num_workers,
        "workers_active": run.active_workers,
        "min_clock": run.min_clock,
        "max_clock": run.max_clock,
        "progress": run.min_clock / spec.iterations if spec.iterations else 0.0,
        "waiting_for": run.waiting_for,
        "slowest": [{"rank": w.rank, "clock": w.clock, "lag": run.max_clock - w.clock} for w in slowest],
        "test_accuracy": finite(ev.eval_accuracy) if ev else None,
        "test_loss": finite(ev.eval_loss) if ev else None,
        "test_auc": auc(ev) if ev else None,
        "eval_clock": ev.clock if ev else None,
        "age_seconds": now - created if created else None,
        "wall_seconds": end - created if created else None,
        "train_seconds": end - started if started else None,
        "pushes_applied": c.pushes_applied,
        "pushes_duplicate": c.pushes_duplicate,
        "pushes_rejected": c.pushes_rejected,
        "pulls_served": c.pulls_served,
        "pulls_parked": c.pulls_parked,
        "parked_seconds": c.parked_seconds,
        "pulls_skipped": c.pulls_skipped,
        "bytes_pushed": c.bytes_pushed,
        "bytes_pulled": c.bytes_pulled,
        "updates_applied": c.updates_applied,
        "evictions": c.evictions,
        "staleness_mean": c.staleness_sum / c.pulls_served if c.pulls_served else 0.0,
        "staleness_max": c.staleness_max,
        "requires": list(spec.requires),
        "tables": [p.name for p in spec.params if p.table],
    }


def launch_result(run: pb.Run) -> dict[str, Any]:
    """The one JSON object ``psctl launch --wait --json`` prints at the end."""
    keys = ("run_id", "name", "state", "message", "test_accuracy", "test_loss", "test_auc", "eval_clock", "iterations",
            "min_clock", "wall_seconds", "train_seconds", "pushes_applied", "pushes_duplicate", "pushes_rejected",
            "pulls_served", "pulls_parked", "parked_seconds", "pulls_skipped", "updates_applied", "evictions",
            "staleness_mean", "staleness_max", "staleness", "workers", "model", "dataset", "optimizer", "lr",
            "compress", "bytes_pushed", "bytes_pulled", "staleness_aware_lr", "lr_scale_mean")
    facts = run_facts(run)
    return {k: facts[k] for k in keys}


def run_headline(run: pb.Run) -> str:
    """'run-x: mlp:64:relu on digits, 4 workers, staleness 2 (SSP), sgd lr 0.1, 120 iterations'."""
    f = run_facts(run)
    return (f"{f['run_id']}: {f['model'] or '?'} on {f['dataset'] or '?'}, {counted(f['workers'], 'worker')}, staleness "
            f"{staleness_text(f['staleness'])}, {f['optimizer']} lr {f['lr']:g}, {counted(f['iterations'], 'iteration')}")


def summary_line(run: pb.Run) -> str:
    """'run-x completed in 4.2 s: test accuracy 0.9611, test loss 0.1234 (480 pushes, 0 duplicates)';
    a binary model's: 'test AUC 0.7912, log-loss 0.4541, accuracy 0.80 (...)'."""
    f = run_facts(run)
    head = f"{f['run_id']} {f['state']} in {f['wall_seconds'] or 0.0:.1f} s"
    if f["state"] != "completed":
        return head + (f": {f['message']}" if f["message"] else "")
    counts = f"({counted(f['pushes_applied'], 'push', 'pushes')}, {counted(f['pushes_duplicate'], 'duplicate')})"
    if any(w.state in (pb.WORKER_STATE_EVICTED, pb.WORKER_STATE_VACANT) and w.clock < run.spec.iterations
           for w in run.workers) or (run.HasField("last_eval") and run.last_eval.clock < run.spec.iterations):
        # completed without some rank's iterations, or its final evaluation (the score above is an
        # earlier one): the message says whose, and of which clock
        counts += f"; {f['message']}"
    if f["test_auc"] is not None:
        return (f"{head}: test AUC {fmt(f['test_auc'])}, log-loss {fmt(f['test_loss'])}, "
                f"accuracy {fmt(f['test_accuracy'], 2)} {counts}")
    acc = f"test accuracy {fmt(f['test_accuracy'])}, " if f["test_accuracy"] is not None else ""
    return f"{head}: {acc}test loss {fmt(f['test_loss'])} {counts}"


def train_loss(run: pb.Run, metrics: pb.GetMetricsResponse | None) -> float | None:
    """The ranks' latest minibatch losses, averaged (else the train loss of the last evaluation)."""
    latest: dict[int, float | None] = recent(metrics, evals=0, events=0)["last_train_loss"]
    losses = [v for v in latest.values() if v is not None]
    if losses:
        return sum(losses) / len(losses)
    return finite(run.last_eval.loss) if run.HasField("last_eval") else None


def progress_line(run: pb.Run, metrics: pb.GetMetricsResponse | None = None) -> str:
    """One plain-text line of a followed run, for logs and pipes: 'running  clock 120/480  workers
    4/4 active  waiting: <what for>  train loss 0.1234  test accuracy 0.9123' (a binary model's ends
    'test AUC 0.7912  log-loss 0.4541')."""
    f = run_facts(run)
    parts = [f["state"], f"clock {f['min_clock']}/{f['iterations']}", f"workers {f['workers_active']}/{f['workers']} active"]
    if f["waiting_for"]:
        parts.append(f"waiting: {f['waiting_for']}")
    loss = train_loss(run, metrics)
    if loss is not None:
        parts.append(f"train loss {fmt(loss)}")
    if f["test_auc"] is not None:  # a binary (CTR) model: AUC and log-loss say more than accuracy
        parts += [f"test AUC {fmt(f['test_auc'])}", f"log-loss {fmt(f['test_loss'])}"]
    elif f["test_accuracy"] is None and f["test_loss"] is not None:  # a regression: no accuracy
        parts.append(f"test loss {fmt(f['test_loss'])}")
    else:
        parts.append(f"test accuracy {fmt(f['test_accuracy'])}")
    if f["message"] and f["state"] not in ("pending", "running"):
        parts.append(f"({f['message']})")
    return "  ".join(parts)


def worker_rows(run: pb.Run, now: float) -> list[dict[str, Any]]:
    s, iters = run.spec.staleness, run.spec.iterations
    pending = run.state == pb.RUN_STATE_PENDING  # a pull is served once every rank joined, whatever the min clock
    live = pending or run.state == pb.RUN_STATE_RUNNING  # an ended run's last snapshot may have pulls being let go
    rows = []
    for w in run.workers:
        seen = seconds(w.last_seen)
        waiting = w.waiting and live
        need = None
        if waiting and not pending:
            need = iters if w.waiting_for_clock >= iters else (None if s < 0 else w.waiting_for_clock - s)
        rows.append({
            "rank": w.rank, "state": _worker_state(w.state), "incarnation": w.incarnation, "clock": w.clock,
            "lag": run.max_clock - w.clock if w.state != pb.WORKER_STATE_VACANT else None,
            "heartbeat_seconds_ago": now - seen if seen else None, "pushes": w.pushes,
            "pulls_skipped": w.pulls_skipped, "waiting": waiting,
            "waiting_pull_clock": w.waiting_for_clock if waiting else None, "needs_min_clock": need,
            "needs_start": waiting and pending,
            "worker_name": w.worker_name, "data_plane": w.data_plane or None,
        })
    return rows


def recent(metrics: pb.GetMetricsResponse | None, evals: int = 5, events: int = 8) -> dict[str, Any]:
    points = list(metrics.points) if metrics else []
    train = sorted((p for p in points if not p.eval), key=lambda p: seconds(p.time) or 0.0)
    latest: dict[int, pb.MetricPoint] = {}
    for p in train:
        latest[p.rank] = p
    return {
        "eval": [{"clock": p.clock, "time": seconds(p.time), "test_loss": finite(p.eval_loss),
                  "test_accuracy": finite(p.eval_accuracy), "test_auc": auc(p), "train_loss": finite(p.loss)}
                 for p in [p for p in points if p.eval][-evals:]],
        "train_loss": [p.loss for p in train],
        "last_train_loss": {r: finite(p.loss) for r, p in sorted(latest.items())},
        "events": event_dicts(list(metrics.events)[-events:] if metrics else []),
    }


def event_dicts(events: Iterable[pb.RunEvent]) -> list[dict[str, Any]]:
    """Events as JSON: time (Unix seconds), kind, rank (-1: the run's), message."""
    return [{"time": seconds(e.time), "kind": e.kind, "rank": e.rank, "message": e.message} for e in events]


def shard_rows(run: pb.Run) -> list[dict[str, Any]]:
    """A run's shards, one per server holding its parameters (none for a run on one server)."""
    held = {s.index: [f"{pc.name}[{pc.row_start}:{pc.row_end}]" for pc in s.pieces] for s in run.shard_map.shards}
    return [{
        "index": s.index, "address": s.address, "reachable": s.reachable, "error": s.error or None,
        "state": state_name(s.state) if s.reachable else "unreachable", "bytes_held": s.bytes_held,
        "min_clock": s.min_clock, "max_clock": s.max_clock, "pushes_applied": s.pushes_applied,
        "pushes_per_second": s.pushes_per_second, "rss_bytes": s.rss_bytes or None, "pieces": held.get(s.index, []),
        "held_because": s.held or None,
    } for s in run.shards]


def status_dict(run: pb.Run, metrics: pb.GetMetricsResponse | None, now: float | None = None) -> dict[str, Any]:
    """``psctl status --json``: the run as proto JSON plus the computed facts the view shows."""
    now = time.time() if now is None else now
    latest = recent(metrics)
    latest.pop("train_loss")
    return {"run": message_to_dict(run), "summary": run_facts(run, now), "workers": worker_rows(run, now),
            "shards": shard_rows(run), **latest}


def event_rows(metrics: pb.GetMetricsResponse) -> list[dict[str, str]]:
    """``psctl metrics``' event list: local time of day (ms), kind, 'rank N' or '-', message."""
    rows = []
    for e in metrics.events:
        when = seconds(e.time)
        stamp = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
                 if when is not None else "-")
        rows.append({"when": stamp, "kind": e.kind, "rank": f"rank {e.rank}" if e.rank >= 0 else "-",
                     "message": e.message})
    return rows


def pull_leads(metrics: pb.GetMetricsResponse) -> list[int]:
    """How far each served pull's clock was ahead of the min clock, over the clock records (SSP
    promises at most the staleness)."""
    return [r.clock - r.min_clock for r in metrics.clock_records if r.kind == pb.ClockRecord.KIND_PULL]


def pull_lead(metrics: pb.GetMetricsResponse) -> int | None:
    """The most a served pull was ahead of the min clock; None without records of pulls."""
    return max(pull_leads(metrics), default=None)


def clock_records(metrics: pb.GetMetricsResponse) -> list[tuple[str, int, int, float]]:
    """The clock records as plain (kind "pull" | "push", rank, clock, seconds after the first)
    (``simulate.Record``): exact to the nanosecond, as recorded."""
    t0 = min((r.time.ToNanoseconds() for r in metrics.clock_records), default=0)
    return [("pull" if r.kind == pb.ClockRecord.KIND_PULL else "push", r.rank, r.clock,
             (r.time.ToNanoseconds() - t0) / 1e9)
            for r in metrics.clock_records if r.kind in (pb.ClockRecord.KIND_PULL, pb.ClockRecord.KIND_PUSH)]


def bounds_in_force(run: pb.Run, metrics: pb.GetMetricsResponse) -> tuple[int, bool]:
    """The tightest staleness bound the run has had (-1 only if it was always unbounded), and
    whether its bound changed while it ran: the server's ``Run.tightest_staleness`` and
    ``loosest_staleness``, which keep the bounds ``psctl set`` replaced. From a server without them:
    its bound now and its schedule's steps (a bound ``psctl set`` replaced is then unknown)."""
    if run.HasField("tightest_staleness") and run.HasField("loosest_staleness"):
        return run.tightest_staleness, run.tightest_staleness != run.loosest_staleness
    known = [run.spec.staleness, *(step.staleness for step in run.spec.staleness_schedule)]
    changed = len(set(known)) > 1 or any(e.kind == "staleness" for e in metrics.events)
    return min(known, key=lambda s: math.inf if s < 0 else s), changed


def eval_history(metrics: pb.GetMetricsResponse) -> list[dict[str, Any]]:
    """Every evaluation of a run, oldest first: clock, wall time (Unix seconds), test accuracy, loss
    (a binary model's: log-loss) and AUC (None but for binary models)."""
    points = sorted((p for p in metrics.points if p.eval), key=lambda p: (p.clock, seconds(p.time) or 0.0))
    return [{"clock": p.clock, "time": seconds(p.time), "test_accuracy": finite(p.eval_accuracy),
             "test_loss": finite(p.eval_loss), "test_auc": auc(p)} for p in points]

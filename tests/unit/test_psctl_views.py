"""psctl's views from protobuf messages alone (``client.facts``, ``client.render``): no server."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from client import facts, render
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def make_run(state: pb.RunState = pb.RUN_STATE_RUNNING, clocks: tuple[int, ...] = (5, 7, 7, 6), accuracy: float = 0.9,
             **kw: object) -> pb.Run:
    run = pb.Run(run_id="run-1", state=state, min_clock=min(clocks), max_clock=max(clocks),
                 spec=pb.RunSpec(name="test", num_workers=len(clocks), iterations=100, staleness=2,
                                 model_spec_json='{"kind": "softmax"}', data_spec_json='{"kind": "digits"}'),
                 workers=[pb.WorkerStatus(rank=r, state=pb.WORKER_STATE_ACTIVE, clock=c) for r, c in enumerate(clocks)],
                 **kw)  # type: ignore[arg-type]
    run.created.GetCurrentTime()
    run.last_eval.CopyFrom(pb.MetricPoint(eval=True, clock=4, eval_loss=0.25, eval_accuracy=accuracy, loss=0.5))
    return run


def text(renderable: object, width: int = 80) -> str:
    out = io.StringIO()
    Console(file=out, width=width).print(renderable)
    return out.getvalue()


@pytest.mark.parametrize(("description", "done", "total", "fields"), [
    ("running", 12000, 12345, {"epoch": "123.4", "loss": "0.123", "acc": "0.961"}),
    ("pending: 3/16 joined", 0, 480, {"epoch": "0.0", "loss": "-", "acc": "-"}),
])
def test_the_progress_bar_names_its_loss_and_fits_80_columns(description: str, done: int, total: int,
                                                             fields: dict[str, str]) -> None:
    progress = render.launch_progress(console=Console(file=io.StringIO(), width=80))
    progress.add_task(description, total=total, completed=done, epoch=fields["epoch"], loss=fields["loss"],
                      acc=fields["acc"])
    (line,) = text(progress.get_renderable()).splitlines()
    assert line.startswith(description) and f"{done}/{total}" in line, line
    assert f"epoch {fields['epoch']} train loss {fields['loss']} test acc {fields['acc']} ETA" in line, line
    assert len(line) <= 80


def test_the_summary_and_the_runs_table_say_which_loss() -> None:
    done = make_run(pb.RUN_STATE_COMPLETED, (100, 100, 100, 100))
    assert ": test accuracy 0.9000, test loss 0.2500 (" in facts.summary_line(done)
    regression = make_run(accuracy=float("nan"))
    assert "test loss 0.2500" in text(render.runs_table([regression]), width=200)


def test_slowest_names_only_the_ranks_holding_the_run_back() -> None:
    """Not the three lowest clocks (ranks 0 behind among them): the ranks at the min clock."""
    run = make_run(clocks=(7, 5, 7, 6))
    assert facts.run_facts(run)["slowest"] == [{"rank": 1, "clock": 5, "lag": 2}]
    view = text(render.status_view(run, None), width=200)
    assert "slowest rank 1 (clock 5, 2 behind)\n" in view
    tied = make_run(clocks=(5, 7, 5, 6))
    assert [s["rank"] for s in facts.run_facts(tied)["slowest"]] == [0, 2]
    assert facts.run_facts(make_run(clocks=(6, 6, 6, 6)))["slowest"] == []  # nobody is behind

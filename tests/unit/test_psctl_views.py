"""psctl's views from protobuf messages alone (``client.facts``, ``client.render``): no server."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize("width", [40, 60, 80, 120])
@pytest.mark.parametrize(("description", "done", "total", "fields"), [
    ("running", 12000, 12345, {"epoch": "123.4", "loss": "0.123", "acc": "0.961"}),
    ("pending: 1000/1024 joined", 0, 10_000, {"epoch": "0.0", "loss": "-", "acc": "-"}),
    ("running", 5, 100, {"epoch": "0.1", "loss": "1.23e+04", "metric": "AUC", "acc": "0.512"}),
])
def test_the_progress_bar_leaves_out_whole_columns_on_a_narrow_terminal(description: str, done: int, total: int,
                                                                         fields: dict[str, str], width: int) -> None:
    """(rich cut every column short instead: at 60 columns 'epoch 12…', 'train loss 0.…', 'test acc 0.…',
    and at 80 a pending run of many ranks lost its loss and score the same way.)"""
    progress = render.launch_progress(console=Console(file=io.StringIO(), width=width))
    progress.add_task(description, total=total, completed=done, **fields)
    (line,) = text(progress.get_renderable(), width).splitlines()
    assert len(line) <= width and "…" not in line, line
    assert line.startswith(description) and f"{done}/{total}" in line, line
    shown = {"epoch": f"epoch {fields['epoch']}", "loss": f"train loss {fields['loss']}",
             "score": f"test {fields.get('metric', 'acc')} {fields['acc']}", "eta": "ETA -:--:--"}
    for name, label in shown.items():
        assert label in line or label.split()[0] not in line, (name, line)
    assert shown["loss"] in line or "pending" in line  # the last to go
    if width >= 80 and "pending" not in line:
        assert all(label in line for label in shown.values()), line
    if width >= 120 and done:  # (an empty bar is drawn blank without colours)
        assert "━" in line or "╸" in line, line


def test_a_progress_line_too_wide_for_its_state_and_clock_cuts_the_state() -> None:
    progress = render.launch_progress(console=Console(file=io.StringIO(), width=40))
    progress.add_task("pending: 1000/1024 joined", total=1_000_000, completed=0, epoch="0.0", loss="-", acc="-")
    (line,) = text(progress.get_renderable(), 40).splitlines()
    assert line == "pending: 1000/1024 join…       0/1000000", line


def test_the_summary_and_the_runs_table_say_which_loss() -> None:
    done = make_run(pb.RUN_STATE_COMPLETED, (100, 100, 100, 100))
    assert ": test accuracy 0.9000, test loss 0.2500 (" in facts.summary_line(done)
    regression = make_run(accuracy=float("nan"))
    assert "test loss 0.2500" in text(render.runs_table([regression]), width=200)


def test_the_summary_of_a_run_completed_without_an_evicted_rank_says_so() -> None:
    message = "the other ranks finished; rank 1 (clock 13) left vacant: 87 iterations dropped"
    done = make_run(pb.RUN_STATE_COMPLETED, (100, 13), message=message)
    done.workers[1].state = pb.WORKER_STATE_EVICTED
    assert facts.summary_line(done).endswith(f"(0 pushes, 0 duplicates); {message}"), facts.summary_line(done)
    whole = make_run(pb.RUN_STATE_COMPLETED, (100, 100), message="all ranks finished")
    whole.last_eval.clock = 100
    assert facts.summary_line(whole).endswith("(0 pushes, 0 duplicates)")


def test_the_summary_of_a_run_completed_without_its_final_evaluation_says_so() -> None:
    """Rank 0 evicted after its last push: the score is of an earlier clock (the summary gave it as
    the run's final accuracy, without a word)."""
    message = ("all ranks finished; the final parameters were not evaluated (rank 0 did not leave): the last "
               "evaluation is of clock 4")
    done = make_run(pb.RUN_STATE_COMPLETED, (100, 100), message=message)
    assert facts.summary_line(done).endswith(f"test accuracy 0.9000, test loss 0.2500 (0 pushes, 0 duplicates); "
                                             f"{message}"), facts.summary_line(done)


def test_launch_json_says_which_clock_its_accuracy_is_of_and_the_readme_names_the_key() -> None:
    """Rank 0 evicted after its last push: the accuracy is of an earlier clock, which the human
    summary says and the JSON gives as ``eval_clock``; the README's launch --json did not name it."""
    done = make_run(pb.RUN_STATE_COMPLETED, (100, 100), message="the last evaluation is of clock 4")
    result = facts.launch_result(done)
    assert result["test_accuracy"] == pytest.approx(0.9) and result["eval_clock"] == 4 < result["iterations"]
    done.ClearField("last_eval")
    assert facts.launch_result(done)["eval_clock"] is None
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `psctl launch ")]
    assert "`eval_clock`, the clock they are of" in row.partition("`--json --wait`")[2], row


def test_slowest_names_only_the_ranks_holding_the_run_back() -> None:
    """Not the three lowest clocks (ranks 0 behind among them): the ranks at the min clock."""
    run = make_run(clocks=(7, 5, 7, 6))
    assert facts.run_facts(run)["slowest"] == [{"rank": 1, "clock": 5, "lag": 2}]
    view = text(render.status_view(run, None), width=200)
    assert "slowest rank 1 (clock 5, 2 behind)\n" in view
    tied = make_run(clocks=(5, 7, 5, 6))
    assert [s["rank"] for s in facts.run_facts(tied)["slowest"]] == [0, 2]
    assert facts.run_facts(make_run(clocks=(6, 6, 6, 6)))["slowest"] == []  # nobody is behind


# ------------------------------------------------------------------------------------ CTR runs and FTRL
def make_ctr_run(state: pb.RunState = pb.RUN_STATE_COMPLETED, auc: float = 0.7912) -> pb.Run:
    """A CTR run (fm with a table), its last evaluation carrying an AUC; its eval_loss is the log-loss."""
    run = make_run(state, (100, 100, 100, 100), accuracy=0.8)
    run.spec.model_spec_json = '{"kind": "fm", "factors": 8, "rows": 1048576}'
    run.spec.data_spec_json = '{"kind": "synthetic-ctr"}'
    run.spec.params.extend([pb.ParamSpec(name="fm.bias", shape=[1]),
                            pb.ParamSpec(name="fm.table", shape=[1048576, 9], table=True)])
    run.spec.requires.extend(["tables", "model:fm"])
    run.last_eval.eval_loss, run.last_eval.eval_auc = 0.4541, auc
    return run


def ctr_metrics(aucs: tuple[float, ...] = (0.61, 0.7912)) -> pb.GetMetricsResponse:
    points = [pb.MetricPoint(eval=True, clock=10 * (i + 1), eval_loss=0.5 - 0.01 * i, eval_accuracy=0.8, eval_auc=a,
                             loss=0.5) for i, a in enumerate(aucs)]
    for i, p in enumerate(points):
        p.time.FromSeconds(1_700_000_000 + i)
    return pb.GetMetricsResponse(points=points)


def test_a_ctr_run_reports_its_auc_and_log_loss() -> None:
    run = make_ctr_run()
    f = facts.run_facts(run)
    assert f["test_auc"] == pytest.approx(0.7912) and f["model"] == "fm:8:rows=1048576"
    assert f["requires"] == ["tables", "model:fm"] and f["tables"] == ["fm.table"]
    assert facts.launch_result(run)["test_auc"] == pytest.approx(0.7912)
    assert ": test AUC 0.7912, log-loss 0.4541, accuracy 0.80 (" in facts.summary_line(run)
    live = make_ctr_run(pb.RUN_STATE_RUNNING)
    assert facts.progress_line(live).endswith("test AUC 0.7912  log-loss 0.4541")
    assert render.progress_fields(live, None, None)["metric"] == "AUC"
    assert render.progress_fields(live, None, None)["acc"] == "0.791"
    assert "AUC 0.7912" in text(render.runs_table([run]), width=200)
    history = facts.eval_history(ctr_metrics())
    assert [e["test_auc"] for e in history] == [pytest.approx(0.61), pytest.approx(0.7912)]
    assert [e["test_auc"] for e in facts.recent(ctr_metrics())["eval"]] == [pytest.approx(0.61), pytest.approx(0.7912)]


@pytest.mark.parametrize("absent", [0.0, float("nan")])
def test_an_auc_of_zero_or_nan_is_no_auc(absent: float) -> None:
    """Dense runs and older servers send 0 (or NaN): every view reads as it did before AUCs."""
    run = make_ctr_run(auc=absent)
    assert facts.run_facts(run)["test_auc"] is None and facts.launch_result(run)["test_auc"] is None
    assert ": test accuracy 0.8000, test loss 0.4541 (" in facts.summary_line(run)
    assert facts.progress_line(make_ctr_run(pb.RUN_STATE_RUNNING, auc=absent)).endswith("test accuracy 0.8000")
    assert render.progress_fields(run, None, None)["metric"] == "acc"
    assert all(e["test_auc"] is None for e in facts.eval_history(ctr_metrics((absent, absent))))
    view = text(render.status_view(run, ctr_metrics((absent, absent))), width=200)
    assert "AUC" not in view and "log-loss" not in view and "test accuracy 0.8000   test loss 0.4541" in view


def test_the_status_view_names_tables_requirements_and_the_auc() -> None:
    view = text(render.status_view(make_ctr_run(), ctr_metrics()), width=200)
    assert "params fm.table (1048576 x 9, table), fm.bias (1)   requires tables, model:fm\n" in view
    assert "test AUC 0.7912   test log-loss 0.4541   test accuracy 0.8000" in view
    assert "test log-loss" in view.split("evaluations")[1] and "0.6100" in view.split("evaluations")[1]
    dense = text(render.status_view(make_run(), None), width=200)
    assert "params" not in dense and "requires" not in dense


def test_the_progress_bar_says_auc_for_a_ctr_run() -> None:
    progress = render.launch_progress(console=Console(file=io.StringIO(), width=80))
    progress.add_task("running", total=100, completed=50, epoch="1.0", loss="0.450", metric="AUC", acc="0.791")
    (line,) = text(progress.get_renderable()).splitlines()
    assert "train loss 0.450 test AUC 0.791 ETA" in line and len(line) <= 80


def test_the_plot_of_a_ctr_run_has_its_auc_and_log_loss() -> None:
    from client.plots import curves_figure

    run = make_ctr_run()
    titles = [ax.get_title() for ax in curves_figure(run, ctr_metrics()).axes]
    assert "test AUC and log-loss vs time" in titles and "test AUC and log-loss vs clock" in titles
    labels = {line.get_label() for ax in curves_figure(run, ctr_metrics()).axes for line in ax.get_lines()}
    assert {"test AUC", "test accuracy", "test log-loss"} <= labels
    dense = [ax.get_title() for ax in curves_figure(run, ctr_metrics((0.0, 0.0))).axes]
    assert "test accuracy and test loss vs time" in dense


def test_ftrl_options_go_into_the_ftrl_config() -> None:
    from client.spec import LaunchOptions, _optimizer, check_options

    o = LaunchOptions(optimizer="ftrl", lr=0.05, l1=1.5, l2=0.25, ftrl_beta=2.0)
    check_options(o)
    assert _optimizer(o) == pb.OptimizerSpec(ftrl=pb.FtrlConfig(learning_rate=0.05, beta=2.0, l1=1.5, l2=0.25))
    assert _optimizer(LaunchOptions(optimizer="ftrl")).ftrl.beta == 1.0  # the default, sent as it is
    assert facts.run_facts(pb.Run(spec=pb.RunSpec(optimizer=_optimizer(o))))["optimizer"] == "ftrl (l1 1.5, l2 0.25, beta 2)"


@pytest.mark.parametrize(("options", "expected"), [
    ({"l1": -1.0}, "--l1 -1: use a finite number >= 0"),
    ({"l2": float("nan")}, "--l2 nan: use a finite number >= 0"),
    ({"l1": float("inf")}, "--l1 inf: use a finite number >= 0"),
    ({"ftrl_beta": 0.0}, "--ftrl-beta 0: use a finite number > 0"),
    ({"ftrl_beta": -2.0}, "--ftrl-beta -2: use a finite number > 0"),
    ({"optimizer": "adam", "l1": 0.5}, "--l1: only --optimizer ftrl takes it (not adam)"),
    ({"optimizer": "sgd", "l2": 0.5, "ftrl_beta": 3.0}, "--l2, --ftrl-beta: only --optimizer ftrl takes them"),
])
def test_bad_ftrl_options_are_refused(options: dict[str, object], expected: str) -> None:
    from client.spec import LaunchOptions, check_options

    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        check_options(LaunchOptions(**{"optimizer": "ftrl", **options}))  # type: ignore[arg-type]


def test_the_status_view_shows_the_compression_only_when_there_is_one() -> None:
    plain = text(render.status_view(make_run(), None), width=200)
    assert "compress" not in plain
    run = make_run()
    run.spec.compression.CopyFrom(pb.Compression(topk_ratio=0.01, dtype=pb.DATA_TYPE_BFLOAT16))
    assert "compress topk:0.01,bf16" in text(render.status_view(run, None), width=200)
    assert facts.launch_result(run)["compress"] == "topk:0.01,bf16"


def test_the_status_view_says_when_the_rate_is_divided_by_staleness() -> None:
    assert "/ staleness" not in text(render.status_view(make_run(), None), width=200)
    run = make_run()
    run.spec.staleness_aware_lr = True
    run.counters.lr_scaled, run.counters.lr_scale_sum = 4, 1.5
    assert "/ staleness (mean x0.38)" in text(render.status_view(run, None), width=200)
    assert facts.launch_result(run)["lr_scale_mean"] == pytest.approx(0.375)


def test_an_export_that_fails_leaves_the_file_it_would_replace(tmp_path: Path) -> None:
    """``psctl export`` writes beside the file and renames: a full disk midway leaves the previous
    export whole and no temporary behind; a whole write replaces it."""
    from client.cli import _write_atomically

    out = tmp_path / "run.npz"
    out.write_bytes(b"the previous export")

    def half(fh: Any) -> None:
        fh.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        _write_atomically(str(out), half)
    assert out.read_bytes() == b"the previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]
    _write_atomically(str(out), lambda fh: fh.write(b"new"))
    assert out.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]


@pytest.mark.parametrize(("options", "says"), [
    ({"staleness": 3_000_000_000}, "--staleness 3000000000: at most 2147483647"),
    ({"workers": 1 << 32}, "--workers 4294967296: at most 4294967295"),
    ({"batch_size": 1 << 32}, "--batch-size 4294967296: at most"),
    ({"eval_every": 1 << 40}, "--eval-every 1099511627776: at most"),
    ({"epochs": 1e30}, "--epochs 1e+30: 1.2e+31 iterations per worker, more than a run takes"),
])
def test_launch_numbers_a_run_spec_cannot_hold_name_their_flag(options: dict[str, object], says: str) -> None:
    """(protobuf said only "Value out of range: N" before.)"""
    from client.spec import LaunchOptions, build_run_spec

    with pytest.raises(ValueError, match=re.escape(says)):
        build_run_spec(LaunchOptions(**{"model": "softmax", "dataset": "digits", **options}))  # type: ignore[arg-type]


def test_launch_refuses_more_workers_than_training_examples() -> None:
    """Every rank trains on a shard of at least one example; a rank with none failed the run once
    it had started (its batch sampler refused an empty shard)."""
    from client.spec import LaunchOptions, build_run_spec

    data = "synthetic-regression:samples=10"  # 8 training examples
    with pytest.raises(ValueError, match=re.escape("--workers 9: the training split of") + ".* has 8 examples"):
        build_run_spec(LaunchOptions(model="linear", dataset=data, workers=9))
    assert build_run_spec(LaunchOptions(model="linear", dataset=data, workers=8)).num_workers == 8


def test_a_staleness_given_as_text_beyond_int32_and_a_port_beyond_65535_are_refused() -> None:
    from client.cli import _address
    from client.spec import parse_staleness

    with pytest.raises(ValueError, match="at most 2147483647"):
        parse_staleness("99999999999999999999")
    assert parse_staleness("2147483647") == 2147483647
    with pytest.raises(ValueError, match=r"a port in 1\.\.65535"):
        _address("127.0.0.1:99999")
    assert _address("127.0.0.1:65535") == "127.0.0.1:65535"


@pytest.mark.parametrize(("model", "shown"), [("mf:3", "mf:3"), ("mf:2:reg=0.01", "mf:2:reg=0.01")])
def test_a_matrix_factorisation_shows_its_factors(model: str, shown: str) -> None:
    """(``mf:3`` showed as ``mf``, its factors and regularisation left out, where ``fm:8`` keeps its 8.)"""
    from client.spec import LaunchOptions, build_run_spec

    spec = build_run_spec(LaunchOptions(model=model, dataset="synthetic-ratings:users=60,items=50,rank=2,density=0.5"))
    assert facts.run_facts(pb.Run(run_id="run-mf", spec=spec))["model"] == shown


async def test_simulate_takes_the_tightest_bound_a_run_had_even_one_psctl_set_replaced() -> None:
    """A run at s = 2 raised to 5 with ``psctl set``: its spec says 5, its tightest_staleness what it
    was; the recorded run is replayed under 2 (its pulls parked under 2), not under 5."""
    from support import make_spec

    from ps_server.testing import InMemoryServer

    async with InMemoryServer() as server, server.client() as c:
        run = await c.create_run(make_spec(num_workers=1, staleness=2))
        await c.join("w", run.run_id)
        assert facts.bounds_in_force(await c.get_run(run.run_id), pb.GetMetricsResponse()) == (2, False)
        await c.update_run(run.run_id, staleness=5)
        after, metrics = await c.get_run(run.run_id), await c.get_metrics(run.run_id)
        later = await c.create_run(make_spec(num_workers=1, staleness=4, staleness_schedule=[
            pb.StalenessStep(from_clock=5, staleness=2)]))
        assert facts.bounds_in_force(await c.get_run(later.run_id), pb.GetMetricsResponse()) == (4, False)  # not yet 2
    assert (after.spec.staleness, after.tightest_staleness, after.loosest_staleness) == (5, 2, 5)
    assert facts.bounds_in_force(after, metrics) == (2, True)
    # The events' words are not read: the field alone says it.
    assert facts.bounds_in_force(after, pb.GetMetricsResponse()) == (2, True)
    was_unbounded = pb.Run(spec=pb.RunSpec(staleness=3), tightest_staleness=3, loosest_staleness=-1)
    assert facts.bounds_in_force(was_unbounded, pb.GetMetricsResponse()) == (3, True)  # -1 is never the tightest


def test_simulate_against_a_server_without_the_bounds_takes_the_spec_and_its_schedule() -> None:
    """An older server sets no tightest_staleness: the bound now and the schedule's steps are all
    that is known (0 in the field would be BSP, not "unknown")."""
    old = pb.Run(spec=pb.RunSpec(staleness=4, staleness_schedule=[pb.StalenessStep(from_clock=5, staleness=2)]))
    assert facts.bounds_in_force(old, pb.GetMetricsResponse()) == (2, True)
    assert facts.bounds_in_force(pb.Run(spec=pb.RunSpec(staleness=-1)), pb.GetMetricsResponse()) == (-1, False)
    raised = pb.GetMetricsResponse(events=[pb.RunEvent(kind="staleness")])
    assert facts.bounds_in_force(pb.Run(spec=pb.RunSpec(staleness=3)), raised) == (3, True)


# ------------------------------------------------------------------------------------ psctl plot's file
def _plot(monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    """``psctl plot run-1 ARGS`` on a CTR run's metrics, the server's answers stood in for."""
    from typer.testing import CliRunner

    from client import cli

    monkeypatch.setattr(cli, "_with_client", lambda server, timeout, body: (make_ctr_run(), ctr_metrics()))
    return CliRunner().invoke(cli.app, ["plot", "run-1", *args])


def test_a_plot_that_fails_midway_leaves_the_file_it_would_replace(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """(savefig wrote into the file itself: a crash or a full disk midway left a truncated image.)"""
    from matplotlib.figure import Figure

    out = tmp_path / "curves.png"
    out.write_bytes(b"the previous plot")
    whole = Figure.savefig

    def half(self: Figure, fname: Any, **kw: Any) -> None:
        (fname.write if hasattr(fname, "write") else Path(fname).write_bytes)(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half)
    failed = _plot(monkeypatch, "-o", str(out))
    assert failed.exit_code == 1 and "No space left on device" in failed.stderr, failed.output
    assert out.read_bytes() == b"the previous plot" and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    monkeypatch.setattr(Figure, "savefig", whole)
    assert _plot(monkeypatch, "-o", str(out)).exit_code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_a_plot_is_written_to_the_file_named_and_a_format_matplotlib_lacks_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``-o curves`` wrote curves.png while psctl said 'wrote curves'; ``-o x.jpgx`` said only
    matplotlib's "Format 'jpgx' is not supported"."""
    plain = _plot(monkeypatch, "-o", str(tmp_path / "curves"))
    assert plain.exit_code == 0 and f"wrote {tmp_path / 'curves'}:" in plain.stdout, plain.output
    assert [p.name for p in tmp_path.iterdir()] == ["curves"]
    assert (tmp_path / "curves").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "c.svg").exists() is False and _plot(monkeypatch, "-o", str(tmp_path / "c.svg")).exit_code == 0
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:400]
    bad = _plot(monkeypatch, "-o", str(tmp_path / "c.jpgx"))
    assert bad.exit_code == 1 and f"-o {str(tmp_path / 'c.jpgx')!r}: " in bad.stderr and ".png" in bad.stderr, bad.output
    assert not (tmp_path / "c.jpgx").exists()


def test_the_plot_of_a_regression_shows_its_test_loss_on_an_axis_of_its_own() -> None:
    """A regression's evaluations have no accuracy (NaN): the panels had an empty accuracy axis,
    0 to 1, with the loss on a second axis beside it."""
    from client.plots import curves_figure

    run = make_run(accuracy=float("nan"))
    points = [pb.MetricPoint(eval=True, clock=10 * (i + 1), eval_loss=0.5 / (i + 1), eval_accuracy=float("nan"))
              for i in range(3)]
    fig = curves_figure(run, pb.GetMetricsResponse(points=points))
    evals = [ax for ax in fig.axes if "test" in ax.get_title()]
    assert [ax.get_title() for ax in evals] == ["test loss vs time", "test loss vs clock"]
    assert len(fig.axes) == 4  # no second axis beside either
    for ax in evals:
        assert ax.get_ylabel() == "test loss" and [line.get_label() for line in ax.get_lines()] == ["test loss"]
        assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([0.5, 0.25, 0.5 / 3])


def test_psctl_counts_one_in_the_singular(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """(psctl said '1 workers', '1 iterations', '(1 pushes, ...)', '1 evaluations'.)"""
    from typer.testing import CliRunner

    from client import cli
    from client.plots import curves_figure

    one = make_run(pb.RUN_STATE_COMPLETED, (1,))
    one.spec.iterations, one.counters.pushes_applied, one.counters.pushes_duplicate = 1, 1, 1
    assert ", 1 worker, staleness 2 (SSP), " in facts.run_headline(one) and facts.run_headline(one).endswith(" 1 iteration")
    assert facts.summary_line(one).endswith("(1 push, 1 duplicate)")
    assert "(1 worker, SSP s=2)" in curves_figure(one, pb.GetMetricsResponse())._suptitle.get_text()  # type: ignore[union-attr]
    point = pb.MetricPoint(eval=True, clock=1, eval_loss=0.5, eval_accuracy=0.5)
    train = pb.MetricPoint(clock=1, loss=0.5)
    monkeypatch.setattr(cli, "_with_client", lambda server, timeout, body: (one, pb.GetMetricsResponse(points=[point, train])))
    plotted = CliRunner().invoke(cli.app, ["plot", "run-1", "-o", str(tmp_path / "p.png")])
    assert plotted.stdout.endswith(": 1 training point, 1 evaluation\n"), plotted.output
    monkeypatch.setattr(cli, "_with_client", lambda server, timeout, body: pb.GetMetricsResponse(
        points=[point, train], events=[pb.RunEvent(kind="created")], clock_records=[pb.ClockRecord()]))
    listed = CliRunner().invoke(cli.app, ["metrics", "run-1"])
    assert listed.stdout.startswith("run-1: 1 training point, 1 evaluation, 1 event, 1 clock record\n"), listed.output


def test_a_regression_s_views_show_its_test_loss_without_an_accuracy_it_has_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """(psctl status said 'test accuracy -' and had a column of dashes for it; psctl metrics
    'test accuracy -' on every evaluation.)"""
    from typer.testing import CliRunner

    from client import cli

    run = make_run(accuracy=float("nan"))
    points = [pb.MetricPoint(eval=True, clock=10 * (i + 1), eval_loss=0.5 / (i + 1), eval_accuracy=float("nan"),
                             loss=0.5) for i in range(2)]
    view = text(render.status_view(run, pb.GetMetricsResponse(points=points)), width=200)
    assert "test loss 0.2500" in view and "accuracy" not in view, view
    assert "clock   test loss   train loss" in view.split("evaluations")[1], view
    monkeypatch.setattr(cli, "_with_client", lambda server, timeout, body: pb.GetMetricsResponse(points=points))
    listed = CliRunner().invoke(cli.app, ["metrics", "run-1"])
    assert "  clock     10  test loss 0.5000\n" in listed.stdout and "accuracy" not in listed.stdout, listed.stdout
    classified = text(render.status_view(make_run(), None), width=200)
    assert "test accuracy 0.9000   test loss 0.2500" in classified


@pytest.mark.parametrize("flag", ["-o", "--plot"])
def test_an_output_that_is_a_directory_is_refused_naming_it(tmp_path: Path, flag: str) -> None:
    """(``psctl export RUN -o /tmp`` said "[Errno 21] Is a directory: '/.psctl-vub3hjum.tmp' -> '/tmp'",
    a temporary file the user never named, made in /; ``-o DIR/`` "Not a directory".)"""
    from client.cli import _write_atomically

    (tmp_path / "out").mkdir()
    for path in (str(tmp_path / "out"), str(tmp_path / "out") + "/", str(tmp_path / "new") + "/"):
        with pytest.raises(ValueError, match=re.escape(f"{flag} {path!r}: a directory; name the file to write")):
            _write_atomically(path, lambda fh: fh.write(b"x"), flag)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out"]


def test_the_progress_bar_of_a_regression_shows_its_test_loss() -> None:
    """(It said 'test acc -' to the end: a regression has no accuracy.)"""
    run = make_run(accuracy=float("nan"))
    fields = render.progress_fields(run, None, 10)
    assert (fields["metric"], fields["acc"]) == ("loss", "0.250")
    progress = render.launch_progress(console=Console(file=io.StringIO(), width=80))
    progress.add_task(**fields)
    (line,) = text(progress.get_renderable()).splitlines()
    assert "test loss 0.250 ETA" in line and len(line) <= 80, line
    assert render.progress_fields(make_run(), None, 10)["metric"] == "acc"


def test_a_bad_address_from_the_environment_is_named_as_the_environment_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """(PSCTL_SERVER=localhost said "--server 'localhost': use HOST:PORT" to a user who gave no --server.)"""
    from typer.testing import CliRunner

    from client import cli

    monkeypatch.setenv("PSCTL_SERVER", "localhost")
    result = CliRunner().invoke(cli.app, ["runs"])
    assert result.exit_code == 1 and "Error: PSCTL_SERVER='localhost': use HOST:PORT" in result.stderr, result.output
    given = CliRunner().invoke(cli.app, ["runs", "--server", "nohost"])
    assert given.exit_code == 1 and "Error: --server 'nohost': use HOST:PORT" in given.stderr, given.output


def test_a_run_whose_spec_does_not_say_its_model_has_none_in_json() -> None:
    """ListRuns' summaries carry no model or data JSON (nor do runs an SDK program made without
    them): psctl runs --json said "model": "?", "dataset": "?"."""
    summary = make_run()
    summary.spec.model_spec_json = summary.spec.data_spec_json = ""
    f = facts.run_facts(summary)
    assert (f["model"], f["dataset"]) == (None, None)
    assert "model ?   dataset ?   " in text(render.status_view(summary, None), width=200)
    assert facts.run_headline(summary).startswith("run-1: ? on ?, 4 workers")
    assert (facts.run_facts(make_run())["model"], facts.run_facts(make_run())["dataset"]) == ("softmax", "digits")


def test_a_small_nonzero_number_is_not_shown_as_zero() -> None:
    """(A regression's losses below 0.0005 read 'train loss 0.000 test loss 0.000' in the progress bar.)"""
    assert facts.fmt(0.0003, 3) == "3e-04" and facts.fmt(-0.00004) == "-4.0e-05"  # (about as wide as 0.000)
    assert facts.fmt(0.0012, 3) == "0.001" and facts.fmt(0.0, 3) == "0.000" and facts.fmt(0.25) == "0.2500"
    assert facts.fmt(12345.0) == "1.234e+04" and facts.fmt(float("nan")) == "-"


_WIDTHS = "the hidden layers' widths must be positive integers, comma-separated (e.g. 'mlp:64', 'mlp:128,64', 'mlp:64:tanh')"


@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize(("model", "expected"), [
    ("mlp:0", f"bad hidden sizes '0' in model 'mlp:0': {_WIDTHS}"),
    ("mlp:", f"bad hidden sizes '' in model 'mlp:': {_WIDTHS}"),
    ("mlp:-3", f"bad hidden sizes '-3' in model 'mlp:-3': {_WIDTHS}"),
    ("mlp:64,0", f"bad hidden sizes '64,0' in model 'mlp:64,0': {_WIDTHS}"),
    ("mlp:64:0", "unknown activation '0' in model 'mlp:64:0': use one of relu, tanh, sigmoid "
                 "(more hidden layers go after a comma: 'mlp:128,64')"),
    ("unknown", "cannot parse model 'unknown'; accepted model forms: 'linear', 'softmax', 'mlp:H1[,H2,...]"),
    ("mf:0", "bad factor count '0' in model 'mf:0': use a positive integer; accepted model forms: "),
    ("fm:-2", "bad factor count '-2' in model 'fm:-2': use a positive integer; accepted model forms: "),
])
def test_a_bad_model_is_refused_saying_what_to_fix_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch, model: str, expected: str, local: bool) -> None:
    """(mlp:0 and mlp:-3 said "mlp 'hidden' must be a non-empty list of positive integers, got [0]", the
    JSON spec's key, not the text given; mlp:64:0 "unknown activation '0'", not where; mf:0 "mf 'factors'
    must be a positive integer".)"""
    from typer.testing import CliRunner

    from client import cli, launch

    def nothing_starts(*args: object, **kwargs: object) -> None:
        raise AssertionError("a local cluster was started")

    monkeypatch.setattr(launch, "LocalCluster", nothing_starts)
    flags = ["--local"] if local else ["--server", "127.0.0.1:1", "--timeout", "0.5"]  # (nobody listens there)
    result = CliRunner().invoke(cli.app, ["launch", "--model", model, *flags])
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {expected}"), result.output


@pytest.mark.parametrize("width", [40, 60, 80])
def test_the_status_view_keeps_each_rank_s_state_clock_and_lag_whole_on_a_narrow_terminal(width: int) -> None:
    """(Its workers' table cut every column short: at 40 columns 'r…   …   …   …', each clock of two
    digits '…', at 60 the states 'ac…'; the other columns give way now.)"""
    run = make_run(clocks=tuple(range(5, 17)))
    run.run_id = "run-" + "0123456789abcdef" * 3  # (a long id wraps, whole, above)
    view = text(render.status_view(run, None), width)
    assert all(len(line) <= width for line in view.splitlines())
    assert run.run_id in view.replace("\n", "")
    rows = [line.split() for line in view.splitlines() if re.match(r"\s*\d+\s+active\b", line)]
    assert [(int(r[0]), r[1]) for r in rows] == [(rank, "active") for rank in range(12)], view
    for rank, row in enumerate(rows):
        assert " ".join(row).find(f"{5 + rank} {16 - (5 + rank)}") > 0, row  # its clock and lag, side by side


@pytest.mark.parametrize("state", [pb.RUN_STATE_STOPPED, pb.RUN_STATE_COMPLETED, pb.RUN_STATE_FAILED])
def test_a_rank_of_an_ended_run_waits_for_nothing(state: pb.RunState) -> None:
    """(psctl watch's final view of a run stopped while pending, its snapshot taken as its parked pulls were
    being let go, said 'pull 0: min clock ≥ -2' for each rank: a wait nobody has, the run stopped.)"""
    run = make_run(state, clocks=(0, 0, 0))
    for w in run.workers:
        w.state, w.waiting, w.waiting_for_clock = pb.WORKER_STATE_STOPPED, True, 0
    assert [w["waiting"] for w in facts.worker_rows(run, 0.0)] == [False, False, False]
    view = text(render.status_view(run, None), width=200)
    assert "pull 0" not in view and "min clock ≥" not in view, view
    running = make_run(clocks=(3, 5))
    running.workers[1].waiting, running.workers[1].waiting_for_clock = True, 6
    assert "pull 6: min clock ≥ 4" in text(render.status_view(running, None), width=200)


@pytest.mark.parametrize("flag", [["--verbose"], ["--servers", "2"]])
def test_an_option_of_local_alone_is_refused_without_it(flag: list[str]) -> None:
    """(--verbose, 'show the children's logs', was taken without --local, where psctl starts no
    children: a run created, nothing more shown, nothing said; --servers N said so already.)"""
    from typer.testing import CliRunner

    from client import cli

    result = CliRunner().invoke(cli.app, ["launch", *flag, "--server", "127.0.0.1:1", "--timeout", "0.5"])
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {flag[0]} ") and "needs --local" in \
        result.stderr, result.output


@pytest.mark.parametrize(("options", "expected"), [
    ({"optimizer": "sgd", "momentum": 0.5}, "--momentum 0.5: only --optimizer momentum or nesterov takes it (not sgd)"),
    ({"optimizer": "adam", "momentum": 0.0}, "--momentum 0: only --optimizer momentum or nesterov takes it (not adam)"),
    ({"optimizer": "adagrad", "weight_decay": 0.01},
     "--weight-decay 0.01: only --optimizer sgd, momentum, nesterov or adam takes it (not adagrad)"),
    ({"optimizer": "ftrl", "weight_decay": 0.01}, "--weight-decay 0.01: only --optimizer sgd, momentum, nesterov or adam"),
])
def test_an_optimizer_option_the_optimizer_does_not_take_is_refused(options: dict[str, object], expected: str) -> None:
    """(--optimizer sgd --momentum 0.5 trained without momentum, --weight-decay with adagrad or ftrl without
    it: never sent, and nothing said; FTRL's --l1, --l2 and --ftrl-beta were refused so already.)"""
    from client.spec import LaunchOptions, _optimizer, check_options

    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        check_options(LaunchOptions(**options))  # type: ignore[arg-type]
    check_options(LaunchOptions(optimizer="nesterov", momentum=0.5, weight_decay=0.01))
    assert _optimizer(LaunchOptions(optimizer="nesterov", momentum=0.5)).momentum.momentum == 0.5
    check_options(LaunchOptions(optimizer="adam"))  # the defaults, given or not, are no choice


@pytest.mark.parametrize(("value", "means"), [("1", True), ("yes", True), ("on", True), ("TRUE", True), ("0", False),
                                               ("off", False), ("", False), ("ture", None), ("2", None)])
def test_psctl_insecure_takes_yes_or_no_as_ps_worker_insecure_does(value: str, means: bool | None) -> None:
    """(PSCTL_INSECURE=on meant no, where PS_WORKER_INSECURE=on and PS_INSECURE=on mean yes; a typo, 'ture',
    meant no too, silently: psctl then refused to send the token, saying to set PSCTL_INSECURE=1.)"""
    from client.spec import security_from_env

    env = {"PS_TOKEN": "t", "PSCTL_INSECURE": value}
    if means is None:
        with pytest.raises(ValueError, match=re.escape(f"PSCTL_INSECURE={value!r} is not yes or no")):
            security_from_env(env)
    else:
        assert security_from_env(env).insecure is means


def test_a_data_file_given_by_a_relative_path_goes_to_the_workers_as_an_absolute_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(psctl read 'npz:data.npz' from its own directory and sent 'data.npz' on: a worker started
    elsewhere, as workers are, could not read it and failed the run, 'No such file or directory'.)"""
    import json

    import numpy as np

    from client.spec import LaunchOptions, build_run_spec

    np.savez(tmp_path / "data.npz", X=np.zeros((8, 3), np.float32), y=np.arange(8) % 2)
    (tmp_path / "data.svm").write_text("".join(f"{i % 2} 1:1 {i + 2}:0.5\n" for i in range(8)))
    monkeypatch.chdir(tmp_path)
    for given, path in (("npz:data.npz,test_fraction=0.25", "data.npz"), ("libsvm:./data.svm", "data.svm")):
        model = "softmax" if given.startswith("npz") else "logistic"
        spec = build_run_spec(LaunchOptions(model=model, dataset=given, workers=1, iterations=1))
        data = json.loads(spec.data_spec_json)
        assert data["path"] == str(tmp_path / path), data
        assert data["test_fraction"] == (0.25 if given.startswith("npz") else 0.2)


def test_dashboard_open_without_a_browser_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Where no browser can be started, a server, a container, --open did nothing and said nothing.)"""
    import webbrowser

    from typer.testing import CliRunner

    from client import cli
    from client.dashboard import server

    async def serve(address: str, security: object, host: str, port: int, timeout: float,
                    ready: Any, allow_host: object) -> None:
        ready("http://127.0.0.1:8265/")

    monkeypatch.setattr(server, "serve", serve)
    tried: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url, *a, **k: tried.append(url) or False)
    result = CliRunner().invoke(cli.app, ["dashboard", "--open", "--server", "127.0.0.1:1"])
    assert result.exit_code == 0 and tried == ["http://127.0.0.1:8265/"], result.output
    assert "no browser could be started here: open the address above" in result.stderr, result.stderr

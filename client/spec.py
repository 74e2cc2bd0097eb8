"""Turn what a user types (``--model mlp:64 --dataset digits --epochs 10``) into a ``RunSpec``.

The launcher resolves everything the server must not have to understand: the model's parameter
layout and initializers (from ``worker.models``), the dataset's dimensions and the number of
iterations an epoch takes on one rank's shard (from ``worker.datasets``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from paramserver.security import Security, read_token
from paramserver.settings import yes_or_no
from paramserver.v1 import paramserver_pb2 as pb
from worker.datasets import load_dataset, parse_dataset
from worker.models import build_model, model_task, parse_model

__all__ = ["DEFAULT_SERVER", "STALENESS_FORMS", "LaunchOptions", "build_run_spec", "check_options", "iterations_per_epoch",
           "parse_compression", "parse_schedule", "parse_staleness", "security_from_env"]

DEFAULT_SERVER = "127.0.0.1:50051"
"""The server psctl talks to without --server or PSCTL_SERVER."""

_INIT = {"zeros": pb.INITIALIZER_ZEROS, "normal": pb.INITIALIZER_NORMAL, "uniform": pb.INITIALIZER_UNIFORM}
@dataclass(frozen=True)
class LaunchOptions:
    model: str = "mlp:64"
    dataset: str = "digits"
    workers: int = 4
    staleness: int = 2
    """0 = BSP, s > 0 = SSP, -1 = unbounded (ASP), as in the proto's RunSpec."""
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    l1: float = 0.0
    """FTRL's L1 strength (--optimizer ftrl only): makes weights exactly zero; 0 = none."""
    l2: float = 0.0
    """FTRL's L2 strength (--optimizer ftrl only); 0 = none."""
    ftrl_beta: float = 1.0
    """FTRL's beta (its alpha is ``lr``), > 0: smooths each coordinate's rate while it has few gradients."""
    epochs: float = 15.0
    iterations: int = 0
    """When > 0, overrides epochs."""
    batch_size: int = 32
    seed: int = 0
    name: str = ""
    eval_every: int = 0
    """0 = about 20 evaluations over the run."""
    aggregation: str = "mean"
    slowdown: tuple[tuple[int, float], ...] = ()
    compress: str = "none"
    """none | fp16 | bf16 | topk:RATIO | topk:RATIO,fp16 | topk:RATIO,bf16 (``parse_compression``)."""
    staleness_aware_lr: bool = False
    """Divide each push's learning rate by its staleness (``RunSpec.staleness_aware_lr``)."""
    staleness_schedule: str = ""
    """CLOCK=S steps the bound follows, e.g. "20%=2" (``parse_schedule``)."""


COMPRESS_FORMS = "none, fp16, bf16, topk:RATIO (e.g. topk:0.01), or topk:RATIO,fp16 / topk:RATIO,bf16"
_HALVES = {"fp16": pb.DATA_TYPE_FLOAT16, "bf16": pb.DATA_TYPE_BFLOAT16}


def parse_compression(text: str) -> pb.Compression | None:
    """``--compress``: the run's Compression (None for none); ValueError saying the forms."""
    out = pb.Compression()
    for item in (p.strip().lower() for p in text.split(",")):
        if item == "none" and text.strip().lower() == "none":
            return None
        if item in _HALVES and not out.dtype:
            out.dtype = _HALVES[item]
        elif item.startswith("topk:") and not out.topk_ratio:
            ratio = item.removeprefix("topk:").removesuffix("%")
            try:
                value = float(ratio) / (100 if item.endswith("%") else 1)
            except ValueError:
                value = float("nan")
            if not (0 < value < 1):
                raise ValueError(f"--compress {text!r}: topk takes a share in (0, 1), such as topk:0.01 or topk:1%")
            out.topk_ratio = value
        else:
            raise ValueError(f"--compress {text!r}: use {COMPRESS_FORMS}")
    return out


OPTIMIZERS = {"sgd": ("sgd", {}), "momentum": ("momentum", {}), "nesterov": ("momentum", {"nesterov": True}),
              "adam": ("adam", {}), "adagrad": ("adagrad", {}), "ftrl": ("ftrl", {})}
"""psctl's optimizer names: the kind of the proto's ``OptimizerSpec`` each sets, and what it fixes.
The kind's own message says which of --lr, --momentum, --weight-decay, --l1, --l2, --ftrl-beta it
takes; hyper-parameters left at zero get the server's defaults (``ps_server.core.spec.OPTIMIZER_DEFAULTS``)."""


def _optimizer(o: LaunchOptions) -> pb.OptimizerSpec:
    if o.optimizer.lower() not in OPTIMIZERS:
        *names, last = OPTIMIZERS
        raise ValueError(f"optimizer {o.optimizer!r}: choose {', '.join(names)} or {last}")
    kind, fixed = OPTIMIZERS[o.optimizer.lower()]
    given = {"learning_rate": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay, "l1": o.l1, "l2": o.l2,
             "beta": o.ftrl_beta, **fixed}
    takes = pb.OptimizerSpec.DESCRIPTOR.fields_by_name[kind].message_type.fields_by_name
    return pb.OptimizerSpec(**{kind: {name: value for name, value in given.items() if name in takes}})


def iterations_per_epoch(o: LaunchOptions) -> int:
    """Iterations one rank takes to see its whole shard once (for progress displays)."""
    data = load_dataset(parse_dataset(o.dataset))  # memoised: free after build_run_spec
    return _per_epoch(len(data.X_train), o)


def _per_epoch(n_train: int, o: LaunchOptions) -> int:
    shard = math.ceil(n_train / max(1, o.workers))
    return max(1, math.ceil(shard / max(1, o.batch_size)))


UNBOUNDED_WORDS = ("inf", "unbounded", "asp")
STALENESS_FORMS = "0 or bsp (synchronous), a positive integer s (SSP), or inf / unbounded / asp (asynchronous)"


def parse_staleness(text: str) -> int:
    """'0'/'bsp' -> 0, a positive integer -> itself, 'inf'/'unbounded'/'asp' -> -1 (the proto's
    "unbounded"). Any negative number is refused: -1 is how the proto spells unbounded, not a word
    for users, and taking it would take -3 as a typo of it."""
    t = str(text).strip().lower()
    if t in UNBOUNDED_WORDS:
        return -1
    if t == "bsp":
        return 0
    try:
        value = int(t)
    except ValueError:
        raise ValueError(f"--staleness {text!r}: use {STALENESS_FORMS}") from None
    if value < 0:
        raise ValueError(f"--staleness {text!r}: a staleness cannot be negative; use {STALENESS_FORMS}")
    if value > _INT32:
        raise ValueError(f"--staleness {text!r}: at most {_INT32} (or 'inf' for unbounded)")
    return value


def parse_schedule(text: str, iterations: int, staleness: int = 2) -> list[pb.StalenessStep]:
    """``--staleness-schedule``: comma-separated CLOCK=S steps, CLOCK a clock or a share of the
    iterations ("20%"), S as --staleness takes it; ValueError saying the form, or which step breaks
    the server's rules (increasing clocks below ``iterations``, none to or from 0 from ``staleness``)."""
    steps: list[pb.StalenessStep] = []
    previous, current = -1, staleness
    for item in (p.strip() for p in text.split(",") if p.strip()):
        at, sep, bound = item.partition("=")
        try:
            clock = round(float(at.removesuffix("%")) / 100 * iterations) if at.endswith("%") else int(at)
        except ValueError:
            clock = -1
        if not sep or clock < 0:
            raise ValueError(f"--staleness-schedule {text!r}: use CLOCK=S steps such as 20%=2,50%=1 or 100=inf "
                             "(CLOCK a clock or a share of the iterations)")
        try:
            step = parse_staleness(bound)
        except ValueError as exc:  # (its message names --staleness, which the user may not have given)
            raise ValueError(f"--staleness-schedule {text!r}: step {item!r}: {str(exc).partition(': ')[2]}") from None
        if not previous < clock < iterations:
            raise ValueError(f"--staleness-schedule {text!r}: step {item!r} is at clock {clock}: steps need "
                             f"increasing clocks below the run's {iterations} iterations")
        if (step == 0) != (current == 0):
            raise ValueError(f"--staleness-schedule {text!r}: step {item!r}: the bound cannot change to or from 0 "
                             f"(BSP; --staleness is {'inf' if staleness < 0 else staleness})")
        steps.append(pb.StalenessStep(from_clock=clock, staleness=step))
        previous, current = clock, step
    return steps


_INT32, _UINT32, _INT64, _UINT64 = (1 << 31) - 1, (1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1
"""The largest values the RunSpec's fields hold (staleness; workers, batch size, eval_every;
iterations, which the server counts in int64; the seed)."""


def check_options(o: LaunchOptions) -> None:
    """The checks that need no dataset: raise ValueError saying what to fix (before anything starts)."""
    for flag, value, most in (("--workers", o.workers, _UINT32), ("--batch-size", o.batch_size, _UINT32),
                              ("--eval-every", o.eval_every, _UINT32), ("--iterations", o.iterations, _INT64),
                              ("--staleness", o.staleness, _INT32), ("--seed", o.seed, _UINT64)):
        if value > most:
            raise ValueError(f"{flag} {value}: at most {most}")
    if o.staleness_aware_lr and o.optimizer.lower() == "ftrl":
        raise ValueError("--staleness-aware-lr: not with --optimizer ftrl (its per-coordinate rate is its own)")
    if o.workers < 1:
        raise ValueError(f"--workers {o.workers}: need at least 1")
    if any(rank >= o.workers for rank, _ in o.slowdown):
        raise ValueError(f"--slowdown: rank {max(r for r, _ in o.slowdown)} does not exist with {o.workers} worker{'s' * (o.workers != 1)} "
                         f"(ranks 0..{o.workers - 1})")
    if o.staleness < -1:
        raise ValueError(f"staleness {o.staleness}: use 0 (BSP), a positive integer, or -1 (unbounded)")
    if o.aggregation not in ("mean", "sum"):
        raise ValueError(f"--aggregation {o.aggregation!r}: use mean or sum")
    if o.batch_size < 1:
        raise ValueError(f"--batch-size {o.batch_size}: need at least 1")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        raise ValueError(f"--lr {o.lr}: use a positive learning rate")
    _check_ftrl(o)
    _check_taken(o)
    if o.iterations < 0:
        raise ValueError(f"--iterations {o.iterations}: use a positive number of iterations per worker "
                         f"(or leave it out and give --epochs)")
    if not (o.epochs > 0 and math.isfinite(o.epochs)):
        raise ValueError(f"--epochs {o.epochs:g}: use a positive number of passes over each rank's shard "
                         f"(e.g. 15, or 0.5 for half a pass), or give --iterations")


def _check_ftrl(o: LaunchOptions) -> None:
    """FTRL's options: finite, --l1/--l2 >= 0, --ftrl-beta > 0 (0 on the wire would mean the server's
    default, 1), and given only with --optimizer ftrl (no other optimizer reads them)."""
    for flag, value in (("--l1", o.l1), ("--l2", o.l2)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{flag} {value:g}: use a finite number >= 0 (0 turns it off)")
    if not (o.ftrl_beta > 0 and math.isfinite(o.ftrl_beta)):
        raise ValueError(f"--ftrl-beta {o.ftrl_beta:g}: use a finite number > 0 (default 1)")
    given = [flag for flag, value, default in (("--l1", o.l1, 0.0), ("--l2", o.l2, 0.0),
                                                 ("--ftrl-beta", o.ftrl_beta, 1.0)) if value != default]
    if given and o.optimizer.lower() in OPTIMIZERS and o.optimizer.lower() != "ftrl":
        raise ValueError(f"{', '.join(given)}: only --optimizer ftrl takes {'them' if len(given) > 1 else 'it'} "
                         f"(not {o.optimizer.lower()})")


def _check_taken(o: LaunchOptions) -> None:
    """--momentum and --weight-decay given (not their defaults) only to an optimizer that takes them:
    another one never sends them (--momentum 0.5 with sgd trained without momentum, saying nothing)."""
    if o.optimizer.lower() not in OPTIMIZERS:
        return  # (_optimizer names the choices)
    takes = {n: pb.OptimizerSpec.DESCRIPTOR.fields_by_name[kind].message_type.fields_by_name
             for n, (kind, _) in OPTIMIZERS.items()}
    for flag, name, value, default in (("--momentum", "momentum", o.momentum, LaunchOptions.momentum),
                                       ("--weight-decay", "weight_decay", o.weight_decay, LaunchOptions.weight_decay)):
        if value != default and name not in takes[o.optimizer.lower()]:
            *names, last = [n for n in OPTIMIZERS if name in takes[n]]
            raise ValueError(f"{flag} {value:g}: only --optimizer {', '.join(names)} or {last} takes it "
                             f"(not {o.optimizer.lower()})")


_MODELS_FOR = {"regression": "linear", "ctr": "logistic or fm:K", "ratings": "mf:K"}
"""The models that suit a dataset's task (said when a model does another task)."""


def build_run_spec(o: LaunchOptions) -> pb.RunSpec:
    """Validate the options and build the spec; raises ValueError saying what to fix."""
    check_options(o)
    model_spec = parse_model(o.model)
    data_spec = parse_dataset(o.dataset)
    if "path" in data_spec:  # read by every worker, from wherever it was started: psctl's directory named
        data_spec["path"] = os.path.abspath(data_spec["path"])
    data = load_dataset(data_spec)
    task = model_task(model_spec)  # before building it: another task's data may not even fit its shape
    if task is not None and task != data.task:
        # (a file's float y is read as regression targets: class labels saved as floats, as from
        # pandas, need converting, not another model)
        floats = data_spec["kind"] == "npz" and data.task == "regression"
        labels = " (its y is float: regression targets)" if floats else ""
        advice = ", or save the class labels as integers (y.astype(np.int64))" if floats and task == "classification" \
            else ""
        raise ValueError(f"model {o.model!r} does a {task} task but dataset {o.dataset!r} is {data.task}{labels}: "
                         f"use {_MODELS_FOR.get(data.task, 'softmax or mlp:...')}{advice}")
    model = build_model(model_spec, data.n_features, data.n_outputs)
    compression = parse_compression(o.compress)
    if compression is not None and model.tables():
        raise ValueError(f"--compress {o.compress}: compression is for dense models; {o.model!r} has tables")
    if o.workers > len(data.X_train):  # (a rank's shard would be empty: it fails the run once started)
        raise ValueError(f"--workers {o.workers}: the training split of {o.dataset!r} has {len(data.X_train)} "
                         f"examples, and every worker needs at least one; use at most {len(data.X_train)} workers")
    per_epoch = _per_epoch(len(data.X_train), o)
    iterations = o.iterations or max(1, round(o.epochs * per_epoch))
    if iterations > _INT64:
        raise ValueError(f"--epochs {o.epochs:g}: {iterations:.3g} iterations per worker, more than a run takes "
                         f"({_INT64}); ask for fewer")
    eval_every = o.eval_every or min(_UINT32, max(1, iterations // 20))
    return pb.RunSpec(
        name=o.name or f"{o.model} on {o.dataset}",
        model_spec_json=json.dumps(model_spec, sort_keys=True),
        data_spec_json=json.dumps(data_spec, sort_keys=True),
        num_workers=o.workers,
        staleness=o.staleness,
        optimizer=_optimizer(o),
        aggregation=pb.AGGREGATION_SUM if o.aggregation == "sum" else pb.AGGREGATION_MEAN,
        iterations=iterations,
        params=[
            pb.ParamSpec(name=p.name, shape=p.shape, dtype=pb.DATA_TYPE_FLOAT32, initializer=_INIT[p.init],
                         scale=p.scale, table=p.table)
            for p in model.param_specs()
        ],
        seed=o.seed,
        batch_size=o.batch_size,
        eval_every=eval_every,
        slowdown=dict(o.slowdown),
        # Runs of dense models suit any worker; a model with tables needs one that pulls rows by id
        # and knows the model (the Python worker; not the Node one).
        # Compressed runs need a worker that speaks it (the Python worker; not the Node one).
        requires=["tables", f"model:{model_spec['kind']}"] if model.tables() else ["compression"] if compression else [],
        compression=compression,
        staleness_aware_lr=o.staleness_aware_lr,
        staleness_schedule=parse_schedule(o.staleness_schedule, iterations, o.staleness),
    )


def security_from_env(env: Mapping[str, str] | None = None) -> Security:
    """psctl's TLS and token settings, from the environment only (a token is never a flag).

    PSCTL_TLS_CA, PSCTL_TLS_CERT, PSCTL_TLS_KEY, PSCTL_TLS_SERVER_NAME, PS_TOKEN or
    PSCTL_TOKEN_FILE, PSCTL_INSECURE=1.
    """
    env = os.environ if env is None else env
    try:  # (as ps-worker's PS_WORKER_INSECURE: "on" is yes, and a typo no answer)
        insecure = yes_or_no(env.get("PSCTL_INSECURE", ""))
    except ValueError:
        raise ValueError(f"PSCTL_INSECURE={env['PSCTL_INSECURE']!r} is not yes or no (1/true/yes/on, 0/false/no/off)") \
            from None
    return Security(
        ca=env.get("PSCTL_TLS_CA", ""), cert=env.get("PSCTL_TLS_CERT", ""), key=env.get("PSCTL_TLS_KEY", ""),
        token=read_token(env.get("PS_TOKEN", ""), env.get("PSCTL_TOKEN_FILE", ""), file_flag="PSCTL_TOKEN_FILE"),
        insecure=insecure,
        server_name=env.get("PSCTL_TLS_SERVER_NAME", ""),
        names={"ca": "PSCTL_TLS_CA", "cert": "PSCTL_TLS_CERT", "key": "PSCTL_TLS_KEY", "insecure": "PSCTL_INSECURE=1",
               "server_name": "PSCTL_TLS_SERVER_NAME"},
    )

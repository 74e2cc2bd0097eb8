"""A run's specification as the core sees it: plain frozen dataclasses, validated once.

``codec`` builds these from the protobuf ``RunSpec``; nothing else in the core knows the wire
format. ``validate_spec`` raises ``InvalidArgument`` (reason INVALID_SPEC) naming the field to fix;
the registry calls it once, before a run exists, so a bad spec never creates one.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument, Reason, ResourceExhausted, quoted

__all__ = [
    "Aggregation",
    "Initializer",
    "OptimizerConfig",
    "OptimizerKind",
    "ParamSpec",
    "RunSpec",
    "DEFAULT_LIMITS",
    "OPTIMIZER_DEFAULTS",
    "Limits",
    "check_sizes",
    "UNBOUNDED",
    "WIRE_DTYPES",
    "offsets",
    "spec_from_dict",
    "spec_to_dict",
    "validate_spec",
]

UNBOUNDED = -1
"""Staleness value meaning unbounded (fully asynchronous, ASP)."""


class Initializer(enum.Enum):
    ZEROS = "zeros"
    CONSTANT = "constant"
    NORMAL = "normal"
    UNIFORM = "uniform"


class OptimizerKind(enum.Enum):
    """The server-side optimizers; each value is its field of the proto's ``OptimizerSpec.kind``
    oneof, and ``OptimizerConfig``'s fields are named as that message's (``codec`` converts by name)."""

    SGD = "sgd"
    MOMENTUM = "momentum"
    ADAM = "adam"
    ADAGRAD = "adagrad"
    FTRL = "ftrl"


class Aggregation(enum.Enum):
    MEAN = "mean"
    SUM = "sum"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    initializer: Initializer = Initializer.ZEROS
    scale: float = 0.0
    stream: int = -1
    """A piece of a tensor (``placement``): the whole tensor's index in the run, whose random
    stream its initial values come from; -1: this tensor's own index."""
    skip: int = 0
    """A piece: how many of that stream's values belong to the rows before it."""
    table: bool = False
    """A table (2-D: rows x dim): pulled and pushed by row (``Rows``), spread by rows over shards."""

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class OptimizerConfig:
    """Hyperparameters of the server-side optimizer; fields a kind does not use are ignored."""

    kind: OptimizerKind = OptimizerKind.SGD
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    weight_decay: float = 0.0
    initial_accumulator: float = 0.0
    l1: float = 0.0
    """FTRL's L1 strength: weights whose accumulated |z| is at most l1 are exactly zero."""
    l2: float = 0.0
    """FTRL's L2 strength."""
    ftrl_beta: float = 1.0
    """FTRL's beta (its alpha is ``learning_rate``): smooths the per-coordinate rate at the start."""


OPTIMIZER_DEFAULTS: dict[OptimizerKind, dict[str, float]] = {
    OptimizerKind.ADAM: {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8},
    OptimizerKind.ADAGRAD: {"epsilon": 1e-10},
    OptimizerKind.FTRL: {"ftrl_beta": 1.0},
}
"""Hyper-parameters whose zero on the wire (proto3: unset) means this value."""


MAX_SCHEDULE = 64
"""Steps of a run's staleness schedule."""
WIRE_DTYPES = ("float32", "float16", "bfloat16")
"""The types pushes and pulls may travel in (``RunSpec.wire_dtype``)."""


@dataclass(frozen=True)
class RunSpec:
    name: str
    num_workers: int
    iterations: int
    params: tuple[ParamSpec, ...]
    staleness: int = 0
    """0 = BSP, UNBOUNDED (-1) = ASP, s > 0 = SSP."""
    optimizer: OptimizerConfig = OptimizerConfig()
    aggregation: Aggregation = Aggregation.MEAN
    model_spec_json: str = "{}"
    data_spec_json: str = "{}"
    seed: int = 0
    batch_size: int = 32
    eval_every: int = 0
    slowdown: Mapping[int, float] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    """What a worker must be able to do to be given this run (its Join capabilities)."""
    wire_dtype: str = "float32"
    """The values of pushes and pulls on the wire (``WIRE_DTYPES``); the store keeps float32."""
    topk_ratio: float = 0.0
    """Top-k pushes: the share of each tensor's elements a push carries (0: dense)."""
    staleness_aware_lr: bool = False
    """Divide each applied push's learning rate by its staleness (``Run._lr_scale``)."""
    staleness_schedule: tuple[tuple[int, int], ...] = ()
    """(from min clock, staleness) steps the run's bound follows (``Run._follow_schedule``)."""

    @property
    def unbounded(self) -> bool:
        return self.staleness == UNBOUNDED

    @property
    def num_params(self) -> int:
        return sum(p.size for p in self.params)

    def describe_staleness(self) -> str:
        if self.unbounded:
            return "unbounded (ASP)"
        return "0 (BSP)" if self.staleness == 0 else f"{self.staleness} (SSP)"


FLOAT32_MAX = 3.4028234663852886e38
TOPK_MAX_ELEMENTS = 1 << 32
"""Elements of one tensor of a top-k run: a sparse chunk's positions (``TensorChunk.indices``)
and a delta pull's are uint32, so positions past 2^32 - 1 would wrap."""


def offsets(specs: tuple[ParamSpec, ...]) -> tuple[dict[str, int], int]:
    """Where each tensor starts in the flat layout (spec order), and the model's size."""
    out: dict[str, int] = {}
    total = 0
    for p in specs:
        out[p.name] = total
        total += p.size
    return out, total


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, Reason.INVALID_SPEC)


@dataclass(frozen=True)
class Limits:
    """What one run, and how many runs, may ask of a server (the README's limits table); over one: RESOURCE_EXHAUSTED."""

    max_workers: int = 1024
    """Ranks per run (the server keeps state per rank and lists every rank in a run's status)."""
    max_tensors: int = 10_000
    """Named tensors per run (a ResNet-152 has ~900)."""
    max_dims: int = 32
    """Dimensions per tensor."""
    max_name_chars: int = 256
    """Characters of a run's or a tensor's name."""
    max_json_bytes: int = 64 << 10
    """Bytes of each of the model and data specs' JSON."""
    max_iterations: int = 1 << 53
    """Iterations per rank."""
    max_pull_rows: int = 1 << 20
    """Row ids of one table in one pull (a push's rows are bounded by its size)."""
    max_requires: int = 64
    """Entries of a run's ``requires`` and of a worker's capabilities, each at most max_name_chars."""
    max_runs: int = 1000
    """Runs not finished (pending or running) a server holds at once: each holds its parameters
    (finished ones are bounded by the retention limits)."""


DEFAULT_LIMITS = Limits()


_LAUNCH_OPTIONS = {"num_workers": "--workers", "iterations": "--iterations", "learning_rate": "--lr",
                   "weight_decay": "--weight-decay", "momentum": "--momentum", "l1": "--l1", "l2": "--l2",
                   "ftrl_beta": "--ftrl-beta"}


def _named(field: str) -> str:
    """A spec's field as a refusal names it: the field, and the ``psctl launch`` option that sets it
    (a user of psctl never sees the field's name)."""
    option = _LAUNCH_OPTIONS.get(field)
    return f"{field} (psctl launch {option})" if option else field


def check_sizes(limits: Limits, *, workers: int, tensors: int, json_bytes: int, slowdowns: int,
                iterations: int) -> None:
    """The counts of a spec, checked before anything is built from it (work proportional to them)."""
    for what, value, limit in (("num_workers", workers, limits.max_workers), ("params", tensors, limits.max_tensors),
                               ("model_spec_json/data_spec_json", json_bytes, limits.max_json_bytes),
                               ("slowdown entries", slowdowns, limits.max_workers),
                               ("iterations", iterations, limits.max_iterations)):
        if value > limit:
            raise ResourceExhausted(f"{_named(what)} is {value}, over this server's limit of {limit}"
                                    + (" (ps-server --max-workers): ask for fewer" if what == "num_workers" else
                                       ": ask for less"))


def _check_float32(label: str, value: float) -> None:
    if abs(value) > FLOAT32_MAX:
        raise _invalid(f"{_named(label)} {value:g} does not fit in float32, the parameters' type "
                              f"(at most {FLOAT32_MAX:.4g})")


def validate_spec(spec: RunSpec, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise InvalidArgument (INVALID_SPEC) naming the field to fix when the spec cannot run, or
    ResourceExhausted when it asks for more than ``limits``."""
    check_sizes(limits, workers=spec.num_workers, tensors=len(spec.params), slowdowns=len(spec.slowdown),
                json_bytes=max(len(spec.model_spec_json.encode()), len(spec.data_spec_json.encode())),
                iterations=spec.iterations)
    if len(spec.name) > limits.max_name_chars:
        raise _invalid(f"the run's name (psctl launch --name) has {len(spec.name)} characters: at most "
                       f"{limits.max_name_chars}")
    if spec.num_workers < 1:
        raise _invalid("num_workers must be at least 1")
    if spec.iterations < 1:
        raise _invalid("iterations must be at least 1")
    if spec.staleness < UNBOUNDED:
        raise _invalid(
            f"staleness {spec.staleness} is invalid: use 0 (BSP), a positive bound, or -1 (unbounded)"
        )
    if not spec.params:
        raise _invalid("params is empty: a run needs at least one named tensor")
    seen: set[str] = set()
    for p in spec.params:
        name = quoted(p.name)
        if not p.name:
            raise _invalid("a param has an empty name")
        if len(p.name) > limits.max_name_chars:
            raise _invalid(f"param {name} has a name of {len(p.name)} characters: at most {limits.max_name_chars}")
        if p.name in seen:
            raise _invalid(f"param {name} appears twice")
        seen.add(p.name)
        if len(p.shape) > limits.max_dims:
            raise _invalid(f"param {name} has {len(p.shape)} dimensions: at most {limits.max_dims}")
        if not p.shape or any(d < 1 for d in p.shape):
            raise _invalid(f"param {name} has shape {list(p.shape)}: every dimension must be >= 1")
        if p.table and len(p.shape) != 2:
            raise _invalid(f"param {name} is a table with shape {list(p.shape)}: a table is 2-D, (rows, dim)")
        if not math.isfinite(p.scale):
            raise _invalid(f"param {name} has a non-finite initializer scale")
        _check_float32(f"param {name}'s initializer scale", p.scale)
    opt = spec.optimizer
    if not (math.isfinite(opt.learning_rate) and opt.learning_rate > 0):
        raise _invalid(f"{_named('learning_rate')} must be a positive number, got {opt.learning_rate}")
    # The server computes in float32: a value that overflows there would make every update
    # NaN/Inf without any operation overflowing (the run detects divergence by overflow).
    for label, value in (("learning_rate", opt.learning_rate), ("weight_decay", opt.weight_decay),
                         ("epsilon", opt.epsilon), ("initial_accumulator", opt.initial_accumulator),
                         ("l1", opt.l1), ("l2", opt.l2), ("ftrl_beta", opt.ftrl_beta)):
        _check_float32(label, value)
    if opt.kind is OptimizerKind.MOMENTUM and not 0 <= opt.momentum < 1:
        raise _invalid(f"{_named('momentum')} must be in [0, 1), got {opt.momentum}")
    if opt.kind is OptimizerKind.ADAM and not (0 <= opt.beta1 < 1 and 0 <= opt.beta2 < 1):
        raise _invalid(f"adam betas must be in [0, 1), got {opt.beta1}, {opt.beta2}")
    if opt.kind in (OptimizerKind.ADAM, OptimizerKind.ADAGRAD) and not opt.epsilon > 0:
        raise _invalid(f"epsilon must be positive, got {opt.epsilon}")
    if opt.weight_decay < 0 or not math.isfinite(opt.weight_decay):
        raise _invalid(f"{_named('weight_decay')} must be >= 0, got {opt.weight_decay}")
    if opt.kind is OptimizerKind.ADAGRAD and not (opt.initial_accumulator >= 0 and math.isfinite(opt.initial_accumulator)):
        raise _invalid(f"initial_accumulator must be >= 0, got {opt.initial_accumulator}")
    if opt.kind is OptimizerKind.FTRL:
        for label, value in (("l1", opt.l1), ("l2", opt.l2), ("ftrl_beta", opt.ftrl_beta)):
            if not (math.isfinite(value) and value >= 0):
                raise _invalid(f"ftrl {_named(label)} must be a finite number >= 0 (0 turns it off), got {value}")
    for label, text in (("model_spec_json", spec.model_spec_json), ("data_spec_json", spec.data_spec_json)):
        try:
            value = json.loads(text or "{}")
        except json.JSONDecodeError as exc:
            raise _invalid(f"{label} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise _invalid(f"{label} must be a JSON object, got {type(value).__name__}")
    if len(spec.requires) > limits.max_requires or any(not r or len(r) > limits.max_name_chars for r in spec.requires):
        raise _invalid(f"requires has {len(spec.requires)} entries: at most {limits.max_requires}, each a non-empty "
                       f"name of at most {limits.max_name_chars} characters")
    if len(spec.staleness_schedule) > MAX_SCHEDULE:
        raise _invalid(f"staleness_schedule has {len(spec.staleness_schedule)} steps: at most {MAX_SCHEDULE}")
    previous, bound = -1, spec.staleness
    for at, step in spec.staleness_schedule:
        if not previous < at < spec.iterations or step < UNBOUNDED or (step == 0) != (bound == 0):
            raise _invalid(f"staleness_schedule step ({at}, {step}): steps need increasing clocks below the run's "
                           f"{spec.iterations} iterations and bounds >= -1, none to or from 0 (BSP)")
        previous, bound = at, step
    if spec.staleness_aware_lr and opt.kind is OptimizerKind.FTRL:
        raise _invalid("staleness_aware_lr is not for ftrl (its per-coordinate rate is its own): use sgd, momentum, "
                       "adam or adagrad, or leave it off")
    if spec.wire_dtype not in WIRE_DTYPES:
        raise _invalid(f"compression dtype {spec.wire_dtype!r}: use one of {', '.join(WIRE_DTYPES)}")
    if not (math.isfinite(spec.topk_ratio) and 0 <= spec.topk_ratio < 1):
        raise _invalid(f"compression topk_ratio {spec.topk_ratio}: use a share in (0, 1), such as 0.01, or 0 for "
                       "dense pushes")
    huge = next((p for p in spec.params if p.size > TOPK_MAX_ELEMENTS), None) if spec.topk_ratio else None
    if huge is not None:
        raise _invalid(f"param {quoted(huge.name)} has {huge.size} elements: with top-k compression a tensor has "
                       "at most 2^32 (its positions travel as uint32); split it into smaller tensors, or use "
                       "fp16/bf16 compression without topk")
    if (spec.wire_dtype != "float32" or spec.topk_ratio) and any(p.table for p in spec.params):
        raise _invalid("compression is for dense tensors: a run with tables (ParamSpec.table) cannot use it yet")
    for rank, factor in spec.slowdown.items():
        if not 0 <= rank < spec.num_workers or not (math.isfinite(factor) and factor >= 1.0):
            raise _invalid(
                f"slowdown for rank {rank} = {factor}: ranks are 0..{spec.num_workers - 1}, factors >= 1"
            )


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """JSON-able form of a spec (for checkpoints)."""
    d = dataclasses.asdict(spec)
    d["params"] = [
        {"name": p.name, "shape": list(p.shape), "initializer": p.initializer.value, "scale": p.scale, "table": p.table}
        for p in spec.params
    ]
    d["optimizer"] = {**dataclasses.asdict(spec.optimizer), "kind": spec.optimizer.kind.value}
    d["aggregation"] = spec.aggregation.value
    d["slowdown"] = {str(k): v for k, v in spec.slowdown.items()}
    return d


def spec_from_dict(d: Mapping[str, Any]) -> RunSpec:
    """Inverse of spec_to_dict; raises KeyError/ValueError on a malformed dict."""
    opt = dict(d["optimizer"])
    opt["kind"] = OptimizerKind(opt["kind"])
    return RunSpec(
        **{
            **{k: v for k, v in d.items() if k not in ("params", "optimizer", "aggregation", "slowdown")},
            "params": tuple(
                ParamSpec(p["name"], tuple(p["shape"]), Initializer(p["initializer"]), p["scale"],
                          table=bool(p.get("table", False))) for p in d["params"]
            ),
            "requires": tuple(d.get("requires", ())),
            "staleness_schedule": tuple((int(a), int(b)) for a, b in d.get("staleness_schedule", ())),
            "optimizer": OptimizerConfig(**opt),
            "aggregation": Aggregation(d["aggregation"]),
            "slowdown": {int(k): float(v) for k, v in d["slowdown"].items()},
        }
    )

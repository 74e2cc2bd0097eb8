"""The sizing the deployment tests hold the containers' memory to (``sizing``), against what the
server itself counts of a run (``footprint``, what --max-total-bytes checks)."""

from __future__ import annotations

import pytest
from sizing import SERVER_PROCESS, server_peak

from ps_server.config import parse_config
from ps_server.core.run import footprint
from ps_server.core.spec import OptimizerConfig, OptimizerKind, ParamSpec, RunSpec

pytestmark = pytest.mark.timeout(30)


def test_a_servers_peak_has_room_for_a_checkpoints_copy_of_a_bsp_runs_held_gradients() -> None:
    """A checkpoint copies a run whole, the gradients BSP holds for a clock too (a model's from
    each rank but the last: --max-total-bytes counts them): the largest run a server accepts is
    the largest of its parameters with Adam's two copies and as many held gradients as its budget
    has room for, not Adam's three copies alone (a BSP run of 8 ranks fitting a budget of 4 GiB
    was sized as 768 MiB copied, and copied 2.5 GiB)."""
    mib = 1 << 20
    config = parse_config([], {"PS_MAX_PARAM_BYTES": str(256 * mib), "PS_MAX_TOTAL_BYTES": str(4096 * mib)},
                          hostname="unused")
    params = (ParamSpec("w", (64 * mib,)),)  # 256 MiB, --max-param-bytes
    bsp = RunSpec(name="bsp", num_workers=8, iterations=10, params=params, staleness=0,
                  optimizer=OptimizerConfig(kind=OptimizerKind.ADAM))
    held = footprint(bsp, params)
    assert held == (3 + 7) * 256 * mib <= config.max_total_bytes  # accepted by the server
    copied = config.push_slots * config.max_param_bytes + held  # a gradient being received, the copy
    assert server_peak(config, 16 << 30) >= config.max_total_bytes + copied + SERVER_PROCESS

"""RunSpec.staleness_aware_lr against a real server over shared memory, TCP and gRPC: each applied
push's learning rate divided by its staleness (PushGradientRequest.param_version), exactly."""

from __future__ import annotations

import numpy as np
import pytest
from support import make_spec

from paramserver import errors
from paramserver.client import PsClient
from paramserver.v1 import paramserver_pb2 as pb

pytestmark = pytest.mark.timeout(90)

SHAPES = {"w": (300, 100)}  # 30k elements: the large-message path of the hand codec too


@pytest.mark.parametrize("aware", [True, False])
async def test_each_push_steps_by_the_rate_over_its_staleness(client: PsClient, aware: bool) -> None:
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=2, staleness=-1, iterations=5, lr=1.0,
                                            init=pb.INITIALIZER_ZEROS, staleness_aware_lr=aware))
    a, b = [(await client.join(f"w{i}", run.run_id)).assignment for i in range(2)]
    g = {"w": np.full(SHAPES["w"], 10.0, np.float32)}
    # (rank, clock, param_version) in the order applied; V = updates before it; τ = max(1, V - version)
    pushes = [(a, 0, 0), (b, 0, 0), (a, 1, 0), (b, 1, 2), (a, 2, None), (b, 2, 0)]
    scales = [1.0, 1.0, 1 / 2, 1.0, 1.0, 1 / 5]  # τ: 1 (V 0), 1 (V 1), 2, 1 (V 3, read at 2), unsaid, 5
    for (who, clock, version), scale in zip(pushes, scales, strict=True):
        if clock == 2 and who is b:  # through push_pull: its answer says the factor too
            ack, _ = await client.push_pull(run.run_id, who.rank, who.incarnation, clock, g, param_version=version,
                                            into={})
        else:
            ack = await client.push(run.run_id, who.rank, who.incarnation, clock, g, param_version=version)
        assert not ack.duplicate
        # The factor applied, for the worker's own step on the copy it keeps (read-my-writes)
        assert ack.lr_scale == scale if aware else not ack.HasField("lr_scale")
        again = await client.push(run.run_id, who.rank, who.incarnation, clock, g, param_version=version)
        assert again.duplicate and (again.lr_scale == scale if aware else not again.HasField("lr_scale"))
    final = (await client.pull(run.run_id)).tensors["w"]
    want = -10.0 * sum(scales) if aware else -10.0 * len(pushes)
    np.testing.assert_allclose(final, np.full(SHAPES["w"], want, np.float32), rtol=1e-6)
    counters = (await client.get_run(run.run_id)).counters
    if aware:  # the pushes that said their version, and their scales
        assert counters.lr_scaled == 5 and counters.lr_scale_sum == pytest.approx(1 + 1 + 0.5 + 1 + 0.2)
    else:
        assert counters.lr_scaled == 0


async def test_bsp_and_ftrl(client: PsClient) -> None:
    """BSP applies one combined step per clock: no staleness to divide by. FTRL is refused."""
    run = await client.create_run(make_spec(shapes=SHAPES, num_workers=2, staleness=0, iterations=5, lr=1.0,
                                            init=pb.INITIALIZER_ZEROS, staleness_aware_lr=True))
    a, b = [(await client.join(f"w{i}", run.run_id)).assignment for i in range(2)]
    g = {"w": np.full(SHAPES["w"], 10.0, np.float32)}
    acks = [await client.push(run.run_id, who.rank, who.incarnation, 0, g, param_version=0) for who in (a, b)]
    assert not any(ack.HasField("lr_scale") for ack in acks)  # (the whole rate: nothing to tell)
    final = (await client.pull(run.run_id, 0, 0, 1)).tensors["w"]
    np.testing.assert_allclose(final, np.full(SHAPES["w"], -10.0, np.float32))  # the mean, lr 1
    with pytest.raises(errors.InvalidArgument, match="not for ftrl"):
        await client.create_run(make_spec(shapes=SHAPES, optimizer=pb.OptimizerSpec(ftrl=pb.FtrlConfig(learning_rate=0.1)),
                                          staleness_aware_lr=True))

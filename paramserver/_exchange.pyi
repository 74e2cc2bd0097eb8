from typing import Any

class Answer(tuple[Any, ...]):
    clock: int
    duplicate: bool
    min_clock: int
    run_state: int
    staleness: int | None
    lr_scale: float | None
    guaranteed_clock: int
    version: int
    final: bool
    pulled_run_state: int
    lineage: int
    pulled_staleness: int | None
    answer_at: int
    answer_len: int

def push_pull(fd: int, region: memoryview, at: int, push_head: bytes, clock: int, grads: tuple[Any, ...],
              prefixes: tuple[bytes, ...], loss: float, pull_head: bytes, wait_field: bytes, since_version: int,
              since_lineage: int, param_version: int, names: tuple[bytes, ...], outs: tuple[Any, ...],
              wait_ms: int) -> Answer | tuple[int, int] | bytes | bool | None: ...

from typing import Any

def push_pull(fd: int, region: memoryview, at: int, push_head: bytes, clock: int, grads: tuple[Any, ...],
              prefixes: tuple[bytes, ...], loss: float, pull_head: bytes, wait_field: bytes, since_version: int,
              since_lineage: int, param_version: int, names: tuple[bytes, ...], outs: tuple[Any, ...],
              wait_ms: int) -> tuple[Any, ...] | bytes | bool | None: ...

from typing import Any

def push_pull(fd: int, region: memoryview, at: int, head: bytes, grads: tuple[Any, ...], prefixes: tuple[bytes, ...],
              tail: bytes, names: tuple[bytes, ...], outs: tuple[Any, ...], wait_ms: int) -> tuple[Any, ...] | int | bool | None: ...

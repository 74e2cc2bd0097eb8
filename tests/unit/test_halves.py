"""``halves``: a large tensor's work split between the calling thread and a helper thread (what
the optimizers do with it: ``test_optimizers.py``)."""

from __future__ import annotations

import threading

import pytest

from ps_server.core import halves

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _split_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(halves, "_CORES", 2)
    monkeypatch.setattr(halves, "MIN_ELEMENTS", 64)  # 256 bytes


def test_both_waits_for_the_helper_and_raises_its_error() -> None:
    seen: list[str] = []
    release = threading.Event()

    def second() -> None:
        release.wait(5)
        seen.append(threading.current_thread().name)
        raise ValueError("from the helper")

    with pytest.raises(ValueError, match="from the helper"):
        halves.both(release.set, second)
    assert seen and seen[0].startswith("ps-halves")  # it ran on the helper, and had finished


def test_a_small_tensor_is_not_split() -> None:
    assert halves.cut(63, 16) == 0
    assert halves.cut(1000, 16) == 496

"""tests/docker needs a Docker engine: deploy/ci-docker.sh provides one and runs ``pytest -m docker tests/docker``."""

from __future__ import annotations

from collections.abc import Generator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Registered here too, so --strict-markers accepts the marker even where pyproject.toml does not list it.
    config.addinivalue_line("markers", "docker: needs a Docker engine and docker-compose (deploy/ci-docker.sh runs them)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item (item.rep_call), so a fixture's teardown knows if the test failed."""
    report: pytest.TestReport = yield
    setattr(item, f"rep_{report.when}", report)
    return report

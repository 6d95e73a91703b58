"""Shared fixtures.

``ray_local``: one local Ray for the whole test session, started on first use (so runs that
select no Ray test never start it): 4 logical CPUs (Worker actors ask for 0.01 CPU each, so
4 ranks fit on a 2-core machine), no dashboard, bound to 127.0.0.1, shut down at the end.
Tests that use it carry ``@pytest.mark.ray``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    from emulator.runtime.ray_setup import start_ray

    with start_ray(None, num_cpus=4) as resources:
        yield resources

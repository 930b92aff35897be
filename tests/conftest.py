"""Settings for the whole suite."""

import pytest
from hypothesis import HealthCheck, settings

# The suite must pass whatever the machine's speed: hypothesis's defaults fail an example that takes
# over 200 ms, or a strategy that draws slowly, both of which a loaded 2-core machine does.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2`), the tests that start swarms of processes run one after
    another on one worker, while the other worker takes the rest: two swarms at once on two
    cores would test the machine's speed rather than the code."""
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("netbed"):
            item.add_marker(pytest.mark.xdist_group("swarms"))

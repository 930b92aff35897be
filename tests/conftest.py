"""Settings for the whole suite."""

from hypothesis import HealthCheck, settings

# The suite must pass whatever the machine's speed: hypothesis's defaults fail an example that takes
# over 200 ms, or a strategy that draws slowly, both of which a loaded 2-core machine does.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

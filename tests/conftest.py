"""Shared pytest fixtures: bundles built once per session, a real mosquitto broker."""

from __future__ import annotations

import os

# keep the suite's torch/XNNPACK work on this 2-core machine predictable
os.environ.setdefault("OMP_NUM_THREADS", "1")

# the real-mosquitto fixtures (mqtt_broker, broker_factory, mqtt_pki) of the telemetry tests
pytest_plugins = ["mqtt_fixtures"]

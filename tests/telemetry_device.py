"""A device process for the telemetry tests and bench: spools telemetry until its seq
reaches --count, waits until the broker acknowledged everything, exits 0 (1 if not).

    TOMA_EDGE_MQTT_PASSWORD=... python tests/telemetry_device.py --mqtt mqtt://dev-1@127.0.0.1:1883 \
        --fleet test --device dev-1 --spool /tmp/dev-1.db --count 300 --rate 50
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from toma_edge.device.agent import TelemetryAgent
from toma_edge.telemetry import mqtt_settings


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mqtt", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--spool", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=50.0, help="messages per second (0: no limit)")
    p.add_argument("--flush-timeout", type=float, default=120.0)
    a = p.parse_args()
    agent = TelemetryAgent(mqtt_settings(a.mqtt), fleet=a.fleet, device_id=a.device,
                           spool=a.spool, interval_s=None, budget_bytes=256 << 20,
                           target="rpi4", max_inflight=200)
    if agent.spool.last_seq("events") == 0:
        agent.set_model("seed-regression", "2026.11.24-1", "ab" * 32)
    agent.set_batch_size(32)
    period = 1.0 / a.rate if a.rate > 0 else 0.0
    nxt = time.monotonic()
    while agent.spool.last_seq("telemetry") < a.count:
        for _ in range(3):
            agent.record_request(random.uniform(0.002, 0.02), rows=32, error=random.random() < 0.01)
        agent.emit_telemetry()
        if period:
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))
    print("spooled", a.count, flush=True)
    ok = agent.flush(a.flush_timeout)
    agent.close()
    print("delivered" if ok else "NOT delivered", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Simulated devices: N of them in one process, speaking the real protocol to a real broker (docs/simulator.md).

    behaviour   the behaviour file: latency, errors, install failures, drift per release and hardware class
    windows     telemetry windows with real mergeable histograms, drawn with numpy
    device      one device's rules: state, statements it obeys, install steps, windows
    clock       wall clock, or simulated time running faster
    config      SimConfig (checked when built), SimCounters, the default paho client factory
    loop        the Simulator: paho clients on one selector loop, timers on one heap

    from edgesdk.sim import SimConfig, Simulator
    counters = Simulator(SimConfig(broker, "demo", devices=1000)).run(stop_event)
"""

from edgesdk.sim.behaviour import DEFAULT_BEHAVIOUR, Behaviour, ReleaseBehaviour, load_behaviour, parse_behaviour
from edgesdk.sim.clock import Clock, ScaledClock, WallClock
from edgesdk.sim.device import FleetTrust, SimDevice
from edgesdk.sim.config import (ClientFactory, SimConfig, SimCounters, StartRelease, default_client_factory,
                                device_id)
from edgesdk.sim.loop import Simulator
from edgesdk.sim.windows import fake_package_id, histogram_of_samples

__all__ = ["DEFAULT_BEHAVIOUR", "Behaviour", "ClientFactory", "Clock", "FleetTrust", "ReleaseBehaviour", "ScaledClock",
           "SimConfig", "SimCounters", "SimDevice", "Simulator", "StartRelease", "WallClock", "default_client_factory",
           "device_id", "fake_package_id", "histogram_of_samples", "load_behaviour", "parse_behaviour"]

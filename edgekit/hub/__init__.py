"""The hub: registry, rollouts, devices and telemetry of a fleet (docs/hub.md)."""

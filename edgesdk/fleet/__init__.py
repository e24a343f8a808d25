"""Fleet-side services: package repository, deployment, telemetry collection."""

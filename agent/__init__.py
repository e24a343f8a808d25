"""edge-agent: the device daemon (fetch, verify, select, activate, serve, report)."""

"""Host-side packaging pipeline: passes that load, fix, simplify, build and validate variants."""

"""edgesdk command line (typer): one sub-app per noun."""

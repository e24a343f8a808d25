"""Built-in target profiles (YAML data, installed as the ``edgesdk.targets`` package)."""

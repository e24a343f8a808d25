"""edgesdk: package a trained model for a fleet of edge devices and keep it running well there.

The light, shared part (errors, profiles, manifest, signing, package reading, protocol) imports
only numpy, pyyaml and cryptography, so the device agent can use it; the conversion tooling
lives in `edgesdk.pipeline` and needs the `host` extra.
"""

__version__ = "0.1.0"

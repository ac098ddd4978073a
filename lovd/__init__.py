"""lovd: per-user OpenCode legal-research sessions as rootless Podman containers."""

__version__ = "0.1.0"

"""Thin helpers for systemd's process protocols (socket activation, sd_notify)."""

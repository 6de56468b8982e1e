"""Errors shared across fedsd's layers (kept dependency-free, so any module can raise them)."""

from __future__ import annotations


class ConfigError(ValueError):
    """An invalid run-config value; the message names the key and what is allowed."""


class DeployError(RuntimeError):
    """A Flower service failed to start, died, or refused a request."""


class ShardsError(FileNotFoundError):
    """The shard directory the SuperNodes need is missing or incomplete."""


class OutInUse(DeployError):
    """Another ``fedsd up`` holds this OUT (or work dir)."""

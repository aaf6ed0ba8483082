"""Tidings: a self-hosted real-time notification hub. Publish once; deliver everywhere."""

__version__ = "0.1.0"

"""kfh_probe: find the attention heads whose answer rows single out a reasoning trace's essential steps."""

__version__ = "0.1.0"

"""gcfs: mount Grand Challenge archives, algorithms and reader studies as a read-only tree."""

__version__ = "0.1.0"

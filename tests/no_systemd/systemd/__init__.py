"""A stand-in that makes ``import systemd`` fail, as on a machine without systemd-python.

Tests put this folder first on PYTHONPATH for a subprocess daemon, so the daemon
takes its built-in sd_notify path and logs JSON to stdout.
"""

raise ImportError("systemd-python is hidden for this test")

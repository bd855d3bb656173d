"""Benchmarks for sfwatch, run on demand: ``.venv/bin/python -m bench all``.

Not part of the test suite (pytest collects only ``tests/``). Each benchmark
starts the fake API (``bench.fakeserver``, a wrapper around ``tests.fakeapi``)
and the real ``sfwatch run`` as subprocesses, prints its figures and writes
them to ``bench/results/<name>.json``. See ``docs/benchmarks.md``.
"""

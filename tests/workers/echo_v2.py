"""A second release of the example echo model, for rolling a pool to a new
class: the same model name and answers, a new version.

Served with ``PYTHONPATH`` pointing here, as ``echo_v2:Echo``.
"""

from __future__ import annotations

from infergate_worker.examples.echo import Echo as _Echo


class Echo(_Echo):
    version = "2"

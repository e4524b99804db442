"""Tools that break kvtier on purpose, shared by the reliability tests and benches.

* :mod:`kvtier.chaos.node`: a ``kvtier serve`` subprocess to start, SIGKILL and
  restart on the same data directory and ports, with its RSS and open descriptors;
* :mod:`kvtier.chaos.crash`: the crash-consistency harness (``kvtier chaos crash``);
* :mod:`kvtier.chaos.faults`: a tier wrapper that injects EIO, ENOSPC, latency and
  torn writes into a real tier;
* :mod:`kvtier.chaos.proxy`: a loopback TCP proxy that delays, drops and cuts
  connections (between clients and nodes, nodes and etcd).

``docs/reliability.md`` says what each suite proves and how to rerun it.
"""

from __future__ import annotations

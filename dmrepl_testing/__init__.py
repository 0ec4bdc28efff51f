"""The test harness of dmrepl: not part of the installed package.

The wheel excludes this package (``pyproject.toml``); it is importable from the
source tree only (pytest's ``pythonpath``, the tools under ``tools/``, which put
the repository root on ``sys.path``, and daemons the harness starts, which get it
on ``PYTHONPATH``).

- :mod:`dmrepl_testing.daemon`: a dmrepl daemon as a child process, and the
  kernel lab (loop devices, network namespaces, veth, qemu-nbd).
- :mod:`dmrepl_testing.simengine`: the simulation engine (``--engine sim``).
- :mod:`dmrepl_testing.replicator`: fake block stores, the write recorder and its
  crash images, waiting helpers.
- :mod:`dmrepl_testing.ulogd`: a fake kernel speaking dm-log-userspace.
"""

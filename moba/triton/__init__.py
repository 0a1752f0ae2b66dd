"""The "triton" backend: MoBA's GPU kernels in Triton (also run on the CPU by Triton's interpreter under
TRITON_INTERPRET=1). Read top-down: ``common.py`` and ``configs.py`` (shared helpers, tile sizes), ``gate.py``
(block selection), ``grouping.py`` (the selection inverted per key block), ``fwd.py``, ``bwd.py``, ``decode.py``.
"""

"""Triton kernels for MoBA (placeholder until the kernels land)."""


def supports(q) -> bool:
    return False

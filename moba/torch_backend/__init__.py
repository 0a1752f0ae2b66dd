"""The "torch" backend: MoBA in PyTorch operations, on any device (the CPU path): ``gate.py`` picks the blocks,
``attention.py`` computes the attention over them, forward and backward."""

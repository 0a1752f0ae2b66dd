"""moba: Mixture of Block Attention (arXiv 2502.13189) for PyTorch, with Triton kernels on GPU."""
from .ops import moba_attention, naive_moba_attention, select_blocks
from .ops.gate import BlockMeansCache

__version__ = "0.1.0"
__all__ = ["moba_attention", "naive_moba_attention", "select_blocks", "BlockMeansCache", "__version__"]

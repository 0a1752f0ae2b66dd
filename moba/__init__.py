"""moba: Mixture of Block Attention (arXiv 2502.13189) for PyTorch, with Triton kernels on GPU."""
from .api import moba_attention, select_blocks
from .cache import BlockMeansCache
from .naive import naive_moba_attention

__version__ = "0.1.0"
__all__ = ["moba_attention", "naive_moba_attention", "select_blocks", "BlockMeansCache", "__version__"]

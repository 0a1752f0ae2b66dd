"""moba: Mixture of Block Attention (arXiv 2502.13189) for PyTorch, with Triton kernels on GPU."""
from .api import moba_attention, select_blocks
from .cache import BlockMeansCache
from .kvcache import cache_key_sums, moba_attention_with_kvcache
from .naive import naive_moba_attention

__version__ = "0.1.0"
__all__ = ["moba_attention", "moba_attention_with_kvcache", "cache_key_sums", "naive_moba_attention", "select_blocks",
           "BlockMeansCache", "__version__"]

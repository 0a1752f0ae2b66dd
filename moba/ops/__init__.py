from .attention import moba_attention, select_blocks
from .naive import naive_moba_attention

__all__ = ["moba_attention", "naive_moba_attention", "select_blocks"]

"""transformers integration: ``moba.hf.enable(model, block_size=..., topk=...)``, ``set_mode``, ``disable``;
``generate`` and ``MobaCache`` for generation through MoBA's KV cache (CUDA-graph decode steps).

Importing this module registers ``attn_implementation="moba"`` (needs the ``hf`` extra).
"""
from .integrations.generation import MobaCache, generate
from .integrations.transformers import disable, enable, moba_attention_forward, register, set_mode

register()

__all__ = ["enable", "set_mode", "disable", "register", "moba_attention_forward", "generate", "MobaCache"]

"""Tile sizes and memory bounds of the Triton kernels, with the reason for each.

``CONFIG[kind]`` may be set by benchmarks and tuning scripts (``benchmarks/tools/tune.py``) to try other tiles; the
launchers read it at every call. Everything else here is a constant of the design; docs/performance.md records
what each choice was measured against.
"""
from __future__ import annotations

# Tiles per kernel: (BM query rows, BN keys, num_warps, num_stages); CONFIG[kind] None means GPU_DEFAULT[kind].
KINDS = ("gate", "fwd", "own", "dkdv", "dq", "own_dq")
CONFIG = dict.fromkeys(KINDS)
GPU_DEFAULT = {"gate": (128, 64, 8, 3), "fwd": (64, 64, 4, 3), "own": (64, 64, 4, 3),
               "dkdv": (32, 128, 8, 3), "dq": (64, 64, 4, 2), "own_dq": (64, 32, 4, 3)}

# The decode kernel (moba.triton.decode): (programs per SM over the whole grid, which sets the splits of each
# (sequence, kv head)'s walk; the most splits; keys per step; num_warps; num_stages; keys per work item, which
# stops at its block's end; 1: the gate in a launch of its own, whose list of chosen blocks the splits share out
# evenly, 0: the gate in every split, which takes every n-th work item of all the blocks; block means the gate
# scores at a time; 1: the gate keeps its choices by replacement (`_topk_replace`, rounds only while a chunk holds
# better blocks), 0: by topk - 1 rounds of max extraction per chunk; listed: programs that score a sequence's blocks
# side by side, a power of 2, merged by a launch of their own where more than 1). CONFIG["decode"] None means
# DECODE_DEFAULT; a shorter tuple takes the rest from it. A step streams K/V: enough programs and bytes in flight
# per SM to keep HBM busy, few enough that every split still finds chosen blocks to read.
DECODE_DEFAULT = (8, 64, 64, 4, 2, 512, 1, 32, 0, 1)
CONFIG["decode"] = None

# The forward's query chunks bound the selection and the entry ids it groups: at least SELECT_BYTES, or q's size
# / SELECT_SHARE for inference. With a backward to come the selection is kept whole anyway, so only the entry ids
# count and the bound is q's size / KEEP_SHARE: training shapes with many slots and few heads otherwise ran in
# many chunks of one launch per slot each, and the host's launch work dominated.
SELECT_BYTES = 1 << 22
SELECT_SHARE = 16
KEEP_SHARE = 2
# ... but a chunk takes enough rows that a (slot, kv head, block) group fills half a tile on average (up to
# FILL_BYTES of entries): with small blocks and few heads, short chunks leave every tile nearly empty.
FILL_BYTES = 1 << 28

# The grouping's counters are kept in PLACE_COPIES copies (less contention on the atomics of popular blocks),
# and its prefix sum runs in one program up to SCAN_SPANS spans of groups, in parallel spans beyond.
PLACE_COPIES = 8
SCAN_SPANS = 8

# The gate keeps its running top-k by S rounds of max extraction per chunk of blocks; from GATE_REPLACE_S slots on,
# a replacement scan (rounds only while a candidate beats the worst kept score) is cheaper. Sequences of at most
# GATE_SHARED_BLOCKS blocks take the gate's per-kv-head form (every earlier block in one chunk: the group's block
# means are loaded and split once for all its query heads).
# GATE_SHARED_BLOCKS - 1 is also the gates' chunk of blocks per step: a power of two, at least 16.
GATE_REPLACE_S = 32
GATE_SHARED_BLOCKS = 33
# The gate fused into the Gluon own-block kernel scores a sequence's earlier blocks in one tile of at most
# OWN_GATE_BLOCKS means and unrolls its top-k rounds, which spill registers from OWN_GATE_SLOTS slots on.
OWN_GATE_BLOCKS = 32
OWN_GATE_SLOTS = 8

# Rings of the sm_90 Gluon kernels (moba.gluon): the forward's K/V ring of 128-key tiles (two slots leave room for
# the consumers' prefetched Q and O rows in 227 KB of shared memory; three measured no faster) and the dK/dV
# kernel's ring of gathered row tiles.
FWD_RING = 2
DKDV_RING = 4

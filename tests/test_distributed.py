"""Context parallelism (moba.distributed) on the CPU: 2 and 4 gloo processes against one process.

For random inputs, each case's sharded outputs, log-sum-exp and gradients, gathered back, must equal single-process
``moba.moba_attention`` on the whole sequence (fp64: 1e-10 relative, fp32: 1e-5), and the dense path SDPA's. The
ranks run every case in one spawn (starting processes is the slow part) and rank 0 writes a verdict per case,
which the parametrised tests below read.
"""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import moba
import moba.distributed as md

# (name, P, scheme, layout, dtype, backend, T, Hq, Hkv, D, block, topk, documents)
CASES = []
for P in (2, 4):
    for scheme in ("allgather", "ulysses"):
        for layout in ("zigzag", "contiguous"):
            CASES.append((f"P{P}-{scheme}-{layout}-gqa-fp64", P, scheme, layout, "float64", "torch", 96, 8, 4, 16, 10,
                          3, None))
            CASES.append((f"P{P}-{scheme}-{layout}-docs-fp32", P, scheme, layout, "float32", "torch", 96, 8, 4, 16, 8,
                          2, [0, 17, 18, 60, 96]))
    CASES.append((f"P{P}-allgather-zigzag-topk1", P, "allgather", "zigzag", "float64", "torch", 80, 4, 2, 8, 6, 1,
                  None))
    CASES.append((f"P{P}-allgather-zigzag-topk-all", P, "allgather", "zigzag", "float64", "torch", 80, 4, 2, 8, 6,
                  100, [0, 40, 80]))
    CASES.append((f"P{P}-allgather-contiguous-odd-heads", P, "allgather", "contiguous", "float64", "torch", 72, 6, 2,
                  8, 7, 3, [0, 5, 70, 72]))
CASES += [
    ("P2-allgather-zigzag-naive", 2, "allgather", "zigzag", "float64", "naive", 48, 4, 2, 8, 5, 3, [0, 20, 48]),
    ("P2-allgather-zigzag-triton", 2, "allgather", "zigzag", "float32", "triton", 64, 4, 2, 16, 8, 3, [0, 30, 64]),
    ("P2-ulysses-zigzag-triton", 2, "ulysses", "zigzag", "float32", "triton", 64, 4, 2, 16, 8, 3, None),
    # the gate="group" variant (cases named "-group")
    ("P2-allgather-zigzag-group-fp64", 2, "allgather", "zigzag", "float64", "torch", 96, 8, 2, 16, 10, 3,
     [0, 17, 18, 60, 96]),
    ("P2-ulysses-contiguous-group-fp64", 2, "ulysses", "contiguous", "float64", "torch", 96, 8, 2, 16, 10, 3, None),
    ("P2-allgather-zigzag-group-triton", 2, "allgather", "zigzag", "float32", "triton", 64, 4, 2, 16, 8, 3,
     [0, 30, 64]),
]
DENSE = [(f"P{P}-{scheme}-{layout}-dense{'-docs' if docs else ''}", P, scheme, layout, docs)
         for P in (2, 4) for scheme in ("allgather", "ulysses") for layout in ("zigzag", "contiguous")
         for docs in (None, [0, 9, 50, 64])]
BAD = ["unequal shards", "ulysses heads", "zigzag odd length", "cu_seqlens end", "block_size on one rank",
       "gate on one rank"]


def _rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _inputs(T, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(1, T, h, D, generator=g, dtype=torch.float64).to(dt) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(1, T, Hq, D, generator=g, dtype=torch.float64).to(dt)
    dlse = torch.randn(1, T, Hq, generator=g, dtype=torch.float64)
    return q, k, v, dout, dlse


def _moba_case(case, rank, group):
    name, P, scheme, layout, dtype, backend, T, Hq, Hkv, D, bs, topk, docs = case
    q, k, v, dout, dlse = _inputs(T, Hq, Hkv, D, dtype, seed=len(name))
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    gate = "group" if "-group" in name else "head"
    ql, kl, vl = (md.shard(x, layout=layout).requires_grad_() for x in (q, k, v))
    out, lse = md.moba_attention(ql, kl, vl, bs, topk, layout=layout, scheme=scheme, cu_seqlens=cu, return_lse=True,
                                 backend=backend, gate=gate)
    loss = (out.double() * md.shard(dout, layout=layout).double()).sum() + (
        lse.double() * md.shard(dlse, layout=layout)).sum()
    loss.backward()
    got = [md.unshard(x.detach(), layout=layout) for x in (out, lse, ql.grad, kl.grad, vl.grad)]
    if rank:
        return None
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    o, lse_ref = moba.moba_attention(qf, kf, vf, bs, topk, cu_seqlens=cu, return_lse=True, backend=backend, gate=gate)
    ((o.double() * dout.double()).sum() + (lse_ref.double() * dlse).sum()).backward()
    want = [o, lse_ref, qf.grad, kf.grad, vf.grad]
    return {n: _rel(a, b) for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want)}


def _dense_ref(q, k, v, docs):
    cu = docs or [0, q.shape[1]]
    outs = []
    for a, b in zip(cu, cu[1:]):
        o = F.scaled_dot_product_attention(q[:, a:b].transpose(1, 2), k[:, a:b].transpose(1, 2),
                                           v[:, a:b].transpose(1, 2), is_causal=True, enable_gqa=True)
        outs.append(o.transpose(1, 2))
    return torch.cat(outs, 1)


def _dense_case(case, rank, group):
    name, P, scheme, layout, docs = case
    q, k, v, dout, _ = _inputs(64, 8, 4, 16, "float64", seed=len(name) + 7)
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    ql, kl, vl = (md.shard(x, layout=layout).requires_grad_() for x in (q, k, v))
    out = md.dense_attention(ql, kl, vl, layout=layout, scheme=scheme, cu_seqlens=cu)
    (out * md.shard(dout, layout=layout)).sum().backward()
    got = [md.unshard(x.detach(), layout=layout) for x in (out, ql.grad, kl.grad, vl.grad)]
    if rank:
        return None
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    o = _dense_ref(qf, kf, vf, docs)
    (o * dout).sum().backward()
    return {n: _rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, [o, qf.grad, kf.grad, vf.grad])}


def _bad_case(which, rank, P):
    """Every rank must raise ValueError (never hang): returns this rank's message, or what happened instead."""
    n, Hq, Hkv, layout, scheme, cu, bs = 8, 4, 2, "zigzag", "allgather", None, 4
    if which == "unequal shards" and rank == 0:
        n = 10
    if which == "ulysses heads":
        Hq, Hkv, scheme = 2 * (P + 1), P + 1, "ulysses"
    if which == "zigzag odd length":
        n = 7
    if which == "cu_seqlens end":
        cu = torch.tensor([0, 5, 8 * P + 1], dtype=torch.int32)
    if which == "block_size on one rank" and rank == P - 1:
        bs = 5
    gate = "groups" if which == "gate on one rank" and rank == 0 else "head"
    q, k, v = torch.randn(1, n, Hq, 8), torch.randn(1, n, Hkv, 8), torch.randn(1, n, Hkv, 8)
    try:
        md.moba_attention(q, k, v, bs, 2, layout=layout, scheme=scheme, cu_seqlens=cu, gate=gate)
    except ValueError as e:
        return "ValueError: " + str(e)
    return "no error"


def _worker(rank, P, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=P)
    res = {}
    for case in CASES:
        if case[1] == P:
            try:
                res[case[0]] = _moba_case(case, rank, None)
            except Exception as e:     # recorded, so that one failing case does not hide the others
                res[case[0]] = f"{type(e).__name__}: {e}"
    for case in DENSE:
        if case[1] == P:
            try:
                res[case[0]] = _dense_case(case, rank, None)
            except Exception as e:
                res[case[0]] = f"{type(e).__name__}: {e}"
    for which in BAD:
        msgs = [None] * P
        mine = _bad_case(which, rank, P)
        dist.all_gather_object(msgs, mine)
        res[f"P{P}-bad-{which}"] = msgs
    # the sharding helpers: a round trip, and the positions a rank holds
    x = torch.arange(2 * P * 3, dtype=torch.float64).view(1, -1, 1, 1)
    for layout in md.LAYOUTS:
        loc = md.shard(x, layout=layout)
        pos = md.positions(loc.shape[1], layout=layout)
        ok = bool(torch.equal(md.unshard(loc, layout=layout), x) and torch.equal(loc.flatten().long(), pos))
        oks = [None] * P
        dist.all_gather_object(oks, ok)
        res[f"P{P}-roundtrip-{layout}"] = oks
    if rank == 0:
        with open(path, "w") as f:
            json.dump(res, f)
    dist.barrier()     # no rank tears its connections down while another still talks to it
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for P in (2, 4):
        path = tmp_path_factory.mktemp(f"cp{P}") / "res.json"
        mp.spawn(_worker, args=(P, _free_port(), str(path)), nprocs=P, join=True)
        out.update(json.loads(path.read_text()))
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_moba_matches_one_process(results, case):
    r = results[case[0]]
    assert isinstance(r, dict), r
    tol = 1e-10 if case[4] == "float64" else 1e-5
    assert all(e < tol for e in r.values()), r


@pytest.mark.parametrize("case", DENSE, ids=[c[0] for c in DENSE])
def test_dense_matches_sdpa(results, case):
    r = results[case[0]]
    assert isinstance(r, dict), r
    assert all(e < 1e-10 for e in r.values()), r


@pytest.mark.parametrize("P", (2, 4))
@pytest.mark.parametrize("which", BAD)
def test_bad_input_raises_on_every_rank(results, P, which):
    msgs = results[f"P{P}-bad-{which}"]
    assert all(m.startswith("ValueError") for m in msgs), msgs


def test_bad_input_names_the_problem(results):
    assert any("unequal" in m or "disagree" in m for m in results["P2-bad-unequal shards"])
    assert any("kv heads" in m for m in results["P4-bad-ulysses heads"])
    assert any("even" in m for m in results["P2-bad-zigzag odd length"])
    assert any("cu_seqlens" in m for m in results["P2-bad-cu_seqlens end"])
    assert any("block_size" in m for m in results["P4-bad-block_size on one rank"])
    assert any("gate must be" in m for m in results["P2-bad-gate on one rank"])


@pytest.mark.parametrize("P", (2, 4))
@pytest.mark.parametrize("layout", ("zigzag", "contiguous"))
def test_shard_unshard_positions(results, P, layout):
    assert results[f"P{P}-roundtrip-{layout}"] == [True] * P


def test_shard_rejects_indivisible_length():
    class One:     # a one-rank "group" is enough for the length check, which runs before any collective
        pass
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        with pytest.raises(ValueError, match="multiple of 2"):
            md.shard(torch.randn(1, 7, 2, 4), layout="zigzag")
        with pytest.raises(ValueError, match="layout"):
            md.shard(torch.randn(1, 8, 2, 4), layout="ring")
    finally:
        dist.destroy_process_group()


def _hf_worker(rank, P, port, path):
    """A tiny Llama (random weights, the same on every rank) over a sequence sharded by moba.hf's cp_group: its
    logits and a parameter's gradient, gathered, against the one-process model."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=P)
    import moba.hf
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double()
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(1))
    res = {}
    for layout in md.LAYOUTS:
        moba.hf.enable(model, block_size=8, topk=3, full_attention_layers=(-1,), cp_group=dist.group.WORLD,
                       cp_layout=layout)
        model.zero_grad()
        local = md.shard(ids, layout=layout)
        logits = model(local, position_ids=md.positions(local.shape[1], layout=layout)[None]).logits
        logits.pow(2).mean().backward()
        got = md.unshard(logits.detach(), layout=layout)
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        dist.all_reduce(grad)
        moba.hf.enable(model, block_size=8, topk=3, full_attention_layers=(-1,))      # the same model, one process
        model.zero_grad()
        want = model(ids).logits
        (want.pow(2).mean() * P).backward()     # each rank's loss is the mean over its shard: P times the whole's
        res[layout] = (_rel(got, want.detach()),
                       _rel(grad, model.model.layers[0].self_attn.q_proj.weight.grad))
    if rank == 0:
        with open(path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def test_hf_model_context_parallel(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "hf.json"
    mp.spawn(_hf_worker, args=(2, _free_port(), str(path)), nprocs=2, join=True)
    res = json.loads(path.read_text())
    for layout, (logits_err, grad_err) in res.items():
        assert logits_err < 1e-10 and grad_err < 1e-10, (layout, logits_err, grad_err)

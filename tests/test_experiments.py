"""Smoke test of experiments/train.py: a few CPU steps, hybrids, and resuming from a checkpoint."""
import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("tokenizers")
ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("moba_experiments_train", ROOT / "experiments" / "train.py")
train = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = train   # dataclasses look their module up here
spec.loader.exec_module(train)


def cfg(tmp_path, **kw):
    base = dict(vocab=512, dim=64, layers=2, heads=4, kv_heads=2, seq_len=128, batch=2, steps=8, block_size=16,
                topk=2, eval_every=4, eval_batches=2, max_corpus_mb=0.5, warmup=2,
                data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"))
    base.update(kw)
    return train.Config(**base)


def test_train_and_resume(tmp_path):
    full = train.train(cfg(tmp_path, out=str(tmp_path / "a")), log=lambda *_: None)
    assert len(full) == 2 and all(h["val_loss"] == h["val_loss"] for h in full)
    assert all(h["trailing_2k"] == pytest.approx(h["val_loss"]) for h in full)     # 128 tokens: all are trailing
    assert all("trailing_2k_short" not in h for h in full)                            # 128 <= eval_short
    train.train(cfg(tmp_path, out=str(tmp_path / "b")), log=lambda *_: None, stop_at=3)
    resumed = train.train(cfg(tmp_path, out=str(tmp_path / "b")), resume=True, log=lambda *_: None)
    assert resumed[-1]["step"] == 8
    assert abs(resumed[-1]["val_loss"] - full[-1]["val_loss"]) < 1e-4


def test_evaluate_trailing_tokens(tmp_path):
    """The trailing-token loss is the mean over the last positions: with 4 buckets of 32 the last bucket's."""
    import torch
    torch.manual_seed(0)
    c = cfg(tmp_path)
    model = train.GPT(c)
    data = torch.randint(0, c.vocab, (5000,))
    vl, buckets, trail, short = train.evaluate(model, data, c, torch.device("cpu"), buckets=4, trailing=32)
    assert len(buckets) == 4 and trail == pytest.approx(buckets[-1]) and vl == pytest.approx(sum(buckets) / 4)
    assert trail != pytest.approx(buckets[0]) and short is None     # eval_short (4096) >= seq_len: off


@pytest.mark.parametrize("attn", ["full", "moba"])
def test_evaluate_trailing_tokens_with_short_context(tmp_path, attn):
    """With eval_short 48 of 128 tokens the last 32 positions are scored again on each window's last 48 tokens alone:
    the same windows as the full evaluation (its generator's seed), written out here with the model's own loss."""
    import torch
    torch.manual_seed(0)
    c = cfg(tmp_path, eval_short=48, attn=attn)
    model = train.GPT(c)
    data = torch.randint(0, c.vocab, (5000,))
    vl, buckets, trail, short = train.evaluate(model, data, c, torch.device("cpu"), buckets=4, trailing=32)
    g, want, whole = torch.Generator().manual_seed(1234), [], []
    with torch.no_grad():
        for _ in range(c.eval_batches):
            x, y = train.batch_of(data, c, g, torch.device("cpu"))
            want.append(model(x[:, -48:], y[:, -48:], reduction="none").view(-1, 48)[:, -32:])
            whole.append(model(x, y, reduction="none").view(x.shape)[:, -32:])
    assert short == pytest.approx(torch.cat(want).double().mean().item(), rel=1e-6)
    assert trail == pytest.approx(torch.cat(whole).double().mean().item(), rel=1e-6) and short != pytest.approx(trail)


def test_hybrids_and_presets(tmp_path):
    h = train.train(cfg(tmp_path, full_last=1, moba_until=0.5, eval_short=64), log=lambda *_: None)
    assert h[-1]["step"] == 8 and h[-1]["trailing_2k_short"] == h[-1]["trailing_2k_short"]    # present, not NaN
    c, resume, stop = train.parse(["--preset", "tiny-cpu", "--attn", "full", "--steps", "3"])
    assert c.steps == 3 and c.attn == "full" and c.dim == train.PRESETS["tiny-cpu"]["dim"] and not resume
    model = train.GPT(cfg(tmp_path, full_last=1))
    assert [b.attn.mode for b in model.blocks] == ["moba", "full"]
    model.set_attention("full")
    assert [b.attn.mode for b in model.blocks] == ["full", "full"]


def test_validation_split_is_by_document():
    docs = train.documents("stdlib", 1)
    names = [n for n, _ in docs]
    assert len(names) == len(set(names)) and len(docs) > 3
    val = [n for n in names if train.is_val(n)]
    assert set(val).isdisjoint(n for n in names if not train.is_val(n))


def load_retrieval():
    spec = importlib.util.spec_from_file_location("moba_experiments_retrieval", ROOT / "experiments" / "retrieval.py")
    ret = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ret
    spec.loader.exec_module(ret)
    return ret


def test_retrieval_smoke(tmp_path):
    ret = load_retrieval()
    c = cfg(tmp_path, steps=3)
    args = ["--pairs", "3", "--queries", "2"] + [f"--{k.replace('_', '-')}={v}" for k, v in
                               dict(vocab=c.vocab, dim=c.dim, layers=c.layers, heads=c.heads, kv_heads=c.kv_heads,
                                    seq_len=c.seq_len, batch=c.batch, steps=c.steps, block_size=c.block_size,
                                    topk=c.topk, eval_batches=2, max_corpus_mb=c.max_corpus_mb,
                                    data_dir=c.data_dir, out=c.out).items()]
    res = ret.main(args + ["--stop-step=2"])      # stops after 2 of the schedule's 3 steps
    assert res["steps_done"] == 2 and res["cfg"]["steps"] == 3
    acc, counts = res["accuracy_by_depth"], res["answers_per_bucket"]
    assert len(acc) == 10 and all((a is None) == (c == 0) for a, c in zip(acc, counts))
    assert all(0 <= a <= 1 for a in acc if a is not None) and sum(counts) > 0
    assert set(res["gate_picks"]) == {"0", "1"}
    rec = res["gate_recall"]
    assert set(rec["by_layer_head"]) == {"0", "1"} and rec["queries"] == 2 * 2 * c.batch
    assert all(len(r) == c.heads and all(0 <= v <= 1 for v in r) for r in rec["by_layer_head"].values())
    torch = __import__("torch")
    g = torch.Generator().manual_seed(0)
    x, y, pos, a, d = ret.make_batch(torch.arange(5000) % 500, c, g, 3, 2)
    V = c.vocab
    for b in range(c.batch):
        for j in range(2):
            p = int(pos[b, j])
            assert x[b, p] == V - 2 and x[b, p - 3] == V - 3 and y[b, p] == a[b, j]      # <q> a b <v> -> c
            s = int(round(float(d[b, j]) * c.seq_len))                                # the needle it asks for
            assert x[b, s] == V - 1 and torch.equal(x[b, s + 1:s + 3], x[b, p - 2:p]) and x[b, s + 4] == a[b, j]
    # a small key/value vocabulary: one-token keys distinct within a sequence, values from kv_vocab ids
    x, y, pos, a, d = ret.make_batch(torch.arange(5000) % 500, c, g, 3, 2, key_len=1, background="random",
                                     kv_vocab=8)
    for b in range(c.batch):
        keys = [int(x[b, s + 1]) for s in range(c.seq_len - 3) if x[b, s] == V - 1]
        assert len(keys) == 3 and len(set(keys)) == 3 and all(V // 4 <= k_ < V // 4 + 8 for k_ in keys)
        assert all(V // 2 <= int(v_) < V // 2 + 8 for v_ in a[b])
        for j in range(2):
            assert y[b, int(pos[b, j])] == a[b, j]
    # without the value marker: <k> a c in the body, <q> a c at the end, c predicted at the query's a
    x, y, pos, a, d = ret.make_batch(None, c, g, 3, 2, key_len=1, background="random", kv_vocab=8, v_mark=False)
    assert not (x == V - 2).any()
    for b in range(c.batch):
        for j in range(2):
            p = int(pos[b, j])
            s = int(round(float(d[b, j]) * c.seq_len))
            assert x[b, p - 1] == V - 3 and x[b, s] == V - 1 and x[b, s + 1] == x[b, p] and y[b, p] == a[b, j]
            assert x[b, s + 2] == a[b, j]
    # needles written 3 times in a row: <k> a c <k> a c <k> a c at the depth the query's answer names
    x, y, pos, a, d = ret.make_batch(None, c, g, 3, 2, key_len=1, background="random", kv_vocab=8, v_mark=False,
                                     repeat=3)
    for b in range(c.batch):
        assert int((x[b] == V - 1).sum()) == 9
        for j in range(2):
            p, s = int(pos[b, j]), int(round(float(d[b, j]) * c.seq_len))
            assert y[b, p] == a[b, j] and all(x[b, s + 3 * r] == V - 1 and x[b, s + 3 * r + 1] == x[b, p]
                                              and x[b, s + 3 * r + 2] == a[b, j] for r in range(3))


def test_retrieval_fine_tunes_a_train_checkpoint(tmp_path):
    """--init loads a train.py checkpoint with weights_only=True (tensors and plain values only), and the retrieval
    run's own checkpoint loads the same way."""
    import torch
    ret = load_retrieval()
    c = cfg(tmp_path, steps=2)
    train.train(c, log=lambda *_: None, stop_at=1)
    ck = pathlib.Path(c.out) / "ckpt.pt"
    assert isinstance(torch.load(ck, weights_only=True)["cfg"], dict)
    args = ["--pairs", "3", "--queries", "2", "--init", str(ck)] + [f"--{k.replace('_', '-')}={v}" for k, v in
                               dict(vocab=c.vocab, dim=c.dim, layers=c.layers, heads=c.heads, kv_heads=c.kv_heads,
                                    seq_len=c.seq_len, batch=c.batch, steps=1, block_size=c.block_size,
                                    topk=c.topk, eval_batches=1, max_corpus_mb=c.max_corpus_mb,
                                    data_dir=c.data_dir, out=str(tmp_path / "ret")).items()]
    res = ret.main(args)
    assert res["steps_done"] == 1 and res["init"] == str(ck)
    assert set(torch.load(tmp_path / "ret" / "ckpt.pt", weights_only=True)) == {"model", "cfg"}


def test_report_reads_and_appends_results(tmp_path, monkeypatch):
    """report.py reads runs.jsonl and curves.jsonl back into the result files' form, and --add appends new ones."""
    import json
    spec = importlib.util.spec_from_file_location("moba_experiments_report", ROOT / "experiments" / "report.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    assert rep.final("s8k6k_full_h100")[1]["val_loss"] == pytest.approx(1.9785, abs=1e-4)
    monkeypatch.setattr(rep, "RUNS", tmp_path / "runs.jsonl")
    monkeypatch.setattr(rep, "CURVES", tmp_path / "curves.jsonl")
    rep.RUNS.write_text("")
    rep.CURVES.write_text("")
    rep._all.cache_clear()
    run = dict(cfg=dict(seed=0), device="cpu", commit="abc", history=[dict(step=1, val_loss=2.0), dict(step=2,
                                                                                                  val_loss=1.5)])
    (tmp_path / "a.json").write_text(json.dumps(run))
    (tmp_path / "b.json").write_text(json.dumps(dict(cfg=dict(seed=1), mean_accuracy=0.5)))
    rep.main(["--add", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert rep.load("a") == run and rep.load("b") == dict(cfg=dict(seed=1), mean_accuracy=0.5)
    assert len(rep.CURVES.read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        rep.main(["--add", str(tmp_path / "a.json")])
    rep._all.cache_clear()


@pytest.mark.parametrize("topk", [1, 3, 99])
def test_gate_recall_against_brute_force(tmp_path, topk):
    """GateRecall's per-query, per-head hits equal select_blocks over the whole sequence, read at each query's
    position, against the blocks of its needle's tokens; topk >= the number of blocks finds every needle."""
    import torch
    import moba
    ret = load_retrieval()
    torch.manual_seed(0)
    c = cfg(tmp_path, seq_len=200, block_size=16, topk=topk, full_last=1, layers=3, eval_batches=2)
    model = train.GPT(c).eval()
    task = dict(key_len=1, background="random", kv_vocab=8, v_mark=False, repeat=2)
    g = torch.Generator().manual_seed(5)
    x, _, pos, a, d = ret.make_batch(None, c, g, 5, 4, **task)
    rec = ret.GateRecall(model, c, task)
    rec.expect(pos, d)
    with torch.no_grad():
        pred = ret.answer_logits(model(x), pos).argmax(-1)
    rec.answered(pred == a)
    rec.close()
    assert set(rec.rows) == {0, 1} and not model.blocks[0].attn._forward_pre_hooks     # MoBA layers; hooks removed
    # brute force: the layers' q and k from their inputs, select_blocks over all positions
    inputs = {}
    hs = [b.attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args))
          for i, b in enumerate(model.blocks[:2])]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    start = (d * c.seq_len).round().long()
    span = 3 * 2
    for layer, (xx, cos, sin, _) in inputs.items():       # (x, cos, sin, context-parallel group)
        mod = model.blocks[layer].attn
        B, L, _ = xx.shape
        q = train.rope(mod.q(xx).view(B, L, c.heads, mod.hd), cos, sin)      # as Attention.forward, written out
        k = train.rope(mod.kv(xx).view(B, L, 2, c.kv_heads, mod.hd).unbind(2)[0], cos, sin)
        sel = moba.select_blocks(q, k, c.block_size, c.topk)
        want = torch.zeros(B, pos.shape[1], c.heads, dtype=torch.bool)
        for b in range(B):
            for j in range(pos.shape[1]):
                blocks = set(range(int(start[b, j]) // 16, (int(start[b, j]) + span - 1) // 16 + 1))
                for h in range(c.heads):
                    want[b, j, h] = bool(blocks & set(sel[b, int(pos[b, j]), h].tolist()))
        assert torch.equal(rec.rows[layer][0], want.flatten(0, 1))
    s = rec.summary()
    assert s["queries"] == 8 and set(s["by_layer_head"]) == {"0", "1"}
    if topk == 99:
        assert s["any_head"] == 1.0 and all(v == 1.0 for r in s["by_layer_head"].values() for v in r)
    if topk == 1:      # only the own block: needles lie before the queries' blocks unless they share one
        assert s["any_head"] < 1.0


def _cp_worker(rank, P, port, base):
    import os

    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=P)
    c = train.Config(**dict(base, cp=P, out=base["out"] + "_cp"))
    train.train(c, log=lambda *_: None)
    dist.barrier()
    dist.destroy_process_group()


def test_train_context_parallel_matches_one_process(tmp_path):
    """train.py --cp 2 (two gloo processes, each with its zigzag shard of every sequence) reproduces the
    one-process run's training losses step for step; a hybrid (a MoBA layer, then a full one) covers both paths."""
    import json
    import socket

    import torch.multiprocessing as mp
    base = dict(vocab=512, dim=64, layers=2, heads=4, kv_heads=2, seq_len=128, batch=2, steps=4, block_size=16,
                topk=2, eval_every=100, eval_batches=1, max_corpus_mb=0.5, warmup=2, full_last=1,
                data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"))
    train.train(train.Config(**base), log=lambda *_: None)            # also builds the data the ranks then share
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cp_worker, args=(2, port, base), nprocs=2, join=True)
    one = json.loads((tmp_path / "run" / "history.json").read_text())["train_losses"]
    cp = json.loads((tmp_path / "run_cp" / "history.json").read_text())["train_losses"]
    assert len(one) == len(cp) == 4
    assert all(abs(a - b) < 1e-4 * abs(a) for a, b in zip(one, cp)), (one, cp)
    assert len(set(one)) > 1                                           # the model trains: the losses move

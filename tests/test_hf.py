"""transformers integration on tiny random-weight models (no download): on the CPU, and with the kernel backends
this machine runs (interpreted on the CPU, compiled on a GPU)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
import moba.hf  # noqa: E402
from helpers import backends, device_of  # noqa: E402
from moba.integrations import transformers as mt  # noqa: E402

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": False}),
}


def tiny(family="llama", layers=3, **kw):
    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, attn_implementation="sdpa",
        **extra, **kw)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(cfg).eval()


def ids(B=1, T=48, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(a, b):
    """A batch of two rows, the shorter one left-padded, and its attention mask."""
    L = max(len(a), len(b))
    batch = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for i, r in enumerate((a, b)):
        batch[i, L - len(r):], mask[i, L - len(r):] = r, 1
    return batch, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_topk_covering_all_blocks_matches_sdpa_model(family):
    m = tiny(family)
    x = ids()
    ref = m(x).logits
    gen_ref = m.generate(x, max_new_tokens=6, do_sample=False)
    moba.hf.enable(m, block_size=8, topk=64)
    assert m.config._attn_implementation == "moba"
    torch.testing.assert_close(m(x).logits, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(m.generate(x, max_new_tokens=6, do_sample=False), gen_ref)
    # negative control: a small topk reads fewer keys and changes the logits
    moba.hf.enable(m, block_size=8, topk=2)
    assert (m(x).logits - ref).abs().max() > 1e-3
    moba.hf.disable(m)
    assert m.config._attn_implementation == "sdpa" and not hasattr(m.config, "moba")
    assert torch.equal(m(x).logits, ref)


def test_full_layers_and_runtime_switching_are_exact_sdpa():
    m = tiny()
    x = ids()
    ref = m(x).logits
    moba.hf.enable(m, block_size=8, topk=2, full_attention_layers=(0, 1, 2))
    assert torch.equal(m(x).logits, ref)              # every layer listed as full: exactly SDPA
    moba.hf.enable(m, block_size=8, topk=2, full_attention_layers=(-1,))
    assert m.config.moba["full_attention_layers"] == [2]
    hybrid = m(x).logits
    assert (hybrid - ref).abs().max() > 1e-3
    moba.hf.set_mode(m, "full")                       # stage two of two-stage training
    assert torch.equal(m(x).logits, ref)
    moba.hf.set_mode(m, "moba")                       # back: layer 2 stays full
    assert torch.equal(m(x).logits, hybrid)
    moba.hf.set_mode(m, "full", layers=[0, 1])        # per layer, live
    assert torch.equal(m(x).logits, ref)
    with pytest.raises(ValueError, match="mode"):
        moba.hf.set_mode(m, "sparse")


def test_padded_batch_matches_rows_run_alone():
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2)
    a, b = ids(T=40, seed=2)[0], ids(T=27, seed=3)[0]
    batch, mask = left_padded(a, b)                    # row 1: 13 pad tokens first
    out = m(batch, attention_mask=mask).logits
    alone_a = m(a[None]).logits[0]
    alone_b = m(b[None]).logits[0]
    torch.testing.assert_close(out[0], alone_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, 13:], alone_b, rtol=1e-4, atol=1e-4)
    # generation with left padding: each row continues as it would alone
    gen = m.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen[0, 40:], m.generate(a[None], max_new_tokens=5, do_sample=False)[0, 40:])
    assert torch.equal(gen[1, 40:], m.generate(b[None], max_new_tokens=5, do_sample=False)[0, 27:])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_step_by_step_equals_whole_sequence(cache):
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2)
    x = ids(T=45)
    whole = m(x).logits
    n = 20
    if cache == "static":
        past = transformers.StaticCache(config=m.config, max_cache_len=64)
    else:
        past = transformers.DynamicCache(config=m.config)
    out = m(x[:, :n], past_key_values=past, use_cache=True)
    steps = [out.logits]
    for t in range(n, x.shape[1]):
        out = m(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-4)


def test_static_cache_generate_with_padding():
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2)
    batch, mask = left_padded(ids(T=30, seed=4)[0], ids(T=21, seed=5)[0])
    dyn = m.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    sta = m.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dyn, sta)


def test_decode_full_runs_dense_attention_when_generating(monkeypatch):
    m = tiny(layers=1)
    moba.hf.enable(m, block_size=8, topk=2, decode="full")
    calls = []
    real = mt._dense
    monkeypatch.setattr(mt, "_dense", lambda *a, **k: (calls.append(a[1].shape[2]), real(*a, **k))[1])
    m.generate(ids(T=30), max_new_tokens=3, do_sample=False)
    assert calls == [1, 1]                            # the two decode steps after the prefill; prefill is MoBA


def test_scaling_is_honoured():
    ref_m, m = tiny(), tiny()
    for mod in (ref_m, m):
        for layer in mod.model.layers:
            layer.self_attn.scaling = 0.37
    x = ids()
    moba.hf.enable(m, block_size=8, topk=64)
    torch.testing.assert_close(m(x).logits, ref_m(x).logits, rtol=1e-4, atol=1e-4)


def test_training_backward_and_dropout_error():
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2)
    m.train()
    x = ids(B=2, T=32)
    loss = m(x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        m(x, labels=x)


def test_save_and_load_keep_the_moba_settings(tmp_path):
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2, full_attention_layers=(2,), decode="full")
    x = ids()
    want = m(x).logits
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="moba").eval()
    assert back.config.moba["block_size"] == 8 and back.config.moba["full_attention_layers"] == [2]
    assert back.config.moba["decode"] == "full"
    torch.testing.assert_close(back(x).logits, want, rtol=1e-5, atol=1e-5)
    moba.hf.enable(back)                              # saved settings are the defaults
    assert back.config.moba["topk"] == 2


def test_group_gate_in_a_model(tmp_path):
    """enable(gate="group") reaches every path: the forward (it changes the logits against the per-head gate), a
    padded batch (rows as alone), moba.hf.generate through the KV cache (transformers' tokens over the model's own
    path), save and load; the per-kv-head query heads choose alike (4 query / 2 kv heads)."""
    m = tiny()
    x = ids(T=64)
    moba.hf.enable(m, block_size=8, topk=2)
    head = m(x).logits
    moba.hf.enable(m, gate="group")
    assert m.config.moba["gate"] == "group" and m.config.moba["topk"] == 2
    group = m(x).logits
    assert (group - head).abs().max() > 1e-3
    a, b = ids(T=40, seed=2)[0], ids(T=27, seed=3)[0]
    batch, mask = left_padded(a, b)
    out = m(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[1, 13:], m(b[None]).logits[0], rtol=1e-4, atol=1e-4)
    gen = m.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen[1, 40:], m.generate(b[None], max_new_tokens=5, do_sample=False)[0, 27:])
    want = m.generate(x[:, :37], max_new_tokens=12, do_sample=False)[:, 37:]
    assert torch.equal(moba.hf.generate(m, x[:, :37], 12), want)
    m.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="moba").eval()
    assert back.config.moba["gate"] == "group"
    torch.testing.assert_close(back(x).logits, group, rtol=1e-5, atol=1e-5)


def test_enable_validates():
    m = tiny(layers=1)
    with pytest.raises(ValueError, match="block_size"):
        moba.hf.enable(m, block_size=0, topk=2)
    with pytest.raises(ValueError, match="gate must be"):
        moba.hf.enable(m, block_size=8, topk=2, gate="kv")
    with pytest.raises(ValueError, match="decode"):
        moba.hf.enable(m, block_size=8, topk=2, decode="sparse")


def test_examples_run(capsys):
    import importlib.util
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1] / "examples"
    mods = {}
    for name in ("generate", "train_hybrid"):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    out = mods["generate"].main(["tiny", "--block-size", "4", "--topk", "2", "--max-new-tokens", "4",
                                 "--cache", "static"])
    assert out.shape[1] == len(b"The quick brown fox") + 4
    assert torch.equal(mods["generate"].main(["tiny", "--block-size", "4", "--topk", "2", "--max-new-tokens", "4",
                                              "--cache", "moba"]), out)
    losses = mods["train_hybrid"].main(["--steps", "6", "--seq-len", "64", "--block-size", "8", "--switch-at", "4"])
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_generation_uses_incremental_block_means(monkeypatch):
    m = tiny(layers=2)
    moba.hf.enable(m, block_size=8, topk=2)
    x = ids(T=40)
    pooled = []
    from moba.torch_backend import gate
    real = gate.block_means
    monkeypatch.setattr(gate, "block_means", lambda *a, **k: (pooled.append(1), real(*a, **k))[1])
    with torch.no_grad():
        cached = m.generate(x, max_new_tokens=12, do_sample=False)
    assert pooled == []                               # no call re-pooled the cache
    for layer in m.model.layers:                      # the same tokens as without the cache
        layer.self_attn._moba_means_cache = None
    monkeypatch.setattr(mt, "_means_cache", lambda *a: None)
    assert torch.equal(m.generate(x, max_new_tokens=12, do_sample=False), cached)
    assert pooled                                     # and that path does pool


def test_right_padded_training_batch_matches_rows_alone():
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2)
    a, b = ids(T=40, seed=2)[0], ids(T=27, seed=3)[0]
    batch = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    batch[0], mask[0] = a, 1
    batch[1, :27], mask[1, :27] = b, 1                # right padding, as in training batches
    out = m(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[0], m(a[None]).logits[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, :27], m(b[None]).logits[0], rtol=1e-4, atol=1e-4)
    labels = batch.masked_fill(mask == 0, -100)
    m.train()
    m(batch, attention_mask=mask, labels=labels).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_kernel_backend_in_a_model(backend):
    """The Triton kernels (interpreted on the CPU) behind a model: strided [B, H, T, D] views, the
    one-query-per-sequence decode kernel during generation, padding."""
    dev = device_of(backend)      # compiled kernels on a GPU, else interpreted
    ref_m, m = tiny(layers=2).to(dev), tiny(layers=2).to(dev)
    moba.hf.enable(ref_m, block_size=8, topk=2, backend="torch")
    moba.hf.enable(m, block_size=8, topk=2, backend=backend)
    batch, mask = (x.to(dev) for x in left_padded(ids(T=30, seed=6)[0], ids(T=19, seed=7)[0]))
    torch.testing.assert_close(m(batch, attention_mask=mask).logits, ref_m(batch, attention_mask=mask).logits,
                               rtol=1e-4, atol=1e-4)
    x = ids(T=26, seed=8).to(dev)
    assert torch.equal(m.generate(x, max_new_tokens=4, do_sample=False),
                       ref_m.generate(x, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_padded_batch_generation_reads_the_cache_in_place(backend, monkeypatch):
    """Generation of a left-padded batch with a kernel backend: every decode step goes to the in-place padded
    decode kernel (no packing copy) and gives the torch backend's tokens (which packs the rows)."""
    from moba.triton import decode
    calls = []
    real = decode.decode_padded
    monkeypatch.setattr(decode, "decode_padded", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    dev = device_of(backend)
    ref_m, m = tiny(layers=2).to(dev), tiny(layers=2).to(dev)
    moba.hf.enable(ref_m, block_size=8, topk=2, backend="torch")
    moba.hf.enable(m, block_size=8, topk=2, backend=backend)
    batch, mask = (x.to(dev) for x in left_padded(ids(T=30, seed=9)[0], ids(T=13, seed=10)[0]))
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(m.generate(batch, **kw), ref_m.generate(batch, **kw))
    assert len(calls) == 4 * 2            # 4 decode steps after the prefill, 2 layers


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_on_cpu(dtype):
    """A half-precision model on the CPU (the fused CPU tiles read half inputs as they are, transposed views from the
    hook included): topk covering every block within rounding of SDPA's logits, alone and as a padded row (the packed
    path). With a small topk a padded row is not compared with the row alone: rounding differences upstream flip the
    gate's near-ties at a few positions (seen: 3 of 70 in bf16), as they would for any hard top-k. The query and key
    projections are scaled up: a random tiny model's attention is nearly uniform, which hides a wrong softmax scale
    (cc484d6's half-precision small groups passed with it, and fail with this)."""
    m = tiny().to(dtype)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    x = ids(T=100)
    a, b = ids(T=70, seed=2)[0], ids(T=100, seed=3)[0]
    batch, mask = left_padded(a, b)
    ref, ref_rows = m(x).logits.float(), m(batch, attention_mask=mask).logits.float()
    moba.hf.enable(m, block_size=8, topk=64)
    assert (m(x).logits.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    rows = m(batch, attention_mask=mask).logits.float()
    assert (rows - ref_rows)[mask.bool()].abs().max() <= 0.02 * ref_rows.abs().max()
    moba.hf.enable(m, block_size=8, topk=3)
    out = m.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 104) and torch.isfinite(m(batch, attention_mask=mask).logits).all()


# ------------------------------------------------------------------------------------------------------
# moba.hf.generate: generation through MoBA's KV cache (MobaCache)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,full,decode", [("llama", (), "moba"), ("qwen3", (-1,), "moba"),
                                                ("llama", (-1,), "full")],
                         ids=["llama", "qwen3-hybrid", "llama-decode-full"])
def test_generate_through_the_kv_cache_equals_transformers_generate(family, full, decode):
    """Greedy tokens of moba.hf.generate (prefill by moba_attention, steps through moba_attention_with_kvcache, dense
    layers with every block selected) equal transformers' generate over the model's own MoBA path."""
    m = tiny(family)
    moba.hf.enable(m, block_size=8, topk=2, full_attention_layers=full, decode=decode)
    x = ids(B=2, T=37, seed=11)
    want = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=14, do_sample=False)[:, 37:]
    assert torch.equal(moba.hf.generate(m, x, 14), want)


def test_generate_ragged_rows_and_a_continued_cache():
    """Rows of different lengths (no padding) give each row's tokens alone; a second call continues the cache (it
    holds the prompt and all but the last new token) as generating over the whole conversation would."""
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2)
    a, b = ids(T=29, seed=12)[0], ids(T=42, seed=13)[0]
    alone = [m.generate(r[None], max_new_tokens=9, do_sample=False)[0, len(r):] for r in (a, b)]
    cache = moba.hf.MobaCache(m, 2, 128)
    out = moba.hf.generate(m, [a, b], 9, cache=cache)
    assert torch.equal(out[0], alone[0]) and torch.equal(out[1], alone[1])
    assert cache.seen == [29 + 8, 42 + 8]
    c, d = ids(T=11, seed=14)[0], ids(T=5, seed=15)[0]
    more = moba.hf.generate(m, [torch.cat([out[0, -1:], c]), torch.cat([out[1, -1:], d])], 6, cache=cache)
    for i, (p, q) in enumerate(((a, c), (b, d))):
        whole = torch.cat([p, out[i], q])[None]
        assert torch.equal(more[i], m.generate(whole, max_new_tokens=6, do_sample=False)[0, whole.shape[1]:])


def test_moba_cache_forward_matches_the_whole_sequence():
    """A plain forward through MobaCache, chunk by chunk (prefill, then appends of several tokens and of one): the
    logits of the whole sequence at once."""
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2)
    x = ids(B=2, T=45, seed=16)
    whole = m(x).logits
    cache = moba.hf.MobaCache(m, 2, 64)
    steps, t0 = [], 0
    for t1 in (20, 29, 30, 31, 45):
        pos = torch.arange(t0, t1)[None].expand(2, -1)
        steps.append(m(x[:, t0:t1], position_ids=pos, past_key_values=cache, use_cache=True).logits)
        t0 = t1
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        m(x[:, :20], position_ids=torch.arange(45, 65)[None].expand(2, -1), past_key_values=cache, use_cache=True)


def test_moba_cache_counts_tokens_when_a_model_runs_fewer_layers_than_it_lists():
    """The cache counts a forward's tokens at its first layer: a model cut to fewer layers than its config lists
    (a draft model, a pruned one) still continues the cache instead of prefilling it again."""
    m = tiny()
    moba.hf.enable(m, block_size=8, topk=2)
    m.model.layers = m.model.layers[:2]
    x = ids(B=1, T=30, seed=19)
    whole = m(x).logits
    cache = moba.hf.MobaCache(m, 1, 40)
    a = m(x[:, :17], position_ids=torch.arange(17)[None], past_key_values=cache, use_cache=True).logits
    b = m(x[:, 17:], position_ids=torch.arange(17, 30)[None], past_key_values=cache, use_cache=True).logits
    assert cache.seen == [30]
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", backends("triton", "gluon"))
def test_generate_with_a_kernel_backend(backend):
    """The kernel backend behind generate (interpreted on the CPU): the torch backend's tokens, eagerly and, on a GPU,
    with the decode step captured as a CUDA graph (which then also covers eos_token_id)."""
    dev = device_of(backend)
    ref_m, m = tiny(layers=2).to(dev), tiny(layers=2).to(dev)
    moba.hf.enable(ref_m, block_size=8, topk=2, backend="torch")
    moba.hf.enable(m, block_size=8, topk=2, backend=backend)
    rows = [ids(T=26, seed=17)[0].to(dev), ids(T=17, seed=18)[0].to(dev)]
    n = 12 if dev == "cuda" else 5
    want = moba.hf.generate(ref_m, rows, n, cuda_graph=False)
    assert torch.equal(moba.hf.generate(m, rows, n, cuda_graph=False), want)
    if dev == "cuda":
        assert torch.equal(moba.hf.generate(m, rows, n, cuda_graph=True), want)
        eos = int(want[0, 4])
        got = moba.hf.generate(m, rows, n, cuda_graph=True, eos_token_id=eos)
        for r in range(2):
            hit = (want[r] == eos).nonzero()
            stop = int(hit[0]) if hit.numel() else n
            assert torch.equal(got[r, :stop + 1], want[r, :stop + 1]) and (got[r, stop:] == eos).all()


def test_generate_validates():
    m = tiny(layers=1)
    x = ids(T=10)
    with pytest.raises(ValueError, match="enable"):
        moba.hf.generate(m, x, 3)
    with pytest.raises(ValueError, match="enable"):
        moba.hf.MobaCache(m, 1, 16)
    moba.hf.enable(m, block_size=8, topk=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        moba.hf.generate(m, x, 0)
    with pytest.raises(ValueError, match="prompts"):
        moba.hf.generate(m, [x[0], torch.zeros(0, dtype=torch.long)], 3)
    with pytest.raises(ValueError, match="max_length"):
        moba.hf.generate(m, x, 7, max_length=16)
    with pytest.raises(ValueError, match="batch_size"):
        moba.hf.generate(m, x, 3, cache=moba.hf.MobaCache(m, 2, 32))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph"):
            moba.hf.generate(m, x, 3, cuda_graph=True)
    cache = moba.hf.MobaCache(m, 1, 32)
    moba.hf.disable(m)                  # another attention would read the new keys alone: refused
    with pytest.raises(ValueError, match="attn_implementation"):
        m(x, past_key_values=cache, use_cache=True)

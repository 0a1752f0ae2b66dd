"""`moba bench`, the README's main job: its rows and table on small CPU shapes, and a clear error for CUDA-graph
timing without CUDA; the benchmark runner (benchmarks/run.py) on its tiny cases: the table it prints and the JSON
lines it appends."""
import importlib.util
import json
import pathlib
import sys

import pytest
import torch

from moba import bench, cli

RUN_PY = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def test_bench_cli_rows_and_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cli.main(["bench", "--lengths", "300,640", "--block-size", "64", "--topk", "3", "--heads", "4", "--kv-heads", "2",
              "--head-dim", "16", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    res = json.loads(out.read_text())
    rows, env = res["rows"], res["env"]
    # what a run was made with: the backend asked for and the one that ran, the versions, the commit
    assert env["backend"] == "auto" and env["backend_used"] == "torch"
    assert env["torch"] == torch.__version__ and "triton" in env and env["commit"]
    assert not any(k.startswith("MOBA_") for k in env)
    assert [r["T"] for r in rows] == [300, 640]
    for r in rows:
        assert r["rel_err"] < 1e-5          # against the fp64 reference on the first kv head's group
        assert r["moba_ms"] > 0 and r["sdpa_ms"] > 0 and r["speedup"] == pytest.approx(r["sdpa_ms"] / r["moba_ms"])
        assert r["frac_pairs"] == pytest.approx(bench.pair_fraction(r["T"], 64, 3))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4].startswith("T | sdpa ms | moba ms | speedup") and lines[-3].startswith("--- | ")
    assert lines[-2].startswith("300 | ") and lines[-1].startswith("640 | ")


def test_bench_graph_needs_cuda():
    with pytest.raises(ValueError, match="graph"):
        bench.run([256], 64, 3, 2, 2, 16, "float32", "auto", "cpu", graph=True)


def test_source_commit_env_override(monkeypatch):
    monkeypatch.delenv("MOBA_SOURCE_COMMIT", raising=False)
    assert bench.source_commit() != "abc1234"
    monkeypatch.setenv("MOBA_SOURCE_COMMIT", "abc1234")
    assert bench.source_commit() == "abc1234"


def test_json_safe_and_append(tmp_path):
    path = tmp_path / "sub" / "x.jsonl"
    bench.append_jsonl(path, [{"a": float("nan"), "b": [1.5, float("inf")]}])
    bench.append_jsonl(path, [{"a": 2.0}])
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"a": None, "b": [1.5, None]}, {"a": 2.0}]


def test_step_returns_gradients_without_accumulating():
    q, k, v = (torch.randn(1, 8, 2, 4, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 8, 2, 4)
    grads = bench.step(bench.dense_causal, q, k, v, do)()
    assert len(grads) == 3 and all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    assert q.grad is None
    assert not bench.step(bench.dense_causal, q, k, v)().requires_grad


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("moba_benchmarks_run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[spec.name]


def test_runner_registry(runner, capsys):
    issue = ["fwd8k", "fb8k", "fwd32k", "fb32k", "fwd128k", "fb128k", "fwd512k", "fwd1m", "fb512k_b128", "decode1m",
             "decode_batch", "dense32k"]
    assert set(issue) <= set(runner.CASES)
    c = runner.CASES["fwd8k"]
    assert (c.T, c.block_size, c.topk, c.batch, c.heads, c.kv_heads, c.head_dim) == (8192, 512, 3, 1, 32, 8, 128)
    d = runner.CASES["decode1m"]
    assert d.decode and (d.T, d.block_size, d.topk, d.batch) == (1 << 20, 4096, 12, 1)
    assert len(runner.CASES["decode_batch"].lengths) == 8
    dense = runner.CASES["dense32k"]
    assert dense.T == 32768 and dense.topk >= -(-dense.T // dense.block_size)
    assert runner.expand("fwd8k,issue,fwd8k")[0] == "fwd8k" and len(runner.expand("issue")) == 7
    assert runner.main(["--list"]) == 0
    assert "fb512k_b128" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        runner.expand("nope")


def test_runner_smoke_table_and_jsonl(runner, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    rc = runner.main(["--smoke", "--device", "cpu", "--repeats", "1", "--backend", "auto,torch", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    smoke = runner.GROUPS["smoke"]
    assert [r["case"] for r in rows] == [n for n in smoke for _ in range(2)]      # one line per (case, backend)
    for r in rows:
        assert r["family"] == ("decode" if "decode" in r["case"] else "kernels")
        assert r["backend"] == "torch" and r["backend_requested"] in ("auto", "torch")
        for key in ("commit", "card", "torch", "triton", "dtype", "block_size", "topk", "heads", "kv_heads",
                    "head_dim", "command", "timestamp", "moba_peak_bytes", "sdpa_peak_bytes"):
            assert key in r, key
        assert r["graph"] is False and r["dtype"] == "float32" and "--smoke" in r["command"]
        assert r["moba_ms"] > 0 and r["sdpa_ms"] > 0 and r["dense_best"] == "sdpa"
        assert r["speedup"] == pytest.approx(r["sdpa_ms"] / r["moba_ms"]) == pytest.approx(r["speedup_sdpa"])
        if r["family"] == "kernels":
            c = runner.CASES[r["case"]]
            assert r["frac_pairs"] == pytest.approx(bench.pair_fraction(c.T, c.block_size, c.topk))
            assert r["moba_tflops"] > 0
        else:
            assert r["moba_gbps"] > 0 and r["moba_nocache_ms"] > 0
    # topk covering every block: MoBA equals dense attention
    assert all(r["err_vs_dense"] < 1e-5 for r in rows if r["case"] == "tiny_dense")
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("# ") and "float32" in text.splitlines()[0]
    tables = [ln for ln in text.splitlines() if ln.startswith("case | pass |")]
    assert len(tables) == 2 and "sdpa ms | moba ms | speedup" in tables[0]
    for n in smoke:
        assert any(ln.startswith(f"{n} | ") for ln in text.splitlines())
    assert f"appended to {out}" in text


def test_runner_smoke_cases_not_recorded_by_default(runner, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "RESULTS", tmp_path)
    assert runner.main(["--cases", "tiny_fwd", "--device", "cpu", "--repeats", "1", "--dense", ""]) == 0
    assert not list(tmp_path.iterdir())
    text = capsys.readouterr().out
    assert "nowhere" in text and "tiny_fwd | fwd |" in text      # no dense baseline: no speedup


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the dense kernels, CUDA graphs and the profiler")
def test_runner_smoke_cuda(runner, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert runner.main(["--smoke", "--repeats", "1", "--backend", "auto,triton", "--graph", "--profile",
                        "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 * len(runner.GROUPS["smoke"])
    for r in rows:
        assert r["graph"] is True and r["dtype"] == "bfloat16" and r["card"] == torch.cuda.get_device_name()
        assert r["moba_graph_ms"] > 0 and r["moba_peak_bytes"] >= 0 and r["host_ms"] > 0
        dense = ["sdpa", "cudnn", "flash", "efficient"] if r["family"] == "decode" else ["cudnn", "flash"]
        ran = {n: r[f"{n}_ms"] for n in dense if r.get(f"{n}_ms") is not None}
        assert ran and r["dense_ms"] == min(ran.values()) and r["dense_best"] in ran
        if r["mode"] == "fwd" and r["backend"] in ("triton", "gluon"):
            assert r["gate_ms"] > 0
    assert "moba graph ms" in capsys.readouterr().out


def test_kvcache_benchmark_smoke(tmp_path):
    """benchmarks/kvcache.py on its small CPU case: one row with the step checked against moba_attention, the dense
    timings, the byte bound of the selection made, and graph timing recorded as unavailable off CUDA."""
    import subprocess
    script = RUN_PY.parent / "kvcache.py"
    out = tmp_path / "kv.jsonl"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["case"] == "smoke" and row["paged"] and row["finite"]
    assert row["rel_err_vs_moba_attention"] < 1e-5
    assert row["moba_ms"] > 0 and row["sdpa_ms"] > 0 and row["speedup"] > 0
    assert 1.0 < row["byte_bound"] < 10.0           # some blocks skipped, never more bytes than dense
    assert "CUDA" in row["moba_error"]              # graphs need CUDA: recorded, not faked


def test_generate_benchmark_smoke(tmp_path):
    """benchmarks/generate.py on its tiny CPU model: one row with MoBA's and the dense methods' steady-state times
    and tokens/s (graph rows need CUDA: none here)."""
    pytest.importorskip("transformers")
    import subprocess
    out = tmp_path / "gen.jsonl"
    r = subprocess.run([sys.executable, str(RUN_PY.parent / "generate.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["case"] == "ctx300" and row["mode"] == "eager" and row["context"] == 300
    assert row["moba_ms"] > 0 and row["static_sdpa_ms"] > 0 and row["prefix_sdpa_ms"] > 0
    assert row["speedup"] == pytest.approx(min(row["static_sdpa_ms"], row["prefix_sdpa_ms"]) / row["moba_ms"])
    assert row["moba_tokens_per_s"] == pytest.approx(1e3 / row["moba_ms"])


def test_train_step_benchmark_smoke(tmp_path):
    """benchmarks/train_step.py on the tiny-cpu preset: a row per attention with step time and tokens/s."""
    import subprocess
    out = tmp_path / "ts.jsonl"
    r = subprocess.run([sys.executable, str(RUN_PY.parent / "train_step.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    moba_row, full_row = [json.loads(x) for x in out.read_text().splitlines()]
    assert (moba_row["attn"], full_row["attn"]) == ("moba", "full") and moba_row["case"] == "train_tiny-cpu"
    assert moba_row["step_ms"] > 0 and moba_row["tokens_per_s"] == pytest.approx(
        moba_row["batch"] * moba_row["seq_len"] / moba_row["step_ms"] * 1e3)
    assert moba_row["speedup_vs_full"] == pytest.approx(full_row["step_ms"] / moba_row["step_ms"])

"""`moba bench`, the README's main job: its rows and table on small CPU shapes, and a clear error for CUDA-graph
timing without CUDA."""
import json

import pytest

from moba import bench, cli


def test_bench_cli_rows_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOBA_CPU_FUSED", "1")
    out = tmp_path / "bench.json"
    cli.main(["bench", "--lengths", "300,640", "--block-size", "64", "--topk", "3", "--heads", "4", "--kv-heads", "2",
              "--head-dim", "16", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["env"]["settings"]["MOBA_CPU_FUSED"] == "1"      # the MOBA_* settings a run was made with
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

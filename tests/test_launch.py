"""moba.triton.launch: which launches reuse a compiled kernel and what they pass it. The cache's logic runs on a
stand-in kernel here (CI has no GPU to launch on). Every kernel of the package launches through it; with
MOBA_DIRECT_LAUNCH=1 on CUDA every GPU test of the Triton and Gluon paths exercises the cache, and the last test
checks one real kernel through it."""
import pytest
import torch

from moba.triton import launch as L


class _Compiled:
    """A compiled kernel's stand-in: records each launch as the launcher receives it."""

    def __init__(self, log, tag):
        self.log, self.tag = log, tag
        self.function, self.packed_metadata = object(), object()

    def run(self, g0, g1, g2, stream, function, packed, meta, enter, leave, *args):
        assert function is self.function and packed is self.packed_metadata
        self.log.append(("direct", self.tag, (g0, g1, g2), stream, args))

    def launch_metadata(self, grid, stream, *args):
        return None


def _spec(x):
    try:
        return L._spec(x)
    except TypeError:
        return repr(x)


class _Kernel:
    """A JITFunction's stand-in with parameters (a, b, n, C=7, D=1): launches through Triton log "triton"; each
    new specialisation gets its own compiled kernel (keyed here by the cache's own rules, which are at least as fine as
    Triton's)."""

    def __init__(self):
        self.log, self.compiled = [], {}
        self.device_caches = {0: (None, None, None, None, self._bind)}

    def _bind(self, a, b, n, C=7, D=1, **options):
        return {"a": a, "b": b, "n": n, "C": C, "D": D}, None, options

    def __getitem__(self, grid):
        def go(*args, **kw):
            bound = self._bind(*args, **kw)[0]
            spec = tuple(map(_spec, args)) + (kw.get("C", 7), kw.get("D", 1), kw.get("num_warps"))
            k = self.compiled.setdefault(spec, _Compiled(self.log, len(self.compiled)))
            g = grid(bound) if callable(grid) else grid
            self.log.append(("triton", k.tag, tuple(g), None, tuple(bound.values())))
            return k
        return go


@pytest.fixture
def cuda_standin(monkeypatch):
    monkeypatch.setattr(L, "_ON", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda dev: 1234, raising=False)
    L._SITES.clear()
    yield
    L._SITES.clear()


def test_second_launch_of_a_specialisation_calls_the_compiled_kernel(cuda_standin):
    fn = _Kernel()
    a, b = torch.randn(64), torch.randn(64)
    L.launch_kernel(fn, (3, 2), a, b, 48, C=5, num_warps=4)
    L.launch_kernel(fn, (3, 2), a, b, 48, C=5, num_warps=4)
    a2 = torch.randn(64)                        # other tensors, same dtypes and alignment: the same kernel
    L.launch_kernel(fn, (5,), a2, b, 32, C=5, num_warps=4)
    assert [e[0] for e in fn.log] == ["triton", "direct", "direct"]
    assert len(fn.compiled) == 1
    _, _, grid, stream, args = fn.log[1]
    assert grid == (3, 2, 1) and stream == 1234
    assert args[:3] == (a, b, 48) and args[3:] == (5, 1)      # positional, then keyword and default values in order
    assert fn.log[2][2] == (5, 1, 1) and fn.log[2][4][0] is a2 and fn.log[2][4][2] == 32


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int_one", "int_not16", "int64", "uint64", "constexpr",
                                    "warps"])
def test_a_changed_specialisation_goes_through_triton(cuda_standin, change):
    fn = _Kernel()
    a, b = torch.randn(64), torch.randn(64)
    L.launch_kernel(fn, (1,), a, b, 48, C=5, num_warps=4)
    args, kw = [a, b, 48], dict(C=5, num_warps=4)
    if change == "misaligned":
        args[0] = a[1:]                         # 4 bytes in: Triton drops the 16-byte alignment hint
    elif change == "dtype":
        args[1] = b.double()
    elif change == "int_one":
        args[2] = 1                             # Triton makes a 1 a constant
    elif change == "int_not16":
        args[2] = 47
    elif change == "int64":
        args[2] = 1 << 33
    elif change == "uint64":
        args[2] = 1 << 63
    elif change == "constexpr":
        kw["C"] = 6
    else:
        kw["num_warps"] = 8
    L.launch_kernel(fn, (1,), *args, **kw)
    L.launch_kernel(fn, (1,), *args, **kw)
    assert [e[0] for e in fn.log] == ["triton", "triton", "direct"]
    assert fn.log[1][1] == fn.log[2][1] == 1                  # the new specialisation's own kernel, twice
    assert fn.log[2][4][:3] == tuple(args)


def test_arguments_it_cannot_key_go_through_triton_every_time(cuda_standin):
    fn = _Kernel()
    a = torch.randn(8)
    for _ in range(2):
        L.launch_kernel(fn, (1,), a, [1, 2], 16)              # a list: no key
        L.launch_kernel(fn, lambda meta: (1,), a, a, 16)      # a grid function: Triton evaluates it
    assert [e[0] for e in fn.log] == ["triton"] * 4 and not L._SITES


def test_off_switch_and_interpreter_go_through_triton(cuda_standin, monkeypatch):
    fn = _Kernel()
    a = torch.randn(8)
    monkeypatch.setattr(L, "_ON", False)
    L.launch_kernel(fn, (1,), a, a, 16)
    L.launch_kernel(fn, (1,), a, a, 16)
    monkeypatch.setattr(L, "_ON", True)
    del fn.device_caches                                      # what the interpreter's kernels lack
    L.launch_kernel(fn, (1,), a, a, 16)
    L.launch_kernel(fn, (1,), a, a, 16)
    assert [e[0] for e in fn.log] == ["triton"] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_cuda_kernel_through_the_cache_matches_triton():
    from moba.triton.decode import _append_rows
    B, Hkv, D = 3, 2, 64
    was = L._ON
    for on in (False, True, True):
        L._ON = on
        try:
            kn, vn = torch.randn(2, B, 1, Hkv, D, device="cuda").unbind(0)
            kc = torch.zeros(B, 8, Hkv, D, device="cuda")
            vc = torch.zeros_like(kc)
            lens = torch.tensor([0, 3, 7], dtype=torch.int32, device="cuda")
            L.launch_kernel(_append_rows, (B, Hkv), kn, vn, kc, vc, lens, lens, kn, *kn.stride()[:3], *vn.stride()[:3],
                            *kc.stride()[:3], *vc.stride()[:3], 1, 0, 0, 1, 8, 0, D=D, DV=D, BD=D, BDV=D, PAGED=False,
                            HAS_SUMS=False, num_warps=1)
            want = torch.zeros_like(kc)
            want[torch.arange(B), lens.long()] = kn[:, 0]
            torch.testing.assert_close(kc, want, rtol=0, atol=0)
        finally:
            L._ON = was
    assert L._SITES.get(_append_rows), "the launches with the cache on should have cached the kernel"


def test_host_stub_tool_runs_on_the_cpu():
    """benchmarks/tools/host_stub.py (a call's own Python with the launches stubbed) counts the launches it
    replaced: a forward of one 8K sequence issues at least the gate, the own block and one slot."""
    import pathlib
    import subprocess
    import sys
    tool = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "tools" / "host_stub.py"
    r = subprocess.run([sys.executable, str(tool), "--case", "fwd8k", "--calls", "2"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n = int(r.stdout.split("us of Python per call")[1].split("launches")[0].split(",")[1])
    assert n >= 3, r.stdout

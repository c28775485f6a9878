"""phd's rows kernel (phd.inference.kernels, csrc/rows_linear.cpp) against its dense reference F.linear, and its
use by decode_linears: only where exactly right, the same tokens as plain linears, a clean fallback without it."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import phd
from phd import PHDConfig, PHDTransformer
from phd.fsutil import sha256_file
from phd.inference import decode_linears, kernels, plain_linears
from phd.inference.weights import DecodeLinear, packed_linears, packing_available

OP = kernels.rows_linear_op()
needs_kernel = pytest.mark.skipif(OP is None, reason="no rows kernel here (not x86 with AVX2, or no compiler)")
VOCAB = 40
# K x N: long rows (the 16-wide loop), K tails of 8 and below 8, N tails of the 4- and 3-column blocks, tiny shapes.
SHAPES = [(768, 2048), (100, 37), (24, 5), (7, 3), (16, 1), (1, 4), (40, 130)]


def _model(name: str, seed: int = 0) -> PHDTransformer:
    torch.manual_seed(seed)
    cfg = PHDConfig.from_name(name, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                              max_seq_len=64)
    return PHDTransformer(cfg).eval()


def _kernel_calls(fn, op: str = "phd_kernels::rows_linear") -> int:
    """How many times `fn` runs the op (the rows kernel by default) on the CPU."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == op)


def test_kernel_is_built_where_it_can_be():
    """On an x86 CPU with AVX2 and a C++ compiler the kernel must be there (a broken build fails here, not as a
    silent slowdown)."""
    if kernels._cpu_supports_kernel() and shutil.which(os.environ.get("CXX") or "c++") \
            and os.environ.get("PHD_KERNELS", "1") != "0":
        assert OP is not None


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_linear_equals_f_linear(rows, bias):
    """Every row count, shapes with every tail, with and without bias: F.linear's values, and no less accurate
    than F.linear against a float64 product."""
    gen = torch.Generator().manual_seed(rows)
    for k, n in SHAPES:
        x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen)
        b = torch.randn(n, generator=gen) if bias else None
        got, ref = OP(x, w, b), F.linear(x, w, b)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        exact = F.linear(x.double(), w.double(), None if b is None else b.double())
        assert (got - exact).abs().max() <= 4 * (ref - exact).abs().max() + 1e-5


@needs_kernel
def test_threads_split_the_output_not_the_sums():
    """With 2 threads each output is still one thread's sum in the same order: bit-identical to 1 thread."""
    x, w, b = torch.randn(7, 300), torch.randn(1000, 300), torch.randn(1000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OP(x, w, b)
        torch.set_num_threads(2)
        two = OP(x, w, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, F.linear(x, w, b), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_torch_compile_traces_through_the_kernel():
    """The op has a fake (shape-only) implementation: a compiled function calls it in one graph."""
    x, w = torch.randn(3, 64), torch.randn(40, 64)
    compiled = torch.compile(lambda a, b: OP(a, b, None).relu(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), F.linear(x, w).relu(), atol=1e-4, rtol=1e-4)


@needs_kernel
def test_rows_linear_refuses_what_it_does_not_handle():
    w = torch.randn(8, 16)
    for x, what in ((torch.randn(9, 16), "1 to 8 rows"), (torch.randn(2, 16).double(), "float32"),
                    (torch.randn(16, 2).t(), "contiguous"), (torch.randn(2, 15), "x must be")):
        with pytest.raises(RuntimeError, match=what):
            OP(x, w.double() if x.dtype == torch.float64 else w, None)
    with pytest.raises(RuntimeError, match="bias"):
        OP(torch.randn(2, 16), w, torch.randn(7))


@needs_kernel
@pytest.mark.parametrize("name,batch", [("vanilla", 1), ("PHD-3", 1), ("PHD-CSWA-3-2-4", 1), ("PHD-2", 2)])
def test_kernel_decodes_the_same_tokens(name, batch):
    """decode_linears for K x B <= 4 rows: every linear of a decode step runs the kernel, and greedy decoding
    gives the plain model's tokens (prefill and training keep F.linear)."""
    model, reference = _model(name), _model(name)
    plain_linears(reference)  # decode steps would give it the kernel too
    k = model.config.repeat_k
    assert decode_linears(model, k * batch) == 7 * model.config.n_layers + 1
    assert all(m.use_kernel and m.packed is None for m in model.modules() if isinstance(m, DecodeLinear))
    ids = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(1))
    assert torch.equal(phd.generate(model, ids, 8), phd.generate(reference, ids, 8))
    cache = model.new_cache(batch, 16)
    with torch.inference_mode():
        model.prefill(ids, cache)
        calls = _kernel_calls(lambda: model.decode_step(ids[:, -1], cache))
    assert calls == 7 * model.config.n_layers + 1  # each layer's 7 linears and the LM head
    plain_linears(model)
    cache = model.new_cache(batch, 16)
    with torch.inference_mode():
        model.prefill(ids, cache)
        assert _kernel_calls(lambda: model.decode_step(ids[:, -1], cache)) == 0


@needs_kernel
@pytest.mark.parametrize("name", ["PHD-CSWA-4-2-4", "vanilla"])
def test_every_decode_path_takes_the_kernel_without_preparation(name):
    """No preparation step (issue 21): model.decode_step, phd.generate and transformers' generate() through the phd
    Cache run every decode linear on the rows kernel, with the plain model's logits and tokens; nothing is packed
    (no second copy of the weights)."""
    model, reference = _model(name), _model(name)
    plain_linears(reference)  # the per-model switch: its decode steps stay on F.linear
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    caches = [m.new_cache(1, 16) for m in (model, reference)]
    with torch.inference_mode():
        for m, cache in zip((model, reference), caches, strict=True):
            m.prefill(ids, cache)
        calls = _kernel_calls(lambda: model.decode_step(ids[:, -1], caches[0]))
        assert _kernel_calls(lambda: reference.decode_step(ids[:, -1], caches[1])) == 0
    assert calls == 7 * model.config.n_layers + 1
    assert all(m.use_kernel and m.packed is None for m in model.modules() if isinstance(m, DecodeLinear))
    torch.testing.assert_close(model.decode_step(ids[:, 0], caches[0]), reference.decode_step(ids[:, 0], caches[1]),
                               atol=1e-5, rtol=1e-5)
    fresh = _model(name)
    assert _kernel_calls(lambda: phd.generate(fresh, ids, 4)) > 0
    assert torch.equal(phd.generate(fresh, ids, 8), phd.generate(reference, ids, 8))
    pytest.importorskip("transformers")
    from phd.hf import PHDForCausalLM

    hf = PHDForCausalLM.from_native(_model(name))
    with torch.no_grad():
        calls = _kernel_calls(lambda: hf.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4))
        assert calls == 3 * (7 * model.config.n_layers + 1)  # the 3 decode steps after the prefill's token
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(out, phd.generate(reference, ids, 8))


def test_the_switch_keeps_decode_on_pytorch_kernels(monkeypatch):
    """PHD_KERNELS=0 (the documented switch) and plain_linears(model) keep every decode linear on F.linear."""
    monkeypatch.setenv("PHD_KERNELS", "0")
    monkeypatch.setattr(kernels, "_loaded", {})
    model = _model("PHD-CSWA-4-2-4")
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    assert _kernel_calls(lambda: phd.generate(model, ids, 4)) == 0
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())


@needs_kernel
def test_kernel_reads_the_live_weight_and_steps_aside_for_gradients():
    """The kernel reads the weight as it is now (no copy to go stale); a wanted gradient or more than 8 rows run
    F.linear."""
    model = _model("PHD-2")
    decode_linears(model, 2)
    lin = model.layers[0].mlp.w_up
    x = torch.randn(2, lin.in_features)
    with torch.no_grad():
        lin.weight.mul_(2)
        assert _kernel_calls(lambda: torch.testing.assert_close(lin(x), F.linear(x, lin.weight), atol=1e-5,
                                                                rtol=1e-5)) == 1
        lin.weight.data = lin.weight.data.clone() + 1
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5)
        assert _kernel_calls(lambda: lin(torch.randn(9, lin.in_features))) == 0
    assert _kernel_calls(lambda: lin(x.requires_grad_(True)).sum().backward()) == 0
    assert x.grad is not None


def test_without_the_kernel_packs_serve_and_one_row_stays_plain(monkeypatch):
    """Where the kernel is unavailable decode_linears falls back to MKL packs (2+ rows) or changes nothing."""
    import phd.inference.weights as weights

    monkeypatch.setattr(weights, "rows_linear_op", lambda: None)
    model = _model("PHD-3")
    assert decode_linears(model, 1) == 0
    if packing_available():
        assert decode_linears(model, 3) == 7 * model.config.n_layers + 1
        assert all(not m.use_kernel and m.packed_rows == 3 for m in model.modules() if isinstance(m, DecodeLinear))
        ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
        assert torch.equal(phd.generate(model, ids, 6), phd.generate(_model("PHD-3"), ids, 6))


@pytest.mark.parametrize("path", ["kernel", "pack"])
def test_a_prepared_linear_with_a_bias_equals_f_linear(path, monkeypatch):
    """PHD models have no biases, but DecodeLinear is any nn.Linear: its bias is added exactly once, on the kernel
    path and on the MKL pack path (checked to be the path taken), for every row count the path serves."""
    import phd.inference.weights as weights

    if path == "kernel" and OP is None:
        pytest.skip("no rows kernel here (not x86 with AVX2, or no compiler)")
    if path == "pack":
        if not packing_available():
            pytest.skip("no MKL packed GEMM in this PyTorch")
        monkeypatch.setattr(weights, "rows_linear_op", lambda: None)
    gen = torch.Generator().manual_seed(3)
    for rows in ([1, 2, 4, 5, 8] if path == "kernel" else [2, 3, 5, 9]):
        holder = torch.nn.Sequential(torch.nn.Linear(37, 19, bias=True))
        with torch.no_grad():
            holder[0].bias.copy_(torch.randn(19, generator=gen) * 10)  # large: a doubled bias cannot hide
        assert decode_linears(holder, rows) == 1
        lin = holder[0]
        assert isinstance(lin, DecodeLinear) and lin.use_kernel == (path == "kernel")
        assert lin.packed_rows == (rows if path == "pack" else 0)
        x = torch.randn(rows, 37, generator=gen)
        with torch.no_grad():
            got = lin(x)
            op = "phd_kernels::rows_linear" if path == "kernel" else "mkl::_mkl_linear"
            assert _kernel_calls(lambda lin=lin, x=x: lin(x), op) == 1
            assert _kernel_calls(lambda lin=lin, x=x: lin(x), "aten::addmm") == 0  # no fallback inside the op
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
        with torch.no_grad():  # the [..., rows, K] shape of a decode step comes back in its own shape
            torch.testing.assert_close(lin(x[None]), F.linear(x, lin.weight, lin.bias)[None], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [True, False])
def test_one_pack_serves_every_row_count_the_kernel_leaves(kernel, monkeypatch):
    """packed_linears (the vLLM plugin's, for batches that change size every step): one MKL pack per weight, made
    for 40 rows, serves every step of 2 to 40 rows the rows kernel does not take, equal to F.linear (bias added
    once) and on the pack itself (no GEMM fallback inside _mkl_linear); the kernel keeps its rows, one row without
    it and steps above 40 rows (prefill) stay plain, and a changed weight is never read from the stale pack."""
    import phd.inference.weights as weights

    if not packing_available():
        pytest.skip("no MKL packed GEMM in this PyTorch")
    if kernel and OP is None:
        pytest.skip("no rows kernel here (not x86 with AVX2, or no compiler)")
    if not kernel:
        monkeypatch.setattr(weights, "rows_linear_op", lambda: None)
    gen = torch.Generator().manual_seed(5)
    holder = torch.nn.Sequential(torch.nn.Linear(37, 19, bias=True))
    with torch.no_grad():
        holder[0].bias.copy_(torch.randn(19, generator=gen) * 10)
    weights.kernel_linears(holder)
    assert packed_linears(holder, 40) == 1
    lin = holder[0]
    for rows in [1, 2, 5, 8, 9, 16, 17, 39, 40, 41, 130]:
        x = torch.randn(rows, 37, generator=gen)
        with torch.no_grad():
            got = lin(x[None])[0]
            on_kernel, on_pack = kernel and rows <= 8, 1 < rows <= 40 and not (kernel and rows <= 8)
            assert _kernel_calls(lambda x=x: lin(x), "mkl::_mkl_linear") == int(on_pack), rows
            assert _kernel_calls(lambda x=x: lin(x), "aten::addmm") == int(not on_pack and not on_kernel), rows
            assert _kernel_calls(lambda x=x: lin(x)) == int(on_kernel), rows
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        lin.weight.add_(1)  # in place: the pack is stale now
        x = torch.randn(20, 37, generator=gen)
        assert _kernel_calls(lambda: lin(x), "mkl::_mkl_linear") == 0
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    assert weights.plain_linears(holder) == 1 and type(lin) is torch.nn.Linear and not hasattr(lin, "packed")


def test_models_without_cpu_float32_linears_never_ask_for_the_kernel(monkeypatch):
    """A bfloat16 (or CUDA) model has nothing for decode_linears: it changes nothing and compiles nothing."""
    import phd.inference.weights as weights

    def refuse():
        raise AssertionError("rows_linear_op consulted for a model it cannot serve")

    monkeypatch.setattr(weights, "rows_linear_op", refuse)
    model = _model("PHD-3").to(torch.bfloat16)
    assert decode_linears(model, 3) == 0 and decode_linears(model, 1) == 0
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())


def test_a_failed_build_warns_once_and_returns_none(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_cpu_supports_kernel", lambda: True)
    monkeypatch.setenv("PHD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="decode kernel is not available.*no C.. compiler"):
        assert kernels.rows_linear_op() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.rows_linear_op() is None  # answered once per process
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("PHD_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.rows_linear_op() is None  # turned off: no compiling, no warning


def test_the_cached_library_is_named_by_source_flags_and_torch_version(monkeypatch, tmp_path):
    """A library compiled with other flags, from another source or against another PyTorch is never loaded: each
    of them changes the digest in the file name (and nothing else does)."""
    monkeypatch.setenv("PHD_CACHE_DIR", str(tmp_path))
    base = kernels._library_path()
    assert base.parent == tmp_path / "kernels" and kernels._library_path() == base
    source = tmp_path / "hidden_attention.cpp"
    source.write_bytes(kernels._SOURCES[1].read_bytes() + b"\n// changed\n")
    changes = {"flags": (kernels, "_FLAGS", [*kernels._FLAGS[:-1], "-O2"]),
               "more flags": (kernels, "_FLAGS", [*kernels._FLAGS, "-march=native"]),
               "torch version": (torch, "__version__", torch.__version__ + ".post1"),
               "source": (kernels, "_SOURCES", (kernels._SOURCES[0], source))}
    names = {}
    for what, (owner, name, value) in changes.items():
        with monkeypatch.context() as m:
            m.setattr(owner, name, value)
            names[what] = kernels._library_path()
        assert names[what] != base, f"the cache key ignores the {what}"
    assert len(set(names.values())) == len(names) and kernels._library_path() == base


# ----- the C++ standard, and the cache: verified entries, private folders, remembered failures -----


@pytest.mark.parametrize("version,standard", [
    ("2.6.0", "c++17"), ("2.12.1+cu128", "c++17"), ("2.13.0+cpu", "c++20"), ("2.13.0a0+git1234abc", "c++20"),
    ("2.14.0.dev20260723+cu132", "c++20"), ("3.0.0", "c++20"), ("10.1", "c++20"), ("unknown", "c++20")])
def test_cxx_standard_follows_the_torch_version(monkeypatch, tmp_path, version, standard):
    """torch's extension builder uses C++20 from 2.13 on (2.14's headers refuse C++17): the kernel is compiled with
    the standard of the running PyTorch, exactly one -std flag, and the standard is part of the cache key."""
    assert kernels.cxx_standard(version) == standard
    monkeypatch.setattr(torch, "__version__", version)
    command = kernels._compile_command("c++", tmp_path / "out.so")
    assert [f for f in command if f.startswith("-std=")] == [f"-std={standard}"]
    base = kernels._library_path(tmp_path)
    other = "c++17" if standard == "c++20" else "c++20"
    monkeypatch.setattr(kernels, "cxx_standard", lambda version=None: other)
    assert kernels._library_path(tmp_path) != base, "the cache key ignores the C++ standard"


def test_cxx_standard_is_the_one_the_installed_torch_builds_extensions_with():
    """The rule agrees with the installed torch.utils.cpp_extension, which passes the flag as a literal."""
    import inspect

    from torch.utils import cpp_extension

    assert f"'-std={kernels.cxx_standard()}'" in inspect.getsource(cpp_extension)


FAKE_CXX = """#!{python}
import os, shutil, signal, sys
with open(os.environ["FAKE_CXX_LOG"], "a") as log:
    log.write(sys.argv[0] + "\\n")
if os.environ.get("FAKE_CXX_FAIL") == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("FAKE_CXX_FAIL"):
    sys.stderr.write("In file included from torch/all.h:1\\nrows_linear.cpp:3:1: error: boom\\n")
    sys.exit(1)
out = sys.argv[sys.argv.index("-o") + 1]
if os.environ.get("FAKE_CXX_COPY"):
    shutil.copyfile(os.environ["FAKE_CXX_COPY"], out)
else:
    with open(out, "wb") as f:
        f.write(os.urandom(4096))
"""


def _fake_compiler(path) -> str:
    """A stand-in for c++ that logs its calls and writes random bytes (or a copy of FAKE_CXX_COPY) to -o."""
    path.write_text(FAKE_CXX.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


class FakeBuild:
    """rows_linear_op in a temporary cache with a stand-in compiler; loading records the path instead of dlopen."""

    def __init__(self, tmp_path, monkeypatch) -> None:
        self.cache, self.log, self.loads = tmp_path / "cache", tmp_path / "cxx.log", []
        self.monkeypatch = monkeypatch
        monkeypatch.setenv("PHD_CACHE_DIR", str(self.cache))
        monkeypatch.setenv("CXX", _fake_compiler(tmp_path / "fake-cxx"))
        monkeypatch.setenv("FAKE_CXX_LOG", str(self.log))
        monkeypatch.delenv("PHD_KERNELS", raising=False)
        monkeypatch.setattr(kernels, "_cpu_supports_kernel", lambda: True)
        monkeypatch.setattr(kernels, "_load", self._load)

    def _load(self, lib):
        record = json.loads(lib.with_suffix(".json").read_text())
        assert (record["size"], record["sha256"]) == (lib.stat().st_size, sha256_file(lib)), "not the one built"
        self.loads.append(lib)
        return lambda x, w, bias: F.linear(x, w, bias)

    def op(self):
        """One new process's first call."""
        self.monkeypatch.setattr(kernels, "_loaded", {})
        return kernels.rows_linear_op()

    @property
    def compiles(self) -> int:
        return len(self.log.read_text().splitlines()) if self.log.exists() else 0

    @property
    def lib(self):
        return kernels._library_path(self.cache / "kernels")


@pytest.fixture
def fake_build(tmp_path, monkeypatch) -> FakeBuild:
    return FakeBuild(tmp_path, monkeypatch)


@pytest.mark.parametrize("damage", ["truncated", "garbage of the same size", "no record"])
def test_a_damaged_cached_library_is_built_again_not_loaded(fake_build, capfd, damage):
    """A truncated library crashed every process with a bus error, a garbage one failed to load on every run: the
    size and sha256 recorded at build time are checked before loading, and a damaged entry is built again."""
    assert fake_build.op() is not None and fake_build.compiles == 1 and fake_build.loads == [fake_build.lib]
    record = json.loads(fake_build.lib.with_suffix(".json").read_text())
    assert record["size"] == fake_build.lib.stat().st_size == 4096
    assert record["sha256"] == sha256_file(fake_build.lib)
    assert fake_build.op() is not None and fake_build.compiles == 1  # a sound entry: loaded, not compiled
    capfd.readouterr()
    if damage == "truncated":
        os.truncate(fake_build.lib, 2000)
    elif damage == "no record":
        fake_build.lib.with_suffix(".json").unlink()
    else:
        fake_build.lib.write_bytes(os.urandom(4096))
    assert fake_build.op() is not None
    assert fake_build.compiles == 2 and len(fake_build.loads) == 3
    assert "building it again" in capfd.readouterr().err
    assert fake_build.op() is not None and fake_build.compiles == 2


def test_a_cache_folder_others_can_write_is_not_used(fake_build):
    """A library planted in a group/other-writable kernels folder is never loaded: one warning, and the kernel is
    built into the user's own private folder (mode 0700) instead."""
    shared = fake_build.cache / "kernels"
    shared.mkdir(parents=True)
    shared.chmod(0o777)
    planted = kernels._library_path(shared)
    planted.write_bytes(b"\x7fELF planted")
    planted.with_suffix(".json").write_text(json.dumps({"size": planted.stat().st_size,
                                                        "sha256": sha256_file(planted)}))
    with pytest.warns(RuntimeWarning, match=r"kernel cache .*kernels is writable by group and others \(mode 777\): "
                                            r"another user could plant a library there"):
        assert fake_build.op() is not None
    [loaded] = fake_build.loads
    assert loaded.parent != shared and fake_build.compiles == 1
    assert loaded.parent.stat().st_uid == os.getuid() and stat.S_IMODE(loaded.parent.stat().st_mode) == 0o700
    assert not stat.S_IMODE(loaded.stat().st_mode) & 0o022


def test_a_library_others_can_write_is_built_again(fake_build, capfd):
    """In the user's own folder, a library (or its record) writable by group or others is replaced, not loaded."""
    fake_build.op()
    fake_build.lib.chmod(0o666)
    capfd.readouterr()
    fake_build.op()
    assert fake_build.compiles == 2 and "writable by group and others (mode 666)" in capfd.readouterr().err
    assert stat.S_IMODE(fake_build.lib.stat().st_mode) == 0o755
    fake_build.lib.with_suffix(".json").chmod(0o646)
    fake_build.op()
    assert fake_build.compiles == 3


def test_a_cache_folder_of_another_user_is_not_used(fake_build, monkeypatch, tmp_path):
    """Ownership (tested by pretending to be another uid): a folder or file of another user is untrusted, and the
    kernel goes to a fresh private folder."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    (mine / "lib.so").write_bytes(b"x")
    (mine / "lib.so").chmod(0o755)
    assert kernels._untrusted(mine, folder=True) is None and kernels._untrusted(mine / "lib.so", folder=False) is None
    real = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    assert kernels._untrusted(mine, folder=True) == f"is owned by uid {real}, not by you (uid {real + 1})"
    assert kernels._untrusted(mine / "lib.so", folder=False) == f"is owned by uid {real}, not by you (uid {real + 1})"
    with pytest.warns(RuntimeWarning, match=f"kernels is owned by uid {real}, not by you"):
        assert fake_build.op() is not None
    [loaded] = fake_build.loads
    assert loaded.parent.name.startswith("kernels-private-")
    assert stat.S_IMODE(loaded.parent.stat().st_mode) == 0o700


def test_a_failed_build_is_remembered_until_the_key_or_compiler_changes(fake_build, monkeypatch, capfd, tmp_path):
    """Every process compiled again (~12 s) and warned: the failure is written beside the entry, later processes
    warn briefly without compiling, and a new key (here a new torch version) or another compiler tries again. A
    compiler killed by a signal (the OOM killer) is not a verdict on the source: not remembered."""
    monkeypatch.setenv("FAKE_CXX_FAIL", "kill")
    marker = fake_build.lib.with_suffix(".failed")
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="decode kernel is not available .*fake-cxx failed"):
            assert fake_build.op() is None
        assert not marker.exists()
    assert fake_build.compiles == 2
    fake_build.log.unlink()
    monkeypatch.setenv("FAKE_CXX_FAIL", "1")
    with pytest.warns(RuntimeWarning, match="decode kernel is not available .*fake-cxx failed: rows_linear.cpp:3:1: "
                                            "error: boom"):
        assert fake_build.op() is None
    assert fake_build.compiles == 1 and "error: boom" in json.loads(marker.read_text())["error"]
    capfd.readouterr()
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match=f"it failed to build before: .*error: boom; delete {marker} to try"):
            assert fake_build.op() is None
    assert fake_build.compiles == 1 and "compiling" not in capfd.readouterr().err
    with monkeypatch.context() as m, pytest.warns(RuntimeWarning, match="fake-cxx failed"):
        m.setattr(torch, "__version__", torch.__version__ + ".post1")
        assert fake_build.op() is None
    assert fake_build.compiles == 2
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path / "other-cxx"))
    with pytest.warns(RuntimeWarning, match="other-cxx failed"):
        assert fake_build.op() is None
    assert fake_build.compiles == 3
    monkeypatch.delenv("FAKE_CXX_FAIL")  # fixed, and the marker deleted as the warning says: built and loaded
    marker.unlink()
    assert fake_build.op() is not None and fake_build.compiles == 4


_RUN_OP = ("import torch; from phd.inference.kernels import rows_linear_op as f; op = f(); x, w = torch.randn(3, 40), "
           "torch.randn(9, 40); torch.testing.assert_close(op(x, w, None), x @ w.T); print('ok')")


@needs_kernel
def test_kernel_compiles_from_scratch_and_survives_a_damaged_cache(tmp_path):
    """A fresh cache: one compile (said on stderr), the library published under its digest with its record, then
    loaded and right (in child processes: a process registers the op namespace once). A truncated library used to
    kill every later process with a bus error, a garbage one to be skipped with a warning on every run: both are
    built again (by a stand-in compiler that copies the good build, to spare 10 s each)."""
    env = {**os.environ, "PHD_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PHD_KERNELS", None)

    def run():
        return subprocess.run([sys.executable, "-c", _RUN_OP], env=env, capture_output=True, text=True, timeout=300)

    done = run()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok" and "compiling the decode kernel" in done.stderr
    lib = kernels._library_path(tmp_path / "cache" / "kernels")
    assert sorted(p.name for p in lib.parent.iterdir()) == sorted([lib.name, lib.with_suffix(".json").name])
    again = run()
    assert again.returncode == 0 and "compiling" not in again.stderr
    good = tmp_path / "good.so"
    shutil.copyfile(lib, good)
    env.update(CXX=_fake_compiler(tmp_path / "fake-cxx"), FAKE_CXX_LOG=str(tmp_path / "cxx.log"),
               FAKE_CXX_COPY=str(good))
    for damage in ("truncate", "garbage"):
        if damage == "truncate":
            subprocess.run(["truncate", "-s", "20000", str(lib)], check=True)
        else:
            lib.write_bytes(os.urandom(good.stat().st_size))
        done = run()
        assert done.returncode == 0, (damage, done.returncode, done.stderr)
        assert done.stdout.strip() == "ok" and "building it again" in done.stderr
        assert "not available" not in done.stderr
    assert len((tmp_path / "cxx.log").read_text().splitlines()) == 2

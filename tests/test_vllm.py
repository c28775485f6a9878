"""vLLM serving (phd.vllm): greedy tokens from vLLM equal the native engine's, for every variant.

Runs in the vLLM virtual environment (scripts/setup-vllm.sh; scripts/test.sh runs it there); skipped where vLLM
is not installed. One engine per variant (about 30 s to start on 2 cores), in-process to save the worker spawn.
Each variant runs a batch of mixed prompt lengths submitted at once, then requests arriving while others
decode; W and C are small so that windows and chunks are crossed many times. The CSWA engine's KV cache is
too small for its batch at once, so vLLM preempts and recomputes requests there. Two more engines: a long request
(thousands of tokens, many paged blocks) and many requests under memory pressure (repeated preemption and
recompute, with the window pool's rows handed back and reused). The batch, the long request and the pressure run go
through both hidden paths: the hidden_attention kernel (the default where phd's kernels build) and its reference,
SDPA over the keys read back from the paged cache.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: no worker spawn
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm_utils import native_greedy, prompts, write_tiny  # noqa: E402

import phd.vllm.model as plugin  # noqa: E402
from phd.inference.kernels import hidden_attention_op  # noqa: E402
from phd.inference.weights import DecodeLinear, packing_available  # noqa: E402

NEW = 12
VARIANTS = {
    "vanilla": {},
    "PHD-2": {"repeat_k": 2},
    "PHD-3-shared": {"repeat_k": 3, "positions": "shared"},
    "PHD-SWA-3-2-inf": {"repeat_k": 3, "window": 2},
    "PHD-CSWA-4-3-5": {"repeat_k": 4, "window": 3, "chunk": 5},
    "PHD-CSWA-2-2-4-shared": {"repeat_k": 2, "window": 2, "chunk": 4, "positions": "shared"},
}
# Three 32-token blocks (plus vLLM's null block): the batch's first two prompts (30 and 28 tokens) both grow
# past a block boundary while decoding, and the second finds no free block: vLLM preempts and recomputes it.
ENGINE = {"PHD-CSWA-4-3-5": {"block_size": 32, "num_gpu_blocks_override": 4, "max_model_len": 96}}
GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, detokenize=False)
# Engines for one test each (indirect parameters of `served`): variant fields and engine settings.
LONG, PRESSURE = "PHD-SWA-3-2-inf-long", "PHD-SWA-2-3-inf-pressure"
SPECIAL = {LONG: ({"repeat_k": 3, "window": 2, "max_seq_len": 4096}, {"max_model_len": 4096}),
           # Five 32-token blocks for eight requests of up to 64 tokens: preempted again and again.
           PRESSURE: ({"repeat_k": 2, "window": 3}, {"block_size": 32, "num_gpu_blocks_override": 6,
                                                    "max_model_len": 96})}


@pytest.fixture(scope="module", params=list(VARIANTS))
def served(request, tmp_path_factory):
    """(native model, vLLM engine) of one variant, from a `phd convert --to phd-hf`-style folder."""
    folder = tmp_path_factory.mktemp(request.param)
    fields, engine = SPECIAL.get(request.param, (VARIANTS.get(request.param), ENGINE.get(request.param, {})))
    model = write_tiny(folder, **fields)
    settings = {"max_model_len": 256, **engine}
    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_num_seqs=8,
              seed=0, **settings)
    yield model, llm, request.param
    llm.llm_engine.engine_core.shutdown()


def _count_preemptions(llm: LLM) -> list[int]:
    """Count the scheduler's preemptions (the engine runs in this process)."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    count = [0]
    preempt = scheduler._preempt_request

    def counted(*args, **kwargs):
        count[0] += 1
        return preempt(*args, **kwargs)

    scheduler._preempt_request = counted
    return count


def _on_both_paths(llm: LLM, monkeypatch, name: str, run) -> None:
    """run() with the hidden_attention kernel (asserting it served the PHD steps where phd's kernels build, and
    that every decode step, all requests one token past their first, took the fused path: all K copies in one
    kernel call), then with the plugin's SDPA path (the kernel set aside, as where it cannot be built: the fused
    path's reference)."""
    calls, fused, unfused = [], [], []
    kernel, decode, general = (plugin._PHDAttention._kernel, plugin.PHDForCausalLM._forward_decode,
                               plugin.PHDForCausalLM._forward_phd)

    def counted_general(self, x, positions, step):
        if x.shape[0] == step.seq_lens.shape[0] and not step.fresh.any():
            unfused.append(1)
        return general(self, x, positions, step)

    monkeypatch.setattr(plugin._PHDAttention, "_kernel", lambda self, *a: calls.append(1) or kernel(self, *a))
    monkeypatch.setattr(plugin.PHDForCausalLM, "_forward_decode", lambda self, *a: fused.append(1) or decode(self, *a))
    monkeypatch.setattr(plugin.PHDForCausalLM, "_forward_phd", counted_general)
    run()
    if name != "vanilla" and hidden_attention_op() is not None:
        assert calls, "the hidden_attention kernel did not run"
        assert fused and not unfused, f"{len(unfused)} decode steps took the general path, {len(fused)} fused"
    model = _plugin_model(llm)
    held, model.kernel = model.kernel, None
    try:
        calls.clear()
        fused.clear()
        run()
        assert not calls and not fused
    finally:
        model.kernel = held


def test_batch_of_mixed_lengths(served, monkeypatch):
    model, llm, name = served
    preempted = _count_preemptions(llm)
    batch = prompts([30, 28, 70, 1, 33])

    def run():
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], GREEDY, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == [native_greedy(model, p, NEW) for p in batch]

    _on_both_paths(llm, monkeypatch, name, run)
    assert (preempted[0] > 0) == (name in ENGINE)  # the small cache forced recomputes, and only there


def test_steps_above_eight_rows_run_on_one_pack(served, monkeypatch):
    """The plugin packs every linear once (MKL, for its largest decode step: K x max_num_seqs rows, 16 at least)
    and the decode steps above the rows kernel's 8 rows run on those packs (3 requests x K >= 3 copies here; the
    tokens stay equal: the tests above). PHD_VLLM_PACKS=0 leaves the linears unpacked."""
    from torch.profiler import ProfilerActivity, profile

    from phd.inference.weights import kernel_linears, plain_linears

    if not packing_available():
        pytest.skip("no MKL packed GEMM in this PyTorch")
    _, llm, _ = served
    plugin_model = _plugin_model(llm)
    k = plugin_model.config.repeat_k
    linears = [m for m in plugin_model.model.modules() if isinstance(m, DecodeLinear)]
    assert linears and all(m.packed_any and m.packed_rows == max(8 * k, 16) for m in linears)
    batch = prompts([12, 9, 7], seed=4)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], GREEDY, use_tqdm=False)
    packed_rows = {e.input_shapes[0][0] for e in prof.key_averages(group_by_input_shape=True)
                   if e.key == "mkl::_mkl_linear" and e.input_shapes}
    assert (3 * k in packed_rows) == (3 * k > 8), packed_rows  # decode steps: the kernel up to 8 rows, packs beyond
    try:
        monkeypatch.setenv("PHD_VLLM_PACKS", "0")
        plain_linears(plugin_model.model)
        kernel_linears(plugin_model.model)
        plugin_model._pack_linears()
        assert not any(getattr(m, "packed_any", False) for m in plugin_model.model.modules())
    finally:
        monkeypatch.delenv("PHD_VLLM_PACKS")
        plugin_model._pack_linears()


ARRIVING = ([9, 3, 26, 1, 6], {0: [0, 1], 3: [2], 5: [3, 4]})  # prompt lengths; step -> requests added before it


def _arrivals(engine, tag: str) -> tuple[list[list[int]], list[list[int]]]:
    """Run ARRIVING's prompts through `engine` step by step, each added at its step: (prompts, their tokens)."""
    lengths, arrivals = ARRIVING
    batch = prompts(lengths, seed=2)
    done: dict[str, list[int]] = {}
    step = 0
    while len(done) < len(batch):
        for i in arrivals.get(step, []):
            engine.add_request(f"{tag}-r{i}", TokensPrompt(prompt_token_ids=batch[i]), GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        assert step < 200
    return batch, [done[f"{tag}-r{i}"] for i in range(len(batch))]


def test_requests_arriving_while_others_decode(served, monkeypatch):
    """Continuous batching: new prompts join steps in which earlier requests decode (prefill + decode mixed), a
    1-token prompt among them; on both hidden paths."""
    model, llm, name = served
    runs = [0]

    def run():
        runs[0] += 1
        batch, got = _arrivals(llm.llm_engine, f"arrive{runs[0]}")
        assert got == [native_greedy(model, p, NEW) for p in batch]

    _on_both_paths(llm, monkeypatch, name, run)


def test_mixed_steps_compute_only_valid_hidden_entries(served, monkeypatch):
    """In a step where prompts and decoding requests mix, a decoding request's hidden set is one position padded to
    the prompts' width; the blocks compute only the valid entries: n originals + each request's hidden positions
    from its floor (its first position, or its chunk's start), K - 1 copies each; and the kernel is told the
    padding sees no key (so it skips it)."""
    from phd.inference.engine import hidden_widths

    model, llm, name = served
    if name == "vanilla":
        pytest.skip("no hidden set")
    plugin_model = _plugin_model(llm)
    cfg, general = plugin_model.config, plugin.PHDForCausalLM._forward_phd
    seen: list[tuple[int, int, bool]] = []  # (rows into layer 0, rows expected, any request padded)

    def recorded(self, x, positions, step):
        held = (step.last - step.floor + 1).clamp(min=1)
        width = min(hidden_widths(cfg, int(held.max()))[0][0], int(held.max()))
        expect = x.shape[0] + int(held.clamp(max=width).sum()) * (cfg.repeat_k - 1)
        first = self.model.layers[0]
        forward = first.forward
        first.forward = lambda h, *a: seen.append((h.shape[1], expect, bool((held < width).any()))) or forward(h, *a)
        try:
            return general(self, x, positions, step)
        finally:
            del first.forward

    kernel, unseen = plugin._PHDAttention._kernel, []

    def checked(self, *a):  # the kernel skips padding queries only if they see no key: limit 0, mask all -inf
        pad = ~self.plan.valid[:, self.plan.m - self.shape.m :]
        unseen.append(bool((self.shape.limit[pad] == 0).all() and self.shape.mask[pad].eq(float("-inf")).all()))
        return kernel(self, *a)

    monkeypatch.setattr(plugin.PHDForCausalLM, "_forward_phd", recorded)
    monkeypatch.setattr(plugin._PHDAttention, "_kernel", checked)
    _arrivals(llm.llm_engine, "valid")
    assert seen and all(rows == expect for rows, expect, _ in seen), seen
    assert all(unseen) and (bool(unseen) == (hidden_attention_op() is not None))
    if cfg.window is not None:  # without a window every request's set is its last position: nothing to pad
        assert any(padded for *_, padded in seen), "no step padded a request: the test did not mix steps"


def _plugin_model(llm: LLM):
    """The plugin's model object (the engine runs in this process)."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


@pytest.mark.parametrize("served", [LONG], indirect=True)
def test_long_request(served, monkeypatch):
    """A 3000-token prompt (24 paged blocks of 128, the partial last one included; the window ring wraps about
    1500 times in prefill) beside short ones: every token equals the native engine's."""
    model, llm, name = served
    batch = prompts([3000, 5, 1100], seed=3)

    def run():
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], GREEDY, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == [native_greedy(model, p, NEW) for p in batch]

    _on_both_paths(llm, monkeypatch, name, run)


@pytest.mark.parametrize("served", [PRESSURE], indirect=True)
def test_preemption_under_memory_pressure(served, monkeypatch):
    """Eight requests, room for about three: vLLM preempts (frees the blocks) and recomputes again and again. Each
    recompute starts the request's window empty in whatever pool row its new first block maps to; rows of keys
    that left are reused, so the pool never holds more rows than the cache has blocks."""
    model, llm, name = served
    batch = prompts([30, 28, 40, 20, 25, 31, 9, 33], seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, detokenize=False)

    def run():
        preempted = _count_preemptions(llm)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], greedy, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == [native_greedy(model, p, 24) for p in batch]
        assert preempted[0] >= 3

    _on_both_paths(llm, monkeypatch, name, run)
    pool = _plugin_model(llm).windows
    assert len(pool.rows) <= 6 and pool.kv.shape[1] == 8  # keyed by first blocks (6), never grown

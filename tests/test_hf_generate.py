"""transformers' own generate() and hand-written cached loops on PHDForCausalLM, against the native engine and,
at K = 1, against transformers' LlamaForCausalLM on the same weights."""

from __future__ import annotations

import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_utils import VOCAB, left_padded, tiny_phd, tiny_transformers  # noqa: E402
from train_utils import one_thread  # noqa: E402, F401 (autouse fixture)

import phd  # noqa: E402
from phd.errors import InputError  # noqa: E402
from phd.hf import PHDForCausalLM  # noqa: E402
from phd.hf.cache import PHDHFCache  # noqa: E402
from phd.hf.convert import from_transformers  # noqa: E402

EOS, PAD = 2, 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16, 17]]
VARIANTS = ["vanilla", "PHD-2", "PHD-3", "PHD-SWA-2-3-inf", "PHD-SWA-3-2-inf", "PHD-CSWA-3-2-4", "PHD-CSWA-2-3-5",
            "repeat-2"]


def hf_phd(variant: str = "PHD-CSWA-3-2-4", **overrides) -> PHDForCausalLM:
    return PHDForCausalLM.from_native(tiny_phd(variant, **overrides), eos_token_id=EOS, pad_token_id=PAD)


def cached_loop(model: PHDForCausalLM, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """The loop users write by hand: the prompt once with use_cache=True, then one token at a time."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        new = []
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=mask, past_key_values=out.past_key_values)
    return torch.cat(new, dim=1)


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over the tiny vocabulary (token i is one character; no spaces)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + string.punctuation + "éüñßøåç"
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars[:VOCAB])}, unk_token="d"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="a", eos_token="c")


# ----- one engine: cached loop == generate() == phd.generate -----


@pytest.mark.parametrize("positions", ["expanded", "shared"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_loop_equals_generate_and_the_native_engine(variant: str, positions: str) -> None:
    model = hf_phd(variant, positions=positions)
    model.generation_config.eos_token_id = None  # no early stop: compare every step
    ids, mask = left_padded(PROMPTS)
    steps = 10
    looped = cached_loop(model, ids, mask, steps)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert torch.equal(generated[:, ids.shape[1]:], looped)
    for row, prompt in enumerate(PROMPTS):
        alone = phd.generate(model.model, torch.tensor(prompt), steps)
        assert alone[len(prompt):].tolist() == looped[row].tolist(), (variant, positions, row)


def test_forward_returns_a_cache_and_its_logits_are_the_training_forward() -> None:
    model = hf_phd()
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        cached = model(ids, attention_mask=mask, use_cache=True)
        plain = model(ids, attention_mask=mask, use_cache=False)
    assert isinstance(cached.past_key_values, PHDHFCache) and plain.past_key_values is None
    assert cached.past_key_values.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(cached.logits, plain.logits, atol=1e-5, rtol=0)
    # with gradients on, the logits come from the autograd forward and the cache is filled all the same
    out = model(ids, attention_mask=mask, use_cache=True)
    assert out.logits.requires_grad and out.past_key_values.is_initialized
    torch.testing.assert_close(out.logits.detach(), plain.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("logits_to_keep", [0, 1])
def test_outputs_are_normal_tensors_not_inference_tensors(logits_to_keep: int) -> None:
    """The engine runs under inference_mode; what a caller gets back (prefill and decode logits, generate's scores
    and logits) is an ordinary tensor it can edit in place, as with Llama."""
    model = hf_phd()
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, logits_to_keep=logits_to_keep)
        assert not out.logits.is_inference()
        out.logits.add_(1)
        token = out.logits[:, -1:].argmax(-1)
        step = model(token, attention_mask=torch.cat([mask, torch.ones_like(token)], 1),
                     past_key_values=out.past_key_values)
        assert not step.logits.is_inference()
        step.logits.mul_(2)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, output_logits=True)
    for tensor in (*got.scores, *got.logits):
        assert not tensor.is_inference()
        tensor.add_(1)


def test_several_new_tokens_at_once_equal_one_at_a_time() -> None:
    model = hf_phd("PHD-SWA-3-2-inf")
    ids = torch.tensor([PROMPTS[0]])
    more = torch.tensor([[20, 21, 22]])
    with torch.no_grad():
        together = model(more, past_key_values=model(ids, use_cache=True).past_key_values).logits
        cache = model(ids, use_cache=True).past_key_values
        apart = torch.cat([model(more[:, i:i + 1], past_key_values=cache).logits for i in range(3)], dim=1)
        full = model(torch.cat([ids, more], dim=1), use_cache=False).logits[:, -3:]
    torch.testing.assert_close(together, apart, atol=0, rtol=0)
    torch.testing.assert_close(together, full, atol=1e-5, rtol=0)


def test_cache_grows_past_its_first_allocation() -> None:
    model = hf_phd("PHD-CSWA-2-3-5")
    ids = torch.tensor([PROMPTS[1]])
    cache = PHDHFCache(model.model.config, max_len=6)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert cache.native.capacity >= 24
    assert out[0].tolist() == phd.generate(model.model, ids[0], 20).tolist()


def test_cache_row_operations_match_a_cache_built_for_those_rows() -> None:
    model = hf_phd("PHD-CSWA-3-2-4")
    ids, mask = left_padded(PROMPTS)
    token = torch.tensor([[30], [31], [32], [33]])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        cache.batch_repeat_interleave(2)
        got = model(token, past_key_values=cache).logits
        rows = torch.tensor([0, 0, 1, 1])
        fresh = model(ids[rows], attention_mask=mask[rows], use_cache=True).past_key_values
        expected = model(token, past_key_values=fresh).logits
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        cache.reorder_cache(torch.tensor([3, 0]))  # beam search: new row i = old row beam_idx[i]
        cache.batch_select_indices(torch.tensor([1]))
        last = model(torch.tensor([[34]]), past_key_values=cache).logits[:, -1]
        alone = model(torch.tensor([PROMPTS[0] + [30, 34]]), use_cache=False).logits[:, -1]
    torch.testing.assert_close(last, alone, atol=1e-5, rtol=0)


def test_what_a_phd_cache_cannot_do_is_refused() -> None:
    model = hf_phd()
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="decodes with its own cache"):
        model(ids, past_key_values=transformers.DynamicCache())
    cache = model(ids, use_cache=True).past_key_values
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="padding among the new tokens"):
        model(torch.tensor([[3]]), attention_mask=torch.tensor([[1] * 9 + [0]]), past_key_values=cache)
    with pytest.raises(ValueError, match="not available for PHD models"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match="does not take position_ids"):
        model(ids, position_ids=torch.arange(9)[None])


def test_cache_position_must_name_the_columns_after_the_cache() -> None:
    """cache_position is checked, not obeyed: the right one gives the logits of no cache_position; one behind the
    cache (tokens again), ahead of it (a gap), of another length or not consecutive is refused in one line, before
    the cache changes. Without a filled cache the right one starts at 0."""
    model = hf_phd()
    ids, more = torch.tensor([PROMPTS[0]]), torch.tensor([[20, 21]])
    with torch.no_grad():
        expected = model(more, past_key_values=model(ids, use_cache=True).past_key_values).logits
        prompt = model(ids, use_cache=True, cache_position=torch.arange(9))
        cache = prompt.past_key_values
        wrong = {"behind": torch.arange(8, 10), "from the start": torch.arange(0, 2), "ahead": torch.arange(10, 12),
                 "shorter": torch.arange(9, 10), "a gap": torch.tensor([9, 11]),
                 "batched, behind": torch.arange(8, 10)[None]}
        message = r"^cache_position is .* after the 9 columns the cache holds: pass cache_position=torch.arange\(9, 11"
        for what, position in wrong.items():
            with pytest.raises(InputError, match=message) as refused:
                model(more, past_key_values=cache, cache_position=position)
            assert "\n" not in str(refused.value), what
            assert cache.columns == 9, f"a refused cache_position ({what}) changed the cache"
        right = model(more, past_key_values=cache, cache_position=torch.arange(9, 11)).logits
        batched = model(more, past_key_values=model(ids, use_cache=True).past_key_values,
                        cache_position=torch.arange(9, 11)[None]).logits
        torch.testing.assert_close(right, expected, atol=0, rtol=0)
        torch.testing.assert_close(batched, expected, atol=0, rtol=0)
        torch.testing.assert_close(prompt.logits, model(ids, use_cache=True).logits, atol=0, rtol=0)
        for use_cache in (True, False):
            with pytest.raises(InputError, match=r"come after the 0 columns"):
                model(ids, use_cache=use_cache, cache_position=torch.arange(3, 12))
        torch.testing.assert_close(model(ids, use_cache=False, cache_position=torch.arange(9)).logits,
                                   model(ids, use_cache=False).logits, atol=0, rtol=0)


# ----- K = 1: transformers' Llama on the same weights, token for token -----


@pytest.fixture(scope="module")
def llama_pair() -> tuple[torch.nn.Module, PHDForCausalLM]:
    llama = tiny_transformers("llama")
    return llama, PHDForCausalLM.from_native(from_transformers(llama), eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False),
    dict(num_beams=3, do_sample=False),
    dict(num_beams=3, num_return_sequences=2, do_sample=False, length_penalty=0.7),
    dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, num_return_sequences=2),
    dict(do_sample=False, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=12),
], ids=["greedy", "beam3", "beam3x2", "sample", "processors"])
def test_k1_generate_equals_transformers_llama(llama_pair, kwargs: dict) -> None:
    llama, model = llama_pair
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(7)
    expected = llama.generate(ids, attention_mask=mask, max_new_tokens=14, **kwargs)
    torch.manual_seed(7)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=14, **kwargs)
    assert got.tolist() == expected.tolist()


def test_k1_scores_equal_transformers_llama(llama_pair) -> None:
    llama, model = llama_pair
    ids, mask = left_padded(PROMPTS)
    args = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                output_scores=True, output_logits=True)
    expected, got = llama.generate(ids, **args), model.generate(ids, **args)
    assert got.sequences.tolist() == expected.sequences.tolist() and len(got.scores) == 6
    for ours, theirs in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


# ----- what transformers' generate() brings -----


def test_streamer_receives_exactly_the_generated_text() -> None:
    model, tok = hf_phd("PHD-SWA-3-2-inf"), char_tokenizer()
    ids = torch.tensor([PROMPTS[0]])
    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=model.generate(
        ids, max_new_tokens=12, do_sample=False, eos_token_id=None, streamer=streamer)))
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed == tok.decode(result["out"][0, ids.shape[1]:]) and len(streamed) == 12


def test_stop_strings_stopping_criteria_and_min_new_tokens() -> None:
    model, tok = hf_phd("PHD-CSWA-2-3-5"), char_tokenizer()
    ids = torch.tensor([PROMPTS[1]])
    free = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)[0, 4:].tolist()
    stop_word = tok.decode([free[5]])
    first = free.index(free[5])
    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, stop_strings=[stop_word],
                         tokenizer=tok)
    assert out[0, 4:].tolist() == free[: first + 1]

    class AfterThree(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 4 + 3, dtype=torch.bool)

    out = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                         stopping_criteria=transformers.StoppingCriteriaList([AfterThree()]))
    assert out[0, 4:].tolist() == free[:3]
    early = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=free[0], min_new_tokens=5)
    assert early.shape[1] - 4 >= 5 and free[0] not in early[0, 4:9].tolist()


def test_generate_without_a_cache_gives_the_same_tokens() -> None:
    model = hf_phd("PHD-3")
    ids, mask = left_padded(PROMPTS)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == plain.tolist()


def test_beam_search_and_several_sequences_on_a_phd_model() -> None:
    model = hf_phd("PHD-CSWA-3-2-4")
    ids, mask = left_padded(PROMPTS)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=3,
                         do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    assert out.sequences.shape == (6, ids.shape[1] + 8)
    # the best beam's score is its summed log-probability under the model's own (uncached) forward
    for row, prompt in enumerate(PROMPTS):
        seq = out.sequences[3 * row, ids.shape[1]:]
        full = torch.tensor([prompt + seq.tolist()])
        with torch.no_grad():
            logp = model(full, use_cache=False).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        total = logp.gather(1, seq[:, None]).sum()
        torch.testing.assert_close(out.sequences_scores[3 * row], total / 8, atol=1e-4, rtol=0)


# ----- one length rule (phd.checks.warn_past_max_len) on every path -----


def _length_warnings(record: list) -> list[str]:
    from phd.checks import LengthWarning

    return [str(w.message) for w in record if issubclass(w.category, LengthWarning)]


def test_every_path_runs_past_max_position_embeddings_with_the_same_warning(tmp_path, capsys) -> None:
    """max_seq_len 12, prompt 8 + 8 new tokens: the uncached forward (native and transformers), the cached
    forward, generate(), phd.generate and `phd generate` all run to 16 tokens, each with the one LengthWarning
    (the CLI as one line); none clips, none refuses, and all give the same tokens. At 12 tokens nothing warns."""
    import warnings

    from phd.commands import main
    from phd.io import save_model

    model = hf_phd(max_seq_len=12)
    prompt, steps = PROMPTS[0][:8], 8
    ids = torch.tensor([prompt])
    past = "runs past max_seq_len=12"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        native = phd.generate(model.model, ids, steps)[0, 8:].tolist()
        assert _length_warnings(record) and past in _length_warnings(record)[0]
        record.clear()
        tokens = {"generate()": model.generate(ids, max_new_tokens=steps, do_sample=False)[0, 8:].tolist()}
        assert _length_warnings(record), "generate()"
        record.clear()
        tokens["cached forward"] = cached_loop(model, ids, torch.ones_like(ids), steps)[0].tolist()
        assert _length_warnings(record), "cached forward"
        full = torch.tensor([prompt + native])
        for name, run in {"native forward": lambda: model.model(full).logits,
                          "uncached forward": lambda: model(full, use_cache=False).logits}.items():
            record.clear()
            with torch.no_grad():
                logits = run()
            assert logits.shape[1] == 16 and _length_warnings(record), name
            tokens[name] = logits[0, 7:-1].argmax(-1).tolist()
        record.clear()
        with torch.no_grad():
            model.model(full[:, :12]), model(full[:, :12], use_cache=False), phd.generate(model.model, ids, 4)
        assert not _length_warnings(record), "warned within max_seq_len"
    assert all(t == native for t in tokens.values()), tokens

    save_model(model.model, tmp_path / "export")
    args = ["generate", "--checkpoint", str(tmp_path / "export"), "--prompt-ids", ",".join(map(str, prompt)),
            "--max-new-tokens", str(steps), "--temperature", "0"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(t) for t in native], "phd generate clipped or changed the tokens"
    assert err.count(f"[warning: the sequence {past}") == 1 and "clipped" not in err


# ----- decode steps and gradients -----


def test_decoding_with_gradients_on_is_refused_and_says_how_to_get_them() -> None:
    """Decode steps come from the inference engine: with gradients on (and trainable parameters) they are refused
    in one line, rather than returning logits without a gradient (a loss over prompt + decode logits would get the
    prompt's gradient only). The prompt's logits are differentiable; no_grad decoding and a frozen model work."""
    model = hf_phd()
    ids = torch.tensor([PROMPTS[0]])
    out = model(ids, use_cache=True)  # eval mode, gradients on: the autograd forward, cache filled beside it
    assert out.logits.requires_grad
    with pytest.raises(InputError, match=r"^decoding against a PHDHFCache computes no gradients.*torch\.no_grad\(\)"):
        model(torch.tensor([[3]]), past_key_values=out.past_key_values)
    assert out.past_key_values.columns == 9, "the refused step changed the cache"
    with torch.no_grad():
        decoded = model(torch.tensor([[3]]), past_key_values=out.past_key_values).logits
    with torch.no_grad():
        full = model(torch.tensor([PROMPTS[0] + [3]]), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=0)
    model.requires_grad_(False)  # nothing wants a gradient: decoding with grad mode on is fine
    model(torch.tensor([[4]]), past_key_values=out.past_key_values)

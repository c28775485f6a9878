"""`PHDLM`: lm-evaluation-harness's model interface over a native PHD model.

Likelihoods come from the full training-time forward (`PHDTransformer.forward`, the same code that was trained):
one pass per batch of right-padded sequences; padding sits after every real token, which the PHD rule never lets
a real token see, so no mask is needed and each row's log-probabilities equal its unpadded ones. Greedy text
generation (`generate_until`) uses the PHD cache through `phd.generate`.

Requests are encoded like lm-eval's own Hugging Face model: trailing spaces of the context move to the
continuation, the continuation's tokens are those of context + continuation after the context's, and the
context is cut from the left when context + continuation exceed `max_length`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..errors import InputError
from ..model import PHDTransformer


class PHDLM(LM):
    """lm-eval model: `model` a native PHDTransformer, `tokenizer` a transformers tokenizer (fast or slow)."""

    def __init__(
        self,
        model: PHDTransformer,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        prefix_token_id: int | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} is invalid: it must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.max_length = max_length or model.config.max_seq_len
        candidates = (prefix_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
        prefix = next((c for c in candidates if c is not None), None)
        if prefix is None:
            raise InputError(
                "the tokenizer declares neither an eos nor a bos token: pass prefix_token_id (the token that "
                "stands before a request with an empty context)"
            )
        self.prefix_token_id = int(prefix)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    # ----- tokens -----
    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    # ----- scoring -----
    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair.

        Pairs are scored in batches sorted by length (longest first); an empty context is preceded by the
        prefix token.
        """
        inputs = []
        for context, continuation in pairs:
            if not continuation:
                raise InputError("a request has an empty continuation: there is nothing to score")
            context = context or [self.prefix_token_id]
            tokens = (context + continuation)[-(self.max_length + 1):]
            inputs.append((tokens[:-1], len(continuation), continuation))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="scoring", unit="batch", disable=not self.progress or len(starts) < 2):
            batch = order[start:start + self.batch_size]
            width = len(inputs[batch[0]][0])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                seq = inputs[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
            logprobs = F.log_softmax(self.model(ids.to(self.device)).logits.float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                seq, n, continuation = inputs[i]
                lp = logprobs[row, len(seq) - n: len(seq)]
                target = torch.tensor(continuation)
                total = float(lp.gather(1, target[:, None]).sum())
                results[i] = (total, bool((lp.argmax(dim=-1) == target).all()))
        return results

    # ----- the lm-eval interface -----
    def loglikelihood(self, requests: Iterable[Any]) -> list[tuple[float, bool]]:
        return self.score([self._encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests: Iterable[Any]) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of max_length tokens."""
        out = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            ]
            out.append(sum(lp for lp, _ in self.score(windows)))
        return out

    @torch.no_grad()
    def generate_until(self, requests: Iterable[Any]) -> list[str]:
        """Greedy continuation with the PHD cache until a stop string or max_gen_toks tokens."""
        from ..inference import generate

        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            tokens = generate(self.model, torch.tensor(ids, device=self.device), max_new, stop_tokens=stops)
            text = self.tokenizer.decode(tokens[len(ids):].tolist(), skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out

"""Evaluation: validation loss / perplexity on token shards, and downstream tasks through lm-eval.

`evaluate_loss` needs only the core package; `phd.eval.harness` (PHDLM), `phd.eval.tasks` and
`phd.eval.downstream` need the `eval` extra (`pip install "phd[eval]"`).
"""

from .perplexity import LossResult, evaluate_loss

__all__ = ["LossResult", "evaluate_loss"]

"""`phd bench serving` runs both engines on the same compute threads: the native engine's torch threads and the
cores vLLM's workers bind (no vLLM needed to check the choice)."""

from __future__ import annotations

import os

import pytest

from phd.bench.serving import _compute_cores


def test_default_is_all_allowed_cores_but_one_named_explicitly():
    allowed = sorted(os.sched_getaffinity(0))
    n, bind = _compute_cores(None, None)
    assert n == max(1, len(allowed) - 1) and bind == ",".join(map(str, allowed[:n]))
    assert _compute_cores(1, None) == (1, str(allowed[0]))
    assert _compute_cores(10_000, None)[0] == len(allowed)  # never more threads than cores to bind


def test_a_bind_already_set_is_kept_and_counted():
    assert _compute_cores(None, "0-3,6") == (5, "0-3,6")
    assert _compute_cores(2, "1,3") == (2, "1,3")


@pytest.mark.parametrize("threads, bind, says", [(2, "0", "disagree"), (None, "0-x", "core list"),
                                                  (None, "0-1|2-3", "core list")])
def test_a_bind_that_cannot_match_the_native_threads_is_refused(threads, bind, says):
    with pytest.raises(SystemExit, match=says):
        _compute_cores(threads, bind)

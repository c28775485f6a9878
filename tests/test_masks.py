import itertools

import pytest
import torch

from phd.masks import AttentionLayout, allowed, reference_mask, split_index


def spec_rule(n, j, m, i, window, chunk):
    """Spec section 3, written out literally with integers (independent of phd.masks)."""
    if (i == 1 and m < n) or (m == n and i <= j):
        return True
    if window is not None and j >= 2 and i >= 2 and n - window <= m < n:
        return chunk is None or m // chunk == n // chunk
    return False


@pytest.mark.parametrize(
    "T, K, W, C", [(5, 1, None, None), (6, 3, None, None), (9, 2, 1, None), (9, 3, 2, 4), (10, 4, 5, 3), (7, 2, 3, 1)]
)
def test_reference_mask_is_the_spec_rule(T, K, W, C):
    mask = reference_mask(T, K, W, C)
    assert mask.shape == (K * T, K * T) and mask.dtype == torch.bool
    for q, k in itertools.product(range(K * T), repeat=2):
        n, j, m, i = q // K, q % K + 1, k // K, k % K + 1
        assert bool(mask[q, k]) == spec_rule(n, j, m, i, W, C), (n, j, m, i)


def test_originals_never_see_hidden_tokens_and_k1_is_causal():
    mask = reference_mask(12, 3, 4, 8)
    assert not mask[0::3][:, [c for c in range(36) if c % 3]].any()
    assert torch.equal(reference_mask(9, 1, 4, 2), torch.ones(9, 9, dtype=torch.bool).tril())


def test_window_counts_positions_and_chunks_clip_it():
    # hidden query (n=5, j=2) with W=2: hidden keys of positions 3 and 4, not 2
    q_pos, q_copy = torch.tensor(5), torch.tensor(2)
    seen = [m for m in range(6) if allowed(q_pos, q_copy, torch.tensor(m), torch.tensor(2), 2, None)]
    assert seen == [3, 4, 5]
    # the same query with chunks of 4: position 3 is in chunk 0, position 5 in chunk 1
    seen = [m for m in range(6) if allowed(q_pos, q_copy, torch.tensor(m), torch.tensor(2), 2, 4)]
    assert seen == [4, 5]


def test_split_layout_is_a_permutation_of_the_interleaved_one():
    T, K, W, C = 11, 3, 2, 4
    pos, copy = split_index(T, K)
    assert pos[:T].tolist() == list(range(T)) and copy[:T].eq(1).all()
    inter = (pos * K + copy - 1).tolist()
    assert sorted(inter) == list(range(T * K))
    ref = reference_mask(T, K, W, C)
    perm = torch.tensor(inter)
    assert torch.equal(AttentionLayout(T, K, W, C).dense_mask(), ref[perm][:, perm])


def test_naive_layout_is_plain_causal():
    mask = AttentionLayout(5, 3, naive=True).dense_mask()
    assert torch.equal(mask, torch.ones(15, 15, dtype=torch.bool).tril())


def test_mask_mod_matches_dense_mask():
    layout = AttentionLayout(9, 3, 2, 4)
    n = layout.num_tokens
    q = torch.arange(n)[:, None].expand(n, n)
    k = torch.arange(n)[None, :].expand(n, n)
    assert torch.equal(layout.mask_mod()(0, 0, q, k), layout.dense_mask())

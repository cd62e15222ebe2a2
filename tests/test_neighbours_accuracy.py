"""The shared brute-force search (`dino.eval.neighbours`) and top-k accuracy (`dino.eval.accuracy`) against
plain reference implementations, including ties and chunk boundaries."""

import pytest
import torch

from dino.eval.accuracy import topk_accuracy, topk_hits
from dino.eval.neighbours import exact_search


@pytest.mark.parametrize("chunk_rows", [1, 7, 50, 1000])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_exact_search_matches_a_full_stable_sort(chunk_rows, k):
    torch.manual_seed(0)
    # integer-valued features: many exactly equal scores, so tie order is tested too
    db = torch.randint(-2, 3, (50, 4)).float()
    queries = torch.randint(-2, 3, (6, 4)).float()
    scores, ids = exact_search(db, queries, k, chunk_rows=chunk_rows)
    full = queries @ db.T
    expected_scores, expected_ids = full.sort(dim=1, descending=True, stable=True)
    assert ids.shape == scores.shape == (6, min(k, 50))
    torch.testing.assert_close(scores, expected_scores[:, :k])
    # returned ids hold exactly the returned scores, and equal scores come in database order
    torch.testing.assert_close(full.gather(1, ids), scores)
    for row_scores, row_ids in zip(scores, ids):
        for a in range(len(row_ids) - 1):
            if row_scores[a] == row_scores[a + 1]:
                assert row_ids[a] < row_ids[a + 1]
    if k == 50:  # the whole database: exactly the stable sort
        assert torch.equal(ids, expected_ids)


def test_exact_search_clips_k_and_handles_an_empty_database():
    db, queries = torch.randn(3, 2), torch.randn(2, 2)
    assert exact_search(db, queries, 10)[1].shape == (2, 3)
    scores, ids = exact_search(torch.zeros(0, 2), queries, 4)
    assert scores.shape == ids.shape == (2, 0)
    with pytest.raises(ValueError, match="chunk_rows"):
        exact_search(db, queries, 1, chunk_rows=0)


def test_topk_hits_and_accuracy():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4]])
    labels = torch.tensor([0, 1, 0, 2])
    # top-1: row 0 only; top-2: rows 0, 1 (0.2 is second), 2 (0.3 second), 3 (0.4 second)
    assert topk_hits(scores, labels, (1, 2, 3, 10)).tolist() == [1, 4, 4, 4]
    assert topk_accuracy(scores, labels, 1) == pytest.approx(25.0)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(100.0)
    assert torch.isnan(torch.tensor(topk_accuracy(scores[:0], labels[:0], 1)))

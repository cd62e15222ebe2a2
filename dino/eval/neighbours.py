"""Exact nearest neighbours by inner product, and whether FAISS is there to do it faster.

One brute-force search for the whole project: the retrieval and copy-detection rankings (`dino.eval.retrieval`)
and the torch fallback index of `dino search` / `dino duplicates` (`dino.inference.search`) both use it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def exact_search(database: Tensor, queries: Tensor, k: int, chunk_rows: int = 65536) -> tuple[Tensor, Tensor]:
    """Brute-force inner-product search: (scores, ids), each (num_queries, min(k, N)), best first.

    The database (N, D) is scanned in chunks of `chunk_rows` rows and only the best k of each are kept, so
    memory is O(num_queries · (k + chunk_rows)), never a (queries × N) matrix for a small k.  Equal scores are
    ordered by database index, lower first (with k = N this is a stable sort of the whole database); which of
    several rows tied at the k-th score is returned is unspecified.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    num_rows = database.shape[0]
    k = min(int(k), num_rows)
    best_scores = queries.new_empty((queries.shape[0], 0))
    best_ids = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, num_rows, chunk_rows):
        scores = queries @ database[start : start + chunk_rows].T
        ids = torch.arange(start, start + scores.shape[1], device=scores.device).expand_as(scores)
        if scores.shape[1] > k:
            scores, top = scores.topk(k, dim=1)
            ids = ids.gather(1, top)
        best_scores, best_ids = torch.cat((best_scores, scores), dim=1), torch.cat((best_ids, ids), dim=1)
        if best_scores.shape[1] > max(k, chunk_rows):  # bound the candidates kept between chunks
            best_scores, top = best_scores.topk(k, dim=1)
            best_ids = best_ids.gather(1, top)
    # best first, ties by index: order by index, then a stable sort by score
    best_ids, by_index = best_ids.sort(dim=1)
    best_scores, order = best_scores.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    return best_scores[:, :k], best_ids.gather(1, order)[:, :k]

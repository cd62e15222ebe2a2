"""Nearest neighbours and near-duplicates over extracted features.

Features from `dino extract` are L2-normalised by default, so the inner product is the cosine similarity.
`build_index` uses FAISS when it is installed (exact `IndexFlatIP`, or IVF-PQ for large collections) and
otherwise a plain torch matrix product, which is exact and fine up to a few million rows.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dino.errors import UserError
from dino.eval.neighbours import exact_search, faiss_available

INDEX_KINDS = ("auto", "exact", "ivfpq", "torch")
# below this many rows "auto" stays exact: IVF-PQ needs enough vectors to train its coarse and PQ codebooks
IVFPQ_MIN_ROWS = 100_000


class TorchIndex:
    """Exact inner-product search with torch (the fallback when faiss is not installed)."""

    def __init__(self, features: np.ndarray, chunk_rows: int = 65536):
        self.features = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.chunk_rows = chunk_rows
        self.ntotal = len(self.features)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        # scanned in chunks so a huge index never needs a (queries × N) matrix at once
        scores, ids = exact_search(self.features, q, k, self.chunk_rows)
        return scores.numpy(), ids.numpy()


def build_index(features: np.ndarray, kind: str = "auto", nlist: int | None = None, pq_m: int = 16, nprobe: int = 16):
    """An index with `.search(queries, k) -> (scores, ids)` over inner products of the rows of `features`.

    kind: auto (faiss exact below 100k rows, IVF-PQ above; torch when faiss is missing) | exact (faiss flat)
    | ivfpq | torch.
    """
    if kind not in INDEX_KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    if kind == "torch" or (kind == "auto" and not faiss_available()):
        return TorchIndex(features)
    if not faiss_available():
        raise UserError(f"index kind {kind!r} needs faiss: pip install 'dino[faiss]' (or use --index torch)")
    import faiss

    n, dim = features.shape
    if kind == "exact" or (kind == "auto" and n < IVFPQ_MIN_ROWS):
        index = faiss.IndexFlatIP(dim)
        index.add(features)
        return index
    if dim % pq_m:
        raise UserError(f"IVF-PQ needs the feature size {dim} to be divisible by pq_m={pq_m}")
    nlist = nlist or max(1, int(4 * np.sqrt(n)))
    if n < 39 * nlist:
        raise UserError(
            f"IVF-PQ with {nlist} lists needs at least {39 * nlist} vectors to train, got {n}; use --index exact"
        )
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    index.train(features)
    index.add(features)
    index.nprobe = nprobe
    return index


def search(index, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (num_queries, k), best first."""
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.asarray(scores), np.asarray(ids)


@dataclass
class DuplicatePair:
    first: int
    second: int
    similarity: float


def near_duplicates(features: np.ndarray, threshold: float = 0.95, chunk_rows: int = 4096) -> list[DuplicatePair]:
    """All pairs i < j with inner product ≥ threshold (cosine for normalised features), most similar first.

    Exact, in row chunks of `chunk_rows` × N similarities (memory O(chunk_rows · N)).
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    pairs: list[DuplicatePair] = []
    for start in range(0, len(x), chunk_rows):
        block = x[start : start + chunk_rows] @ x.T
        rows, cols = torch.nonzero(block >= threshold, as_tuple=True)
        rows = rows + start
        upper = cols > rows
        for i, j in zip(rows[upper].tolist(), cols[upper].tolist()):
            pairs.append(DuplicatePair(i, j, float(block[i - start, j])))
    pairs.sort(key=lambda p: -p.similarity)
    return pairs


def write_duplicates_csv(pairs: Sequence[DuplicatePair], paths: Sequence[str], out_path: str | os.PathLike) -> Path:
    import csv
    import io

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # the csv module quotes paths holding commas, quotes or line breaks, so every row reads back as 3 fields
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["similarity", "first", "second"])
    writer.writerows([f"{p.similarity:.6f}", paths[p.first], paths[p.second]] for p in pairs)
    out_path.write_text(buffer.getvalue(), encoding="utf-8")
    return out_path


def write_contact_sheet_html(
    query_paths: Sequence[str],
    results: Sequence[Sequence[tuple[str, float]]],
    out_path: str | os.PathLike,
    thumb_px: int = 160,
) -> Path:
    """An HTML page: one row per query, the query image then its neighbours with their similarity."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def cell(path: str, caption: str) -> str:
        uri = Path(path).resolve().as_uri()
        return (
            f'<td><img src="{html.escape(uri)}" style="max-width:{thumb_px}px;max-height:{thumb_px}px"><br>'
            f"<small>{html.escape(caption)}</small></td>"
        )

    rows = []
    for query, neighbours in zip(query_paths, results):
        cells = [cell(query, "query: " + os.path.basename(query))]
        cells += [cell(path, f"{score:.3f} {os.path.basename(path)}") for path, score in neighbours]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    out_path.write_text("<html><body><table>" + "".join(rows) + "</table></body></html>\n", encoding="utf-8")
    return out_path


def write_contact_sheet_png(
    query_paths: Sequence[str],
    results: Sequence[Sequence[tuple[str, float]]],
    out_path: str | os.PathLike,
    thumb_px: int = 128,
) -> Path:
    """The same grid as one PNG (queries in the first column, similarities written under each thumbnail)."""
    from PIL import Image, ImageDraw

    from dino.data.datasets import CorruptImageError
    from dino.data.transforms import load_image_for

    columns = 1 + max((len(r) for r in results), default=0)
    caption_px = 14
    sheet = Image.new("RGB", (columns * thumb_px, len(query_paths) * (thumb_px + caption_px)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (query, neighbours) in enumerate(zip(query_paths, results)):
        items = [(query, "query")] + [(p, f"{s:.3f}") for p, s in neighbours]
        for col, (path, caption) in enumerate(items):
            try:
                thumb = load_image_for(path, thumb_px)  # a thumbnail needs no full decode of a huge image
                thumb.thumbnail((thumb_px, thumb_px))
            except CorruptImageError:
                thumb = Image.new("RGB", (thumb_px, thumb_px), "gray")
            x, y = col * thumb_px, row * (thumb_px + caption_px)
            sheet.paste(thumb, (x, y))
            draw.text((x + 2, y + thumb_px), caption, fill="black")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path)
    return out_path

"""Revisited Oxford / Paris retrieval: revisitop metrics against hand-worked values and an independent
brute-force implementation, the three protocols, the dataset layout checks, and an end-to-end run of
eval_image_retrieval.py on a tiny generated dataset in the official on-disk format."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino.errors import UserError
from dino.eval import retrieval as R
from dino.hub import save_backbone
from dino.models import build_backbone

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_VIT = dict(arch="vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2)


def save_tiny_vit(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    kwargs = dict(TINY_VIT)
    model = build_backbone(kwargs.pop("arch"), kwargs.pop("patch_size"), **kwargs)
    save_backbone(model, path, model_kwargs=dict(TINY_VIT))
    return path


# ------------------------------------------------------------------------- independent reference


def reference_query_scores(ranking, ok, junk, kappas):
    """AP and P@k of one query written from the definitions: drop the junk from the list, walk it, add a
    trapezoid (precision just before and just after each hit, width 1/|ok|) at every positive."""
    ok, junk = set(int(i) for i in ok), set(int(i) for i in junk)
    cleaned = [int(i) for i in ranking if int(i) not in junk]
    true_positives = 0
    ap = 0.0
    hit_positions = []  # 1-based
    for index, item in enumerate(cleaned):
        if item in ok:
            before = 1.0 if index == 0 else true_positives / index
            true_positives += 1
            after = true_positives / (index + 1)
            ap += 0.5 * (before + after) / len(ok)
            hit_positions.append(index + 1)
    precisions = []
    for k in kappas:
        cutoff = min(k, hit_positions[-1])
        precisions.append(sum(1 for p in hit_positions if p <= cutoff) / cutoff)
    return ap, precisions


# -------------------------------------------------------------------------------------- metrics


def test_compute_ap_hand_worked():
    # positives at 0-based positions 0 and 2 of 2: ½(1+1)·½ + ½(½+⅔)·½ = 19/24
    assert R.compute_ap([0, 2], 2) == pytest.approx(19 / 24)
    # a single positive at position 1: ½(0 + ½) = ¼
    assert R.compute_ap([1], 1) == pytest.approx(0.25)
    # positives never retrieved add nothing: one of two found at the top → ½
    assert R.compute_ap([0], 2) == pytest.approx(0.5)


def test_junk_is_removed_by_shifting_positions():
    # ranking: junk 7, positive 3, other 5, positive 4 → junk-free positions 0 and 2 → AP 19/24
    ranks = np.array([[7], [3], [5], [4]])
    scores = R.compute_map(ranks, [{"ok": [3, 4], "junk": [7]}], kappas=(1, 5, 10))
    assert scores.map == pytest.approx(19 / 24)
    assert R.positions_without_junk(ranks[:, 0], np.array([3, 4]), np.array([7])).tolist() == [0, 2]
    # without the junk entry the positives sit at 1 and 3: a lower AP
    unjunked = R.compute_map(ranks, [{"ok": [3, 4], "junk": []}], kappas=(1,))
    assert unjunked.map == pytest.approx(R.compute_ap([1, 3], 2)) and unjunked.map < 19 / 24


def test_precision_at_k_divides_by_min_of_k_and_last_positive():
    # positives at 1-based positions 1 and 3 (after junk removal)
    ranks = np.array([[3], [9], [5], [4], [6], [0], [1], [2], [8], [7]])
    scores = R.compute_map(ranks, [{"ok": [3, 4], "junk": [9]}], kappas=(1, 2, 5, 10))
    # k=1: 1/1; k=2: 1/2; k=5: min(5, 3)=3 → 2/3; k=10: 2/3 (not 2/10)
    assert scores.p_at_k[0].tolist() == pytest.approx([1.0, 0.5, 2 / 3, 2 / 3])


def test_query_without_positives_is_nan_and_excluded():
    ranks = np.array([[0, 0], [1, 1], [2, 2]])
    gnd = [{"ok": [1], "junk": []}, {"ok": [], "junk": [0]}]
    scores = R.compute_map(ranks, gnd, kappas=(1, 5))
    assert np.isnan(scores.aps[1]) and np.isnan(scores.p_at_k[1]).all()
    assert scores.map == pytest.approx(R.compute_ap([1], 1))  # the mean over the one valid query
    assert scores.mp_at_k.tolist() == pytest.approx([0.0, 0.5])  # P@1 = 0/1, P@5 → min(5, 2) = 2 → 1/2
    all_empty = R.compute_map(ranks, [{"ok": [], "junk": []}] * 2)
    assert np.isnan(all_empty.map)


def test_compute_map_matches_brute_force_on_random_rankings():
    rng = np.random.default_rng(0)
    n_db, n_queries, kappas = 40, 12, (1, 5, 10)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_queries)], axis=1)
    gnd = []
    for q in range(n_queries):
        chosen = rng.permutation(n_db)
        n_ok = 0 if q == 3 else int(rng.integers(1, 8))
        n_junk = int(rng.integers(0, 6))
        gnd.append({"ok": chosen[:n_ok], "junk": chosen[n_ok : n_ok + n_junk]})
    scores = R.compute_map(ranks, gnd, kappas)
    expected_aps, expected_prs = [], []
    for q in range(n_queries):
        if len(gnd[q]["ok"]) == 0:
            assert np.isnan(scores.aps[q])
            continue
        ap, prs = reference_query_scores(ranks[:, q], gnd[q]["ok"], gnd[q]["junk"], kappas)
        assert scores.aps[q] == pytest.approx(ap)
        assert scores.p_at_k[q].tolist() == pytest.approx(prs)
        expected_aps.append(ap)
        expected_prs.append(prs)
    assert scores.map == pytest.approx(np.mean(expected_aps))
    assert scores.mp_at_k.tolist() == pytest.approx(np.mean(expected_prs, axis=0).tolist())


# ------------------------------------------------------------------------------------ protocols


def test_protocol_sets():
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [0, 0, 1, 1]}]
    sets = {p: R.protocol_ground_truth(gnd, p)[0] for p in R.PROTOCOLS}
    assert sorted(sets["easy"]["ok"]) == [0, 1] and sorted(sets["easy"]["junk"]) == [2, 3]
    assert sorted(sets["medium"]["ok"]) == [0, 1, 2] and sorted(sets["medium"]["junk"]) == [3]
    assert sorted(sets["hard"]["ok"]) == [2] and sorted(sets["hard"]["junk"]) == [0, 1, 3]


def test_evaluate_protocols_hand_worked():
    gnd = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [1], "hard": [], "junk": []}]
    ranks = np.array([[4, 1], [3, 0], [2, 2], [0, 3], [1, 4]])
    scores = R.evaluate_protocols(ranks, gnd)
    # query 0, easy: junk {3, 2} removed → [4, 0, 1]: positives at 1, 2 → ¼·½ + (½+⅔)/2·½ = 5/12
    assert scores["easy"].aps[0] == pytest.approx(5 / 12)
    # medium: junk {3} removed → [4, 2, 0, 1]: positives at 1, 2, 3 of 3 → 1/12 + 7/36 + 17/72 = 37/72
    assert scores["medium"].aps[0] == pytest.approx(37 / 72)
    # hard: junk {3, 0, 1} removed → [4, 2]: positive at 1 of 1 → ¼
    assert scores["hard"].aps[0] == pytest.approx(1 / 4)
    # query 1 has an empty hard set: nan under Hard, excluded from its mean
    assert np.isnan(scores["hard"].aps[1])
    assert scores["hard"].map == pytest.approx(1 / 4)
    assert scores["easy"].aps[1] == pytest.approx(1.0)
    assert scores["easy"].map == pytest.approx((5 / 12 + 1) / 2)


# ------------------------------------------------------------------------------ ranking, features


def test_rank_database_is_cosine_order():
    torch.manual_seed(0)
    db, queries = torch.randn(9, 5), torch.randn(3, 5)
    ranks = R.rank_database(db * torch.rand(9, 1) * 5, queries, backend="torch")  # scaling must not matter
    cosine = torch.nn.functional.cosine_similarity(db[:, None], queries[None], dim=-1)
    for q in range(3):
        expected = sorted(range(9), key=lambda i: -float(cosine[i, q]))
        assert ranks[:, q].tolist() == expected
    assert R.rank_database(db, queries, backend="torch", top=4).shape == (4, 3)


def test_crop_to_patch_multiple_keeps_top_left():
    images = torch.arange(2 * 3 * 19 * 21, dtype=torch.float32).reshape(2, 3, 19, 21)
    cropped = R.crop_to_patch_multiple(images, 8)
    assert cropped.shape == (2, 3, 16, 16)
    assert torch.equal(cropped, images[..., :16, :16])
    assert R.crop_to_patch_multiple(torch.zeros(1, 3, 5, 20), 8).shape == (1, 3, 8, 16)


def test_multiscale_feature_is_normalised_mean_over_scales():
    class SumModel(torch.nn.Module):
        """A 'backbone' whose feature is [mean pixel, height, width]: shows which inputs it saw."""

        patch_size = 4

        def forward(self, x):
            return torch.stack(
                [
                    x.mean(dim=(1, 2, 3)),
                    torch.full((x.shape[0],), float(x.shape[-2])),
                    torch.full((x.shape[0],), float(x.shape[-1])),
                ],
                dim=1,
            )

    images = torch.ones(1, 3, 32, 24)
    feature = R.make_retrieval_feature_fn(4, multiscale=True)(SumModel(), images)
    # scales 1, 1/√2, 1/2 of 32x24 → 32x24, 22x16 → cropped 20x16, 16x12
    expected = torch.tensor([[1.0, (32 + 20 + 16) / 3, (24 + 16 + 12) / 3]])
    assert torch.allclose(feature, torch.nn.functional.normalize(expected, dim=1))
    single = R.make_retrieval_feature_fn(4, multiscale=False)(SumModel(), images)
    assert torch.allclose(single, torch.nn.functional.normalize(torch.tensor([[1.0, 32.0, 24.0]]), dim=1))


# --------------------------------------------------------------------------------------- dataset


def write_revisitop(root: Path, dataset: str = "roxford5k", n_db: int = 6, size: int = 48) -> Path:
    """<root>/<dataset>/jpg/*.jpg + gnd_<dataset>.pkl; query q0 is an exact copy of db image 0."""
    folder = root / dataset
    (folder / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    db_names = [f"{dataset}_db_{i:02d}" for i in range(n_db)]
    for name in db_names:
        pixels = rng.integers(0, 256, size=(size, size + 8 * (len(name) % 2), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "jpg" / f"{name}.jpg", quality=95)
    query_names = ["query_0", "query_1"]
    shutil.copy(folder / "jpg" / f"{db_names[0]}.jpg", folder / "jpg" / "query_0.jpg")
    shutil.copy(folder / "jpg" / f"{db_names[3]}.jpg", folder / "jpg" / "query_1.jpg")
    gnd = [
        {"bbx": [2.0, 3.0, 40.4, 44.6], "easy": [0], "hard": [1], "junk": [2]},
        {
            "bbx": [0.0, 0.0, 30.0, 30.0],
            "easy": np.array([3, 4]),
            "hard": np.array([], dtype=np.int64),
            "junk": np.array([5]),
        },
    ]
    with open(folder / f"gnd_{dataset}.pkl", "wb") as handle:
        pickle.dump({"imlist": db_names, "qimlist": query_names, "gnd": gnd}, handle)
    return root


def test_load_revisitop_reads_the_official_layout(tmp_path):
    write_revisitop(tmp_path)
    data = R.load_revisitop(str(tmp_path), "roxford5k")
    assert len(data.db_names) == 6 and data.query_names == ["query_0", "query_1"]
    assert data.query_paths[0].endswith("roxford5k/jpg/query_0.jpg")
    assert data.query_boxes[0] == (2.0, 3.0, 40.4, 44.6)
    # pointing at the dataset folder itself works too
    assert R.load_revisitop(str(tmp_path / "roxford5k"), "roxford5k").db_names == data.db_names


def test_load_revisitop_layout_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="rparis6k"):
        R.load_revisitop(str(tmp_path), "rparis6k")
    with pytest.raises(UserError, match="Did you mean: roxford5k"):
        R.load_revisitop(str(tmp_path), "roxford5")
    write_revisitop(tmp_path)
    (tmp_path / "roxford5k" / "jpg" / "roxford5k_db_04.jpg").unlink()
    with pytest.raises(UserError, match="roxford5k_db_04.jpg"):
        R.load_revisitop(str(tmp_path), "roxford5k")
    (tmp_path / "roxford5k" / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(UserError, match="gnd_roxford5k.pkl"):
        R.load_revisitop(str(tmp_path), "roxford5k")


def test_ground_truth_reader_refuses_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Exploit()]}))
    with pytest.raises(UserError, match="refusing"):
        R.read_ground_truth(str(path))


def test_query_crop_and_thumbnail(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 100, 3), dtype=np.uint8)).save(path)
    full = R.RetrievalImages([str(path)], imsize=50)[0][0]
    assert full.shape == (3, 20, 50)  # longer side to 50, aspect kept
    cropped = R.RetrievalImages([str(path)], imsize=50, boxes=[(10.4, 0.0, 30.6, 20.0)])[0][0]
    assert cropped.shape == (3, 20, 21)  # box rounded to (10, 0, 31, 20); never enlarged


# ------------------------------------------------------------------------------------ end to end


def _run_script(argv):
    sys.path.insert(0, str(REPO_ROOT))
    import eval_image_retrieval

    return eval_image_retrieval.main(argv)


@pytest.mark.parametrize("extra", [[], ["--multiscale", "--crop_queries"]])
def test_script_end_to_end(tmp_path, monkeypatch, extra):
    data = write_revisitop(tmp_path / "data")
    weights = save_tiny_vit(tmp_path / "tiny.pth")
    output = tmp_path / "out"
    distractors = tmp_path / "distractors"
    distractors.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(distractors / "d0.jpg")
    rankings = []
    rank_database = R.rank_database
    monkeypatch.setattr(
        R, "rank_database", lambda *args, **kwargs: rankings.append(rank_database(*args, **kwargs)) or rankings[-1]
    )
    results = _run_script(
        [
            "--data_path",
            str(data),
            "--dataset",
            "roxford5k",
            "--imsize",
            "32",
            "--pretrained_weights",
            str(weights),
            "--device",
            "cpu",
            "--num_workers",
            "0",
            "--output_dir",
            str(output),
            "--distractors",
            str(distractors),
            "--ranking",
            "torch",
            *extra,
        ]
    )
    written = json.loads((output / "retrieval_roxford5k.json").read_text())
    assert set(written["results"]) == {"easy", "medium", "hard"}
    for protocol in ("easy", "medium", "hard"):
        assert set(written["results"][protocol]) == {"mAP", "mP@1", "mP@5", "mP@10"}
    assert written["protocol"]["distractors"] == 1
    if not extra:
        # query_0 is an exact copy of its only easy positive, so it is ranked first under Easy
        assert written["per_query_ap"]["easy"]["query_0"] == pytest.approx(100.0)
        assert written["protocol"]["crop_queries"] is False
    # query_1 has no hard positives: nan → null, excluded from the Hard mean
    assert written["per_query_ap"]["hard"]["query_1"] is None
    # every AP from the ranking the run made, by the revisitop definitions (write_revisitop's ground truth):
    # Easy counts the easy images and ignores the hard ones, Medium counts both, Hard counts the hard ones
    # and ignores the easy ones; the 'junk' images are ignored by all three
    (ranks,) = rankings
    assert ranks.shape == (7, 2)  # 6 database images + 1 distractor, 2 queries
    truth = [dict(easy=[0], hard=[1], junk=[2]), dict(easy=[3, 4], hard=[], junk=[5])]
    for protocol, ok_of, junk_of in (
        ("easy", ["easy"], ["junk", "hard"]),
        ("medium", ["easy", "hard"], ["junk"]),
        ("hard", ["hard"], ["junk", "easy"]),
    ):
        aps = []
        for q, name in enumerate(["query_0", "query_1"]):
            ok = [i for key in ok_of for i in truth[q][key]]
            junk = [i for key in junk_of for i in truth[q][key]]
            if ok:
                aps.append(100.0 * reference_query_scores(ranks[:, q], ok, junk, (1,))[0])
                assert written["per_query_ap"][protocol][name] == pytest.approx(aps[-1])
        assert results["results"][protocol]["mAP"] == pytest.approx(np.mean(aps))


def test_script_wrong_layout_names_the_expected_file(tmp_path):
    (tmp_path / "roxford5k" / "jpg").mkdir(parents=True)
    with pytest.raises(UserError, match=r"gnd_roxford5k\.pkl"):
        _run_script(["--data_path", str(tmp_path), "--device", "cpu"])
    with pytest.raises(UserError, match="--data_path"):
        _run_script(["--device", "cpu"])

"""bench/scale_replicate.py, the shortcut behind the 1M and 10M scale figures: a copied row must
score, link and group as its source does, and a row that is not copied must stay once."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import scale_replicate as rep  # noqa: E402

from memstage.gpu.lexical_index import LexicalIndex  # noqa: E402
from memstage.stores import artifacts  # noqa: E402

TEXTS = ["red apples and pears", "apples again", "a green boat", "red boat sails", "pears only"]
KEEP = np.array([False, True, True, False, True])  # row 0 and 3: the planted conversation, once


def test_copied_rows_score_as_their_sources_in_bm25(tmp_path: Path) -> None:
    LexicalIndex.build(TEXTS).save(tmp_path / "lex")
    pos = rep.positions(KEEP, 3)
    rep.copy_lexical(tmp_path / "lex", tmp_path / "out", KEEP, pos)
    base, copy = LexicalIndex.load(tmp_path / "lex"), LexicalIndex.load(tmp_path / "out")
    assert copy.n == 5 + 2 * 3
    for word in ["appl", "pear", "boat", "red", "green"]:
        want = base.dense_scores([word])
        got = copy.dense_scores([word])
        np.testing.assert_array_equal(got[:5], want)  # the originals unchanged
        for k in (1, 2):
            kept = np.flatnonzero(KEEP)
            np.testing.assert_array_equal(got[pos[k, kept]], want[kept])  # each copy as its source
    assert np.all(np.diff(np.asarray(copy.indices)[copy.indptr[0] : copy.indptr[1]]) > 0)  # rows sorted


def test_copied_structure_keeps_sessions_and_links_within_each_copy(tmp_path: Path) -> None:
    session = np.array([0, 0, 1, 1, 1], np.int32)
    keep = np.array([False, False, True, True, True])  # session 1 is synthetic
    arrays = {
        "session": session,
        "prev": np.array([-1, 0, -1, 2, 3], np.int64),
        "next": np.array([1, -1, 3, 4, -1], np.int64),
        "speaker": np.array([0, 1, 2, 3, 2], np.int32),
        "days": np.array([5, 5, 9, 9, 9], np.int32),
    }
    for name, array in arrays.items():
        artifacts.save_array(tmp_path / f"L0.{name}.npy", array)
    out = tmp_path / "out"
    out.mkdir()
    src, copy = rep.copied(keep, 3)
    rep.copy_structure(tmp_path, out, src, copy, rep.positions(keep, 3))
    got = {name: np.load(out / f"L0.{name}.npy") for name in [*arrays, "session_start"]}
    assert got["session"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert got["session_start"].tolist() == [0, 2, 5, 8]
    assert got["prev"].tolist() == [-1, 0, -1, 2, 3, -1, 5, 6, -1, 8, 9]
    assert got["next"].tolist() == [1, -1, 3, 4, -1, 6, 7, -1, 9, 10, -1]
    assert got["speaker"].tolist() == arrays["speaker"][src].tolist()

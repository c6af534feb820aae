"""`gpu.triton_scoring`'s kernels score every row as `gpu.device_scoring`'s torch ops do (with and
without the turn terms: a neighbour turn's best passage, a passage below its turn's best), and the
best rows come back the same, on a synthetic level 0 (sessions of 1..40 rows, turns split into passages,
speakers, event days). The torch ops themselves are checked against the host's `score_rows` by
tests/tasks/test_retrieve_index.py.

Runs on a CUDA card with triton, or on the CPU under triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 where no card is; the test extras install triton). Skipped without triton.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from memstage.gpu import device_scoring, triton_scoring
from memstage.gpu.device_scoring import DeviceLevel0, Int8Rows, Question, device_vectors

ON_CARD = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not triton_scoring.available() or not (ON_CARD or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton on a CUDA card, or TRITON_INTERPRET=1",
)
DIMS, VOCAB, SPEAKERS = 384, 60, 5


def level(seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple, dict[str, np.ndarray]]:
    """int8 codes and scales, a BM25 matrix (CSC) and the structure arrays of a random level 0."""
    rng = np.random.default_rng(seed)
    prev, nxt, session, speaker, days = [], [], [], [], []
    row = 0
    for s in range(80):
        turns = [int(rng.integers(1, 4)) if rng.random() < 0.2 else 1 for _ in range(rng.integers(1, 25))]
        firsts = np.cumsum([row] + turns[:-1]).tolist()
        day = int(rng.integers(19000, 19400)) if rng.random() < 0.8 else device_scoring.NO_DAY
        for t, parts in enumerate(turns):
            who = int(rng.integers(-1, SPEAKERS))
            for _ in range(parts):
                prev.append(firsts[t - 1] if t else -1)
                nxt.append(firsts[t + 1] if t + 1 < len(turns) else -1)
                session.append(s)
                speaker.append(who)
                days.append(day)
        row += sum(turns)
    n = row
    codes = rng.integers(-127, 128, (n, DIMS)).astype(np.int8)
    scale = (rng.random(n) * 0.01 + 0.002).astype(np.float32)
    dense = (rng.random((n, VOCAB)) < 0.08) * rng.random((n, VOCAB)) * 3
    indptr = np.concatenate([[0], np.cumsum((dense > 0).sum(0))])
    indices = np.concatenate([np.flatnonzero(dense[:, c]) for c in range(VOCAB)]).astype(np.int32)
    data = np.concatenate([dense[dense[:, c] > 0, c] for c in range(VOCAB)]).astype(np.float32)
    structure = {
        "prev": np.array(prev, np.int64),
        "next": np.array(nxt, np.int64),
        "session": np.array(session, np.int64),
        "speaker": np.array(speaker, np.int64),
        "days": np.array(days, np.int32),
    }
    return codes, scale, (data, indices, indptr), structure


def questions(seed: int = 1) -> list[Question]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(6):
        q = rng.normal(size=DIMS)
        out.append(
            Question(
                qvec=q / np.linalg.norm(q),
                dense_mean=0.01 * i,
                dense_sd=0.05 + 0.01 * i,
                columns=tuple(int(c) for c in rng.choice(VOCAB, size=i, replace=False)),
                named=(int(rng.integers(0, SPEAKERS)),) * (i % 3 == 1) + (0, 1) * (i % 3 == 2),
                day_ranges=((19100, 19200),) if i % 2 else (),
            )
        )
    return out


def weights(top: int = 3, turns: bool = True) -> device_scoring.Weights:
    return device_scoring.Weights(
        w_dense=0.7,
        neighbour=0.5,
        no_neighbour=-1.0,
        session=0.4,
        session_top=top,
        turn_neighbour=turns,
        passage_rest=-0.2 if turns else 0.0,
        speaker=0.6,
        speaker_session=0.3,
        period=0.8,
    )


@pytest.mark.parametrize(("top", "turns"), [(3, True), (2, True), (3, False)])
def test_kernels_score_every_row_as_the_torch_ops_do(top, turns):
    dev = torch.device("cuda" if ON_CARD else "cpu")
    codes, scale, lexical, structure = level()
    kernels = DeviceLevel0(
        Int8Rows(torch.from_numpy(codes).to(dev), torch.from_numpy(scale).to(dev)), lexical, structure
    )
    assert kernels.kernels and kernels.runs is not None and kernels.maps is not None and kernels.passages
    assert kernels.maps.turn_width == 4  # turns of up to 3 passages
    ops = DeviceLevel0(device_vectors(codes, scale, dev, torch.float64), lexical, structure, torch.float64)
    assert not ops.kernels and ops.pad is not None
    w = weights(top, turns)
    for q in questions():
        got = kernels.score(q, w).double().cpu().numpy()
        want = ops.score(q, w).cpu().numpy()
        assert kernels.kernels, "a kernel failed and the torch ops ran instead"
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
        rows, vals = kernels.top(q, w, 25)  # the best 25 up to float32 near-ties, best first
        assert len(set(rows.tolist())) == 25 and np.all(np.diff(vals) <= 0)
        assert want[rows].min() >= np.sort(want)[-25] - 2e-4
        np.testing.assert_allclose(vals, want[rows], rtol=0, atol=2e-4)


def test_session_kernel_counts_equal_scores_as_a_sort_does():
    """Ties and short sessions: the mean of the best `top` is what sorting each session gives."""
    dev = torch.device("cuda" if ON_CARD else "cpu")
    sessions = [[5.0, 5.0, 5.0, 1.0], [2.0, 2.0], [7.0, 3.0, 3.0, 3.0, 1.0], [4.0], [-1.0, -1.0, 0.5, 0.5]]
    scores = torch.tensor([x for s in sessions for x in s], device=dev)
    size = torch.tensor([len(s) for s in sessions], dtype=torch.int32, device=dev)
    start = torch.cumsum(size.long(), 0) - size.long()
    speakers = [[0, 1, 1, 0], [2, 2], [2, 2, 1, 0, 2], [2], [2, 2, 2, 1]]
    speaker = torch.tensor([x for s in speakers for x in s], dtype=torch.int32, device=dev)
    assert speaker.shape == scores.shape
    named = torch.tensor([0.0, 1.0, 0.0], device=dev)  # speaker 1 is named
    for top in (1, 2, 3, 4):
        mean, any_named = triton_scoring.sessions(scores, start, size, 5, top, named, speaker)
        want = [np.mean(sorted(s, reverse=True)[:top]) for s in sessions]
        np.testing.assert_allclose(mean.cpu().numpy(), want, rtol=0, atol=1e-6)
        assert any_named.cpu().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]

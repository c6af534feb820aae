"""Scoring every level-0 row on a device (`gpu.device_scoring`): the host's half, and when it runs.

Where a namespace's vectors go to a CUDA card (torch sees one, and the vector backend is not forced
to the CPU), `tasks.retrieve` scores all of level 0 there instead of a candidate set:
MEMSTAGE_DEVICE_SCORING is auto (there), off, or cpu (the same torch code on the CPU: slow, O(n) a
question, for checking the path where no card is). The host makes each question's inputs: the
dense z statistics, the BM25 columns of its scored words, the speakers it is about and the
event-day ranges of its periods, with the namespace's years, as an exhaustive scan sees them.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np

from memstage.gpu.vector_index import pick_backend
from memstage.settings import get_settings
from memstage.tasks import scoring

K_DEVICE = 4096  # best rows sent back when no budget is given (`Retriever.rank`)
# With a budget: at least K_MIN rows, more for budgets of over 2,048 tokens. A 1000-token budget packs
# 40-100 memories, found within the first ~75 ranked on average at 10M (duplicates skipped); 1,024
# rows cost 2.36 ms a question at 10M on an H200 against 3.03 ms for 4,096 (the copy back and the
# host's arrays; bench/results/device_level_h200.json).
K_MIN = 1024
K_MAX = 16384


def rows_for(budget: int | None) -> int:
    """How many of the best rows come back for packing a budget of `budget` tokens."""
    if budget is None:
        return K_DEVICE
    return min(K_MAX, max(K_MIN, 1 << max(budget // 2 - 1, 0).bit_length()))


def wanted(backend: str | None = None) -> str | None:
    """The torch device level 0 is scored on, or None (the candidate path)."""
    mode = get_settings().device_scoring
    if mode == "cpu":
        return "cpu"
    if mode == "auto" and pick_backend(backend) == "torch-cuda":
        return "cuda"
    return None


def scans_codes(device: str | None) -> bool:
    """Whether level 0 is scored on a card by the triton kernels straight from its int8 codes (no
    float copy of the vectors needed there)."""
    from memstage.gpu import triton_scoring

    return device is not None and device != "cpu" and triton_scoring.available()


def device_level(ns: Any, device: str) -> Any:
    """Level 0 of a loaded namespace, uploaded: on a card with triton, the int8 codes as stored
    (`gpu.triton_scoring` scans them); else vectors dequantised on the device (fp16 on a card, float64
    on the CPU, where the check against numpy wants its precision); BM25 and structure."""
    import torch

    from memstage.gpu.device_scoring import DeviceLevel0, Int8Rows, device_vectors, upload

    level = ns.levels[0]
    on_card = device != "cpu"
    vectors = level.dense.device_rows if on_card else None  # the dense backend's copy, when it has one
    if scans_codes(device):
        dev = torch.device(device)
        vectors = Int8Rows(upload(level.codes, dev, torch.int8), upload(level.scale, dev, torch.float32))
    elif vectors is None:
        dtype = torch.float16 if on_card else torch.float64
        vectors = device_vectors(level.codes, level.scale, torch.device(device), dtype)
    lexical = (level.lexical.data, level.lexical.indices, level.lexical.indptr)
    structure = {k: getattr(ns, k) for k in ("prev", "next", "session", "speaker", "days")}
    return DeviceLevel0(vectors, lexical, structure, torch.float32 if on_card else torch.float64)


def weights() -> Any:
    """`tasks.scoring`'s weights as they are now (tests change them)."""
    from memstage.gpu.device_scoring import Weights

    s = scoring
    return Weights(
        w_dense=s.W_DENSE,
        neighbour=s.NEIGHBOUR,
        no_neighbour=s.NO_NEIGHBOUR,
        session=s.SESSION,
        session_top=s.SESSION_TOP,
        turn_neighbour=s.TURN_NEIGHBOUR,
        passage_rest=s.PASSAGE_REST,
        speaker=s.SPEAKER,
        speaker_session=s.SPEAKER_SESSION,
        period=s.PERIOD,
    )


def question_inputs(ns: Any, qvec: np.ndarray, scored: list[str], question: str, today: date | None) -> Any:
    from memstage.gpu.device_scoring import Question

    level = ns.levels[0]
    vocab = level.lexical.vocab
    periods, relative = scoring.question_periods(question), scoring.relative_periods(question, today)
    ranges = scoring.day_ranges(periods, relative, ns.years) if periods or relative else []
    return Question(
        qvec=qvec,
        dense_mean=float(qvec @ level.mean),
        dense_sd=float(np.sqrt(max(float(qvec @ level.cov @ qvec), 0.0))),
        columns=tuple(vocab[w] for w in scored if w in vocab),
        named=tuple(sorted(scoring.named_in(ns, question))),
        day_ranges=tuple(ranges),
    )


def top_rows(
    ns: Any, qvec: np.ndarray, scored: list[str], question: str, today: date | None, k: int = K_DEVICE
) -> tuple[np.ndarray, np.ndarray]:
    """The k best level-0 rows of the whole namespace and their scores, best first."""
    return ns.device.top(question_inputs(ns, qvec, scored, question, today), weights(), k)

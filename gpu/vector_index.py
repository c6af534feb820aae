"""Exact vector search over normalised embeddings: FAISS on CPU, FAISS on GPU, or torch on CUDA.

A `VectorIndex` owns one matrix of vectors and the memory ids of its rows. The backend is chosen
automatically (FAISS GPU where FAISS sees GPUs, torch on CUDA where only torch does, FAISS CPU
otherwise) and can be forced with `backend=` or MEMSTAGE_VECTOR_BACKEND. Saved as a FAISS flat
index file plus a sidecar of ids, so an artifact written on a GPU host loads on a CPU one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from memstage.settings import get_settings

BACKENDS = ("faiss-cpu", "faiss-gpu", "torch-cuda")


def pick_backend(backend: str | None = None) -> str:
    chosen = backend or get_settings().vector_backend
    if chosen != "auto":
        if chosen not in BACKENDS:
            raise ValueError(f"unknown vector backend {chosen!r}; choose one of {BACKENDS} or 'auto'")
        return chosen
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    try:
        import torch

        if torch.cuda.is_available():
            return "torch-cuda"
    except ImportError:  # pragma: no cover
        pass
    return "faiss-cpu"


class VectorIndex:
    """Inner-product (cosine, for normalised vectors) exact search over a set of ids."""

    def __init__(self, dims: int, backend: str | None = None) -> None:
        self.dims = dims
        self.backend = pick_backend(backend)
        self.ids: list[str] = []
        self._cpu = faiss.IndexFlatIP(dims)  # the artifact's form; also the CPU search path
        self._device_index = None  # faiss GPU index or torch fp16 matrix, rebuilt lazily

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dims or len(ids) != vectors.shape[0]:
            raise ValueError(f"expected {len(ids)} x {self.dims} vectors, got {vectors.shape}")
        self._cpu.add(vectors)
        self.ids.extend(ids)
        self._device_index = None

    def vectors(self) -> np.ndarray:
        if len(self.ids) == 0:
            return np.zeros((0, self.dims), dtype=np.float32)
        return faiss.rev_swig_ptr(self._cpu.get_xb(), len(self.ids) * self.dims).reshape(-1, self.dims).copy()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k rows per query: (scores [q, k'], ids [q][k']) with k' = min(k, len)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, len(self.ids))
        if k == 0:
            return np.zeros((queries.shape[0], 0), np.float32), [[] for _ in range(queries.shape[0])]
        if self.backend == "torch-cuda":
            scores, rows = self._search_torch(queries, k)
        elif self.backend == "faiss-gpu":
            if self._device_index is None:
                res = faiss.StandardGpuResources()
                self._device_index = faiss.index_cpu_to_gpu(res, 0, self._cpu)
                self._gpu_res = res
            scores, rows = self._device_index.search(queries, k)
        else:
            scores, rows = self._cpu.search(queries, k)
        return scores, [[self.ids[r] for r in row if r >= 0] for row in rows]

    def _search_torch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from memstage.gpu.fused_search import topk_ip  # fused scan + top-k where it measured faster

        if self._device_index is None:
            self._device_index = torch.from_numpy(self.vectors()).to("cuda", torch.float16).contiguous()
        q = torch.from_numpy(queries).to("cuda", torch.float16)
        scores, rows = topk_ip(self._device_index, q, k)
        return scores.float().cpu().numpy(), rows.cpu().numpy()

    def save(self, path: Path) -> None:
        """Write `path` (FAISS flat index) and `path.ids.json`, each via a temp file and rename."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        faiss.write_index(self._cpu, str(tmp))
        os.replace(tmp, path)
        ids_path = Path(str(path) + ".ids.json")
        tmp_ids = ids_path.with_suffix(".tmp")
        tmp_ids.write_text(json.dumps(self.ids))
        os.replace(tmp_ids, ids_path)

    @classmethod
    def load(cls, path: Path, backend: str | None = None) -> VectorIndex:
        path = Path(path)
        cpu = faiss.read_index(str(path))
        index = cls(cpu.d, backend)
        index._cpu = cpu
        index.ids = json.loads(Path(str(path) + ".ids.json").read_text())
        if len(index.ids) != cpu.ntotal:
            raise ValueError(
                f"{path}: {cpu.ntotal} vectors but {len(index.ids)} ids; rebuild with `memstage run index`"
            )
        return index

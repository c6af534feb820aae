"""The encoder's threaded tokenisation gives exactly the ids of the model's own tokenizer call."""

from __future__ import annotations

import pytest


def test_threaded_token_ids_match_the_tokenizer(encoder) -> None:
    texts = [f"Maya: I moved to Lisbon in {y}, near the river." for y in range(1990, 2600)]
    texts += ["word " * 400, "", "   ", "émoji 🤖 ünïcode", "Sam: we adopted a beagle named Pepper."]
    tok = encoder.model.tokenizer
    expected = tok(texts, truncation=True, max_length=encoder.model.max_seq_length, padding=False)[
        "input_ids"
    ]
    got = encoder.token_ids(texts)
    assert got == expected
    assert max(map(len, got)) == encoder.model.max_seq_length  # the long text was truncated, not dropped
    assert encoder.token_ids(texts[:3]) == expected[:3]  # fewer texts than threads


@pytest.fixture(scope="module")
def fp32_encoder():
    from memstage.gpu.encoder import Encoder

    return Encoder(device="cpu", dtype="float32")


def test_batched_path_matches_sentence_transformers_on_cpu(fp32_encoder) -> None:
    """The batched path (`_encode_fast`, what CUDA and a bf16 CPU run) gives sentence-transformers'
    vectors, in input order, whatever the lengths (here on CPU, in fp32)."""
    import numpy as np

    encoder = fp32_encoder
    texts = [f"Maya: I moved to Lisbon in {y}, near the river." * (1 + y % 7) for y in range(1990, 2290)]
    texts += ["word " * 400, "x", "émoji 🤖 ünïcode", "Sam: we adopted a beagle named Pepper."]
    want = encoder.model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    got = encoder._encode_fast(texts, 64)
    assert got.shape == want.shape and got.dtype == np.float32
    assert float(np.min(np.sum(got * want, axis=1))) > 0.99999


def test_tokenised_batches_are_the_padded_token_ids(encoder) -> None:
    texts = [f"turn {k}: " + "words " * (k % 13) for k in range(700)]
    ids = encoder.token_ids(texts)
    seen = []
    for idx, future in encoder.tokenise_batches(texts, 256):
        matrix = future.result()
        assert matrix.shape[1] == max(len(ids[i]) for i in idx)  # padded to the batch's longest only
        for row, i in zip(matrix.tolist(), idx, strict=True):
            assert row[: len(ids[i])] == ids[i] and set(row[len(ids[i]) :]) <= {0}
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(texts)))


def test_light_encoder_gives_sentence_transformers_vectors(encoder) -> None:
    """A query process's encoder (transformers alone, no sentence-transformers import) embeds exactly as
    the indexes were embedded."""
    import numpy as np

    from memstage.gpu.encoder import Encoder

    light = Encoder(device="cpu", light=True)
    texts = [f"Maya: I moved to Lisbon in {y}." for y in range(1990, 2060)]
    texts += ["word " * 400, "", "émoji 🤖 ünïcode", "What is the name of Sam's dog?"]
    a, b = encoder.encode(texts), light.encode(texts)
    assert a.shape == b.shape and b.dtype == np.float32
    assert float(np.abs(a - b).max()) < 1e-5 and light.token_ids(texts) == encoder.token_ids(texts)


def test_bfloat16_vectors_stay_within_float32s(fp32_encoder) -> None:
    """MEMSTAGE_ENCODER_DTYPE=bfloat16 (auto's choice on CPUs with bf16 instructions): every vector keeps
    a cosine of at least 0.9999 to float32's, and the nearest neighbour of each question is unchanged."""
    import numpy as np

    from memstage.gpu.encoder import Encoder

    bf16 = Encoder(device="cpu", dtype="bfloat16")
    docs = [f"Maya: I moved to Lisbon in {y}, near the river." for y in range(1990, 2030)]
    docs += [
        "Sam: we adopted a beagle named Pepper.",
        "Ana: my sister runs a bakery in Porto.",
        "word " * 300,
    ]
    questions = ["What is the name of Sam's dog?", "Where does Ana's sister work?", "When did Maya move?"]
    a, b = fp32_encoder.encode(docs + questions), bf16.encode(docs + questions)
    assert b.dtype == np.float32 and a.shape == b.shape
    assert float(np.min(np.sum(a * b, axis=1))) >= 0.9999
    n = len(docs)
    assert (np.argmax(a[n:] @ a[:n].T, axis=1) == np.argmax(b[n:] @ a[:n].T, axis=1)).all()


def test_encoder_dtype_follows_the_setting_and_the_cpu(monkeypatch) -> None:
    from memstage.gpu.encoder import cpu_has_bf16, encoder_dtype
    from memstage.settings import reload_settings

    monkeypatch.delenv("MEMSTAGE_ENCODER_DTYPE", raising=False)
    reload_settings()
    try:
        assert encoder_dtype("cuda:0") == "float16"
        assert encoder_dtype("cpu") == ("bfloat16" if cpu_has_bf16() else "float32")
        monkeypatch.setenv("MEMSTAGE_ENCODER_DTYPE", "float32")
        reload_settings()
        assert encoder_dtype("cpu") == encoder_dtype("cuda") == "float32"
    finally:
        monkeypatch.delenv("MEMSTAGE_ENCODER_DTYPE", raising=False)
        reload_settings()


def test_pretokenised_input_gives_the_same_ids_and_vectors() -> None:
    """Texts tokenised elsewhere (`tokenise`, what a flow's worker pool sends a GPU encoder) carry the
    encoder's own ids, and the same Encoder gives the same vectors for them as for the texts, in input
    order; also with the CUDA path's padding to a multiple of 8 tokens (masked out of the pooling)."""
    import numpy as np

    from memstage.gpu.encoder import Encoder, tokenise

    encoder = Encoder(device="cpu", light=True, dtype="float32")
    texts = [f"Maya: I moved to Lisbon in {y}, near the river." * (1 + y % 5) for y in range(1990, 2190)]
    texts += ["word " * 400, "", "x", "émoji 🤖 ünïcode", "Sam: we adopted a beagle named Pepper."]
    tokens = tokenise(texts)
    assert len(tokens) == len(texts) and tokens.flat.dtype == np.int32
    ids = encoder.token_ids(texts)
    assert [
        tokens.flat[a:b].tolist() for a, b in zip(tokens.offsets[:-1], tokens.offsets[1:], strict=True)
    ] == ids
    want = encoder.encode(texts)
    for pad_multiple in (1, 8):
        encoder.pad_multiple = pad_multiple
        got = encoder.encode(tokens)
        assert got.shape == want.shape and got.dtype == np.float32
        assert float(np.abs(got - want).max()) < 1e-5, pad_multiple
    assert encoder.encode(tokenise([])).shape == (0, encoder.dims)

"""MEMSTAGE_ENCODER_MODEL: another sentence-transformers folder embeds instead of the packaged MiniLM.

Rules checked: a folder memstage cannot use is refused with a clear error (missing, not a model
folder, pooling other than the mean); the model's name and dimensions come from its folder and
are written into the index manifest; a namespace indexed with one model is not searched with
another (a clear error, not wrong vectors); stored embeddings of other dimensions are refused. The
"other" model here is the packaged MiniLM under another folder name (CI has no second model; the
bench `bench/encoder_compare.py` measured all-mpnet-base-v2 this way on the real data).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import SAMPLE

from memstage.gpu import encoder as enc
from memstage.stores.store import MemoryStore, NamespaceError


def _copy(tmp_path: Path, name: str) -> Path:
    """The packaged model's folder under another name: its files linked, its configs copied."""
    src, dst = Path(enc.read_model_info(enc.model_path()).path), tmp_path / name
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".json":
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, target)
    return dst


def test_a_folder_memstage_cannot_use_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        enc.read_model_info(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a sentence-transformers model folder"):
        enc.read_model_info(str(tmp_path / "empty"))
    cls = _copy(tmp_path, "cls-pooled")
    pooling = cls / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    pooling.write_text(
        json.dumps({**config, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True})
    )
    with pytest.raises(ValueError, match="mean of its tokens"):
        enc.read_model_info(str(cls))


def test_the_chosen_model_names_the_index_and_guards_its_search(tmp_path, monkeypatch, token_counter) -> None:
    from memstage.tasks.build_batch import build_indexes
    from memstage.tasks.index import run_index
    from memstage.tasks.ingest import commit_events, parse_file
    from memstage.tasks.retrieve import Retriever

    other = _copy(tmp_path, "minilm-elsewhere")
    monkeypatch.setenv("MEMSTAGE_ENCODER_MODEL", str(other))
    enc.get_settings.cache_clear()
    chosen = enc.Encoder(device="cpu", light=True)
    assert (chosen.name, chosen.dims) == ("minilm-elsewhere", 384)
    store = MemoryStore(tmp_path / "home")
    commit_events(store, *parse_file(SAMPLE, "jsonl"))
    run_index(store, "demo", embed=chosen.encode, count_tokens=token_counter.count_many)
    build_indexes(store, "demo")
    assert set(store.current_indexes("demo").column("model").to_pylist()) == {"minilm-elsewhere"}
    assert Retriever(store, chosen, token_counter).retrieve("demo", "Where does Alex work?", 200)["memories"]

    monkeypatch.delenv("MEMSTAGE_ENCODER_MODEL")
    enc.get_settings.cache_clear()
    default = enc.Encoder(device="cpu", light=True)
    assert default.name == enc.MODEL_NAME
    with pytest.raises(NamespaceError, match="minilm-elsewhere"):
        Retriever(store, default, token_counter).retrieve("demo", "Where does Alex work?", 200)


def test_embeddings_of_other_dimensions_are_refused() -> None:
    from memstage.tasks.index_build import embedding_matrix

    column = pa.chunked_array([pa.array([[0.1] * 8, [0.2] * 8], pa.list_(pa.float32()))])
    assert embedding_matrix(column, 8).shape == (2, 8)
    with pytest.raises(ValueError, match="8-8 dimensions, the embedding model in use 384"):
        embedding_matrix(column)

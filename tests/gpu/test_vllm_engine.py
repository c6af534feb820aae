"""The vLLM engine: greedy answers token-identical with and without prefix caching (GPU), and its CPU-side parts.

The GPU tests need CUDA and vllm (`pip install "memstage[gpu]"`) and skip, saying which is missing,
elsewhere; the rest runs everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from memstage.gpu.generator import make_generator
from memstage.tasks.generate import build_messages

SAMPLE = Path(__file__).resolve().parents[2] / "cli" / "samples" / "sample_conversation.jsonl"


def gpu_skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device: the vllm engine runs on CUDA only"
    if importlib.util.find_spec("vllm") is None:
        return 'vllm is not installed: pip install "memstage[gpu]"'
    return None


def models_root() -> Path:
    return Path(os.environ["MEMSTAGE_MODELS"])


@pytest.fixture(scope="module")
def vllm_generator():
    reason = gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    # Eager mode keeps the test's engine start short; the bench checks identity with CUDA graphs on.
    gen = make_generator("vllm", models_root(), enforce_eager=True, gpu_memory_utilization=0.3)
    yield gen
    gen.close()


def memory_prompt(question: str) -> list[dict[str, str]]:
    """memstage's layout over the bundled sample conversation: a long shared prefix, then the question."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    memories = [
        {
            "memory_id": f"m{i}",
            "text": f"{r.get('speaker', '')}: {r.get('text', '')}",
            "event_time": r.get("time"),
        }
        for i, r in enumerate(rows)
    ]
    return build_messages({"question": question, "memories": memories})


@pytest.mark.gpu
def test_vllm_greedy_tokens_identical_with_and_without_prefix_cache(vllm_generator) -> None:
    gen = vllm_generator
    for question in ("What is the name of Sam's puppy?", "Where does Maya live?"):
        ids = gen.prompt_ids(memory_prompt(question))
        cold, cold_res = gen.generate_ids(ids, max_new_tokens=24, skip_prefix_cache=True)
        assert cold_res.cached_tokens == 0 and len(cold) > 0
        warm, warm_res = gen.generate_ids(ids, max_new_tokens=24)
        assert warm_res.cached_tokens >= len(ids) // 2, "the second run of the same prompt hit no cache"
        assert warm == cold


@pytest.mark.gpu
def test_vllm_answers_and_streams(vllm_generator) -> None:
    pieces: list[str] = []
    r = vllm_generator.generate(
        [{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, on_text=pieces.append
    )
    assert "Paris" in r.text and "".join(pieces) == r.text
    assert r.prompt_tokens > 5 and 0 < r.ttft_s <= r.total_s and r.completion_tokens > 0


def test_vllm_engine_refuses_a_cpu_device(tmp_path) -> None:
    with pytest.raises(ValueError, match="CUDA only"):
        make_generator("vllm", tmp_path, device="cpu", model="unused")


def test_vllm_missing_says_what_to_install(monkeypatch) -> None:
    from memstage.gpu.vllm_engine import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed, on any host
    with pytest.raises(RuntimeError, match=r"memstage\[gpu\]"):
        import_vllm()


def test_llama_dummy_folder_keeps_the_tokenizer_and_sets_the_8b_shape(tmp_path, token_counter) -> None:
    from memstage.gpu.tokenizer import ensure_converted
    from memstage.gpu.vllm_engine import llama_dummy_folder

    smol = ensure_converted(models_root())
    folder = Path(llama_dummy_folder(tmp_path / "llama8b", smol))
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (
        4096,
        32,
        8,
    )
    assert config["vocab_size"] >= json.loads((smol / "config.json").read_text())["vocab_size"]
    assert (folder / "tokenizer.json").read_bytes() == (smol / "tokenizer.json").read_bytes()
    small = json.loads(
        Path(llama_dummy_folder(tmp_path / "small", smol, num_hidden_layers=2))
        .joinpath("config.json")
        .read_text()
    )
    assert small["num_hidden_layers"] == 2 and small["hidden_size"] == 4096

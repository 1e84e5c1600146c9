"""The LLM's words as the client sees them: an OpenAI-compatible chat completion, bounded and
cleaned; and a voice message as text, from the same kind of server."""

import html
import itertools
import json
import logging
import re
import struct
import time

import requests
from urllib3.exceptions import HTTPError as TransportError, ReadTimeoutError
from urllib3.util import Timeout

MAX_ANSWER_CHARS = 6000  # longer answers are cut: a client reads a couple of messages, not 254
MAX_BYTES = 1 << 20  # all that is read for one answer, reasoning and protocol included
MAX_VOICE_CHARS = 2000  # of a transcription: two minutes of speech are about 1,500
log = logging.getLogger("llm")

# What happened — what to change: (English for the log, Russian for the owner's --check).
# {part} is LLM or STT, so each names its own settings; LLM_TIMEOUT is the deadline of both.
_ADVICE = {
    "key": ("the server refused the key ({what}) — check {part}_API_KEY",
            "сервер не принял ключ ({what}) — проверьте {part}_API_KEY"),
    "model": ("model {model!r} or this address is unknown ({what}) — check {part}_MODEL (Ollama: "
              "ollama pull <model>) and that {part}_BASE_URL ends with /v1",
              "сервер не знает модель {model!r} или этот адрес ({what}) — проверьте {part}_MODEL "
              "(Ollama: ollama pull <модель>) и что {part}_BASE_URL оканчивается на /v1"),
    "limit": ("rate limit or no credit left ({what}) — wait, or check your plan and balance with "
              "the provider", "лимит запросов или кончились деньги на счёте ({what}) — подождите "
              "или проверьте тариф и баланс у провайдера"),
    "server": ("the server failed ({what}) — look at its log or try again later",
               "сбой на сервере ({what}) — посмотрите его журнал или повторите позже"),
    "late": ("no answer within LLM_TIMEOUT ({timeout:g} s) — raise LLM_TIMEOUT or pick a faster "
             "model", "нет ответа за LLM_TIMEOUT ({timeout:g} с) — увеличьте LLM_TIMEOUT или "
             "выберите модель быстрее"),
    "connect": ("cannot reach the server ({what}) — start the {part} server or correct "
                "{part}_BASE_URL", "сервер недоступен ({what}) — запустите его или исправьте "
                "{part}_BASE_URL"),
    "malformed": ("not an OpenAI-compatible API ({what}) — check {part}_BASE_URL, it usually ends "
                  "with /v1", "это не OpenAI-совместимый API ({what}) — проверьте {part}_BASE_URL, "
                  "обычно он оканчивается на /v1"),
    "broken": ("the answer broke off half-way — look at the server's log or try again later",
               "ответ оборвался на середине — посмотрите журнал сервера или повторите позже"),
    "empty": ("the model gave no text, maybe only reasoning — raise LLM_MAX_TOKENS or pick "
              "another LLM_MODEL", "модель не дала текста, возможно, только рассуждала — "
              "увеличьте LLM_MAX_TOKENS или выберите другую LLM_MODEL"),
    "cut": ("the answer was cut (max_tokens or the size cap) before one whole sentence — raise "
            "LLM_MAX_TOKENS", "ответ оборван (LLM_MAX_TOKENS или предел размера) раньше, чем "
            "кончилось первое предложение — увеличьте LLM_MAX_TOKENS"),
    "silent": ("no speech in the voice message", "в голосовом сообщении не распознано речи"),
}
_STATUS_KINDS = {401: "key", 403: "key", 400: "model", 404: "model", 405: "model", 402: "limit",
                 429: "limit"}


class LLMError(Exception):
    """No usable answer. str() is one English line for the log, .advice the same in Russian for
    the owner; neither holds a URL or key. .kind is a key of _ADVICE, .status the HTTP status or
    None."""

    def __init__(self, cfg, kind, what="", status=None, part="LLM"):
        model = getattr(cfg, part.lower() + "_model", "")
        english, russian = (f"{part}: " + text.format(what=what, model=model, part=part,
                                                      timeout=cfg.llm_timeout)
                            for text in _ADVICE[kind])
        super().__init__(english)
        self.kind, self.status, self.advice = kind, status, russian


def check(cfg) -> list[tuple[bool | None, str]]:
    """Lines for --check, in Russian. The LLM is asked as the bot asks (streamed when LLM_STREAM),
    so a gateway that breaks streams shows here. The STT probe sends one second of Opus silence in
    a valid voice.ogg, as the bot sends a voice message: a working server answers 200 (empty text
    counts), so any error status is a real fault — a 4xx says the model or the endpoint is wrong."""
    return [_check_llm(cfg), _check_stt(cfg)]


def _check_llm(cfg):
    if not cfg.llm_base_url:
        return None, ("LLM: выключен (LLM_BASE_URL пуст) — вместо рекомендации клиенты получают "
                      "короткий стандартный текст")
    if not cfg.llm_model:
        return False, "LLM: LLM_MODEL пуст при заданном LLM_BASE_URL — укажите имя модели"
    try:
        raw, finish = _ask(cfg, "Answer with one word.", "Say: ready")
        _final(cfg, raw, finish)
    except LLMError as error:
        return False, error.advice
    untagged, lone = getattr(cfg, "llm_reasoning_untagged", False), _LONE_CLOSE.match(raw)
    if lone and not untagged:
        return False, ("LLM: модель рассуждает без открывающего <think> (в ответе одинокий "
                       "</think>), черновики покажут клиентам её рассуждения — поставьте "
                       "LLM_REASONING_UNTAGGED=1")
    return True, f"LLM: модель {cfg.llm_model} отвечает" + (
        "" if lone or not untagged else "; в ответе нет </think>, а LLM_REASONING_UNTAGGED=1 "
        "скрывает черновики до него — если модель так не рассуждает, поставьте 0")


def _check_stt(cfg):
    if not (model := getattr(cfg, "stt_model", "")):
        return None, ("STT: распознавание голоса выключено (STT_MODEL пуст) — на голосовое "
                      "сообщение бот просит написать текстом")
    try:
        transcribe(cfg, _silence())
    except LLMError as error:
        if error.kind != "silent":
            return False, error.advice
    return True, f"STT: модель {model} распознаёт голос (проверено секундой тишины)"


def complete(cfg, system: str, user: str, on_text=None, session=None, stream=True) -> str:
    """The model's clean plain-text answer to a system + user message pair (stream=False: never
    streamed); LLMError when there is none. cfg.llm_timeout covers all, connect to last byte.
    on_text(text_so_far) sees the cleaned text of a stream grow ("" while the model only reasons);
    only the return value is final. A cut answer (max_tokens, the size cap, the deadline) ends at
    its last whole sentence; a stream ending with neither "data: [DONE]" nor a finish_reason broke
    off: LLMError."""
    return _final(cfg, *_ask(cfg, system, user, on_text, session, stream))


def _ask(cfg, system, user, on_text=None, session=None, stream=True):
    """(raw content, finish_reason); finish_reason "length" at a cap, "late" at the deadline."""
    deadline = time.monotonic() + cfg.llm_timeout
    payload = {"model": cfg.llm_model, "max_tokens": cfg.llm_max_tokens,
               "stream": stream and cfg.llm_stream, "messages": [
                   {"role": "system", "content": system}, {"role": "user", "content": user}]}
    url = cfg.llm_base_url.rstrip("/") + "/chat/completions"
    with _post(cfg, "LLM", url, cfg.llm_api_key, session, json=payload) as response:
        lines = _lines(cfg, response, deadline)
        # Told by the body, not the Content-Type: gateways label streams as JSON or plain text.
        first = next((line for line in lines if line is None or line.strip()), b"")
        lines = itertools.chain([first], lines)
        if first is not None and re.match(rb"(?:data|event|id|retry)?:", first.lstrip()):
            return _from_stream(cfg, lines, on_text)
        return _from_json(cfg, lines)


def _post(cfg, part, url, key, session, **body):
    """The 2xx response to a POST, to be read as it streams in; else LLMError."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = (session or requests).post(url, headers=headers, stream=True,
                                              timeout=Timeout(total=cfg.llm_timeout), **body)
    except (requests.RequestException, ValueError) as error:  # its str holds the URL: class only
        kind = "late" if isinstance(error, requests.ReadTimeout) else "connect"
        raise LLMError(cfg, kind, type(error).__name__, part=part) from None
    if (status := response.status_code) // 100 != 2:
        response.close()
        kind = _STATUS_KINDS.get(status, "server" if status >= 500 else "malformed")
        raise LLMError(cfg, kind, f"HTTP {status}", status, part)
    return response


def _lines(cfg, response, deadline, part="LLM"):
    """The body's lines as they arrive, then None if MAX_BYTES cut it short. Each read is one system
    call (read1) with the socket timeout set to the time left: a trickling server cannot stretch
    the deadline."""
    sock = getattr(response.raw.connection, "sock", None)
    settimeout = getattr(sock, "settimeout", lambda seconds: None)  # none for a test double
    buffer, total = bytearray(), 0
    while total < MAX_BYTES:
        if (left := deadline - time.monotonic()) <= 0:
            raise LLMError(cfg, "late", part=part)
        try:
            settimeout(left)
            data = response.raw.read1(min(16384, MAX_BYTES - total), decode_content=True)
        except (TransportError, OSError) as error:
            kind = "late" if isinstance(error, ReadTimeoutError) else "broken"
            raise LLMError(cfg, kind, part=part) from None
        if not data:
            break
        total += len(data)
        buffer += data
        if b"\n" in data:  # splitting only then keeps a long line linear
            *lines, buffer = buffer.split(b"\n")
            yield from lines
    yield buffer if total < MAX_BYTES else None


def _from_json(cfg, lines):
    """A whole JSON completion, also when a server does not stream; reasoning fields are ignored."""
    try:  # a None in lines (over MAX_BYTES: no completion is that big) is a TypeError too
        choice = json.loads(b"\n".join(lines))["choices"][0]
        raw = choice["message"].get("content") or ""
        if not isinstance(raw, str):  # another JSON value where the text belongs
            raise TypeError
        return raw, choice.get("finish_reason")
    except (ValueError, LookupError, TypeError, AttributeError):
        raise LLMError(cfg, "malformed", "no JSON completion") from None


def _from_stream(cfg, lines, on_text):
    """Server-sent events up to "data: [DONE]" or the event with a finish_reason: a server may hold
    the connection open after either. What arrived before the deadline is a cut answer."""
    drafts = _Drafts(on_text, getattr(cfg, "llm_reasoning_untagged", False))
    try:
        for data in _events(lines):
            if data is None or drafts.full():
                return drafts.raw, "length"  # a cap cuts the answer as max_tokens would
            if data == b"[DONE]":
                return drafts.raw, "stop"
            text, reasoning, finish = _event(cfg, data)
            if text or reasoning:
                drafts.add(text)
            if finish:
                return drafts.raw, finish
    except LLMError as error:
        if error.kind != "late":
            raise
        return drafts.raw, "late"
    raise LLMError(cfg, "broken")


def _events(lines):
    """The data of each server-sent event: its "data:" lines joined with \\n up to a blank line
    (the SSE rule), then None if MAX_BYTES cut the body. Comments and other fields are skipped."""
    data = []
    for line in lines:
        if line is None:
            yield None
            return
        if line.startswith(b"data:"):
            data.append(line[5:].strip())  # JSON breaks lines between tokens only
        if data and (not line.strip() or data == [b"[DONE]"]):
            yield b"\n".join(data)
            data = []
    if data:  # the last event, without its blank line
        yield b"\n".join(data)


def _event(cfg, data):
    """(content, whether it carries reasoning, finish_reason) of one streamed chunk."""
    try:
        event = json.loads(data)
        choice = event["choices"][0] if event.get("choices") else {}  # usage-only chunks: []
        delta = choice.get("delta") or {}
        text, finish = delta.get("content"), choice.get("finish_reason")
        reasoning = bool(delta.get("reasoning_content") or delta.get("reasoning"))
    except (ValueError, LookupError, TypeError, AttributeError):
        raise LLMError(cfg, "malformed", "no JSON event") from None
    if event.get("error"):
        raise LLMError(cfg, "server", "an error event mid-answer")
    return text if isinstance(text, str) else "", reasoning, finish


class _Drafts:
    """A stream's raw content, and on_text's view of it: cleaned, never shorter, "" while it may
    all be reasoning (LLM_REASONING_UNTAGGED: up to a lone </think>)."""

    def __init__(self, on_text, untagged):
        self.on_text, self.hidden = on_text or (lambda text: None), untagged
        self.raw, self.visible, self.cleaned_at, self.shown = "", "", 0, ""

    def add(self, text):
        self.raw += text
        self.hidden = self.hidden and "</think" not in self.raw[-len(text) - 7:].lower()
        # Cleaning the whole text for every chunk would be quadratic: the steps grow with the text.
        if len(self.raw) - self.cleaned_at > max(len(self.visible) // 16, len(self.raw) // 64):
            self.visible, self.cleaned_at = clean(self.raw)[:MAX_ANSWER_CHARS], len(self.raw)
        # Marks near the end of the last line may still pair up ('*bold', '<thi'): not shown yet.
        last_line = max(self.visible.rfind("\n") + 1, len(self.visible) - 60)
        mark = _MARK.search(self.visible, last_line)
        view = "" if self.hidden else self.visible[:mark.start() if mark else None]
        if len(view) > len(self.shown) or not (view or self.shown):
            self.shown = view
            self.on_text(view)

    def full(self):
        """Untagged reasoning is not the answer yet: only MAX_BYTES bounds it (R1 reasons for
        pages)."""
        return len(self.visible) >= MAX_ANSWER_CHARS and not self.hidden


def _final(cfg, raw, finish):
    """The answer in raw; a cut one ends at its last whole sentence, never passed off as whole."""
    cut = finish in ("length", "late")
    if cut and getattr(cfg, "llm_reasoning_untagged", False) and "</think" not in raw.lower():
        raw = ""  # reasoning cut before its </think>: no answer
    text = clean(raw)
    kind = "late" if finish == "late" else "cut" if text else "empty"
    if cut or len(text) > MAX_ANSWER_CHARS:
        ends = [end.end() for end in _SENTENCE_END.finditer(text, 0, MAX_ANSWER_CHARS + 1)]
        text = text[:max([end for end in ends if end <= MAX_ANSWER_CHARS], default=0)]
    if not text:
        raise LLMError(cfg, kind)
    if finish == "late":
        log.warning("LLM answer cut at the deadline")
    return text


def transcribe(cfg, audio: bytes, session=None) -> str:
    """The text of a voice message (Ogg Opus, as Telegram sends it) from an OpenAI-compatible
    POST {STT_BASE_URL or LLM_BASE_URL}/audio/transcriptions, at most MAX_VOICE_CHARS; LLMError
    when there is none. The deadline (LLM_TIMEOUT) and MAX_BYTES hold as for complete()."""
    deadline = time.monotonic() + cfg.llm_timeout
    base = getattr(cfg, "stt_base_url", "") or cfg.llm_base_url
    key = getattr(cfg, "stt_api_key", "") or cfg.llm_api_key
    model = getattr(cfg, "stt_model", "")
    files = {"file": ("voice.ogg", audio, "audio/ogg"), "model": (None, model)}
    url = base.rstrip("/") + "/audio/transcriptions"
    with _post(cfg, "STT", url, key, session, files=files) as response:
        lines = list(_lines(cfg, response, deadline, "STT"))
        html_page = "html" in response.headers.get("Content-Type", "")
    try:  # {"text": …}, or the text alone (response_format=text; whisper.cpp can)
        body = b"\n".join(lines).decode()
        text = json.loads(body)["text"] if body.lstrip().startswith("{") else body
        if html_page or not isinstance(text, str):  # a proxy's error page is no transcription
            raise TypeError
    except (ValueError, LookupError, TypeError):  # a None in lines: over MAX_BYTES
        raise LLMError(cfg, "malformed", "no transcription", part="STT") from None
    if not (text := text.strip()[:MAX_VOICE_CHARS].strip()):
        raise LLMError(cfg, "silent", part="STT")
    return text


def _silence(seconds=1):
    """A valid Ogg Opus file (RFC 7845) of silence: a head page, a tags page, one audio page."""
    head = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, 48000, 0, 0)  # mono, 312 pre-skip
    tags = b"OpusTags" + struct.pack("<I", 7) + b"leadbot" + struct.pack("<I", 0)
    frames = [b"\xf8\xff\xfe"] * (50 * seconds)  # 20 ms of CELT silence each
    pages = [([head], 0, 2), ([tags], 0, 0), (frames, 960 * len(frames), 4)]  # 2 first, 4 last
    return b"".join(_ogg_page(number, *page) for number, page in enumerate(pages))


def _ogg_page(number, packets, granule, flags):
    lacing = bytes(itertools.chain(*([255] * (len(p) // 255) + [len(p) % 255] for p in packets)))
    page = bytearray(b"OggS" + struct.pack("<BBqIIIB", 0, flags, granule, 1, number, 0,
                                           len(lacing)) + lacing + b"".join(packets))
    crc = 0  # Ogg's CRC-32: polynomial 0x04C11DB7, not reflected, unlike zlib's
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = (crc << 1 ^ (0x04C11DB7 if crc >> 31 else 0)) & 0xFFFFFFFF
    page[22:26] = struct.pack("<I", crc)
    return bytes(page)


# Cleaning. Every pattern is linear on any input: no two repeats can match the same characters.
# Reasoning is <think>… up to </think> or the end, and all before a first </think> without
# <think> (as from a server that puts the <think> in the prompt). A match ends at the first
# possible place: none is retried. Such a server (vLLM serving DeepSeek-R1 or QwQ without a
# reasoning parser) streams the reasoning as text, known as such only at its lone </think>:
# LLM_REASONING_UNTAGGED=1 hides drafts until then, and --check suggests it (_LONE_CLOSE).
_LONE_CLOSE = re.compile(r"(?:(?!<think).)*?</think", re.I | re.S)
_SENTENCE_END = re.compile(r"[.!?…][\"»)]*(?=\s|\Z)")
_THINK = re.compile(r"<think(?:ing)?>.*?(?:</think(?:ing)?>|\Z)"
                    r"|\A(?:(?!<think).)*?</think(?:ing)?>", re.I | re.S)
_TAG = re.compile(r"<(/?(?:b|strong|i|em|u|s|del|code|pre|span|div|p|br|hr|li|ul|ol|h[1-6]|a))"
                  r"(?:\s[^<>]*)?/?>", re.I)
_TAG_TEXT = {"br": "\n", "hr": "\n", "li": "\n• ",
             **dict.fromkeys("p /p /div /ul /ol /h1 /h2 /h3".split(), "\n\n")}
_QUOTE = re.compile(r"(?:[ \t]*>)+[ \t]?")
_BLOCK = re.compile(r"([ \t]*)(?:(#{1,6})|[-*+])[ \t]+")  # a heading or a list item
_MARK = re.compile(r"[*_~`\[<]")
_LINK = re.compile(r"!?\[([^\[\]\n]*)\]\(\s*([^()\s]+)\s*\)")
# Marks only pair up as formatting, not inside words or around spaces: ivan_petrov, 2*3, a * b stay.
_EMPHASIS = [re.compile(rf"(?<![\w{c}]){re.escape(mark)}(?=[^\s{c}])([^{c}\n]*?[^\s{c}])"
                        rf"{re.escape(mark)}" + (rf"(?!{c})" if c == r"\*" else rf"(?![\w{c}])"))
             for c, marks in ((r"\*", ("*", "**", "***")), ("_", ("_", "__", "___")),
                              ("~", ("~~",))) for mark in marks]


def clean(text: str) -> str:
    """Plain text for the client: no reasoning, no Markdown or HTML marks, at most one blank line
    in a row."""
    text = _THINK.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    lines, fenced = [""], False
    text = html.unescape(_TAG.sub(lambda m: _TAG_TEXT.get(m.group(1).lower(), ""), text))
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
    """line without emphasis marks, code backticks and link brackets; code spans stay."""
    parts = line.split("`")
    if len(parts) % 2 == 0:  # an odd backtick out stays
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    line = "\ue000".join(parts[::2])  # code spans set aside, a private-use mark in their place
    line = _LINK.sub(lambda m: m.group(2) if m.group(1).strip() in ("", m.group(2))
                     else f"{m.group(1)} ({m.group(2)})", line)
    for pattern in _EMPHASIS:
        line = pattern.sub(r"\1", line)
    return "".join(text + code for text, code in zip(line.split("\ue000"), parts[1::2] + [""]))

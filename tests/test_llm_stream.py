"""llm.py against a scripted HTTP server on 127.0.0.1: streams as gateways label and send them,
cut answers, the deadline, transcribe() and check()."""

import json
import logging
import struct
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import llm

KEY = "sk-stream-secret"


class Scripted:
    """A server whose answer is .script(handler, request) — handler.wfile written as it pleases;
    every request is kept in .requests as (path, headers, body bytes)."""

    def __init__(self):
        self.script, self.requests, self.release = None, [], threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append((self.path, self.headers, body))
                fake.script(self, body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.release = True, self.release
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = Scripted()
    yield fake
    fake.stop()


def make_cfg(base, **overrides):
    values = dict(llm_base_url=base, llm_model="test-model", llm_api_key="", llm_timeout=5,
                  llm_stream=True, llm_max_tokens=400)
    return types.SimpleNamespace(**{**values, **overrides})


def start(handler, content_type, status=200):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()


def chunk(handler, text):
    data = text.encode()
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    handler.wfile.flush()


def end(handler):
    handler.wfile.write(b"0\r\n\r\n")


def event(content=None, finish=None, **extra):
    delta = {} if content is None else {"content": content}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra},
                      ensure_ascii=False)


def streaming(pieces, content_type="text/event-stream", hold=None):
    """A script sending each piece as an HTTP chunk; hold: then keep the connection open."""
    def script(handler, body):
        start(handler, content_type)
        for piece in pieces:
            chunk(handler, piece)
        if hold:
            hold.wait(10)
        end(handler)
    return script


def ask(server, on_text=None, **overrides):
    return llm.complete(make_cfg(server.url, **overrides), "SYSTEM", "USER", on_text=on_text)


# The stream is told by its body


@pytest.mark.parametrize("content_type", ["application/json", "text/plain; charset=utf-8",
                                          "application/octet-stream", "text/event-stream"])
def test_a_stream_under_any_content_type_is_read_as_a_stream(server, content_type):
    server.script = streaming([f"data: {event('Привет')}\n\n", f"data: {event(', мир!', 'stop')}\n\n",
                               "data: [DONE]\n\n"], content_type)
    seen = []
    assert ask(server, seen.append) == "Привет, мир!"
    assert seen and seen[-1].startswith("Привет")


def test_one_event_over_several_data_lines_is_joined(server):
    text = json.dumps(json.loads(event("Раз два.", "stop")), indent=1, ensure_ascii=False)
    lines = "".join(f"data: {line}\r\n" for line in text.split("\n"))
    server.script = streaming([": keep-alive\n\n", lines[:20], lines[20:] + "\r\n", "data: [DONE]\n\n"])
    assert ask(server) == "Раз два."


def test_a_stream_ending_with_a_usage_only_chunk_is_whole(server):
    usage = json.dumps({"choices": [], "usage": {"total_tokens": 9}})
    server.script = streaming([f"data: {event('Готово.')}\n\n", f"data: {usage}\n\n"])
    with pytest.raises(llm.LLMError, match="broke off"):  # no finish_reason, no [DONE]
        ask(server)
    server.script = streaming([f"data: {event('Готово.')}\n\n", f"data: {event(finish='stop')}\n\n",
                               f"data: {usage}\n\n"])
    assert ask(server) == "Готово."


def test_an_answer_is_complete_at_its_finish_reason_though_the_server_holds_on(server):
    server.script = streaming([f"data: {event('Ответ готов.')}\n\n", f"data: {event(finish='stop')}\n\n"],
                              hold=server.release)
    started = time.monotonic()
    assert ask(server) == "Ответ готов."
    assert time.monotonic() - started < 1  # not the 5 s deadline


def test_an_html_page_is_still_no_stream(server):
    def page(handler, body):
        start(handler, "text/event-stream")
        chunk(handler, "<html>gateway says hi</html>")
        end(handler)
    server.script = page
    with pytest.raises(llm.LLMError, match="OpenAI-compatible"):
        ask(server)


# A cut answer ends at its last whole sentence


@pytest.mark.parametrize("stream", [True, False])
def test_an_answer_cut_at_max_tokens_ends_at_its_last_whole_sentence(server, stream):
    reply = "Вам подойдёт лендинг. Это быстро! А онлайн-оплата и са"

    def script(handler, body):
        if json.loads(body)["stream"]:
            return streaming([f"data: {event(reply[:30])}\n\n", f"data: {event(reply[30:], 'length')}\n\n",
                              "data: [DONE]\n\n"])(handler, body)
        answer = {"choices": [{"message": {"content": reply}, "finish_reason": "length"}]}
        data = json.dumps(answer).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    server.script = script
    assert ask(server, llm_stream=stream) == "Вам подойдёт лендинг. Это быстро!"


def test_a_cut_answer_without_a_whole_sentence_is_no_answer(server):
    server.script = streaming([f"data: {event('Вам подойдёт лендинг и онлайн-оп', 'length')}\n\n"])
    with pytest.raises(llm.LLMError, match="LLM_MAX_TOKENS") as caught:
        ask(server)
    assert caught.value.kind == "cut"


def steady(words, every):
    """A model writing a word every `every` seconds, longer than any deadline of these tests."""
    def script(handler, body):
        start(handler, "text/event-stream")
        for word in words:
            chunk(handler, f"data: {event(word)}\n\n")
            if handler.server.release.wait(every):
                return
        end(handler)
    return script


def test_at_the_deadline_what_arrived_is_the_answer_cut_at_a_sentence(server, caplog):
    words = ["Вам ", "подойдёт ", "лендинг. ", "Это ", "быстро. ", "И ", "ещё "] + ["слово "] * 100
    server.script = steady(words, 0.1)
    seen = []
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="llm"):
        answer = ask(server, seen.append, llm_timeout=1)
    assert answer == "Вам подойдёт лендинг. Это быстро."
    assert time.monotonic() - started < 1.5 and seen
    records = [r for r in caplog.records if r.name == "llm"]
    assert [r.getMessage() for r in records] == ["LLM answer cut at the deadline"]


def test_at_the_deadline_without_a_whole_sentence_it_is_late(server):
    server.script = steady(["слово "] * 100, 0.1)
    with pytest.raises(llm.LLMError, match="LLM_TIMEOUT") as caught:
        ask(server, llm_timeout=0.5)
    assert caught.value.kind == "late"


def test_at_the_deadline_untagged_reasoning_is_no_answer(server):
    server.script = steady(["Думаю. "] * 100, 0.05)
    with pytest.raises(llm.LLMError, match="LLM_TIMEOUT"):
        ask(server, llm_timeout=0.5, llm_reasoning_untagged=True)


# transcribe()


def json_answer(payload, status=200, content_type="application/json"):
    def script(handler, body):
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return script


def stt_cfg(server, **overrides):
    return make_cfg("http://127.0.0.1:9/nothing-here", **{
        "stt_model": "whisper-1", "stt_base_url": server.url, "stt_api_key": KEY, **overrides})


def test_transcribe_posts_the_voice_as_multipart_and_returns_the_text(server):
    server.script = json_answer({"text": "  Перезвоните мне, пожалуйста  "})
    assert llm.transcribe(stt_cfg(server), b"OggS-voice-bytes") == "Перезвоните мне, пожалуйста"
    [(path, headers, body)] = server.requests
    assert path == "/v1/audio/transcriptions" and headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Content-Type"].startswith("multipart/form-data")
    assert b'name="file"; filename="voice.ogg"' in body and b"Content-Type: audio/ogg" in body
    assert b"OggS-voice-bytes" in body and b'name="model"\r\n\r\nwhisper-1' in body


def test_transcribe_defaults_to_the_llm_server_and_key(server):
    server.script = json_answer("Текст без JSON\n", content_type="text/plain")
    cfg = make_cfg(server.url + "/", llm_api_key="llm-key", stt_model="whisper-1")
    assert llm.transcribe(cfg, b"voice") == "Текст без JSON"
    assert server.requests[0][1]["Authorization"] == "Bearer llm-key"
    cfg = make_cfg(server.url, stt_model="whisper-1")
    llm.transcribe(cfg, b"voice")
    assert "Authorization" not in server.requests[1][1]


def test_a_long_transcription_is_capped(server):
    server.script = json_answer({"text": "слово " * 2000})
    assert len(llm.transcribe(stt_cfg(server), b"voice")) <= llm.MAX_VOICE_CHARS


@pytest.mark.parametrize("payload, status, content_type, kind", [
    ({"text": "   "}, 200, "application/json", "silent"),
    ({"result": "x"}, 200, "application/json", "malformed"),
    ("<html>proxy error</html>", 200, "text/html", "malformed"),
    ("x" * (llm.MAX_BYTES + 10), 200, "text/plain", "malformed"),
    ({"error": "bad key"}, 401, "application/json", "key"),
    ({"error": "no such model"}, 404, "application/json", "model"),
    ({"error": "boom"}, 500, "application/json", "server"),
])
def test_transcription_failures_are_advice_without_secrets(server, payload, status, content_type, kind):
    server.script = json_answer(payload, status, content_type)
    with pytest.raises(llm.LLMError) as caught:
        llm.transcribe(stt_cfg(server), b"voice")
    error = caught.value
    assert error.kind == kind and str(error).startswith("STT: ") and error.advice.startswith("STT: ")
    for text in (str(error), error.advice):
        assert KEY not in text and "127.0.0.1" not in text and "\n" not in text
    if kind in ("key", "model"):
        assert f"STT_{'API_KEY' if kind == 'key' else 'MODEL'}" in error.advice


def test_a_transcription_server_out_of_reach_or_late(server):
    with pytest.raises(llm.LLMError, match="STT_BASE_URL"):
        llm.transcribe(stt_cfg(server, stt_base_url="http://127.0.0.1:9/v1"), b"voice")

    def trickle(handler, body):
        start(handler, "application/json")
        for char in '{"text": "долго"}':
            if server.release.wait(0.1):
                return
            chunk(handler, char)
    server.script = trickle
    started = time.monotonic()
    with pytest.raises(llm.LLMError, match="LLM_TIMEOUT"):
        llm.transcribe(stt_cfg(server, llm_timeout=0.5), b"voice")
    assert time.monotonic() - started < 1.5


# check()


def ogg_pages(data):
    """The pages of an Ogg file, each CRC checked with a table-driven CRC (not llm's loop)."""
    table = []
    for n in range(256):
        crc = n << 24
        for _ in range(8):
            crc = (crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    pages = []
    while data:
        assert data[:4] == b"OggS"
        segments = data[26]
        size = 27 + segments + sum(data[27:27 + segments])
        page = bytearray(data[:size])
        stored, page[22:26] = struct.unpack("<I", page[22:26])[0], b"\0\0\0\0"
        crc = 0
        for byte in page:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
        assert crc == stored
        pages.append(bytes(page[27 + segments:]))
        data = data[size:]
    return pages


def test_check_probes_stt_with_a_valid_ogg_opus_file(server):
    server.script = json_answer({"text": ""})  # silence: an empty text is the right answer
    [llm_line, stt_line] = llm.check(stt_cfg(server, llm_base_url=""))
    assert llm_line[0] is None and stt_line == (True, "STT: модель whisper-1 распознаёт голос "
                                                      "(проверено секундой тишины)")
    body = server.requests[0][2]
    ogg = body[body.index(b"OggS"):body.index(b"\r\n--", body.index(b"OggS"))]
    head, tags, audio = ogg_pages(ogg)
    assert head.startswith(b"OpusHead") and tags.startswith(b"OpusTags") and len(audio) == 150


def test_check_stt_failures_are_red_and_russian(server):
    server.script = json_answer({"error": "model not found"}, 404)
    [_, (ok, text)] = llm.check(stt_cfg(server, llm_base_url=""))
    assert ok is False and "STT_MODEL" in text and "whisper-1" in text and "проверьте" in text


def test_check_with_an_empty_model_is_red():
    [(ok, text), _] = llm.check(make_cfg("http://127.0.0.1:9/v1", llm_model=""))
    assert ok is False and "LLM_MODEL" in text


def test_check_asks_as_the_bot_asks_so_a_broken_stream_is_red(server):
    def gateway(handler, body):  # answers JSON requests well, breaks streams
        if not json.loads(body)["stream"]:
            return json_answer({"choices": [{"message": {"content": "ready"}, "finish_reason": "stop"}]})(
                handler, body)
        start(handler, "text/event-stream")
        chunk(handler, f"data: {event('rea')}\n\n")
        handler.wfile.flush()
    server.script = gateway
    assert llm.check(make_cfg(server.url, llm_stream=False))[0] == (True, "LLM: модель test-model отвечает")
    ok, text = llm.check(make_cfg(server.url))[0]
    assert ok is False and "оборвался" in text


def test_check_suggests_the_untagged_setting_on_a_lone_closing_tag(server):
    server.script = streaming([f"data: {event('The user wants a word.</think>ready')}\n\n",
                               f"data: {event(finish='stop')}\n\n"])
    ok, text = llm.check(make_cfg(server.url))[0]
    assert ok is False and "LLM_REASONING_UNTAGGED=1" in text
    assert llm.check(make_cfg(server.url, llm_reasoning_untagged=True))[0] == (
        True, "LLM: модель test-model отвечает")

"""llm.py against FakeLLM (real HTTP on 127.0.0.1) and `responses`: streaming, deadline, caps, errors, clean()."""

import json
import time
import types

import pytest
import requests
import responses

import llm
from fakes import FakeLLM, running

KEY = "sk-test-secret-key"
SYSTEM = "SYSTEM-PROMPT"
USER = "Хочу интернет-магазин"
BASE = "http://llm.test/v1"
ENDPOINT = BASE + "/chat/completions"


@pytest.fixture
def server():
    yield from running(FakeLLM())


def make_cfg(base, **overrides):
    values = dict(llm_base_url=base, llm_model="test-model", llm_api_key="", llm_timeout=5, llm_stream=True,
                  llm_max_tokens=400)
    return types.SimpleNamespace(**{**values, **overrides})


def ask(server, on_text=None, **overrides):
    return llm.complete(make_cfg(server.url, **overrides), SYSTEM, USER, on_text=on_text)


def grows(texts):
    """on_text's contract: "" only before any text, then never shorter."""
    lengths = [len(t) for t in texts]
    return lengths == sorted(lengths) and "" not in texts[next((i for i, t in enumerate(texts) if t), len(texts)):]


# Streaming


def test_stream_is_assembled_cleaned_and_shown_as_it_grows(server):
    server.reply = "Вам подойдёт **Лендинг под ключ**: это *быстрый* старт для пекарни и вашего бизнеса."
    server.chunks = 4
    seen = []
    answer = ask(server, seen.append)
    assert answer == "Вам подойдёт Лендинг под ключ: это быстрый старт для пекарни и вашего бизнеса."
    assert len(seen) >= 5 and answer.startswith(seen[-1]) and grows(seen)
    assert not any("*" in text for text in seen)  # already clean, also half-way
    body = server.requests[0]["json"]
    assert (body["stream"], body["max_tokens"], body["model"]) == (True, 400, "test-model")
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]


def test_text_is_shown_while_the_stream_still_arrives(server):
    server.reply, server.chunk_delay = "Раз два три четыре пять шесть семь восемь девять", 0.03
    seen = []
    answer = ask(server, lambda text: seen.append((time.monotonic(), text)))
    done = time.monotonic()
    assert answer == server.reply and len(seen) >= 3
    assert done - seen[0][0] >= 0.05  # the first words were out before the last ones arrived


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_fields_never_reach_the_text(server, field):
    server.reasoning, server.reasoning_field = "Клиенту нужна витрина, значит СЕКРЕТ-МЫСЛЬ", field
    seen = []
    assert ask(server, seen.append) == server.reply
    assert seen[0] == "" and grows(seen) and server.reply.startswith(seen[-1])
    assert not any("СЕКРЕТ" in text for text in seen)


@pytest.mark.parametrize("think, chunks", [
    ("<think>СЕКРЕТ план</think>", None),
    ("<THINK>СЕКРЕТ план</THINK>\n", None),
    ("<thinking>СЕКРЕТ</thinking>", None),
    ("<thi|nk>СЕКРЕТ</th|ink>", "|"),  # tags split across chunks
])
def test_think_blocks_in_content_never_reach_the_text(server, think, chunks):
    pieces = (think + "Итог: лендинг.").split("|") if chunks else None
    server.chunks = pieces or 3
    server.reply = think + "Итог: лендинг."
    seen = []
    assert ask(server, seen.append) == "Итог: лендинг."
    assert grows(seen) and not any("СЕКРЕТ" in t or "<" in t for t in seen)


def test_reasoning_before_a_lone_closing_tag_is_dropped_from_the_answer(server):
    # As from a server that puts <think> in the prompt. Only the final answer can tell it was reasoning.
    server.reply = "СЕКРЕТ без открывающего тега</think>Итог: лендинг."
    assert ask(server, lambda text: None) == "Итог: лендинг."


def test_think_via_fake_option_shows_thinking_first(server):
    server.think = "СЕКРЕТ " * 50
    seen = []
    assert ask(server, seen.append) == server.reply
    assert seen[0] == "" and server.reply.startswith(seen[-1]) and not any("СЕКРЕТ" in t for t in seen)


def test_only_thinking_is_an_empty_answer(server):
    server.reply, server.chunks = "<think>никак не решу, что ответить", 5
    with pytest.raises(llm.LLMError, match="LLM_MAX_TOKENS"):
        ask(server, lambda text: None)


def test_comment_lines_are_skipped(server):
    server.comments = True
    assert ask(server) == server.reply
    body = {"model": "m", "messages": [], "stream": True}
    raw = requests.post(server.url + "/chat/completions", json=body, timeout=5).text
    assert raw.startswith(": OPENROUTER PROCESSING\n\ndata: {") and raw.endswith("data: [DONE]\n\n")


def test_a_json_answer_to_a_stream_request_is_read(server):
    server.no_stream = True
    seen = []
    assert ask(server, seen.append) == server.reply
    assert server.requests[0]["json"]["stream"] is True


def test_stream_off_sends_stream_false_and_reads_json(server):
    server.reply = "## Совет\n- **Лендинг**"
    assert ask(server, llm_stream=False) == "Совет\n• Лендинг"
    assert server.requests[0]["json"]["stream"] is False


def test_a_stream_that_breaks_off_is_an_error(server):
    server.break_after = 4
    seen = []
    with pytest.raises(llm.LLMError, match="broke off") as caught:
        ask(server, seen.append)
    assert caught.value.status is None and seen  # some text was shown before the break


def sse(*events, done=True):
    lines = [f"data: {json.dumps(event)}\n\n" for event in events]
    return "".join(lines) + ("data: [DONE]\n\n" if done else "")


def delta(content, finish=None):
    return {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}


@pytest.fixture
def api():
    with responses.RequestsMock() as mock:
        yield mock


def test_a_stream_ending_without_done_needs_a_finish_reason(api):
    api.add(responses.POST, ENDPOINT, body=sse(delta("Привет"), delta("!", "stop"), done=False),
            content_type="text/event-stream")
    assert llm.complete(make_cfg(BASE), SYSTEM, USER) == "Привет!"
    api.replace(responses.POST, ENDPOINT, body=sse(delta("Привет"), done=False), content_type="text/event-stream")
    with pytest.raises(llm.LLMError, match="broke off"):
        llm.complete(make_cfg(BASE), SYSTEM, USER)


def test_sse_without_space_usage_chunks_and_event_lines(api):
    body = ("event: message\r\n" + "data:" + json.dumps(delta("Да")) + "\r\n\r\n"
            + "data: " + json.dumps({"choices": [], "usage": {"total_tokens": 3}}) + "\n\n" + "data:[DONE]")
    api.add(responses.POST, ENDPOINT, body=body, content_type="text/event-stream; charset=utf-8")
    assert llm.complete(make_cfg(BASE), SYSTEM, USER) == "Да"


def test_a_garbled_event_is_an_error(api):
    body = sse(delta("Нач"), done=False) + "data: {broken\n\n"
    api.add(responses.POST, ENDPOINT, body=body, content_type="text/event-stream")
    with pytest.raises(llm.LLMError, match="OpenAI-compatible"):
        llm.complete(make_cfg(BASE), SYSTEM, USER)


def test_an_error_event_mid_stream_is_an_error(api):
    body = sse(delta("Нач"), {"error": {"message": "overloaded", "code": 502}})
    api.add(responses.POST, ENDPOINT, body=body, content_type="text/event-stream")
    with pytest.raises(llm.LLMError, match="try again later"):
        llm.complete(make_cfg(BASE), SYSTEM, USER)


# Deadline and size caps


def test_a_trickling_server_cannot_stretch_the_deadline(server):
    server.trickle = 0.05  # one byte every 0.05 s: the answer would take a minute
    started = time.monotonic()
    with pytest.raises(llm.LLMError, match=r"LLM_TIMEOUT \(0.3 s\)"):
        ask(server, llm_timeout=0.3)
    assert time.monotonic() - started < 0.3 + 1.0
    assert server.requests[0]["json"]["stream"] is True


def test_a_trickling_json_answer_cannot_either(server):
    server.trickle = 0.2
    started = time.monotonic()
    with pytest.raises(llm.LLMError, match="LLM_TIMEOUT"):
        ask(server, llm_timeout=0.3, llm_stream=False)
    assert time.monotonic() - started < 0.3 + 1.0


def test_a_late_answer_is_an_error(server):
    server.delay = 1
    with pytest.raises(llm.LLMError, match="LLM_TIMEOUT"):
        ask(server, llm_timeout=0.2)


def test_a_huge_stream_is_cut_to_a_bounded_answer_at_a_whole_sentence(server):
    server.reply, server.chunks = "Одно слово. Другое слово! " * 50_000, 50_000  # 1.3 MB of text
    seen = []
    answer = ask(server, seen.append)
    assert len(answer) <= llm.MAX_ANSWER_CHARS and answer.endswith(("слово.", "слово!"))
    assert server.reply.startswith(answer)
    assert grows(seen) and all(len(text) <= llm.MAX_ANSWER_CHARS for text in seen)


def test_a_capped_stream_without_a_whole_sentence_is_no_answer(server):
    server.reply, server.chunks = "слово " * 200_000, 50_000
    with pytest.raises(llm.LLMError, match="before one whole sentence") as caught:
        ask(server, lambda text: None)
    assert caught.value.kind == "cut"


def test_a_long_stream_of_small_chunks_stops_at_the_cap(server):
    server.reply = "Слово за словом. " * 2000
    answer = ask(server)
    assert len(answer) <= llm.MAX_ANSWER_CHARS and answer.endswith("словом.")
    assert len(server.requests) == 1


def test_a_huge_json_answer_is_not_taken(server):
    server.reply = "x" * (llm.MAX_BYTES + 10)
    with pytest.raises(llm.LLMError, match="OpenAI-compatible"):
        ask(server, llm_stream=False)


def test_a_long_json_answer_is_cut(server):
    server.reply = "Длинный ответ. " * 1000
    answer = ask(server, llm_stream=False)
    assert len(answer) <= llm.MAX_ANSWER_CHARS and answer.endswith("ответ.")
    assert server.reply.startswith(answer)


# Requests and errors


def test_authorization_only_with_a_key(server):
    ask(server)
    ask(server, llm_api_key=KEY)
    assert "Authorization" not in server.requests[0]["headers"]
    assert server.requests[1]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_trailing_slash_and_given_session(server):
    class Session(requests.Session):
        posts = 0

        def post(self, *args, **kwargs):
            Session.posts += 1
            return super().post(*args, **kwargs)

    with Session() as session:
        assert llm.complete(make_cfg(server.url + "/"), SYSTEM, USER, session=session) == server.reply
    assert Session.posts == 1 and server.calls == 1


def setup_fault(server, fault):
    if fault == "down":
        server.down()
    elif fault == "wrong model":
        server.models = {"other-model"}
    elif fault == "not json":
        server.raw = "<html>gateway says hi</html>"
    elif fault == "json without choices":
        server.raw = json.dumps({"id": "x"})
    elif fault == "empty":
        server.reply = "   "
    elif fault == "only markup":
        server.reply = "** ** <br>"
    else:
        server.status = int(fault)


FAULTS = {  # fault: (advice in the text, .status)
    "401": ("LLM_API_KEY", 401), "403": ("LLM_API_KEY", 403),
    "400": ("LLM_MODEL", 400), "404": ("ends with /v1", 404), "wrong model": ("ollama pull", 404),
    "429": ("rate limit", 429), "402": ("credit", 402),
    "500": ("try again later", 500), "503": ("try again later", 503),
    "down": ("LLM_BASE_URL", None),
    "not json": ("OpenAI-compatible", None), "json without choices": ("OpenAI-compatible", None),
    "empty": ("LLM_MAX_TOKENS", None), "only markup": ("LLM_MAX_TOKENS", None),
}


@pytest.mark.parametrize("fault, stream", [(fault, True) for fault in FAULTS]
                         + [(fault, False) for fault in ("401", "404", "500", "not json", "empty")])
def test_every_failure_is_one_line_of_advice_without_secrets(server, fault, stream):
    advice, status = FAULTS[fault]
    setup_fault(server, fault)
    cfg = make_cfg(server.url, llm_api_key=KEY, llm_stream=stream)
    with pytest.raises(llm.LLMError) as caught:
        llm.complete(cfg, SYSTEM, USER)
    text = str(caught.value)
    assert advice in text and text.startswith("LLM: ") and "\n" not in text
    assert caught.value.status == status
    for secret in (KEY, "127.0.0.1", str(server.port), SYSTEM, USER):
        assert secret not in text


def test_a_connection_error_names_only_its_class(api):
    api.add(responses.POST, ENDPOINT, body=requests.ConnectionError(f"cannot connect to {ENDPOINT}?key={KEY}"))
    with pytest.raises(llm.LLMError) as caught:
        llm.complete(make_cfg(BASE, llm_api_key=KEY), SYSTEM, USER)
    assert "(ConnectionError)" in str(caught.value) and "llm.test" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# check()


def test_check_off_ok_and_failing(server):
    [off, stt] = llm.check(make_cfg(""))
    assert off[0] is None and "LLM_BASE_URL" in off[1] and "выключен" in off[1]
    assert stt[0] is None and "STT_MODEL" in stt[1]
    assert llm.check(make_cfg(server.url))[0] == (True, "LLM: модель test-model отвечает")
    assert server.requests[0]["json"]["stream"] is True  # asked as the bot asks
    server.status = 401
    [(ok, text), _] = llm.check(make_cfg(server.url, llm_api_key=KEY))
    assert ok is False and "LLM_API_KEY" in text and "ключ" in text and KEY not in text


# clean()

CORPUS = {
    "bold and italic": ("**Лендинг** — это *быстро* и __надёжно__, _честно_", "Лендинг — это быстро и надёжно, честно"),
    "bold italic and strike": ("***Важно*** и ~~старое~~", "Важно и старое"),
    "case ending after bold": ("Вам нужен **лендинг**ом", "Вам нужен лендингом"),
    "usernames and emails": ("Пишите @ivan_petrov или info_box@mail.ru, а snake_case_name — код",
                             "Пишите @ivan_petrov или info_box@mail.ru, а snake_case_name — код"),
    "two underscored names": ("ivan_petrov и maria_ivanova", "ivan_petrov и maria_ivanova"),
    "arithmetic": ("2*3 = 6, a * b, 2*3*4 и 5 * 6 * 7", "2*3 = 6, a * b, 2*3*4 и 5 * 6 * 7"),
    "lone and unbalanced stars": ("Цена* от 10 000 ₽\n*без хостинга\n**не закрыто",
                                  "Цена* от 10 000 ₽\n*без хостинга\n**не закрыто"),
    "a lone star": ("*", "*"),
    "headings": ("### Заголовок\n#хэштег\n# Большой", "Заголовок\n#хэштег\nБольшой"),
    "bullets": ("- один\n* два\n+ три\n  - вложенный", "• один\n• два\n• три\n  • вложенный"),
    "numbered list stays": ("1. Первое\n2. Второе", "1. Первое\n2. Второе"),
    "phone is no bullet": ("+7 912 345-67-89\n-5 градусов", "+7 912 345-67-89\n-5 градусов"),
    "links": ("[Наш сайт](https://primer.ru/a_b_c) и [https://x.ru](https://x.ru)",
              "Наш сайт (https://primer.ru/a_b_c) и https://x.ru"),
    "code": ("Команда `pip install *x*` и ``` без пары", "Команда pip install *x* и ` без пары"),
    "fences": ("```python\nprint(**x**)\n```\nГотово", "print(**x**)\nГотово"),
    "bold code": ("**`npm i`** готово", "npm i готово"),
    "quotes": ("> цитата\n>> вложенная\n2 > 1", "цитата\nвложенная\n2 > 1"),
    "html": ("<b>Жирный</b> и <i>курсив</i><br>строка<br/>ещё<p>абзац</p><ul><li>а</li><li>б</li></ul>",
             "Жирный и курсив\nстрока\nещё\n\nабзац\n\n• а\n• б"),
    "not html": ("Срок <5 дней, a < b > c", "Срок <5 дней, a < b > c"),
    "rules": ("Раз\n---\n* * *\n___\nДва", "Раз\n\nДва"),
    "blank lines": ("\n\nа\n\n\n\n\nб\n   \n\t\nв  \n\n", "а\n\nб\n\nв"),
    "windows newlines": ("а\r\n\r\n\r\nб\rв", "а\n\nб\nв"),
    "think closed": ("<think>план</think>Ответ", "Ответ"),
    "think uppercase": ("<THINK>план</Think>\nОтвет", "Ответ"),
    "thinking": ("<thinking>план</thinking>Ответ", "Ответ"),
    "think unclosed": ("<think>план без конца", ""),
    "think unclosed later": ("Ответ. <think>передумал", "Ответ."),
    "think close only": ("рассуждение</think>Ответ", "Ответ"),
    "think twice": ("<think>a</think>Раз <think>b</think>два", "Раз два"),
    "the private mark _inline uses": ("a\ue000b &#57344;c `код`", "ab c код"),
    "html entities": ("&laquo;Лендинг&raquo;&nbsp;&mdash; быстро &amp; недорого", "«Лендинг»\u00a0— быстро & недорого"),
}


@pytest.mark.parametrize("text, expected", CORPUS.values(), ids=CORPUS.keys())
def test_clean(text, expected):
    assert llm.clean(text) == expected


@pytest.mark.parametrize("unit", [
    "а", "*", "_", "*a", "**a ", "_a_ ", "[a](", "<think>", "</think>", "<b ", "`", "x<think", "- *a*\n", "> ", "## ",
])
def test_clean_is_fast_on_100k_characters(unit):
    text = unit * (100_000 // len(unit))
    started = time.perf_counter()
    llm.clean(text)
    assert time.perf_counter() - started < 1


UNTAGGED = {"llm_reasoning_untagged": True}  # LLM_REASONING_UNTAGGED=1


def test_with_untagged_reasoning_no_text_before_a_lone_closing_tag_is_shown(server):
    # A chat template that puts <think> into the prompt: the reasoning streams as text up to a lone </think>.
    server.reply, server.chunks = "СЕКРЕТ: по системному промпту скидка 30% своим</think>Итог: лендинг.", 6
    seen = []
    assert ask(server, seen.append) == "Итог: лендинг."  # without the setting the drafts cannot know
    assert any("СЕКРЕТ" in text for text in seen)
    seen = []
    assert ask(server, seen.append, **UNTAGGED) == "Итог: лендинг."
    assert seen and not any("СЕКРЕТ" in text for text in seen) and "Итог" in seen[-1]


@pytest.mark.parametrize("stream", [True, False])
def test_with_untagged_reasoning_an_answer_cut_before_its_closing_tag_is_no_answer(server, stream):
    server.reply, server.finish_reason = "СЕКРЕТ: клиент пишет про пекарню. Мне нужно подумать.", "length"
    with pytest.raises(llm.LLMError, match="LLM_MAX_TOKENS"):  # cut at max_tokens: the honest fallback
        ask(server, lambda text: None, llm_stream=stream, **UNTAGGED)
    assert ask(server, llm_stream=stream) == server.reply  # without the setting it is an answer


@pytest.mark.parametrize("finish", ["stop", "eos", "end_turn"])
def test_an_answer_that_only_mentions_the_tag_changes_no_later_answer(server, finish):
    server.reply, server.finish_reason = "Закрывающий тег </think> мы уберём. Рекомендуем лендинг.", finish
    ask(server, lambda text: None)  # cut to its tail, as any answer with a lone closing tag is
    server.reply, server.finish_reason = "Рекомендуем лендинг под ключ. И ещё", "length"
    seen = []
    assert ask(server, seen.append) == "Рекомендуем лендинг под ключ."  # cut, but an answer
    assert seen  # and shown while it streamed: nothing was learned from the first answer


def test_long_untagged_reasoning_is_not_cut_off_as_if_it_were_the_answer(server):
    server.reply, server.chunks = "СЕКРЕТ " * 1500 + "</think>Итог: лендинг под ключ.", 400  # 10,500 chars
    assert ask(server, lambda text: None, **UNTAGGED) == "Итог: лендинг под ключ."

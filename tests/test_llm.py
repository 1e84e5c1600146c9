import json
import logging
import types

import pytest
import requests
import responses

import llm

BASE = "http://llm.test/v1"
ENDPOINT = BASE + "/chat/completions"
KEY = "sk-test-secret-key"
SYSTEM = "SYSTEM-PROMPT-SECRET"
USER = "Хочу интернет-магазин, мой телефон +79001234567"


def make_cfg(**overrides):
    values = dict(llm_base_url=BASE, llm_model="test-model", llm_api_key="", llm_timeout=7.5)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def chat(content):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


@pytest.fixture
def api():
    with responses.RequestsMock() as mock:
        yield mock


def test_returns_stripped_answer(api):
    api.add(responses.POST, ENDPOINT, json=chat("  Вам подойдёт интернет-магазин.\n"))
    assert llm.complete(make_cfg(), SYSTEM, USER) == "Вам подойдёт интернет-магазин."


def test_request_body_has_model_and_two_messages(api):
    api.add(responses.POST, ENDPOINT, json=chat("ok"))
    llm.complete(make_cfg(), SYSTEM, USER)
    body = json.loads(api.calls[0].request.body)
    assert body == {"model": "test-model",
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]}


def test_no_authorization_header_without_key(api):
    api.add(responses.POST, ENDPOINT, json=chat("ok"))
    llm.complete(make_cfg(llm_api_key=""), SYSTEM, USER)
    assert "Authorization" not in api.calls[0].request.headers


def test_bearer_header_with_key(api):
    api.add(responses.POST, ENDPOINT, json=chat("ok"))
    llm.complete(make_cfg(llm_api_key=KEY), SYSTEM, USER)
    assert api.calls[0].request.headers["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("base", [BASE, BASE + "/"])
def test_base_url_with_or_without_trailing_slash(api, base):
    api.add(responses.POST, ENDPOINT, json=chat("ok"))
    assert llm.complete(make_cfg(llm_base_url=base), SYSTEM, USER) == "ok"
    assert api.calls[0].request.url == ENDPOINT


def test_uses_given_session_and_timeout():
    class RecordingSession:
        def post(self, url, **kwargs):
            self.kwargs = kwargs
            response = requests.Response()
            response.status_code = 200
            response._content = json.dumps(chat("ok")).encode()
            return response

    session = RecordingSession()
    assert llm.complete(make_cfg(), SYSTEM, USER, session=session) == "ok"
    assert session.kwargs["timeout"] == 7.5


FAILURES = {
    "connection error": (dict(body=requests.ConnectionError(f"cannot connect to {ENDPOINT}")),
                         "LLM request failed: ConnectionError"),
    "timeout": (dict(body=requests.exceptions.ReadTimeout(f"read timed out: {ENDPOINT}")),
                "LLM request failed: ReadTimeout"),
    "http 500": (dict(status=500, json={"error": f"boom {KEY}"}), "LLM request failed: HTTP 500"),
    "http 401": (dict(status=401, json={"error": "bad key"}), "LLM request failed: HTTP 401"),
    "not json": (dict(body="<html>gateway says hi</html>"), "LLM answer malformed: not JSON"),
    "json list": (dict(json=["x"]), "LLM answer malformed: no choices"),
    "no choices key": (dict(json={"id": "x"}), "LLM answer malformed: no choices"),
    "empty choices": (dict(json={"choices": []}), "LLM answer malformed: no choices"),
    "missing message": (dict(json={"choices": [{"index": 0}]}), "LLM answer malformed: no message"),
    "empty content": (dict(json=chat("")), "LLM answer malformed: empty content"),
    "blank content": (dict(json=chat("  \n ")), "LLM answer malformed: empty content"),
    "null content": (dict(json=chat(None)), "LLM answer malformed: empty content"),
    "non-string content": (dict(json=chat([{"type": "text", "text": "hi"}])), "LLM answer malformed: empty content"),
}


@pytest.mark.parametrize("reply, logged", FAILURES.values(), ids=FAILURES.keys())
def test_failure_gives_none_and_one_clean_log_line(api, caplog, reply, logged):
    api.add(responses.POST, ENDPOINT, **reply)
    cfg = make_cfg(llm_api_key=KEY)
    with caplog.at_level(logging.WARNING, logger="llm"):
        assert llm.complete(cfg, SYSTEM, USER) is None
        assert [r.getMessage() for r in caplog.records] == [logged]
        assert all(r.levelno == logging.WARNING for r in caplog.records)
    for secret in (KEY, "llm.test", SYSTEM, USER, "+7900"):
        assert secret not in caplog.text

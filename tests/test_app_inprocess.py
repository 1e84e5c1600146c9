"""The dialog driven in-process through App.handle, with a recording stand-in for Telegram."""
import threading
import types
from contextlib import contextmanager

import pytest

import leadbot


class Recorder:
    def __init__(self):
        self.sent = []

    def send(self, chat_id, text, buttons=None, contact_button=False, remove_keyboard=False):
        self.sent.append(text)

    @contextmanager
    def typing(self, chat_id):
        yield


def make_app(tmp_path):
    cfg = leadbot.read_config({"DATA_DIR": str(tmp_path / "data")}, telegram=False)
    return leadbot.App(cfg, Recorder(), leadbot.MemoryJournal())


def say(app, text, update_id=None):
    app.handle(leadbot.Incoming(chat_id=7, text=text, update_id=update_id))
    return app.out.sent[-1]


def test_a_returning_client_is_reminded_and_asked_the_open_question_again(tmp_path):
    app = make_app(tmp_path)
    say(app, "/start")
    assert say(app, "Сайт для кафе") == leadbot.QUESTIONS[1][1]
    app.dialogs[7]["updated_at"] -= app.RETURN_AFTER + 1  # the client went away for a while
    before = len(app.out.sent)
    assert say(app, "Привет, я вернулся") == leadbot.QUESTIONS[1][1]
    assert app.out.sent[before] == leadbot.TEXTS["returning"]
    assert app.dialogs[7]["stage"] == "qualifying" and len(app.dialogs[7]["answers"]) == 1


def test_a_redelivered_update_is_not_handled_twice(tmp_path):
    app = make_app(tmp_path)
    say(app, "/start", update_id=1)
    say(app, "Сайт для кафе", update_id=2)
    sent = len(app.out.sent)
    app.handle(leadbot.Incoming(chat_id=7, text="Сайт для кафе", update_id=2))
    assert len(app.out.sent) == sent and len(app.dialogs[7]["answers"]) == 1


def test_without_an_llm_the_offer_is_the_fallback_and_the_contact_is_asked(tmp_path):
    app = make_app(tmp_path)
    for text in ["/start", "Сайт", "Не срочно", "Пока не знаю"]:
        say(app, text)
    assert "Сервис временно недоступен, давайте обменяемся контактами" in app.out.sent
    assert app.dialogs[7]["stage"] == "collecting_contact"


def test_a_contact_typed_into_an_answer_is_not_sent_to_the_llm(tmp_path, monkeypatch):
    app = make_app(tmp_path)
    asked = []
    monkeypatch.setattr(app, "ask_llm", lambda system, user: asked.append(user) or "Совет")
    for text in ["/start", "Сайт, звоните +7 999 123-45-67", "Не срочно", "пишите на ivan@example.ru"]:
        say(app, text)
    app.summary_for(7, app.dialogs[7])  # the manager's notes, written in the background
    assert len(asked) == 2
    assert all("123-45-67" not in user and "ivan@example.ru" not in user for user in asked)


class BlockingTelegram:
    """A Bot API whose getUpdates answers only when released."""

    def __init__(self):
        self.release = threading.Event()

    def call(self, method, **params):
        self.release.wait(10)
        return [{"update_id": 1}]


def polling_app():
    cfg = types.SimpleNamespace(poll_timeout=25, telegram_timeout=15)
    outbox = types.SimpleNamespace(next_due=lambda: None)
    return types.SimpleNamespace(cfg=cfg, outbox=outbox, stopping=threading.Event(), polling=False)


def test_on_windows_the_long_poll_waits_in_a_thread_and_still_returns_updates(monkeypatch):
    monkeypatch.setattr(leadbot, "POLL_IN_THREAD", True)
    tg = BlockingTelegram()
    threading.Timer(0.05, tg.release.set).start()
    assert leadbot.fetch_updates(polling_app(), tg, None) == [{"update_id": 1}]


def test_on_windows_stopping_ends_the_long_poll_while_the_request_still_hangs(monkeypatch):
    monkeypatch.setattr(leadbot, "POLL_IN_THREAD", True)
    app, tg = polling_app(), BlockingTelegram()
    threading.Timer(0.05, app.stopping.set).start()
    with pytest.raises(leadbot.Stopped):
        leadbot.fetch_updates(app, tg, None)
    assert not tg.release.is_set()  # the request was abandoned, not waited for
    tg.release.set()

"""The test harness itself: fakes driven with plain requests and smtplib, and the bot launcher."""

import itertools
import json
import smtplib
import sys
import threading
import time
from email.message import EmailMessage

import pytest
import requests

import fakes
from fakes import FakeSMTP, run_bot, start_bot


@pytest.fixture
def http():
    session = requests.Session()
    session.trust_env = False  # a developer's proxy must not see 127.0.0.1 traffic
    yield session
    session.close()


def call(http, telegram, method, client_timeout=5, **params):
    return http.post(f"{telegram.url}/bot{telegram.token}/{method}", json=params, timeout=client_timeout)


def result(http, telegram, method, **params):
    response = call(http, telegram, method, **params)
    assert response.status_code == 200, response.text
    return response.json()["result"]


# Telegram: API surface


def test_get_me_and_auth_errors(telegram, http):
    assert result(http, telegram, "getMe")["username"] == "test_lead_bot"
    wrong = http.post(f"{telegram.url}/bot999:wrong/getMe")
    assert wrong.status_code == 401
    assert wrong.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
    unknown = call(http, telegram, "sendPhoto")
    assert (unknown.status_code, unknown.json()["description"]) == (404, "Not Found")


def test_long_poll_returns_as_soon_as_an_update_arrives(telegram, http):
    threading.Timer(0.1, telegram.send_text, args=(42, "привет")).start()
    started = time.monotonic()
    updates = result(http, telegram, "getUpdates", timeout=5)
    assert 0.075 < time.monotonic() - started < 2
    assert [u["message"]["text"] for u in updates] == ["привет"]


def test_long_poll_without_updates_waits_for_timeout(telegram, http):
    started = time.monotonic()
    assert result(http, telegram, "getUpdates", timeout=0.1) == []
    assert time.monotonic() - started >= 0.1


def test_offset_confirms_updates_and_limit_caps_them(telegram, http):
    first, second, third = (telegram.send_text(1, text) for text in "abc")
    assert [u["update_id"] for u in result(http, telegram, "getUpdates", limit=2)] == [first, second]
    assert [u["update_id"] for u in result(http, telegram, "getUpdates", offset=second + 1)] == [third]
    assert result(http, telegram, "getUpdates", offset=third + 1) == []
    assert telegram.confirmed_offset == third + 1
    assert [c.get("offset") for c in telegram.calls("getUpdates")] == [None, second + 1, third + 1]
    assert result(http, telegram, "getWebhookInfo")["pending_update_count"] == 0


def test_query_string_and_form_parameters_are_understood(telegram, http):
    update_id = telegram.send_text(1, "a")
    url = f"{telegram.url}/bot{telegram.token}"
    answer = http.post(f"{url}/getUpdates", params={"offset": update_id + 1, "allowed_updates": '["message"]'})
    assert answer.json() == {"ok": True, "result": []}
    assert telegram.calls("getUpdates")[0]["allowed_updates"] == ["message"]
    keyboard = {"keyboard": [[{"text": "Поделиться", "request_contact": True}]], "resize_keyboard": True}
    http.post(f"{url}/sendMessage", data={"chat_id": 5, "text": "123", "reply_markup": json.dumps(keyboard)})
    [message] = telegram.messages(5)
    assert (message["chat_id"], message["text"], message["reply_markup"]) == (5, "123", keyboard)


def test_send_message_validation(telegram, http):
    too_long = call(http, telegram, "sendMessage", chat_id=5, text="я" * 4097)
    assert (too_long.status_code, too_long.json()) == (
        400, {"ok": False, "error_code": 400, "description": "Bad Request: message is too long"})
    assert result(http, telegram, "sendMessage", chat_id=5, text="я" * 4096)["chat"]["id"] == 5
    empty = call(http, telegram, "sendMessage", chat_id=5, text="")
    assert (empty.status_code, empty.json()["description"]) == (400, "Bad Request: message text is empty")
    telegram.block(6)
    blocked = call(http, telegram, "sendMessage", chat_id=6, text="hi")
    assert (blocked.status_code, blocked.json()["description"]) == (403, "Forbidden: bot was blocked by the user")
    assert len(telegram.calls("sendMessage")) == 4
    assert telegram.texts(5) == ["я" * 4096] and telegram.texts(6) == []


def test_other_methods_are_recorded(telegram, http):
    assert result(http, telegram, "sendChatAction", chat_id=5, action="typing") is True
    assert result(http, telegram, "setMyCommands", commands=[{"command": "start", "description": "Начать"}])
    bad = call(http, telegram, "setMyCommands", commands=[{"command": "/Start", "description": "Начать"}])
    assert bad.status_code == 400
    assert telegram.calls("sendChatAction") == [{"chat_id": 5, "action": "typing"}]
    assert len(telegram.calls("setMyCommands")) == 2


def test_webhook_blocks_get_updates_until_deleted(telegram, http):
    telegram.webhook_url = "https://example.com/hook"
    assert result(http, telegram, "getWebhookInfo")["url"] == "https://example.com/hook"
    conflict = call(http, telegram, "getUpdates")
    assert conflict.status_code == 409 and conflict.json()["description"].startswith("Conflict:")
    assert result(http, telegram, "deleteWebhook") is True
    assert result(http, telegram, "getUpdates") == []


# Telegram: faults


def test_fail_answers_the_error_then_recovers(telegram, http):
    telegram.fail("sendMessage", 429, "Too Many Requests: retry after 3", {"retry_after": 3})
    limited = call(http, telegram, "sendMessage", chat_id=5, text="hi")
    assert limited.status_code == 429
    assert limited.json() == {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 3",
                              "parameters": {"retry_after": 3}}
    assert result(http, telegram, "sendMessage", chat_id=5, text="hi")
    assert telegram.texts(5) == ["hi"] and len(telegram.calls("sendMessage")) == 2


def test_disconnect_resets_the_connection(telegram, http):
    telegram.disconnect("getMe", times=2)
    for _ in range(2):
        with pytest.raises(requests.ConnectionError):
            call(http, telegram, "getMe")
    assert result(http, telegram, "getMe")["id"] == 777


def test_stall_causes_read_timeout_then_answers(telegram, http):
    telegram.stall("getMe", 0.4)
    with pytest.raises(requests.ReadTimeout):
        call(http, telegram, "getMe", client_timeout=0.1)
    telegram.stall("getMe", 0.1)
    started = time.monotonic()
    assert result(http, telegram, "getMe")["id"] == 777
    assert time.monotonic() - started >= 0.1


def test_http_error_is_a_non_json_page(telegram, http):
    telegram.http_error("getUpdates", 502, "<html><body>502 Bad Gateway</body></html>")
    page = call(http, telegram, "getUpdates")
    assert page.status_code == 502 and page.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ValueError):
        page.json()


def test_down_refuses_connections_and_cuts_long_polls_until_up(telegram, http):
    errors = []

    def poll():
        try:
            call(http, telegram, "getUpdates", timeout=5)
        except requests.ConnectionError as error:
            errors.append(error)

    poller = threading.Thread(target=poll)
    poller.start()
    telegram.wait_for(lambda: telegram.calls("getUpdates"))
    telegram.down()
    poller.join(2)
    assert errors, "the long poll should have been cut"
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{telegram.url}/bot{telegram.token}/getMe", timeout=1)
    telegram.up()
    assert result(http, telegram, "getMe")["id"] == 777


# Telegram: simulated users and inspection


def test_simulated_users_build_real_updates(telegram, http):
    telegram.send_text(10, "/start", username="ivan")
    telegram.send_text(-100, "всем привет", chat_type="supergroup", user_id=11)
    telegram.send_contact(10, "+79991234567")
    kinds = ["photo", "sticker", "voice", "video", "document", "location", "poll"]
    for kind in kinds:
        telegram.send_media(10, kind)
    telegram.push_update({"edited_message": telegram.build_message(10, text="правка", edit_date=1)})
    updates = result(http, telegram, "getUpdates")
    ids = [u["update_id"] for u in updates]
    assert ids == list(range(ids[0], ids[0] + 11))
    start = updates[0]["message"]
    assert start["from"] == {"id": 10, "is_bot": False, "first_name": "Иван", "username": "ivan",
                             "language_code": "ru"}
    assert start["chat"]["type"] == "private" and start["entities"][0]["type"] == "bot_command"
    group = updates[1]["message"]
    assert (group["chat"]["id"], group["chat"]["type"], group["from"]["id"]) == (-100, "supergroup", 11)
    contact = updates[2]["message"]["contact"]
    assert contact == {"phone_number": "+79991234567", "first_name": "Иван", "user_id": 10}
    assert all(kind in u["message"] for kind, u in zip(kinds, updates[3:10], strict=True))
    assert updates[10]["edited_message"]["text"] == "правка"


def test_wait_helpers(telegram, http):
    threading.Timer(0.05, lambda: [call(http, telegram, "sendMessage", chat_id=5, text=t) for t in "ab"]).start()
    assert telegram.wait_messages(5, 2) == ["a", "b"]
    assert telegram.wait_reply(5, after=1) == "b"
    with pytest.raises(AssertionError, match="3 message.*chat 5(.|\n)*sent to 5: 'b'"):
        telegram.wait_reply(5, after=2, timeout=0.05)


# LLM


def completion(http, llm, **body):
    return http.post(f"{llm.url}/chat/completions", json=body,
                     headers={"Authorization": "Bearer key-1"}, timeout=5)


MESSAGES = [{"role": "user", "content": "Нужен сайт"}]


def test_llm_answers_reply_and_records_requests(llm, http):
    answer = completion(http, llm, model="m-1", messages=MESSAGES).json()
    assert answer["model"] == "m-1" and answer["choices"][0]["message"]["content"] == llm.reply
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["total_tokens"] > 0
    llm.reply_fn = lambda body: body["messages"][-1]["content"].upper()
    answer = completion(http, llm, model="m-1", messages=MESSAGES).json()
    assert answer["choices"][0]["message"]["content"] == "НУЖЕН САЙТ"
    assert llm.calls == 2
    assert llm.requests[0]["json"]["messages"] == MESSAGES
    assert llm.requests[0]["headers"]["authorization"] == "Bearer key-1"
    assert completion(http, llm, messages=MESSAGES).status_code == 400


def test_llm_faults(llm, http):
    llm.fail_times(2, status=503)
    assert [completion(http, llm, model="m", messages=MESSAGES).status_code for _ in range(3)] == [503, 503, 200]
    llm.status = 500
    failed = completion(http, llm, model="m", messages=MESSAGES)
    assert (failed.status_code, failed.json()) == (500, {"error": {"message": "boom", "type": "server_error"}})
    llm.status, llm.raw = None, "{not json"
    garbled = completion(http, llm, model="m", messages=MESSAGES)
    assert garbled.status_code == 200 and garbled.text == "{not json"


def test_llm_delay_does_not_serialize_requests(llm):
    llm.delay = 0.3
    body = {"model": "m", "messages": MESSAGES}
    threads = [threading.Thread(target=completion, args=(requests, llm), kwargs=body) for _ in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 0.3 <= time.monotonic() - started < 0.8
    assert llm.calls == 3


# SMTP


def mail(subject="Новая заявка"):
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "bot@example.com", "manager@example.com", subject
    message.set_content("Клиент: Иван")
    return message


def test_smtp_receives_and_restarts_on_the_same_port(smtp):
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.send_message(mail())
    [received] = smtp.wait_for_messages(1)
    assert received["Subject"] == "Новая заявка" and received.get_content().strip() == "Клиент: Иван"
    assert (received.mail_from, received.rcpt_tos) == ("bot@example.com", ["manager@example.com"])
    smtp.stop()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", smtp.port, timeout=5)
    smtp.start()
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=5) as client:
        client.send_message(mail("Вторая"))
    assert [m["Subject"] for m in smtp.wait_for_messages(2)] == ["Новая заявка", "Вторая"]


def test_smtp_auth_rejects_wrong_and_missing_credentials():
    server = FakeSMTP(auth=("user", "pass"))
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("user", "wrong")
            with pytest.raises(smtplib.SMTPSenderRefused):
                client.send_message(mail())
            client.login("user", "pass")
            client.send_message(mail())
        assert len(server.wait_for_messages(1)) == 1
    finally:
        server.stop()


# The bot launcher, with a stand-in for leadbot.py

STAND_IN = """
import os, signal, sys, time
if "--echo" in sys.argv:
    print(sys.stdin.read().upper(), end="")
    sys.exit(4)
signal.signal(signal.SIGTERM, lambda *_: (print("stopping"), sys.exit(3)))  # before "started": no race
print("env", os.environ.get("TELEGRAM_BOT_TOKEN"), os.environ.get("SMTP_HOST"), os.environ.get("KEEP_ME"))
print("started", file=sys.stderr)
time.sleep(30)
"""


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN, encoding="utf-8")
    monkeypatch.setattr(fakes, "BOT_SCRIPT", script)
    monkeypatch.setenv("SMTP_HOST", "developer-smtp")
    monkeypatch.setenv("KEEP_ME", "kept")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM handlers need POSIX")
def test_bot_process_isolates_settings_and_stops_on_sigterm(stand_in, tmp_path):
    process = start_bot({"TELEGRAM_BOT_TOKEN": "t-1"}, cwd=tmp_path)
    output = process.wait_log("started")
    assert "env t-1 None kept" in output and process.alive()
    process.terminate()
    assert process.wait() == 3 and not process.alive()
    assert "stopping" in process.output()


def test_wait_log_fails_fast_when_the_bot_exits(stand_in, tmp_path):
    process = start_bot({}, "--echo", cwd=tmp_path)
    with pytest.raises(AssertionError, match="exited"):
        process.wait_log("never printed", timeout=5)


def test_run_bot_feeds_input_and_captures_output(stand_in, tmp_path):
    completed = run_bot({}, "--echo", cwd=tmp_path, input="привет\n")
    assert (completed.returncode, completed.stdout) == (4, "ПРИВЕТ\n")


# Telegram: groups, forum topics, buttons, voice


def api_error(response):
    return response.status_code, response.json()["description"]


FORUM_CHAT = {"id": -1001, "title": "Менеджеры", "type": "supergroup", "is_forum": True}


def bot_api(http, telegram):
    """ok(method, **params): its result; err(method, **params): (status, description)."""
    def ok(method, **params):
        return result(http, telegram, method, **params)

    def err(method, **params):
        return api_error(call(http, telegram, method, **params))

    return ok, err


def test_forum_topics_are_created_closed_reopened_and_edited(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.add_group(-1001, forum=True)
    telegram.add_group(-1002)
    telegram.add_group(-1003, forum=True, bot_can_manage_topics=False)
    topic = ok("createForumTopic", chat_id=-1001, name="Иван: сайт")
    assert topic == {"message_thread_id": topic["message_thread_id"], "name": "Иван: сайт",
                     "icon_color": 7322096}
    thread = topic["message_thread_id"]
    long_name = ok("createForumTopic", chat_id=-1001, name="я" * 200)
    assert long_name["name"] == "я" * 128  # Telegram cuts it, as TDLib's clean_name does
    assert err("createForumTopic", chat_id=-1001, name=" ") == (
        400, "Bad Request: title must be non-empty")
    assert err("createForumTopic", chat_id=-1002, name="x") == (
        400, "Bad Request: the chat is not a forum")
    assert err("createForumTopic", chat_id=-1003, name="x") == (
        400, "Bad Request: not enough rights to create a topic")
    assert err("createForumTopic", chat_id=-1009, name="x") == (
        400, "Bad Request: chat not found")
    where = {"chat_id": -1001, "message_thread_id": thread}
    assert ok("editForumTopic", **where, name="Иван: магазин") is True
    assert err("editForumTopic", **where, name="Иван: магазин") == (
        400, "Bad Request: TOPIC_NOT_MODIFIED")
    assert ok("closeForumTopic", **where) is True
    assert err("closeForumTopic", **where) == (
        400, "Bad Request: TOPIC_NOT_MODIFIED")
    assert telegram.topics(-1001)[thread]["closed"] is True
    assert telegram.topics(-1001)[thread]["name"] == "Иван: магазин"
    assert ok("reopenForumTopic", **where) is True
    assert telegram.topics(-1001)[thread]["closed"] is False
    unknown = {"chat_id": -1001, "message_thread_id": 999}
    assert err("closeForumTopic", **unknown) == (
        400, "Bad Request: message thread not found")


def test_messages_in_topics_and_replies_carry_thread_ids(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.add_group(-1001, forum=True)
    thread = ok("createForumTopic", chat_id=-1001, name="Лид")["message_thread_id"]
    card = ok("sendMessage", chat_id=-1001, text="Карточка", message_thread_id=thread)
    assert card["chat"] == FORUM_CHAT
    assert (card["message_thread_id"], card["is_topic_message"]) == (thread, True)
    root = card["reply_to_message"]  # the topic's creation service message
    assert (root["message_id"], root["forum_topic_created"]["name"]) == (thread, "Лид")
    assert telegram.messages(-1001)[0]["message_id"] == card["message_id"]
    assert telegram.messages(-1001)[0]["message_thread_id"] == thread
    general = ok("sendMessage", chat_id=-1001, text="Всем")
    assert "message_thread_id" not in general
    assert telegram.messages(-1001)[1]["message_thread_id"] is None
    for bad in (thread + 100, card["message_id"]):  # a message is no topic
        assert err("sendMessage", chat_id=-1001, text="x",
                   message_thread_id=bad) == (400, "Bad Request: message thread not found")
    answer = ok("sendMessage", chat_id=-1001, text="Ответ",
                    reply_parameters={"message_id": card["message_id"]})
    assert answer["message_thread_id"] == thread
    assert answer["reply_to_message"]["text"] == "Карточка"
    assert err("sendMessage", chat_id=-1001, text="x",
               reply_to_message_id=12345) == (400, "Bad Request: message to be replied not found")
    assert ok("sendMessage", chat_id=-1001, text="x", reply_parameters={
        "message_id": 12345, "allow_sending_without_reply": True})
    ok("closeForumTopic", chat_id=-1001, message_thread_id=thread)
    assert ok("sendMessage", chat_id=-1001, text="админ", message_thread_id=thread)
    telegram.add_group(-1001, forum=True, bot_status="member")  # admins only write in closed topics
    assert err("sendMessage", chat_id=-1001, text="x",
                          message_thread_id=thread) == (400, "Bad Request: TOPIC_CLOSED")
    telegram.add_group(-1001, forum=True, bot_status="kicked")
    assert err("sendMessage", chat_id=-1001, text="x") == (
        403, "Forbidden: bot was kicked from the supergroup chat")


def test_get_chat_and_get_chat_member_tell_whether_the_bot_can_manage_topics(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.add_group(-1001, forum=True)
    telegram.add_group(-1002, bot_status="member")
    chat = ok("getChat", chat_id=-1001)
    assert (chat["type"], chat["is_forum"], chat["title"]) == ("supergroup", True, "Менеджеры")
    assert "is_forum" not in ok("getChat", chat_id=-1002)
    assert ok("getChat", chat_id=42)["type"] == "private"
    assert err("getChat", chat_id=-1009) == (400, "Bad Request: chat not found")
    bot = ok("getChatMember", chat_id=-1001, user_id=777)
    assert (bot["status"], bot["can_manage_topics"]) == ("administrator", True)
    assert bot["user"]["id"] == 777
    assert ok("getChatMember", chat_id=-1002, user_id=777)["status"] == "member"
    telegram.add_group(-1001, forum=True, bot_can_manage_topics=False)
    assert ok("getChatMember", chat_id=-1001, user_id=777)["can_manage_topics"] is False
    assert ok("getChatMember", chat_id=-1001, user_id=5)["status"] == "left"
    telegram.send_group_text(-1001, "привет", user_id=5)
    assert ok("getChatMember", chat_id=-1001, user_id=5)["status"] == "member"


def test_group_members_write_in_topics_reply_and_edit(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.add_group(-1001, forum=True)
    telegram.add_group(-1002)
    telegram.add_group(-3, chat_type="group")
    thread = ok("createForumTopic", chat_id=-1001, name="Лид")["message_thread_id"]
    card = ok("sendMessage", chat_id=-1001, text="Карточка", message_thread_id=thread)
    telegram.send_group_text(-1001, "Здравствуйте!", user_id=9, thread_id=thread)
    telegram.send_group_text(-1001, "Ответ", user_id=9, reply_to=card["message_id"])
    telegram.send_group_text(-1001, "Болтовня", user_id=9)
    plain = ok("sendMessage", chat_id=-1002, text="Карточка")
    telegram.send_group_text(-1002, "Ответ", user_id=9, reply_to=plain["message_id"])
    basic = ok("sendMessage", chat_id=-3, text="Карточка")
    telegram.send_group_text(-3, "Ответ", user_id=9, reply_to=basic["message_id"])
    telegram.send_group_media(-1001, "photo", user_id=9, thread_id=thread, caption="макет")
    telegram.send_group_text(-1001, "Не в тему", user_id=9, thread_id=thread,
                             is_topic_message=False)
    private = telegram.send_text(10, "мой номер 8917")
    updates = ok("getUpdates")
    in_topic, reply, chatter, plain_reply, basic_reply, photo, forced, first = (
        u["message"] for u in updates)
    assert (in_topic["message_thread_id"], in_topic["is_topic_message"]) == (thread, True)
    created = in_topic["reply_to_message"]["forum_topic_created"]
    assert created == {"name": "Лид", "icon_color": 7322096}
    assert in_topic["from"] == {"id": 9, "is_bot": False, "first_name": "Мария",
                                "language_code": "ru"}
    assert in_topic["chat"] == FORUM_CHAT
    assert reply["message_thread_id"] == thread and reply["reply_to_message"]["text"] == "Карточка"
    assert "reply_to_message" not in reply["reply_to_message"]  # not nested deeper
    assert not {"message_thread_id", "is_topic_message", "reply_to_message"} & set(chatter)
    assert plain_reply["message_thread_id"] == plain["message_id"]  # a supergroup's reply thread
    assert "is_topic_message" not in plain_reply
    assert "message_thread_id" not in basic_reply
    assert basic_reply["reply_to_message"]["text"] == "Карточка"
    assert photo["photo"] and photo["caption"] == "макет" and photo["message_thread_id"] == thread
    assert "is_topic_message" not in forced and forced["message_thread_id"] == thread
    with pytest.raises(KeyError):
        telegram.send_group_text(-1001, "x", user_id=9, reply_to=99999)
    telegram.edit_text(10, first["message_id"], "мой номер 89171234567")
    telegram.edit_text(-1001, in_topic["message_id"], "/start правка")
    edits = [u["edited_message"] for u in ok("getUpdates", offset=private + 1)]
    assert [(e["message_id"], e["text"]) for e in edits] == [
        (first["message_id"], "мой номер 89171234567"), (in_topic["message_id"], "/start правка")]
    assert edits[0]["edit_date"] and edits[1]["message_thread_id"] == thread
    assert edits[1]["entities"][0]["type"] == "bot_command"
    with pytest.raises(KeyError):
        telegram.edit_text(-1001, card["message_id"], "the bot's own")


def test_buttons_give_callback_queries_answered_once(telegram, http):
    ok, err = bot_api(http, telegram)
    keyboard = {"inline_keyboard": [[{"text": "Вернуть клиента боту", "callback_data": "back:7"}]]}
    sent = ok("sendMessage", chat_id=10, text="Карточка", reply_markup=keyboard)
    assert sent["reply_markup"] == keyboard
    too_long = {"inline_keyboard": [[{"text": "x", "callback_data": "я" * 33}]]}
    assert err("sendMessage", chat_id=10, text="x", reply_markup=too_long) == (
        400, "Bad Request: BUTTON_DATA_INVALID")
    telegram.press_button(10, sent["message_id"], "back:7")
    telegram.press_button(10, 4242, "old", user_id=11, first_name="Мария")
    pressed, stale = (u["callback_query"] for u in ok("getUpdates"))
    assert (pressed["data"], pressed["from"]["id"]) == ("back:7", 10)
    assert pressed["message"]["text"] == "Карточка"
    assert pressed["message"]["reply_markup"] == keyboard and pressed["chat_instance"]
    inaccessible = {"chat": {"id": 10, "type": "private"}, "message_id": 4242, "date": 0}
    assert stale["message"] == inaccessible
    assert stale["from"]["id"] == 11
    assert ok("answerCallbackQuery", callback_query_id=pressed["id"], text="Готово")
    again = call(http, telegram, "answerCallbackQuery", callback_query_id=pressed["id"])
    assert api_error(again) == (400, "Bad Request: query is too old and response timeout expired "
                                     "or query ID is invalid")
    assert err("answerCallbackQuery", callback_query_id=stale["id"],
                          text="я" * 201) == (400, "Bad Request: MESSAGE_TOO_LONG")


def test_get_updates_honours_allowed_updates(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.push_update({"message_reaction": {"chat": {"id": 1}, "message_id": 1}})
    first = telegram.send_text(10, "a")
    assert [u["update_id"] for u in ok("getUpdates")] == [first]
    assert telegram.allowed_updates is None and len(telegram.discarded) == 1
    sent = ok("sendMessage", chat_id=10, text="?", reply_markup={
        "inline_keyboard": [[{"text": "Да", "callback_data": "y"}]]})
    ok("getUpdates", offset=first + 1, allowed_updates=["message"])
    assert telegram.allowed_updates == ["message"]
    telegram.edit_text(10, 1, "b")
    telegram.press_button(10, sent["message_id"], "y")
    kept = telegram.send_text(10, "c")
    assert [u["update_id"] for u in ok("getUpdates")] == [kept]
    ok("getUpdates", offset=kept + 1,
           allowed_updates=["message", "edited_message", "callback_query"])
    telegram.edit_text(10, 1, "d")
    assert [list(u)[1] for u in ok("getUpdates")] == ["edited_message"]
    assert len(telegram.discarded) == 3


# Telegram: per-chat faults, proxies' pages, flood limits


def test_fail_chat_fails_one_chat_while_others_go_through(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.fail_chat(5, "sendMessage", 429, "Too Many Requests: retry after 20",
                       {"retry_after": 20}, times=2)
    assert call(http, telegram, "sendMessage", chat_id=6, text="other").status_code == 200
    limited = call(http, telegram, "sendMessage", chat_id=5, text="hi")
    assert limited.json()["parameters"] == {"retry_after": 20} and limited.status_code == 429
    assert call(http, telegram, "sendMessage", chat_id=7, text="other").status_code == 200
    assert call(http, telegram, "sendMessage", chat_id=5, text="hi").status_code == 429
    assert call(http, telegram, "sendMessage", chat_id=5, text="hi").status_code == 200
    telegram.stall_chat(5, "sendMessage", 0.3)
    started = time.monotonic()
    assert call(http, telegram, "sendMessage", chat_id=6, text="fast").status_code == 200
    assert time.monotonic() - started < 0.2
    assert call(http, telegram, "sendMessage", chat_id=5, text="slow").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_html_error_pages_for_a_method_or_any(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.html_error("getMe", 404)
    page = call(http, telegram, "getMe")
    assert page.status_code == 404 and "<h1>404 Not Found</h1>" in page.text
    assert page.headers["Content-Type"].startswith("text/html")
    telegram.html_error("*", 502, times=2)
    assert call(http, telegram, "sendMessage", chat_id=5, text="x").status_code == 502
    assert call(http, telegram, "getUpdates").status_code == 502
    assert call(http, telegram, "getMe").status_code == 200 and telegram.texts(5) == []


def test_group_rate_limit_answers_429_until_the_window_moves(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.add_group(-1001)
    telegram.group_rate_limit(-1001, per_minute=3, window=0.5)
    codes = [call(http, telegram, "sendMessage", chat_id=-1001, text=str(n)).status_code
             for n in range(4)]
    assert codes == [200, 200, 200, 429]
    limited = call(http, telegram, "sendMessage", chat_id=-1001, text="x").json()
    assert limited["parameters"] == {"retry_after": 1}
    assert limited["description"] == "Too Many Requests: retry after 1"
    assert call(http, telegram, "sendMessage", chat_id=5, text="private").status_code == 200
    telegram.wait_for(lambda: call(http, telegram, "sendMessage", chat_id=-1001, text="z").ok, 2)
    telegram.group_rate_limit(-1001, per_minute=20)
    assert len(telegram.texts(-1001)) == 4
    telegram.group_rate_limit(-1001, per_minute=0)
    assert all(call(http, telegram, "sendMessage", chat_id=-1001, text="x").ok for _ in range(25))


def test_voice_files_are_served_by_get_file_and_the_download_url(telegram, http):
    ok, err = bot_api(http, telegram)
    telegram.send_voice(10, duration=4, data=b"OggS-voice-bytes")
    telegram.send_voice(10, file_size=21 * 1024 * 1024)
    small, big = (u["message"]["voice"] for u in ok("getUpdates"))
    assert (small["duration"], small["file_size"], small["mime_type"]) == (4, 16, "audio/ogg")
    file = ok("getFile", file_id=small["file_id"])
    assert file["file_size"] == 16 and file["file_path"].startswith("voice/")
    url = f"{telegram.url}/file/bot{telegram.token}/{file['file_path']}"
    assert http.get(url, timeout=5).content == b"OggS-voice-bytes"
    assert telegram.calls("download") == [{"file_path": file["file_path"]}]
    assert err("getFile", file_id=big["file_id"]) == (
        400, "Bad Request: file is too big")
    assert err("getFile", file_id="nope") == (400, "Bad Request: invalid file_id")
    missing = http.get(f"{telegram.url}/file/bot{telegram.token}/voice/nope.oga", timeout=5)
    assert (missing.status_code, missing.json()["description"]) == (404, "Not Found")
    wrong_token = f"{telegram.url}/file/bot1:wrong/{file['file_path']}"
    assert http.get(wrong_token, timeout=5).status_code == 404
    telegram.fail("download", 404, "Not Found")
    assert http.get(url, timeout=5).status_code == 404
    telegram.stall("download", 0.4)
    with pytest.raises(requests.ReadTimeout):
        http.get(url, timeout=0.1)
    telegram.fail("getFile", 500, "Internal Server Error")
    assert call(http, telegram, "getFile", file_id=small["file_id"]).status_code == 500
    assert ok("getFile", file_id="voice-id")["file_path"]  # send_media's voice


# LLM: stream variants and transcription


def stream(http, llm, **body):
    body = {"model": "m", "messages": MESSAGES, "stream": True, **body}
    return http.post(f"{llm.url}/chat/completions", json=body, timeout=5, stream=True)


def sse_events(response):
    """The data of each server-sent event as it arrives, its data: lines joined as SSE says."""
    lines = []
    for line in response.iter_lines():
        line = line.decode()
        if line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        elif not line and lines:
            yield "\n".join(lines)
            lines = []


def test_llm_streams_under_any_label_over_several_data_lines_with_usage(llm, http):
    llm.stream_content_type = "application/octet-stream"
    llm.multiline_data = llm.usage_chunk = True
    response = stream(http, llm)
    assert response.headers["Content-Type"] == "application/octet-stream"
    events = list(sse_events(response))
    assert events[-1] == "[DONE]" and all("\n" in event for event in events[:-1])
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == llm.reply and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    llm.stream_content_type, llm.multiline_data = "text/plain", False
    response = stream(http, llm)
    assert response.headers["Content-Type"] == "text/plain"
    assert all("\n" not in event for event in sse_events(response))


def test_llm_holds_the_connection_after_finish_reason(llm, http):
    llm.hold_after_finish = 0.4
    started = time.monotonic()
    response = stream(http, llm)
    lines = response.iter_lines(decode_unicode=True)
    finished = next(line for line in lines if '"finish_reason": "stop"' in line)
    assert finished and time.monotonic() - started < 0.3
    assert "[DONE]" in "".join(lines) and time.monotonic() - started >= 0.4


def test_llm_streams_one_word_at_a_time_at_a_steady_pace(llm, http):
    llm.reply, llm.chunks, llm.chunk_delay = "раз два три четыре", "word", 0.1
    started, arrivals = time.monotonic(), []
    for event in itertools.islice(sse_events(stream(http, llm)), 1, 5):
        arrivals.append(time.monotonic() - started)
        assert len(json.loads(event)["choices"][0]["delta"]["content"].split()) == 1
    assert arrivals[-1] >= 0.4 and arrivals[-1] - arrivals[0] >= 0.3


def transcribe(http, llm, data=b"OggS-audio", **fields):
    return http.post(f"{llm.url}/audio/transcriptions", timeout=5,
                     data={"model": "whisper-1", **fields},
                     files={"file": ("voice.ogg", data, "audio/ogg")},
                     headers={"Authorization": "Bearer stt-key"})


def test_transcription_endpoint_records_the_upload_and_answers_the_transcripts(llm, http):
    audio = b"OggS\x00\r\n--binary\r\n\x00" * 50
    llm.transcripts.append("Перезвоните мне")
    assert transcribe(http, llm, audio).json() == {"text": "Перезвоните мне"}
    [upload] = llm.transcriptions
    assert (upload["model"], upload["filename"]) == ("whisper-1", "voice.ogg")
    assert upload["data"] == audio
    assert upload["headers"]["authorization"] == "Bearer stt-key"
    assert transcribe(http, llm).json() == {"text": llm.transcript}
    plain = transcribe(http, llm, response_format="text")
    assert plain.text == llm.transcript and plain.headers["Content-Type"].startswith("text/plain")
    assert transcribe(http, llm, response_format="verbose_json").json()["language"] == "russian"
    no_file = http.post(f"{llm.url}/audio/transcriptions", data={"model": "m"}, timeout=5)
    assert no_file.status_code == 400
    assert llm.calls == 0  # chat requests are counted apart


def test_transcription_faults(llm, http):
    llm.stt_fail_times(1, status=503)
    assert [transcribe(http, llm).status_code for _ in range(2)] == [503, 200]
    llm.stt_models = {"whisper-large-v3"}
    missing = transcribe(http, llm)
    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "model_not_found")
    llm.stt_models, llm.stt_raw = None, "<html>bad gateway</html>"
    assert transcribe(http, llm).text == "<html>bad gateway</html>"
    llm.stt_raw, llm.stt_delay = None, 0.4
    with pytest.raises(requests.ReadTimeout):
        http.post(f"{llm.url}/audio/transcriptions", timeout=0.1, data={"model": "m"},
                  files={"file": ("voice.ogg", b"x")})
    llm.stt_status, llm.stt_delay = 500, 0
    assert transcribe(http, llm).status_code == 500
    assert completion(http, llm, model="m", messages=MESSAGES).status_code == 200

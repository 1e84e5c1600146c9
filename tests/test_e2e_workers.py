"""Many chats at once: the LLM writes off the dispatch path, each chat stays in order, every file is
consistent (no timing asserts)."""
import json
import re
from pathlib import Path

from fakes import CONTACT_REQUEST, read_rows, wait_until
from fakes import QUESTIONS, TEXTS

CHATS = range(4001, 4016)
BYSTANDERS = range(4101, 4106)  # chats without a dialog: nothing but the update id guards them
THANKS = "Спасибо"


def task(chat):
    return f"Сайт для клиента-{chat}"


def phone(chat):
    return f"+7 9{chat:09d}"


def answer_per_chat(request):
    """The offer and the summary name the chat whose answers they were written from."""
    system, user = (m["content"] for m in request["messages"])
    marker = re.search(r"клиента-\d+", user).group()
    if "ровно две строки" in system:
        return f"Сайт {marker}\nКлиенту {marker} нужен сайт."
    return f"Рекомендуем лендинг для {marker}."


def expected_texts(chat):
    """What one chat reads, in this order, for /help, /start, three answers and a contact."""
    return [TEXTS["help"], "Здравствуйте", QUESTIONS[0][1], QUESTIONS[1][1], QUESTIONS[2][1],
            f"Рекомендуем лендинг для клиента-{chat}.", CONTACT_REQUEST, THANKS]


def in_order(texts, expected):
    """texts are exactly the expected messages (each given by a part of it), in this order."""
    return len(texts) == len(expected) and all(e in t for e, t in zip(expected, texts))


def write_all_at_once(telegram, chats, messages):
    """Every chat sends its messages back to back, without waiting for a reply; returns the last update_id."""
    last = None
    for chat in chats:
        for text in messages(chat):
            last = telegram.send_text(chat, text)
    return last


def qualifying(chat):
    return ["/help", "/start", task(chat), "В течение месяца", "50–200 тыс. ₽"]


def journal_entries(bot_env):
    """Every line of state.jsonl as JSON; a torn or foreign line fails the test."""
    text = (Path(bot_env["DATA_DIR"]) / "state.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def all_confirmed(telegram, last_update):
    """Waits until the bot confirmed every update: nothing it took is still queued or being handled."""
    telegram.wait_for(lambda: telegram.confirmed_offset > last_update, 15, "every update confirmed")


def check_every_chat(telegram, bot_env):
    for chat in CHATS:
        texts = telegram.texts(chat)
        assert in_order(texts, expected_texts(chat)), (chat, texts)
    rows = read_rows(bot_env)
    assert sorted(int(row["chat_id"]) for row in rows) == list(CHATS)  # one row per dialog
    for row in rows:
        chat = int(row["chat_id"])
        assert row["contact"].lstrip("'") == phone(chat) and row["status"] == "new"
        assert row["intent"] == f"Сайт клиента-{chat}"  # notes from this chat's own answers


def test_a_burst_keeps_every_chat_in_order_with_one_row_and_mail_each_and_nothing_handled_twice(
        bot, bot_env, telegram, llm, smtp):
    llm.delay = 0.1
    llm.reply_fn = answer_per_chat
    bot()
    write_all_at_once(telegram, CHATS, qualifying)
    write_all_at_once(telegram, BYSTANDERS, lambda chat: ["/help"])  # done while offers are written
    telegram.wait_for(lambda: all(CONTACT_REQUEST in "".join(telegram.texts(c)) for c in CHATS), 20,
                      "every chat asked for a contact")
    last = write_all_at_once(telegram, CHATS, lambda chat: [phone(chat)])
    telegram.wait_for(lambda: all(THANKS in "".join(telegram.texts(c)) for c in CHATS), 20, "every thank-you")
    all_confirmed(telegram, last)  # a second answer to any update would have been sent by now
    check_every_chat(telegram, bot_env)
    assert all(telegram.texts(chat) == [TEXTS["help"]] for chat in BYSTANDERS)
    assert len(llm.requests) == 2 * len(CHATS)  # one offer and one summary per dialog
    smtp.wait_for_messages(len(CHATS))  # emails go out in the background
    mailed = [line for mail in smtp.messages for line in mail.get_content().splitlines() if line.startswith("Чат:")]
    assert sorted(mailed) == sorted(f"Чат: {chat}" for chat in CHATS)


def test_sigterm_in_a_burst_leaves_a_clean_state_file_and_every_dialog_goes_on_after_a_restart(
        bot, bot_env, telegram, llm):
    llm.delay = 0.2
    llm.reply_fn = answer_per_chat
    process = bot(SMTP_HOST=None)
    write_all_at_once(telegram, CHATS, qualifying)
    wait_until(lambda: len(llm.requests) >= 4, 10, message="offers being written")
    process.terminate()
    assert process.wait(10) == 0
    unfinished = [c for c in CHATS if CONTACT_REQUEST not in "".join(telegram.texts(c))]
    assert unfinished  # the test stopped the bot in the middle of the burst
    assert {entry["chat"] for entry in journal_entries(bot_env)} <= set(CHATS)

    llm.delay = 0.05  # after the restart the offers need not take long
    process = bot(SMTP_HOST=None)
    telegram.wait_for(lambda: all(CONTACT_REQUEST in "".join(telegram.texts(c)) for c in CHATS), 20,
                      "every chat asked for a contact after the restart")
    last = write_all_at_once(telegram, CHATS, lambda chat: [phone(chat)])
    telegram.wait_for(lambda: all(THANKS in "".join(telegram.texts(c)) for c in CHATS), 20, "every thank-you")
    all_confirmed(telegram, last)
    check_every_chat(telegram, bot_env)
    process.terminate()
    assert process.wait(10) == 0
    assert {e["chat"] for e in journal_entries(bot_env) if e["dialog"]} == set(CHATS)


def test_what_was_handled_before_a_sigterm_is_not_handled_again_after_the_restart(bot, telegram, llm):
    llm.delay = 0.5
    process = bot()
    write_all_at_once(telegram, [4201], qualifying)  # its offer holds back the confirmed offset
    telegram.wait_for(lambda: llm.requests, 10, "the offer being written")
    telegram.send_text(4202, "/help")
    telegram.wait_messages(4202, 1)
    process.terminate()
    assert process.wait(10) == 0

    llm.delay = 0  # the offer is written again after the restart: it need not be slow now
    bot()
    telegram.send_text(4202, "/help")
    all_confirmed(telegram, telegram.send_text(4201, "/help"))  # and so whatever came again is handled
    telegram.wait_messages(4202, 2)  # confirmed once saved: its lane may still be sending
    telegram.wait_messages(4201, 8)  # its /help is answered at once: commands never wait for the LLM
    assert telegram.texts(4202) == [TEXTS["help"]] * 2
    texts = telegram.texts(4201)
    assert texts[1:].count(TEXTS["help"]) == 1, texts
    dialog = texts[:1] + [t for t in texts[1:] if t != TEXTS["help"]]
    assert in_order(dialog, [*expected_texts(4201)[:5], llm.reply, CONTACT_REQUEST]), texts

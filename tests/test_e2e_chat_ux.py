"""What a client sees in Telegram: command menu, buttons, typing…, /cancel, /help and /forget."""
import contextlib
import inspect
import json
import re
import threading
from pathlib import Path

import leadbot
from fakes import ANSWERS, CONTACT_REQUEST, TEXTS, full_dialog, reach_contact_step, read_rows, say, wait_until

REMOVE = {"remove_keyboard": True}


def leads_bytes(bot_env):
    return (Path(bot_env["DATA_DIR"]) / "leads.csv").read_bytes()


def state_text(bot_env):
    """The dialog-state file with its \\u escapes decoded, so a client's words can be looked for."""
    lines = (Path(bot_env["DATA_DIR"]) / "state.jsonl").read_text(encoding="utf-8").splitlines()
    return "\n".join(json.dumps(json.loads(line), ensure_ascii=False) for line in lines)


def last_message(telegram, chat_id, containing):
    """The last message to chat_id whose text contains `containing`, with its reply_markup."""
    return [m for m in telegram.messages(chat_id) if containing in m["text"]][-1]


def button_rows(message):
    return (message["reply_markup"] or {}).get("keyboard") or []


def typing_actions(telegram, chat_id):
    return [call for call in telegram.calls("sendChatAction")
            if call.get("chat_id") == chat_id and call.get("action") == "typing"]


def test_the_command_menu_is_registered_in_russian_at_start_up(bot, telegram):
    bot()
    [call] = telegram.wait_for(lambda: telegram.calls("setMyCommands"), message="setMyCommands")
    menu = {c["command"]: c["description"] for c in call["commands"]}
    assert list(menu) == ["start", "help", "cancel", "forget"]
    assert "заново" in menu["start"].lower()
    assert "человек" in menu["help"].lower()
    assert "прервать" in menu["cancel"].lower() and "ничего не сохран" in menu["cancel"].lower()
    assert "удалить мои данные" in menu["forget"].lower()


def test_help_lists_the_commands_and_how_to_reach_a_person(bot, telegram):
    bot()
    answer = say(telegram, 2001, "/help", "/forget")
    assert "/start" in answer and "/cancel" in answer
    assert "менеджер" in answer


def test_contact_button_refuses_someone_elses_contact_and_accepts_the_clients_own(bot, bot_env, telegram):
    bot(PRIVACY_URL="https://example.ru/privacy")
    reach_contact_step(telegram, 2002)
    request = last_message(telegram, 2002, CONTACT_REQUEST)
    assert button_rows(request) == [[{"text": "📱 Поделиться номером", "request_contact": True}],
                                    [{"text": TEXTS["decline_button"]}]]
    assert "@username" in request["text"] and "email" in request["text"]  # typing it works too
    assert "менеджер" in request["text"] and "соглаш" in request["text"]  # purpose and consent
    assert "https://example.ru/privacy" in request["text"]

    say(telegram, 2002, {"phone": "+79990001122", "user_id": 555}, "своим номером")
    refusal = telegram.messages(2002)[-1]
    assert button_rows(refusal)[0][0]["request_contact"] is True  # the step goes on, button and all
    assert read_rows(bot_env) == []

    say(telegram, 2002, {"phone": "+79991234567"}, "Спасибо")
    assert telegram.messages(2002)[-1]["reply_markup"] == REMOVE
    [row] = read_rows(bot_env)
    assert row["contact"].lstrip("'") == "+79991234567" and row["status"] == "new"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", row["timestamp"])  # consent given


def test_declining_to_leave_a_contact_removes_the_keyboard(bot, bot_env, telegram):
    bot()
    reach_contact_step(telegram, 2003)
    assert "Политика" not in last_message(telegram, 2003, CONTACT_REQUEST)["text"]  # PRIVACY_URL unset
    say(telegram, 2003, "нет", "без контакта")
    assert telegram.messages(2003)[-1]["reply_markup"] == REMOVE
    assert read_rows(bot_env)[0]["status"] == "rejected"


def test_choices_come_as_buttons_and_free_text_is_accepted_too(bot, bot_env, telegram):
    bot()
    say(telegram, 2004, "/start", "задача")
    timeline = say(telegram, 2004, "Сайт для пекарни", "Когда")
    choices = [row[0]["text"] for row in button_rows(last_message(telegram, 2004, timeline))]
    assert len(choices) >= 2 and any("месяц" in c for c in choices)

    budget = say(telegram, 2004, choices[1], "бюджет")  # a button pressed
    assert any("тыс" in row[0]["text"] for row in button_rows(last_message(telegram, 2004, budget)))
    say(telegram, 2004, "около ста тысяч", CONTACT_REQUEST)  # free text instead of a button
    offer = [m for m in telegram.messages(2004) if m["text"].startswith("Рекомендуем")][-1]
    assert offer["reply_markup"] == REMOVE  # the budget buttons go away with the answer

    say(telegram, 2004, "+7 999 123-45-67", "Спасибо")
    notes = read_rows(bot_env)[0]["notes"]
    assert choices[1] in notes and "около ста тысяч" in notes


def reach_contact_step_without_the_last_answer(telegram, chat_id):
    say(telegram, chat_id, "/start", "задача")
    for answer in ANSWERS[:-1]:
        before = len(telegram.texts(chat_id))
        telegram.send_text(chat_id, answer)
        telegram.wait_messages(chat_id, before + 1)


def test_typing_is_shown_before_the_llm_call(bot, telegram, llm):
    llm.delay = 6  # longer than the 5 s Telegram shows one typing action
    bot(LLM_TIMEOUT="10")
    reach_contact_step_without_the_last_answer(telegram, 2005)
    assert typing_actions(telegram, 2005) == []

    telegram.send_text(2005, ANSWERS[-1])
    wait_until(lambda: llm.requests, message="the LLM call")
    wait_until(lambda: typing_actions(telegram, 2005), message="typing while the LLM writes")
    assert llm.reply not in telegram.texts(2005)  # shown while the LLM writes (6 s), not after
    # The renewal every 4.5 s is seen in-process, at 50 times the pace: the next test.


@contextlib.contextmanager
def quick_typing_bot(tmp_path, telegram, llm, asked):
    """The bot's loop (leadbot.run) in this process against the fakes, its Telegram renewing 'typing…' 50 times
    faster than the bot asks; each interval asked for goes into `asked`."""
    class QuickTyping(leadbot.Telegram):
        def typing(self, chat_id, done, *args, **kwargs):
            call = inspect.signature(leadbot.Telegram.typing).bind(self, chat_id, done, *args, **kwargs)
            call.apply_defaults()
            asked.append(call.arguments["every"])
            super().typing(chat_id, done, every=call.arguments["every"] / 50)

    cfg = leadbot.read_config({"TELEGRAM_BOT_TOKEN": telegram.token, "TELEGRAM_API_URL": telegram.url,
                               "LLM_BASE_URL": llm.url, "LLM_MODEL": "test-model", "LLM_TIMEOUT": "10",
                               "POLL_TIMEOUT": "1", "DATA_DIR": str(tmp_path / "data")})
    bot = leadbot.Bot(cfg, QuickTyping(cfg, threading.Event()), "telegram")
    loop = threading.Thread(target=leadbot.run, args=(bot,), daemon=True)
    loop.start()
    try:
        yield
    finally:
        bot.stopping.set()
        loop.join(5)


def test_typing_is_renewed_while_the_llm_is_slow(tmp_path, telegram, llm):
    asked = []
    with quick_typing_bot(tmp_path, telegram, llm, asked):
        llm.delay = 0.6  # longer than several renewals at this pace, as 6 s is at the real one
        reach_contact_step_without_the_last_answer(telegram, 2009)
        telegram.send_text(2009, ANSWERS[-1])
        wait_until(lambda: llm.requests, message="the LLM call")
        telegram.wait_for(lambda: len(typing_actions(telegram, 2009)) >= 2, message="a renewed typing action")
        assert llm.reply not in telegram.texts(2009)  # renewed while the answer was still coming
        assert asked and all(every < 5 for every in asked)  # Telegram shows one typing action for 5 s


def test_typing_stops_when_the_client_cancels_while_the_llm_writes(tmp_path, telegram, llm):
    with quick_typing_bot(tmp_path, telegram, llm, []):
        llm.delay = 0.6  # six renewals at this pace
        reach_contact_step_without_the_last_answer(telegram, 2010)
        telegram.send_text(2010, ANSWERS[-1])
        telegram.wait_for(lambda: len(typing_actions(telegram, 2010)) >= 2, message="a renewed typing action")
        say(telegram, 2010, "/cancel", "ничего не сохранено")
        typed = len(typing_actions(telegram, 2010))
        wait_until(lambda: len(llm.requests) >= 1, message="the offer asked for")
        telegram.wait_for(lambda: len(typing_actions(telegram, 2010)) <= typed + 1 and
                          len(llm.requests) == 1, message="no notes asked for a cancelled dialog")
        assert len(typing_actions(telegram, 2010)) <= typed + 1  # one may have been on its way


def test_cancel_saves_nothing_and_removes_the_keyboard(bot, bot_env, telegram, llm, smtp):
    bot()
    reach_contact_step(telegram, 2006)
    assert ANSWERS[0] in state_text(bot_env)
    say(telegram, 2006, "/cancel", "ничего не сохранено")
    assert telegram.messages(2006)[-1]["reply_markup"] == REMOVE
    assert ANSWERS[0] not in state_text(bot_env)  # the answers are not kept on disk either

    say(telegram, 2006, "+7 999 123-45-67", "Здравствуйте")  # a new dialog, not a lead
    assert read_rows(bot_env) == [] and smtp.messages == []

    assert "/forget" in say(telegram, 2007, "/cancel", "/forget")  # nothing to cancel: says what helps


def test_first_name_from_telegram_greets_the_client_and_names_the_lead(bot, bot_env, telegram):
    bot()
    full_dialog(telegram, 2008, first_name="Мария")
    assert "Здравствуйте, Мария!" in telegram.texts(2008)[0]
    assert read_rows(bot_env)[0]["client_name"] == "Мария"


def test_forget_removes_every_row_of_that_chat_and_keeps_the_others_byte_for_byte(bot, bot_env, telegram):
    process = bot()
    full_dialog(telegram, 3001, first_name="Борис")
    only_b = leads_bytes(bot_env)
    full_dialog(telegram, 3002, contact="+7 999 000-11-22", first_name="Аполлинария")
    b_a = leads_bytes(bot_env)
    full_dialog(telegram, 3003, first_name="Светлана")
    b_a_c = leads_bytes(bot_env)
    full_dialog(telegram, 3002, contact="apollinaria@example.ru", first_name="Аполлинария")
    assert "Аполлинария" in state_text(bot_env)

    assert "удалены" in say(telegram, 3002, "/forget", "удален")
    assert telegram.messages(3002)[-1]["reply_markup"] == REMOVE
    assert leads_bytes(bot_env) == only_b + b_a_c[len(b_a):]  # the other rows, byte for byte
    assert [row["chat_id"] for row in read_rows(bot_env)] == ["3001", "3003"]
    assert "Аполлинария" not in state_text(bot_env) and "Светлана" in state_text(bot_env)
    assert not list(Path(bot_env["DATA_DIR"]).glob("*.tmp"))

    output = process.wait_log("forgot chat 3002")
    for personal in ("Аполлинария", "000-11-22", "apollinaria"):
        assert personal not in output


def test_forget_drops_the_chats_dialog_in_progress_and_its_unsent_email(bot, bot_env, telegram, smtp):
    smtp.stop()
    process = bot()
    full_dialog(telegram, 3101, contact="+7 999 555-66-77")
    full_dialog(telegram, 3102, contact="+7 999 888-99-00")
    process.wait_log("email for chat 3101 failed")
    say(telegram, 3101, "/start", "задача")
    say(telegram, 3101, "Секретный проект", "Когда")

    answered = len(telegram.texts(3101))
    telegram.send_text(3101, "/forget")
    wait_until(lambda: "Секретный" not in state_text(bot_env), message="the dialog in progress erased")
    assert telegram.texts(3101)[answered:] == []  # not «удалены» while its email may still go out

    smtp.start()
    telegram.wait_for(lambda: TEXTS["forgotten"] in telegram.texts(3101)[answered:], 20, "«удалены» at last")
    [mail] = smtp.wait_for_messages(1)
    assert "+7 999 888-99-00" in mail.get_content() and "555-66-77" not in mail.get_content()
    assert [row["chat_id"] for row in read_rows(bot_env)] == ["3102"]
    assert "555-66-77" not in (Path(bot_env["DATA_DIR"]) / "ledger.jsonl").read_text(encoding="utf-8")
    say(telegram, 3101, "продолжим?", "Здравствуйте")  # begins anew instead of asking the next question

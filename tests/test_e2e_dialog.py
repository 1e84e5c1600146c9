"""The whole bot as a real process against fake Telegram, LLM and SMTP servers."""

import json

from fakes import (ANSWERS, QUESTIONS, TEXTS, copy_app, full_dialog, reach_contact_step, read_rows, run_bot,
                   saved_dialogs, say, wait_until)

COLUMNS = ["timestamp", "chat_id", "client_name", "contact", "intent", "notes", "source", "status"]


def test_a_client_goes_from_start_to_a_saved_and_emailed_lead(bot, bot_env, telegram, llm, smtp):
    bot()
    thanks = full_dialog(telegram, 1001, contact="+7 999 123-45-67")
    assert "сохранена" in thanks
    texts = telegram.texts(1001)
    assert "Здравствуйте, Иван" in texts[0]
    assert llm.reply in texts  # the recommendation reached the client as the LLM wrote it

    rows = read_rows(bot_env)
    assert len(rows) == 1 and list(rows[0]) == COLUMNS
    row = rows[0]
    assert row["chat_id"] == "1001" and row["client_name"] == "Иван"
    assert row["contact"].lstrip("'") == "+7 999 123-45-67"
    assert row["source"] == "telegram" and row["status"] == "new"
    assert row["intent"] and row["notes"]
    assert "T" in row["timestamp"] and ("+" in row["timestamp"][10:] or row["timestamp"].endswith("Z"))

    smtp.wait_for_messages(1)
    [mail] = smtp.messages
    assert mail["To"] == "manager@example.com"
    assert "+7 999 123-45-67" in mail.get_content()

    offer_request = llm.requests[0]["json"]
    assert offer_request["model"] == "test-model"
    system, user = offer_request["messages"]
    assert system["role"] == "system" and "Пример" in system["content"]
    assert user["role"] == "user" and user["content"].startswith("Контекст: ")
    assert user["content"].endswith("\nЗапрос: " + ANSWERS[0])  # after /start: the first answer
    assert llm.requests[0]["headers"]["Authorization"] == "Bearer test-llm-key-SECRET"
    assert all("999 123-45-67" not in str(r["json"]) for r in llm.requests)


def test_llm_failure_still_leads_to_a_saved_lead(bot, bot_env, telegram, llm, smtp):
    llm.status = 500
    bot()
    reach_contact_step(telegram, 1002)
    assert TEXTS["llm_failed"] in telegram.texts(1002)
    say(telegram, 1002, "ivan@example.ru", "Спасибо")
    [row] = read_rows(bot_env)
    assert row["contact"] == "ivan@example.ru" and row["status"] == "new"
    assert "Задача" in row["notes"]  # assembled from the answers when the LLM cannot summarise
    smtp.wait_for_messages(1)


def test_unrecognised_contact_is_explained_and_asked_again(bot, bot_env, telegram):
    bot()
    reach_contact_step(telegram, 1003)
    say(telegram, 1003, "позвоните мне", "+7 999 123-45-67")
    say(telegram, 1003, "@ivan_petrov", "Спасибо")
    assert read_rows(bot_env)[0]["contact"] == "'@ivan_petrov"  # neutralised for Excel


def test_a_refusal_ends_politely_and_records_a_rejected_row_without_email(bot, bot_env, telegram, smtp):
    bot()
    reach_contact_step(telegram, 1004)
    say(telegram, 1004, "Нет, не хочу", "/start")
    [row] = read_rows(bot_env)
    assert row["status"] == "rejected" and row["contact"] == ""
    say(telegram, 1004, "А можно ещё вопрос?", "Когда")  # a new dialog: the message answers its first question
    assert not any("С возвращением" in t for t in telegram.texts(1004))
    assert smtp.messages == []


def test_start_in_the_middle_starts_over(bot, telegram):
    bot()
    say(telegram, 1005, "/start", "задача")
    say(telegram, 1005, "Интернет-магазин", "результат")
    say(telegram, 1005, "/start", "задача")
    say(telegram, 1005, "Лендинг", "результат")


def test_missing_token_stops_start_up_with_one_line_naming_it(bot_env, tmp_path):
    result = run_bot({**bot_env, "TELEGRAM_BOT_TOKEN": None}, cwd=tmp_path, timeout=20)
    assert result.returncode == 2
    assert "TELEGRAM_BOT_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr


def test_env_file_is_read_and_real_environment_wins(bot_env, tmp_path):
    app = copy_app(tmp_path / "app")
    (app.parent / ".env").write_text("TELEGRAM_BOT_TOKEN=\nLLM_TIMEOUT=abc\n", encoding="utf-8")
    (tmp_path / ".env").write_text("LLM_MAX_TOKENS=abc\n", encoding="utf-8")  # only the one beside leadbot.py
    result = run_bot({**bot_env, "LLM_TIMEOUT": None}, "--check", cwd=tmp_path, timeout=20, script=app)
    assert "LLM_TIMEOUT" in result.stdout  # from .env
    assert "TELEGRAM_BOT_TOKEN" not in result.stdout  # the environment's token wins over the empty one
    assert "LLM_MAX_TOKENS" not in result.stdout


def test_console_mode_needs_no_token_and_saves_a_console_lead(tmp_path):
    dialog = "\n".join(ANSWERS + ["anna@example.ru"]) + "\n"
    env = {"DATA_DIR": str(tmp_path / "data")}
    result = run_bot(env, "--console", cwd=tmp_path, input=dialog, timeout=20)
    assert result.returncode == 0, result.stderr
    assert TEXTS["no_llm"] in result.stdout and "Спасибо" in result.stdout  # no LLM: nothing claims a breakdown
    [row] = read_rows(env)
    assert row["source"] == "console" and row["contact"] == "anna@example.ru"


def test_an_empty_enter_in_the_console_is_no_answer(tmp_path):
    dialog = "\n".join(["", "  ", ANSWERS[0], "", *ANSWERS[1:], "anna@example.ru"]) + "\n"
    env = {"DATA_DIR": str(tmp_path / "data")}
    result = run_bot(env, "--console", cwd=tmp_path, input=dialog, timeout=20)
    assert result.returncode == 0, result.stderr
    [row] = read_rows(env)
    assert row["contact"] == "anna@example.ru" and f"{QUESTIONS[0][0]}: {ANSWERS[0]};" in row["notes"]


def test_a_console_lead_emailed_at_the_end_is_not_reported_as_unsent(smtp, tmp_path):
    env = {"DATA_DIR": str(tmp_path / "data"), "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp.port),
           "SMTP_SECURITY": "none", "MANAGER_EMAIL": "manager@example.com"}
    sent = run_bot(env, "--console", cwd=tmp_path, input="\n".join(ANSWERS + ["anna@example.ru"]) + "\n", timeout=20)
    assert len(smtp.messages) == 1 and "could not be sent" not in sent.stdout
    smtp.stop()
    unsent = run_bot(env, "--console", cwd=tmp_path, input="\n".join(ANSWERS + ["olga@example.ru"]) + "\n", timeout=20)
    assert "email could not be sent now; it goes out at the next start" in unsent.stdout


def test_cancel_and_forget_in_the_console_start_a_new_dialog_and_keep_earlier_console_leads(tmp_path):
    env = {"DATA_DIR": str(tmp_path / "data")}
    run_bot(env, "--console", cwd=tmp_path, input="\n".join(ANSWERS + ["olga@example.ru"]) + "\n", timeout=20)
    lines = [ANSWERS[0], "/cancel", "/forget", "Здравствуйте", *ANSWERS, "anna@example.ru"]  # a greeting first
    result = run_bot(env, "--console", cwd=tmp_path, input="\n".join(lines) + "\n", timeout=20)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert TEXTS["cancelled"] in result.stdout and "leads.csv keeps the console's rows" in result.stdout
    assert [row["contact"] for row in read_rows(env)] == ["olga@example.ru", "anna@example.ru"]


def test_a_card_the_telegram_bot_owes_stays_owed_after_a_console_dialog(tmp_path):
    env = {"DATA_DIR": str(tmp_path / "data"), "MANAGER_CHAT_ID": "5550001"}
    outbox = tmp_path / "data" / "outbox"
    outbox.mkdir(parents=True)
    lead = {"timestamp": "2026-11-24T10:00:00+03:00", "chat_id": 42, "client_name": "Ольга", "contact": "+79991234567",
            "intent": "сайт", "notes": "", "source": "telegram", "status": "new"}
    item = {"id": "42-7", "chat_id": 42, "lead": lead, "owed": ["telegram"], "since": 0, "update_id": 7,
            "confirmed": True, "due": 0, "attempts": 0, "took": ["csv"]}
    (outbox / "42-7.json").write_text(json.dumps(item), encoding="utf-8")
    result = run_bot(env, "--console", cwd=tmp_path, input="\n".join(ANSWERS + ["anna@example.ru"]) + "\n", timeout=20)
    assert result.returncode == 0, result.stderr
    assert json.loads((outbox / "42-7.json").read_text(encoding="utf-8"))["owed"] == ["telegram"]
    assert "telegram could not be sent now; it goes out at the next start" in result.stdout


def test_the_not_now_button_beside_the_share_button_ends_the_dialog_politely(bot, bot_env, telegram):
    bot()
    reach_contact_step(telegram, 1601)
    markup = [m for m in telegram.messages(1601) if m.get("reply_markup")][-1]["reply_markup"]
    rows = [[button["text"] for button in row] for row in markup["keyboard"]]
    assert rows[-1] == [TEXTS["decline_button"]]
    say(telegram, 1601, TEXTS["decline_button"], TEXTS["refused"][:20])
    wait_until(lambda: read_rows(bot_env))
    assert read_rows(bot_env)[0]["status"] == "rejected"


def test_a_button_number_that_is_no_button_is_asked_again_not_stored(bot, bot_env, telegram):
    bot()
    say(telegram, 1602, "/start", "задача")
    say(telegram, 1602, ANSWERS[0], "Когда")
    say(telegram, 1602, "7", TEXTS["pick_button"][:20])  # three buttons only
    telegram.wait_for(lambda: "Когда" in telegram.texts(1602)[-1], 10, "the question again")
    say(telegram, 1602, "2", "бюджет")
    wait_until(lambda: saved_dialogs(bot_env["DATA_DIR"])[1602]["answers"][1:] == [QUESTIONS[1][2][1]])


def test_a_voice_message_without_stt_is_asked_to_be_written(bot, telegram):
    bot()
    say(telegram, 1603, "/start", "задача")
    telegram.send_media(1603, "voice")
    telegram.wait_for(lambda: TEXTS["voice_off"] in telegram.texts(1603), 10, "the voice note")

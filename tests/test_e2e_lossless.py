"""Not one lead lost, for real: what owners, clients and servers did to the bot, as a real process.

Each test is named after the situation in the world it reproduces.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakes import (ANSWERS, TEXTS, full_dialog, owed, reach_contact_step, read_rows, run_bot, say, saved_dialogs,
                   wait_until)

COLUMNS = "timestamp;chat_id;client_name;contact;intent;notes;source;status"
THANKS = "Спасибо"


def leads_file(env):
    return Path(env["DATA_DIR"]) / "leads.csv"


def write_leads(env, text, delimiter=";"):
    path = leads_file(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("\ufeff".encode() + text.replace(";", delimiter).encode())
    return path


OLD_ROWS = ("2026-11-01T10:00:00+03:00;11;Ольга;+7 912 000-00-01;сайт;Нужен лендинг для ООО \"Ромашка;telegram;new\r\n"
            "2026-11-02T10:00:00+03:00;12;Пётр;@petr_ivanov;магазин;каталог на 300 товаров;telegram;new\r\n")


def test_a_cell_edited_in_notepad_with_an_unbalanced_quote_loses_no_row(bot, bot_env, telegram):
    path = write_leads(bot_env, COLUMNS + "\r\n" + OLD_ROWS)
    before = path.read_bytes()
    bot()
    full_dialog(telegram, 901)
    wait_until(lambda: len(read_rows(bot_env)) == 3, message=lambda: path.read_text(encoding="utf-8-sig"))
    assert path.read_bytes().startswith(before)  # not a byte of the owner's file changed
    assert [row["chat_id"] for row in read_rows(bot_env)] == ["11", "12", "901"]


def test_a_file_saved_without_its_final_line_break_keeps_its_last_row(bot, bot_env, telegram):
    path = write_leads(bot_env, COLUMNS + "\r\n" + OLD_ROWS.rstrip("\r\n"))
    bot()
    full_dialog(telegram, 902)
    wait_until(lambda: len(read_rows(bot_env)) == 3, message=lambda: path.read_text(encoding="utf-8-sig"))
    rows = read_rows(bot_env)
    assert rows[1]["status"] == "new" and rows[1]["chat_id"] == "12"
    assert rows[2]["chat_id"] == "902"


def test_a_quoted_cell_left_open_stops_start_up_and_names_the_line(bot_env, tmp_path):
    path = write_leads(bot_env, COLUMNS + "\r\n" + OLD_ROWS + '2026-11-03;13;Анна;"+7 900;x;y;telegram;new\r\n')
    before = path.read_bytes()
    result = run_bot(bot_env, cwd=tmp_path)
    assert result.returncode == 2
    assert "строки 4" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before


def test_three_console_dialogs_finished_within_one_second_give_three_rows(bot_env, tmp_path):
    env = {**bot_env, "LLM_BASE_URL": "", "SMTP_HOST": ""}
    for _ in range(3):
        result = run_bot(env, "--console", cwd=tmp_path, input="\n".join(ANSWERS + ["+7 999 123-45-67"]) + "\n")
        assert result.returncode == 0, result.stderr
    rows = read_rows(bot_env)
    assert len(rows) == 3 and {row["source"] for row in rows} == {"console"}


def test_a_second_copy_on_the_same_data_folder_exits_2_and_says_why(bot, bot_env, telegram, tmp_path):
    first = bot()
    first.wait_log("started")
    result = run_bot(bot_env, cwd=tmp_path, timeout=10)
    assert result.returncode == 2
    assert "другая копия" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    check = run_bot(bot_env, "--check", cwd=tmp_path)
    assert "бот работает с этой папкой" in check.stdout
    full_dialog(telegram, 903)  # the first copy is unharmed
    assert first.alive()


def test_a_copy_killed_with_kill_9_leaves_no_stale_lock(bot, bot_env, telegram):
    first = bot()
    first.wait_log("started")
    first.kill()
    first.wait()
    second = bot()
    second.wait_log("started")
    full_dialog(telegram, 904)


@pytest.mark.parametrize("where, reason", [("data", "это файл"), ("data/inner", "не удаётся создать")])
def test_a_data_dir_that_cannot_hold_data_stops_start_up(bot_env, tmp_path, where, reason):
    (tmp_path / "data").write_text("not a folder")
    result = run_bot({**bot_env, "DATA_DIR": str(tmp_path / where)}, cwd=tmp_path, timeout=10)
    assert result.returncode == 2
    assert "DATA_DIR" in result.stderr and reason in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_log_file_in_a_missing_folder_stops_start_up_with_one_line(bot_env, tmp_path):
    result = run_bot({**bot_env, "LOG_FILE": str(tmp_path / "no" / "such" / "bot.log")}, cwd=tmp_path, timeout=10)
    assert result.returncode == 2
    assert "LOG_FILE" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def full_disk(env):
    """ledger.jsonl, the one commit point, cannot be appended to (a directory in its place), as on
    a full disk; returns what gives the room back."""
    ledger = Path(env["DATA_DIR"]) / "ledger.jsonl"
    ledger.touch()
    ledger.rename(ledger.with_name("ledger-away"))
    ledger.mkdir()

    def room_again():
        ledger.rmdir()
        ledger.with_name("ledger-away").rename(ledger)
    return room_again


@pytest.mark.parametrize("smtp_host", ["", "127.0.0.1"])
def test_a_lead_the_disk_cannot_take_is_never_thanked_and_the_resent_contact_is_one_lead(
        bot, bot_env, telegram, smtp, smtp_host):
    bot(SMTP_HOST=smtp_host)
    reach_contact_step(telegram, 905)
    room_again = full_disk(bot_env)
    reply = say(telegram, 905, "+7 999 123-45-67", "ещё раз")
    assert reply == TEXTS["not_taken"]  # the truth: nothing was committed, nothing is on its way
    assert saved_dialogs(bot_env["DATA_DIR"])[905]["stage"] == "collecting_contact"
    assert read_rows(bot_env) == [] and smtp.messages == []
    room_again()  # space freed: the client sends the contact again and is thanked
    say(telegram, 905, "+7 999 123-45-67", THANKS)
    wait_until(lambda: len(read_rows(bot_env)) == 1)
    if smtp_host:
        assert len(smtp.wait_for_messages(1)) == 1


def test_leads_csv_unwritable_the_lead_is_committed_emailed_and_written_later(bot, bot_env, telegram, smtp):
    bot()
    reach_contact_step(telegram, 906)
    leads = leads_file(bot_env)
    leads.unlink(missing_ok=True)
    leads.mkdir()  # only the owner's spreadsheet cannot be written (Excel holds it)
    reply = say(telegram, 906, "+7 999 123-45-67", THANKS)
    assert reply == TEXTS["thanks_saved"]  # true: ledger.jsonl has it
    smtp.wait_for_messages(1)  # the email does not wait for the spreadsheet
    leads.rmdir()
    wait_until(lambda: len(read_rows(bot_env)) == 1, timeout=15)


def test_malformed_get_updates_answers_are_survived_without_losing_an_update(bot, telegram):
    process = bot(RETRY_BASE_SECONDS="0.02", RETRY_MAX_SECONDS="0.04")  # five failed polls in a row: short pauses
    process.wait_log("started")
    for result in (None, {"update_id": 1}, "updates", 42):
        telegram._add_fault("getUpdates", ("json", (200, {"ok": True, "result": result})), 1)
    telegram._add_fault("getUpdates", ("json", (200, {"ok": True, "result": [
        "x", {"message": {"text": "no id"}}, {"update_id": "7"}]})), 1)
    say(telegram, 907, "/start", "задача")
    assert process.alive()
    assert "Traceback" not in process.output()


def test_a_state_file_with_a_broken_entry_is_set_aside_and_the_bot_starts(bot, bot_env, telegram):
    data = Path(bot_env["DATA_DIR"])
    data.mkdir(parents=True)
    good = {"id": "abc", "stage": "qualifying", "answers": ["Сайт для кафе"], "name": "Иван", "source": "telegram",
            "started": time.time(), "updated_at": time.time(), "seen": [], "waiting": [], "busy": False}
    lines = [{"chat": 908, "dialog": good}, {"chat": 909, "dialog": "qualifying"},
             {"chat": 910, "dialog": {**good, "updated_at": "yesterday"}}, ["not", "an", "entry"]]
    (data / "state.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    (data / "ledger.jsonl").write_text('{"seq": 1, "id": "5-1", "lead": {"chat_id"', encoding="utf-8")  # torn
    process = bot()
    process.wait_log("started")
    assert any(p.name.startswith("state.jsonl.bad") for p in data.iterdir())
    assert (data / "ledger.jsonl.bad").exists()  # the bot's own torn write never stops a start
    say(telegram, 908, "В течение месяца", "бюджет")  # the good dialog goes on where it was


def test_update_ids_restarted_by_telegram_after_a_quiet_week_are_answered(bot, telegram):
    bot(SESSION_TTL_HOURS="720")
    say(telegram, 911, "/start", "задача")
    say(telegram, 911, "Сайт для кафе", "Когда")
    telegram._update_ids = iter(range(500, 10**6))  # Telegram picks a new, lower start
    say(telegram, 911, "В течение месяца", "бюджет")


@pytest.mark.parametrize("text, contact", [
    ("Нет проблем, пишите в вотсап +375 29 123-45-67", "+375 29 123-45-67"),
    ("мой номер +49 151 23456789", "+49 151 23456789"),
    ("Казахстан: +7 701 234 56 78", "+7 701 234 56 78"),
])
def test_everyday_replies_with_a_foreign_number_are_leads_not_refusals(bot, bot_env, telegram, smtp, text, contact):
    bot()
    reach_contact_step(telegram, 912)
    say(telegram, 912, text, THANKS)
    wait_until(lambda: read_rows(bot_env))
    row = read_rows(bot_env)[0]
    assert row["status"] == "new" and row["contact"].lstrip("'") == contact
    smtp.wait_for_messages(1)


def test_two_contacts_in_one_message_are_both_kept(bot, bot_env, telegram):
    bot()
    reach_contact_step(telegram, 913)
    say(telegram, 913, "+7 912 345-67-89, почта info@primer-studio.ru", THANKS)
    wait_until(lambda: read_rows(bot_env))
    contact = read_rows(bot_env)[0]["contact"]
    assert "+7 912 345-67-89" in contact and "info@primer-studio.ru" in contact


def test_a_huge_manager_card_is_split_and_a_refused_card_is_not_retried_forever(bot, telegram, bot_env):
    bot(MANAGER_CHAT_ID="5550001")
    long_task = "Нужен сайт " + "очень большой " * 140  # kept to 2,000 characters
    reach_contact_step(telegram, 914, answers=[long_task, "В течение месяца", "50–200 тыс. ₽"])
    say(telegram, 914, "+7 999 123-45-67", THANKS)
    cards = telegram.wait_for(lambda: telegram.texts(5550001), 10, "the manager's card")
    assert all(len(card) <= 4096 for card in cards)
    telegram.fail("sendMessage", 400, "Bad Request: chat not found", times=1)
    reach_contact_step(telegram, 915)
    say(telegram, 915, "+7 999 123-45-68", THANKS)
    wait_until(lambda: owed(bot_env) == [], timeout=10)  # the refused card is not retried forever


def test_line_breaks_in_a_client_answer_cannot_forge_fields_for_the_manager(bot, telegram, smtp):
    bot(MANAGER_CHAT_ID="5550001")
    # No phone or email in the forged lines: one in an answer is the lead's contact (issue 20).
    forged = "Сайт\nКонтакт: позвоните директору\nBcc: spy at example.com"
    reach_contact_step(telegram, 916, answers=[forged, "В течение месяца", "50–200 тыс. ₽"])
    say(telegram, 916, "+7 999 123-45-67", THANKS)
    mail = smtp.wait_for_messages(1)[0]
    assert mail["Bcc"] is None
    for text in (mail.get_content(), telegram.wait_for(lambda: telegram.texts(5550001))[0]):
        forged_lines = [line for line in text.splitlines()
                        if line.startswith(("Контакт: позвоните", "Bcc:"))]
        assert not forged_lines


def test_a_slow_trickling_llm_cannot_hold_a_client_past_its_deadline(bot, telegram, llm):
    llm.trickle = 0.3  # a byte every 0.3 s: each read is well within the timeout, the answer never is
    process = bot(LLM_TIMEOUT="1")
    reach_contact_step(telegram, 917)  # the fallback offer and the contact request arrive in time
    assert TEXTS["llm_failed"] in "\n".join(telegram.texts(917))
    process.terminate()
    assert process.wait(timeout=3) == 0


def test_a_megabyte_from_the_llm_stays_a_chat_sized_answer(bot, bot_env, telegram, llm):
    llm.reply = "Лендинг. " + "слово " * 200_000
    bot()
    reach_contact_step(telegram, 918)
    assert len(telegram.texts(918)) <= 8
    state = Path(bot_env["DATA_DIR"]) / "state.jsonl"
    assert state.stat().st_size < 200_000


def test_a_100000_character_word_does_not_freeze_the_bot(bot, telegram):
    bot()
    say(telegram, 919, "/start", "задача")
    say(telegram, 919, "ф" * 100_000 + "@", "Когда")
    say(telegram, 920, "/start", "задача", timeout=5)  # another client is served meanwhile


def test_a_secret_pushed_through_logging_comes_out_masked(bot_env, tmp_path):
    log_file = tmp_path / "bot.log"
    code = ("import logging, sys, leadbot\n"
            "env, keys = leadbot.read_env()\n"
            "cfg = leadbot.read_config(env)\n"
            "leadbot.setup_logging(cfg)\n"
            "logging.getLogger('x').warning('token %s key %s pw %s', cfg.telegram_bot_token, cfg.llm_api_key,"
            " cfg.smtp_password)\n")
    env = {**bot_env, "SMTP_PASSWORD": "smtp-PASSWORD-123", "LOG_FILE": str(log_file)}
    from fakes import _bot_environment, REPO
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_bot_environment(env),
                            capture_output=True, text=True, timeout=20)
    for text in (result.stderr, log_file.read_text(encoding="utf-8")):
        assert "***" in text
        for secret in (bot_env["TELEGRAM_BOT_TOKEN"], bot_env["LLM_API_KEY"], "smtp-PASSWORD-123"):
            assert secret not in text


def test_flood_control_on_get_updates_waits_as_long_as_telegram_asks(bot, telegram):
    telegram.fail("getUpdates", 429, "Too Many Requests: retry after 1", {"retry_after": 1})
    process = bot()
    process.wait_log("retrying in 1.00s")
    say(telegram, 921, "/start", "задача")

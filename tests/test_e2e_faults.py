"""Telegram, network and LLM faults, restarts and signals, against the real bot process."""
import os
import re
import threading
import time
from pathlib import Path

import pytest

import fakes
import leadbot
from fakes import ANSWERS, CONTACT_REQUEST, reach_contact_step, read_rows, run_bot, saved_dialogs, say, wait_until
from fakes import QUESTIONS, SUMMARY_PROMPT, TEXTS

GREETING = "Здравствуйте"
HELP = TEXTS["help"]
FALLBACK = TEXTS["llm_failed"]


def token_parts(token):
    return [token, *token.split(":")]


def polling(telegram):
    """Waits until the bot has called getUpdates."""
    telegram.wait_for(lambda: telegram.calls("getUpdates"), 10, "a getUpdates call")


def arrival_times(telegram, method, count, timeout=10):
    """When each of the next `count` calls of method reached the fake (observed every millisecond)."""
    seen, times = len(telegram.calls(method)), []
    while len(times) < count:
        wait_until(lambda: len(telegram.calls(method)) > seen, timeout, interval=0.001,
                   message=f"call {len(times) + 1} of {count} to {method}")
        now, total = time.monotonic(), len(telegram.calls(method))
        times += [now] * (total - seen)
        seen = total
    return times[:count]


# --- Start-up ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rejection", ["wrong token (401)", "404 at getMe"])
def test_a_rejected_token_stops_start_up_with_one_line_and_exit_2(bot_env, telegram, tmp_path, rejection):
    env = dict(bot_env)
    if rejection.startswith("wrong"):
        env["TELEGRAM_BOT_TOKEN"] = "987654321:AAwrong-token-Qx7"
    else:
        telegram.fail("getMe", 404, "Not Found")
    result = run_bot(env, cwd=tmp_path, timeout=20)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert output.strip().splitlines() == ["leadbot: Telegram отклонил TELEGRAM_BOT_TOKEN — " + leadbot.TOKEN_FIX]
    assert not any(part in output for part in token_parts(env["TELEGRAM_BOT_TOKEN"]))


@pytest.mark.parametrize("method", ["getMe", "getUpdates"])
@pytest.mark.parametrize("status", [401, 404])
def test_an_html_error_page_with_401_or_404_stops_the_bot_instead_of_retrying_forever(
        bot, telegram, method, status):
    # A wrong TELEGRAM_API_URL path or a proxy answers with a page, not JSON: the status decides.
    telegram.http_error(method, status, "<html><body>Not Found</body></html>")
    process = bot()
    assert process.wait() == 2
    output = process.output()
    assert "Telegram отклонил TELEGRAM_BOT_TOKEN" in output and "Traceback" not in output
    assert not any(part in output for part in token_parts(telegram.token))


def test_a_token_revoked_after_start_up_stops_the_bot_with_exit_2(bot, telegram):
    telegram.fail("getUpdates", 401, "Unauthorized")
    process = bot()
    assert process.wait() == 2
    assert telegram.calls("getMe")
    output = process.output()
    assert "Telegram отклонил TELEGRAM_BOT_TOKEN" in output and "Traceback" not in output
    assert not any(part in output for part in token_parts(telegram.token))


def test_telegram_errors_at_start_up_are_retried_until_it_answers(bot, telegram):
    telegram.fail("getMe", 502, "Bad Gateway")
    telegram.disconnect("getMe")
    telegram.http_error("getMe", 503, "<html><body>503 Service Unavailable</body></html>")
    bot()
    say(telegram, 1102, "/start", QUESTIONS[0][1])
    assert len(telegram.calls("getMe")) == 4


def test_an_unresolvable_telegram_host_is_retried_quietly_and_sigterm_still_stops_it(bot, telegram):
    process = bot(TELEGRAM_API_URL="http://api.telegram.invalid")
    process.wait_log("getMe failed (ConnectionError); retrying")
    wait_until(lambda: process.output().count("getMe failed") >= 3, 5, message="more retries")
    process.terminate()
    assert process.wait(3) == 0
    output = process.output()
    assert "Traceback" not in output and "/bot" not in output
    assert not any(part in output for part in token_parts(telegram.token))


# --- 409 Conflict -------------------------------------------------------------------------------

def test_a_webhook_conflict_is_explained_once_and_retried_with_backoff_until_it_is_gone(bot, telegram):
    telegram.webhook_url = "https://example.com/hook"
    process = bot(RETRY_BASE_SECONDS="0.025", RETRY_MAX_SECONDS="0.25")
    process.wait_log("webhook is set")
    polls_before = len(telegram.calls("getUpdates"))
    time.sleep(0.35)  # what the bot does meanwhile is the point: a spinning loop would poll hundreds of times,
    assert len(telegram.calls("getUpdates")) - polls_before <= 8  # one without growing pauses 14 times
    telegram.webhook_url = ""  # the owner deleted the webhook
    say(telegram, 1201, "/start", QUESTIONS[0][1])
    output = process.output()
    assert output.count("webhook is set") == 1 and "DELETE_WEBHOOK=1" in output
    assert "another copy" not in output


def test_another_copy_polling_is_named_once_and_the_bot_takes_over_when_it_stops(bot, telegram):
    telegram.fail("getUpdates", 409, "Conflict: terminated by other getUpdates request; "
                                     "make sure that only one bot instance is running", times=3)
    process = bot()
    say(telegram, 1202, "/start", QUESTIONS[0][1])
    output = process.output()
    assert output.count("another copy of this bot is polling") == 1
    assert "webhook" not in output


def test_delete_webhook_setting_removes_the_webhook_and_polling_works(bot, telegram):
    telegram.webhook_url = "https://example.com/hook"
    process = bot(DELETE_WEBHOOK="1")
    say(telegram, 1203, "/start", QUESTIONS[0][1])
    assert telegram.calls("deleteWebhook") and telegram.webhook_url == ""
    assert "webhook is set" not in process.output()


# --- 429, 5xx, resets, timeouts ---------------------------------------------------------------------

def test_429_on_send_message_waits_retry_after_and_then_delivers_the_same_message(bot, telegram):
    telegram.fail("sendMessage", 429, "Too Many Requests: retry after 1", {"retry_after": 1})
    bot()
    telegram.send_text(1301, "/start")
    [refused_at, resent_at] = arrival_times(telegram, "sendMessage", 2)
    assert resent_at - refused_at >= 0.95
    attempts = telegram.calls("sendMessage")
    assert attempts[0]["text"] == attempts[1]["text"] and GREETING in attempts[0]["text"]
    texts = telegram.wait_messages(1301, 2)
    assert GREETING in texts[0] and texts[1] == QUESTIONS[0][1]


def test_send_message_errors_and_resets_are_retried_and_each_text_arrives_once(bot, telegram):
    telegram.fail("sendMessage", 502, "Bad Gateway")
    telegram.disconnect("sendMessage")
    telegram.http_error("sendMessage", 504, "<html><body>504 Gateway Time-out</body></html>")
    telegram.stall("sendMessage", 0.15)  # slow but within TELEGRAM_TIMEOUT
    bot(RETRY_MAX_SECONDS="0.1")
    say(telegram, 1302, "/start", QUESTIONS[0][1])
    say(telegram, 1302, ANSWERS[0], QUESTIONS[1][1])
    texts = telegram.texts(1302)
    assert len(texts) == 3 and GREETING in texts[0]


def test_getupdates_faults_lose_no_update_and_handle_none_twice(bot, telegram):
    process = bot(POLL_TIMEOUT="1", TELEGRAM_TIMEOUT="0.5", RETRY_MAX_SECONDS="0.1")
    polling(telegram)
    say(telegram, 1401, "/help", "/cancel")
    telegram.fail("getUpdates", 502, "Bad Gateway")
    telegram.http_error("getUpdates", 502, "<html><body>502 Bad Gateway</body></html>")
    telegram.disconnect("getUpdates")
    telegram.fail("getUpdates", 500, "Internal Server Error")
    telegram.stall("getUpdates", 2)  # longer than POLL_TIMEOUT + TELEGRAM_TIMEOUT: a read timeout
    telegram.send_text(1402, "/help")
    process.wait_log("getUpdates failed (HTTP 502)")
    telegram.send_text(1403, "/help")
    process.wait_log("getUpdates failed (ReadTimeout)")
    telegram.down()  # connection refused
    telegram.send_text(1404, "/help")
    process.wait_log("getUpdates failed (ConnectionError)")
    telegram.up()
    last = telegram.send_text(1405, "/help")
    chats = range(1401, 1406)
    telegram.wait_for(lambda: all(telegram.texts(chat) for chat in chats), 10, "a reply in every chat")
    # Handling comes before confirming, so once all is confirmed a doubled reply would show.
    telegram.wait_for(lambda: telegram.confirmed_offset > last, 5, "the last update confirmed")
    assert [telegram.texts(chat) for chat in chats] == [[HELP]] * 5
    assert "Traceback" not in process.output()


def announced_delays(process, count):
    """The pauses the bot announced after its failed getUpdates calls, once there are count of them."""
    def delays():
        found = re.findall(r"getUpdates failed \(.*?\); retrying in ([0-9.]+)s", process.output())
        return [float(d) for d in found] if len(found) >= count else None
    return wait_until(delays, 10, message=lambda: f"{count} failed polls logged:\n{process.output()}")


def test_backoff_doubles_up_to_the_cap_and_restarts_small_after_a_success(bot, telegram):
    telegram.fail("getUpdates", 502, "Bad Gateway", times=5)
    process = bot(POLL_TIMEOUT="1", RETRY_BASE_SECONDS="0.05", RETRY_MAX_SECONDS="0.4")
    delays = announced_delays(process, 5)
    for delay, nominal in zip(delays, [0.05, 0.1, 0.2, 0.4, 0.4]):  # jitter: half to full
        assert nominal * 0.5 - 0.006 <= delay <= nominal + 0.006, delays
    telegram.wait_for(lambda: len(telegram.calls("getUpdates")) >= 6, 10, "a poll after the failures")
    telegram.fail("getUpdates", 502, "Bad Gateway")  # hits the call after the running long poll
    telegram.send_text(1404, "/help")  # which this message ends with a success, at once
    assert announced_delays(process, 6)[5] <= 0.05 + 0.006, "the backoff was not reset by the success"
    assert telegram.wait_messages(1404, 1) == [HELP]


def test_400_on_send_message_is_skipped_with_a_log_line_and_the_dialog_goes_on(bot, telegram):
    telegram.fail("sendMessage", 400, "Bad Request: can't parse entities: unsupported start tag")
    process = bot()
    say(telegram, 1501, "/start", QUESTIONS[0][1])
    say(telegram, 1501, ANSWERS[0], QUESTIONS[1][1])
    assert not any(GREETING in text for text in telegram.texts(1501))  # the refused one was skipped
    assert "Telegram refused a message (400) for chat 1501; skipped" in process.output()


def test_a_client_who_blocked_the_bot_loses_the_dialog_quietly_and_others_go_on(bot, bot_env, telegram):
    process = bot()
    say(telegram, 1502, "/start", QUESTIONS[0][1])
    wait_until(lambda: 1502 in saved_dialogs(bot_env["DATA_DIR"]), 5, message="the dialog saved")
    telegram.block(1502)
    telegram.send_text(1502, ANSWERS[0])
    say(telegram, 1503, "/start", QUESTIONS[0][1])
    wait_until(lambda: 1502 not in saved_dialogs(bot_env["DATA_DIR"]), 5, message="the dialog dropped")
    output = process.output()
    assert "chat 1502 blocked the bot" in output and "failed" not in output


def test_a_poisoned_update_is_confirmed_without_logging_content_and_the_queue_goes_on(bot, telegram):
    process = bot()
    polling(telegram)
    telegram.push_update({"message": telegram.build_message(1601, text=["POISON-7731"])})
    shapeless = telegram.push_update({"message": "POISON-7732"})
    say(telegram, 1601, "/start", QUESTIONS[0][1])
    say(telegram, 1602, "/start", QUESTIONS[0][1])
    telegram.wait_for(lambda: telegram.confirmed_offset > shapeless, 5, "the poisoned updates confirmed")
    output = process.output()
    assert "POISON" not in output and "Traceback" not in output


# --- The LLM ------------------------------------------------------------------------------------

def test_a_broken_llm_gives_the_fallback_the_lead_is_still_saved_and_others_are_served(bot, telegram, llm):
    faults = {
        "down": llm.down,
        "timeout": lambda: setattr(llm, "delay", 1.5),
        "503": lambda: setattr(llm, "status", 503),
        "not JSON": lambda: setattr(llm, "raw", "<html>upstream error</html>"),
        "empty answer": lambda: setattr(llm, "reply", "   "),
    }
    process = bot(LLM_TIMEOUT="1")
    for chat, (fault, inject) in enumerate(faults.items(), start=1701):
        llm.up()
        llm.delay, llm.status, llm.raw = 0, None, None
        inject()
        say(telegram, 1700, "/start", QUESTIONS[0][1])  # another client is answered meanwhile
        reach_contact_step(telegram, chat)
        assert FALLBACK in telegram.texts(chat), fault
        say(telegram, chat, "ivan@example.ru", "Спасибо")
    output = process.output()
    for reason in ("cannot reach the server (ConnectionError)", "no answer within LLM_TIMEOUT", "the server failed (HTTP 503)",
                   "not an OpenAI-compatible API"):
        assert f"LLM offer failed: LLM: {reason}" in output


# --- Restarts and signals ---------------------------------------------------------------------------

@pytest.mark.parametrize("stop", ["terminate", "kill"])
def test_a_restart_mid_dialog_continues_from_the_same_stage(bot, bot_env, telegram, stop):
    first = bot()
    say(telegram, 1801, "/start", QUESTIONS[0][1])
    say(telegram, 1801, ANSWERS[0], QUESTIONS[1][1])
    getattr(first, stop)()
    first.wait()
    if stop == "kill":  # killed in the middle of writing the next state line
        with open(Path(bot_env["DATA_DIR"]) / "state.jsonl", "a", encoding="utf-8") as f:
            f.write('{"chat": 1801, "dialog": {"stage": "do')
    bot()
    before = len(telegram.texts(1801))
    say(telegram, 1801, ANSWERS[1], QUESTIONS[2][1])
    say(telegram, 1801, ANSWERS[2], CONTACT_REQUEST)
    assert not any(GREETING in text for text in telegram.texts(1801)[before:])
    answers = ANSWERS
    wait_until(lambda: saved_dialogs(bot_env["DATA_DIR"])[1801]["answers"] == answers, 5,
               message="every answer kept across the restart")


@pytest.mark.parametrize("signal_name", ["terminate", "interrupt"])
def test_sigterm_or_ctrl_c_during_a_25_second_long_poll_exits_0_within_2_seconds(
        bot, bot_env, telegram, signal_name):
    process = bot(POLL_TIMEOUT="25")
    say(telegram, 1901, "/start", QUESTIONS[0][1])
    answer = telegram.send_text(1901, ANSWERS[0])
    telegram.wait_for(lambda: telegram.confirmed_offset > answer, 5, "the next long poll")
    time.sleep(0.1)  # let the request reach its blocking read
    getattr(process, signal_name)()
    assert process.wait(5) == 0  # at once, not when the 25 s poll ends
    assert "Traceback" not in process.output()
    assert saved_dialogs(bot_env["DATA_DIR"])[1901]["stage"] == "qualifying"


def test_sigterm_exits_within_2_seconds_while_the_llm_still_writes_the_managers_notes(bot, telegram, llm):
    def slow_notes(request):
        if request["messages"][0]["content"] == SUMMARY_PROMPT:  # the notes, asked after the offer
            time.sleep(5)
        return llm.reply

    llm.reply_fn = slow_notes
    process = bot(POLL_TIMEOUT="25", LLM_TIMEOUT="10")
    reach_contact_step(telegram, 1903)
    wait_until(lambda: llm.calls == 2, 5, message="the notes requested")
    process.terminate()
    assert process.wait(3) == 0  # the notes would hold it for 5 s


def test_sigterm_while_the_llm_writes_the_offer_exits_at_once_and_the_offer_comes_after_restart(
        bot, bot_env, telegram, llm):
    llm.delay = 0.5
    process = bot()
    say(telegram, 1902, "/start", QUESTIONS[0][1])
    say(telegram, 1902, ANSWERS[0], QUESTIONS[1][1])
    say(telegram, 1902, ANSWERS[1], QUESTIONS[2][1])
    telegram.send_text(1902, ANSWERS[2])
    wait_until(lambda: llm.calls >= 1, 5, message="the offer requested from the LLM")
    process.terminate()
    assert process.wait(5) == 0
    assert saved_dialogs(bot_env["DATA_DIR"])[1902]["stage"] == "offering"
    llm.delay = 0  # the LLM that writes the offer after the restart need not be slow
    bot()
    telegram.wait_for(lambda: CONTACT_REQUEST in telegram.texts(1902)[-1], 10, "the offer after the restart")
    assert llm.reply in telegram.texts(1902)
    say(telegram, 1902, "+7 999 123-45-67", "Спасибо")


def test_dialogs_idle_longer_than_session_ttl_are_dropped_and_the_client_is_greeted_anew(
        bot, bot_env, telegram):
    bot(SESSION_TTL_HOURS="0.0002", POLL_TIMEOUT="10")  # 0.72 s; the long poll outlasts it
    state = Path(bot_env["DATA_DIR"]) / "state.jsonl"
    say(telegram, 2001, "/start", QUESTIONS[0][1])
    say(telegram, 2001, "Vitrina-2001 для ателье", QUESTIONS[1][1])
    say(telegram, 2002, "/start", QUESTIONS[0][1])
    time.sleep(0.8)
    say(telegram, 2002, ANSWERS[0], GREETING)  # a new dialog, though no cleanup ran in the long poll
    wait_until(lambda: "Vitrina-2001" not in state.read_text(encoding="utf-8"), 5,
               message="the idle dialog gone from the state file")
    wait_until(lambda: list(saved_dialogs(bot_env["DATA_DIR"])) == [2002], 5, message="only the new dialog kept")


def test_a_failing_delete_webhook_does_not_stop_the_bot(bot, telegram):
    telegram.fail("deleteWebhook", 400, "Bad Request: method not supported")
    process = bot(DELETE_WEBHOOK="1")
    say(telegram, 1204, "/start", QUESTIONS[0][1])
    assert "could not delete the webhook (400)" in process.output()


def test_a_slow_telegram_does_not_serve_the_chats_of_a_batch_one_after_another(bot, telegram):
    """Replies to different chats go out at once, each chat's in order: with Telegram 1 s away, three clients
    who wrote together are not answered one second after another."""
    bot()
    telegram.stall("sendMessage", 1.0, times=3)
    with telegram._cond:  # the three arrive in one getUpdates answer
        for chat in (3601, 3602, 3603):
            telegram.send_text(chat, "/start")
    telegram.wait_for(lambda: all(len(telegram.texts(chat)) == 2 for chat in (3601, 3602, 3603)), 15,
                      "greeting and first question in each chat")
    assert telegram.peak["sendMessage"] >= 2
    assert all(telegram.texts(chat) == [TEXTS["greeting"].replace("{name}", ", Иван"), QUESTIONS[0][1]]
               for chat in (3601, 3602, 3603))


def test_a_reply_telegram_never_took_before_sigterm_is_sent_after_the_restart(bot, bot_env, telegram):
    process = bot(RETRY_BASE_SECONDS="1", RETRY_MAX_SECONDS="2")
    say(telegram, 3801, "/start", QUESTIONS[0][1])
    telegram.fail("sendMessage", 502, "Bad Gateway", times=1000)
    telegram.send_text(3801, ANSWERS[0])
    telegram.wait_for(lambda: len(telegram.calls("sendMessage")) >= 3, 10, "the next question failing")
    process.terminate()
    assert process.wait(5) == 0
    saved = saved_dialogs(bot_env["DATA_DIR"])[3801]
    assert saved["answers"] == ANSWERS[:1] and [reply[0] for reply in saved["replies"]] == [QUESTIONS[1][1]]
    with telegram._cond:
        telegram._faults.clear()
    bot()
    telegram.wait_for(lambda: QUESTIONS[1][1] in telegram.texts(3801), 10, "the next question after the restart")
    say(telegram, 3801, ANSWERS[1], QUESTIONS[2][1])
    wait_until(lambda: saved_dialogs(bot_env["DATA_DIR"])[3801]["answers"] == ANSWERS[:2], 5)  # once, in order


def test_an_error_answer_with_a_text_error_code_is_a_failure_not_a_crash(bot, telegram):
    process = bot()
    telegram.fail("sendMessage", "429", "Too Many Requests")  # a proxy may send the code as text
    telegram.send_text(3802, "/start")
    say(telegram, 3803, "/start", QUESTIONS[0][1])
    assert process.alive()


@pytest.mark.parametrize("details", [[], ["звоните после обеда"]])  # joined to the phone when replayed
def test_a_contact_replayed_after_the_notes_whose_thanks_a_stop_cut_off_is_thanked_once(
        bot, bot_env, telegram, llm, smtp, details):
    notes_may_come = threading.Event()

    def reply(request):
        if request["messages"][0]["content"] == SUMMARY_PROMPT:
            notes_may_come.wait(10)
        return llm.reply
    llm.reply_fn = reply
    process = bot(RETRY_BASE_SECONDS="1")
    reach_contact_step(telegram, 3901)
    for text in [*details, "+7 999 123-45-67"]:  # wait for the notes
        telegram.send_text(3901, text)
    wait_until(lambda: len(saved_dialogs(bot_env["DATA_DIR"]).get(3901, {}).get("waiting", [])) > len(details), 5)
    telegram.fail("sendMessage", 502, "Bad Gateway", times=1000)
    sent = len(telegram.calls("sendMessage"))
    notes_may_come.set()
    telegram.wait_for(lambda: len(telegram.calls("sendMessage")) > sent, 10, "the thank-you tried")
    process.terminate()
    assert process.wait(5) == 0
    with telegram._cond:
        telegram._faults.clear()
    before = len(telegram.texts(3901))
    bot()
    telegram.wait_for(lambda: len(telegram.texts(3901)) > before, 10, "the thank-you after the restart")
    wait_until(lambda: not saved_dialogs(bot_env["DATA_DIR"])[3901]["busy"], 10)  # the notes came again
    say(telegram, 3902, "/start", QUESTIONS[0][1])  # a later batch: all the restart did is done
    after = telegram.texts(3901)[before:]
    assert len(after) == 1 and "Спасибо" in after[0]  # not a new dialog for the phone already taken
    wait_until(lambda: smtp.messages, 10)  # the delivery thread's
    say(telegram, 3902, "Сайт", QUESTIONS[1][1])
    assert len(read_rows(bot_env)) == 1 and len(smtp.messages) == 1


def test_a_stop_while_one_chat_goes_unanswered_sends_only_that_chats_pending_replies_after_it(
        bot, bot_env, telegram):
    """Chat 3952's replies get 502 until the bot is stopped; chat 3951 in the same batch is answered and starts
    over. After the restart 3952's reply, saved with its dialog, is sent, and nothing of 3951's again."""
    process = bot(RETRY_BASE_SECONDS="1")
    say(telegram, 3951, "/start", QUESTIONS[0][1])
    say(telegram, 3952, "/start", QUESTIONS[0][1])
    send = telegram._methods["sendMessage"]

    def refuse_3952(params):
        if int(params["chat_id"]) == 3952:
            raise fakes._ApiError(502, "Bad Gateway")
        return send(params)
    telegram._methods["sendMessage"] = refuse_3952
    with telegram._cond:  # one getUpdates answer
        telegram.send_text(3951, ANSWERS[0])
        telegram.send_text(3951, "/start")
        telegram.send_text(3952, ANSWERS[0])
    telegram.wait_for(lambda: telegram.texts(3951)[-1] == QUESTIONS[0][1] and len(telegram.texts(3951)) == 5, 10,
                      "3951 answered and greeted anew")
    process.terminate()
    assert process.wait(5) == 0
    telegram._methods["sendMessage"] = send
    bot()
    telegram.wait_for(lambda: QUESTIONS[1][1] in telegram.texts(3952), 10, "3952's pending reply sent")
    say(telegram, 3953, "/start", QUESTIONS[0][1])  # a later batch
    assert len(telegram.texts(3951)) == 5  # nothing of 3951's came again
    wait_until(lambda: saved_dialogs(bot_env["DATA_DIR"])[3952]["answers"] == ANSWERS[:1], 5)


def test_a_stop_cutting_off_the_reply_after_forget_keeps_nothing_from_before_it(bot, bot_env, telegram):
    """In one batch a client answers, sends /forget, then writes anew; the greeting for the new message gets 502
    until the bot is stopped. State keeps nothing of the forgotten answer, and the new dialog's greeting, saved
    with it, is sent after the restart."""
    process = bot(RETRY_BASE_SECONDS="1")
    say(telegram, 3961, "/start", QUESTIONS[0][1])
    send = telegram._methods["sendMessage"]

    def refuse_greeting(params):
        if int(params["chat_id"]) == 3961 and params["text"].startswith("Здравствуйте"):
            raise fakes._ApiError(502, "Bad Gateway")
        return send(params)
    telegram._methods["sendMessage"] = refuse_greeting
    with telegram._cond:  # one getUpdates answer
        telegram.send_text(3961, "Сайт для кафе, звоните +7 999 555-44-33")
        telegram.send_text(3961, "/forget")
        telegram.send_text(3961, "Другой вопрос: нужен логотип")
    telegram.wait_for(lambda: TEXTS["forgotten"] in telegram.texts(3961), 10, "«удалены»")
    telegram.wait_for(lambda: len(telegram.calls("sendMessage")) >= 6, 10, "the greeting refused")
    # The message after /forget waited for «удалены»: it starts the new dialog after it.
    assert telegram.texts(3961)[-1] == TEXTS["forgotten"]
    process.terminate()
    assert process.wait(5) == 0
    assert "555-44-33" not in (Path(bot_env["DATA_DIR"]) / "state.jsonl").read_text(encoding="utf-8")
    telegram._methods["sendMessage"] = send
    bot()
    telegram.wait_for(lambda: telegram.texts(3961)[-1] == QUESTIONS[0][1], 10, "the new message answered")
    assert telegram.texts(3961).count(TEXTS["forgotten"]) == 1


@pytest.mark.skipif(os.name == "nt", reason="Windows does not let the open .lock be deleted")
def test_a_deleted_lock_file_never_lets_two_copies_run_on_one_data_dir(bot, bot_env, telegram):
    first = bot()
    first.wait_log("started as")
    (Path(bot_env["DATA_DIR"]) / ".lock").unlink()  # the owner cleaning up "junk"
    second = bot()
    wait_until(lambda: not (first.alive() and second.alive()), 10)
    (stopped,) = [process for process in (first, second) if not process.alive()]
    assert stopped.wait(5) == 2 and "другая копия leadbot" in stopped.output()

"""Chats are independent lanes: one chat's 429, 5xx or 403 never holds up the others, and replies a stop or a
kill -9 cut off go out after the restart (no timing asserts: waits are bounded, order is checked)."""
import threading

import pytest

import fakes
from fakes import ANSWERS, CONTACT_REQUEST, QUESTIONS, TEXTS, saved_dialogs, wait_until

GREETING = TEXTS["greeting"].replace("{name}", ", Иван")


def greeted(telegram, chat):
    return telegram.texts(chat)[:2] == [GREETING, QUESTIONS[0][1]]


def test_a_chat_waiting_out_429_retry_after_20_holds_up_no_other_chat(bot, telegram):
    slow, others = 5001, range(5002, 5007)
    telegram.fail_chat(slow, "sendMessage", 429, "Too Many Requests: retry after 20", {"retry_after": 20})
    bot()
    telegram.send_text(slow, "/start")
    telegram.wait_for(lambda: telegram.calls("sendMessage"), 5, "the refused greeting")
    telegram.send_text(slow, ANSWERS[0])  # the client writes on: it waits behind the greeting, in order
    with telegram._cond:  # five new clients in one getUpdates answer
        for chat in others:
            telegram.send_text(chat, "/start")
    telegram.wait_for(lambda: all(greeted(telegram, chat) for chat in others), 8, "the other chats greeted")
    tried = [call for call in telegram.calls("sendMessage") if int(call["chat_id"]) == slow]
    assert len(tried) == 1  # the others were served before the slow chat's retry was even due
    telegram.wait_for(lambda: len(telegram.texts(slow)) >= 3, 30, "the slow chat's replies after the wait")
    assert telegram.texts(slow) == [GREETING, QUESTIONS[0][1], QUESTIONS[1][1]]
    assert all(telegram.texts(chat) == [GREETING, QUESTIONS[0][1]] for chat in others)


def every_third_send_fails(telegram):
    """502 Bad Gateway on every third sendMessage, whichever chat it is for."""
    send, count, lock = telegram._methods["sendMessage"], [0], threading.Lock()

    def flaky(params):
        with lock:
            count[0] += 1
            fail = count[0] % 3 == 0
        if fail:
            raise fakes._ApiError(502, "Bad Gateway")
        return send(params)
    telegram._methods["sendMessage"] = flaky
    return count


def test_502_on_one_send_in_three_in_a_burst_of_20_loses_no_reply_and_doubles_none(bot, telegram, llm):
    chats = range(5101, 5121)
    count = every_third_send_fails(telegram)
    bot(RETRY_MAX_SECONDS="0.1")
    expected = [GREETING, QUESTIONS[0][1], QUESTIONS[1][1], QUESTIONS[2][1], llm.reply, CONTACT_REQUEST]
    for step, text in enumerate(["/start", *ANSWERS]):
        with telegram._cond:  # every client at once
            for chat in chats:
                telegram.send_text(chat, text)
        want = 2 + step if step < len(ANSWERS) else len(expected)
        telegram.wait_for(lambda: all(len(telegram.texts(chat)) >= want for chat in chats), 20,
                          f"every chat's reply to step {step}")
    assert count[0] > 3 * 20  # the fault really hit the burst
    for chat in chats:
        texts = telegram.texts(chat)
        assert len(texts) == len(expected) and all(e in t for e, t in zip(expected, texts)), (chat, texts)


def hold_up(telegram, chat, fault):
    """The chat's next sendMessage calls fail with 502 for good, or the next one hangs for 30 s."""
    if fault == "502":
        telegram.fail_chat(chat, "sendMessage", 502, "Bad Gateway", times=10_000)
    else:
        telegram.stall_chat(chat, "sendMessage", 30)


def restart_and_see_the_pending_question(bot, telegram, chat):
    """Telegram works again and the bot restarts: the question still owed goes out, once, in order."""
    with telegram._cond:
        telegram._faults.clear()
    bot()
    telegram.wait_for(lambda: QUESTIONS[1][1] in telegram.texts(chat), 10, "the pending question after the restart")
    fakes.say(telegram, chat, ANSWERS[1], QUESTIONS[2][1])
    assert telegram.texts(chat) == [GREETING, QUESTIONS[0][1], QUESTIONS[1][1], QUESTIONS[2][1]]


@pytest.mark.parametrize("fault", ["502", "stalled"])
def test_replies_pending_at_a_kill_9_go_out_after_the_restart_and_the_dialog_is_where_it_was(
        bot, bot_env, telegram, fault):
    chat = 5201
    first = bot()
    fakes.say(telegram, chat, "/start", QUESTIONS[0][1])
    hold_up(telegram, chat, fault)
    telegram.send_text(chat, ANSWERS[0])
    telegram.wait_for(lambda: len(telegram.calls("sendMessage")) >= 3, 10, "the next question held up")
    saved = saved_dialogs(bot_env["DATA_DIR"])[chat]
    assert saved["answers"] == ANSWERS[:1]  # the answer is kept at once, with what the client has still to read
    assert [reply[0] for reply in saved["replies"]] == [QUESTIONS[1][1]]
    first.kill()
    first.wait()
    restart_and_see_the_pending_question(bot, telegram, chat)
    wait_until(lambda: saved_dialogs(bot_env["DATA_DIR"])[chat]["answers"] == ANSWERS[:2], 5,
               message="each answer kept once, in order")
    wait_until(lambda: saved_dialogs(bot_env["DATA_DIR"])[chat]["replies"] == [], 5,
               message="the replies sent leave the saved dialog")


@pytest.mark.parametrize("fault", ["502", "stalled"])
def test_a_sigterm_while_replies_wait_for_telegram_sends_them_after_the_restart(bot, bot_env, telegram, fault):
    chat = 5251
    first = bot(RETRY_BASE_SECONDS="1", RETRY_MAX_SECONDS="2")
    fakes.say(telegram, chat, "/start", QUESTIONS[0][1])
    hold_up(telegram, chat, fault)
    telegram.send_text(chat, ANSWERS[0])
    telegram.wait_for(lambda: len(telegram.calls("sendMessage")) >= 3, 10, "the next question held up")
    first.terminate()
    assert first.wait(5) == 0  # a send hanging on its way is not waited for long
    restart_and_see_the_pending_question(bot, telegram, chat)


def test_a_client_who_blocked_the_bot_has_the_dialog_ended_and_the_others_in_the_batch_are_served(
        bot, bot_env, telegram):
    gone, others = 5301, range(5302, 5307)
    process = bot()
    fakes.say(telegram, gone, "/start", QUESTIONS[0][1])
    wait_until(lambda: gone in saved_dialogs(bot_env["DATA_DIR"]), 5, message="the dialog saved")
    telegram.block(gone)
    with telegram._cond:  # one getUpdates answer
        telegram.send_text(gone, ANSWERS[0])
        for chat in others:
            telegram.send_text(chat, "/start")
    telegram.wait_for(lambda: all(greeted(telegram, chat) for chat in others), 8, "the other chats greeted")
    wait_until(lambda: gone not in saved_dialogs(bot_env["DATA_DIR"]), 5, message="the blocked chat's dialog ended")
    process.wait_log(f"chat {gone} blocked the bot; dialog ended")
    telegram.unblock(gone)
    telegram.send_text(gone, "Привет")  # a new dialog: nothing of the old one is still pending
    assert telegram.wait_messages(gone, 4)[2:] == [GREETING, QUESTIONS[0][1]]


def test_a_long_reply_cut_off_after_its_first_piece_goes_on_from_the_second_without_repeating(
        bot, telegram, llm):
    chat, offer = 5401, "Рекомендуем лендинг под ключ. " * 170  # 5,100 characters: two messages
    llm.reply = offer.strip()
    send, refused = telegram._methods["sendMessage"], []

    def refuse_the_second_piece(params):
        offer_sent = any(text.startswith("Рекомендуем") for text in telegram.texts(chat))
        if offer_sent and not refused:
            refused.append(params["text"])
            raise fakes._ApiError(502, "Bad Gateway")
        return send(params)
    telegram._methods["sendMessage"] = refuse_the_second_piece
    bot()
    fakes.reach_contact_step(telegram, chat)
    texts = telegram.texts(chat)
    pieces = [text for text in texts if text.startswith("Рекомендуем")]
    assert len(pieces) == 2 and refused and refused[0] == pieces[1]  # the failed piece, sent once after
    assert " ".join(pieces).split() == offer.split() and CONTACT_REQUEST in texts[-1]
    assert len(texts) == len(set(texts))


def test_a_cancel_while_the_chat_waits_out_a_429_is_answered_after_the_replies_before_it(bot, bot_env, telegram):
    chat = 5501
    bot()
    fakes.say(telegram, chat, "/start", QUESTIONS[0][1])
    telegram.fail_chat(chat, "sendMessage", 429, "Too Many Requests: retry after 1", {"retry_after": 1})
    telegram.send_text(chat, ANSWERS[0])
    telegram.wait_for(lambda: len(telegram.calls("sendMessage")) >= 3, 5, "the next question refused")
    telegram.send_text(chat, "/cancel")
    wait_until(lambda: chat not in saved_dialogs(bot_env["DATA_DIR"]), 5, message="the dialog dropped at once")
    telegram.wait_messages(chat, 4)
    assert telegram.texts(chat) == [GREETING, QUESTIONS[0][1], QUESTIONS[1][1], TEXTS["cancelled"]]

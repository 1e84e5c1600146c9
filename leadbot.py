"""leadbot: a Telegram assistant that qualifies prospective clients and hands leads to a manager.

    python leadbot.py [--console | --check | --stats [--json]]     (see README.md)

This file reads in the order a message flows: the stage table and its functions, the dispatcher that
runs one message through them and saves the dialog, the loop that feeds the dispatcher, the lead's
way to the manager, then the plumbing (the client's words, the Bot API, prompt.txt, settings,
start-up).
"""
import argparse
import collections
import contextlib
import copy
import difflib
import io
import json
import logging
import os
import queue
import random
import re
import secrets
import signal
import sys
import threading
import time
import traceback
import unicodedata
import zoneinfo
from datetime import datetime, time as dtime, timedelta, timezone
from pathlib import Path

import requests
from dotenv import dotenv_values
from dotenv.parser import parse_stream

import llm
import mailer
import store

log = logging.getLogger("leadbot")
HERE = Path(__file__).resolve().parent

# --- The dialog: one function per stage, each returning the next stage --------------------------


def greet(bot, dialog, msg):
    """Greets the client, asks the first question; a first message that says more than hello
    (not /start) is kept as the client's request."""
    name = f", {dialog['name']}" if dialog["name"] else ""
    bot.say(msg.chat_id, bot.text("greeting").replace("{name}", name))
    if msg.text and not command_of(msg.text) and not GREETING_ONLY.fullmatch(plain_words(msg.text)):
        dialog["request"] = msg.text
    note_contact(bot, dialog, msg)
    ask_question(bot, msg.chat_id, 0)
    return "qualifying"


def take_answer(bot, dialog, msg):
    """Stores the answer, asks the next question; after the last one starts writing the offer.
    A button number that is no button («7» of 3), a shared contact and an old button are asked
    again, not stored."""
    question = question_at(bot, len(dialog["answers"]))
    note_contact(bot, dialog, msg)
    answer = msg.text.strip()
    no_button = question.buttons and answer.isdigit() and button_text(question, answer) == answer
    # A contact shared with the button answers no question, nor «Новая заявка» tapped twice.
    if msg.shared or no_button or msg.text == bot.text("new_request_button"):
        if no_button:
            bot.say(msg.chat_id, bot.text("pick_button"))
        ask_question(bot, msg.chat_id, len(dialog["answers"]))
        return "qualifying"
    dialog["answers"].append(button_text(question, msg.text))
    if len(dialog["answers"]) < len(bot.prompt.questions):
        ask_question(bot, msg.chat_id, len(dialog["answers"]))
        return "qualifying"
    start_offer(bot, msg.chat_id, dialog)
    return "offering"


def make_offer(bot, dialog, msg):
    """Sends the recommendation the LLM wrote, asks for a contact unless the client gave one
    already (the lead is then saved with it as soon as the notes are in: handle_llm)."""
    dialog["offer"] = msg.offer
    bot.say(msg.chat_id, msg.offer, remove_keyboard=True)
    if not dialog.get("contact"):
        ask_contact(bot, msg.chat_id)
    return "collecting_contact"


def take_contact(bot, dialog, msg):
    """A contact (or «пишите сюда») -> the lead; a refusal, or the REASK_CAP-th answer without a
    contact -> goodbye with the door open; anything else gets the format explained once."""
    if msg.shared and not msg.own_contact:
        bot.say(msg.chat_id, bot.text("foreign_contact"), contact_button=True)
        return "collecting_contact"
    # A contact given earlier stands whatever comes now (after a lead no channel took, say).
    contact = contact_in(bot, msg) or joined_phone(dialog, msg.text) or dialog.get("contact", "")
    if contact:
        return lead_with_contact(bot, dialog, msg, contact)
    dialog["unanswered"] = dialog.get("unanswered", 0) + 1
    declined = msg.text == bot.text("decline_button")  # the «Не сейчас» button: no guess needed
    if declined or is_refusal(msg.text) or dialog["unanswered"] >= REASK_CAP:
        commit_lead(bot, dialog, msg, "", "rejected")
        bot.say(msg.chat_id, bot.text("refused"), remove_keyboard=True)
        return "done"
    bot.say(msg.chat_id, bot.text("contact_format"))
    ask_contact(bot, msg.chat_id)
    return "collecting_contact"


def lead_with_contact(bot, dialog, msg, contact):
    """The one place a contact becomes a lead: saved and thanked; the next stage."""
    # nothing saved: the client must not hear so
    if not commit_lead(bot, dialog, msg, contact, "new"):
        bot.say(msg.chat_id, bot.text("not_taken"))
        return "collecting_contact"
    bot.say(msg.chat_id, bot.text("thanks_saved"), remove_keyboard=True)
    dialog["saved"], dialog["contact"] = True, contact  # the contact: to know a new one after it
    return "done"


def contact_given(bot, dialog, msg):
    """The offer is out and the client gave a contact before it: the lead, without asking again."""
    return lead_with_contact(bot, dialog, msg, dialog["contact"])


def note_contact(bot, dialog, msg):
    """A contact in any answer (a phone, «пишите сюда», the share button) is the lead's: kept in
    the dialog, said once, not asked for again."""
    found = new_contacts(dialog, contacts_in(bot, msg))
    if found and not dialog.get("contact"):
        bot.say(msg.chat_id, bot.text("contact_noted"))
    if found:
        dialog["contact"] = with_contacts(dialog, found)


def new_contacts(dialog, found):
    """The contacts found that the dialog has not yet; a phone spaced otherwise is the same."""
    def key(contact):
        return re.sub(r"[^\w@]", "", contact.lower())
    known = {key(contact) for contact in dialog.get("contact", "").split(", ")}
    return [contact for contact in found if key(contact) not in known]


def with_contacts(dialog, found):
    return ", ".join([known for known in [dialog.get("contact")] if known] + found)


def contact_in(bot, msg):
    return ", ".join(contacts_in(bot, msg))


def contacts_in(bot, msg):
    """The contacts a message gives: a shared one, its phones, emails, @usernames, or this chat."""
    found = [msg.shared] if msg.shared else find_contacts(msg.text)
    return found or [chat for chat in [chat_contact(bot, msg)] if chat]


def chat_contact(bot, msg):
    """«Пишите сюда»: this chat (and the sender's @username) is the way to reach the client."""
    if not WRITE_HERE.search(plain_words(msg.text)):
        return ""
    username = f" @{msg.username}" if msg.username else ""
    return f"{bot.source.capitalize()} chat {msg.chat_id}{username}"


def after_end(bot, dialog, msg):
    """After a saved lead, what the client writes is kept (the manager's to read) and one tap on
    the button starts a new request; a contact the lead has not («и ещё почта …») sends the lead
    again with it."""
    if msg.text in (bot.text("new_request_button"), "1"):  # «1»: its number, as in the console
        renew(bot, dialog, msg)
        return greet(bot, dialog, msg._replace(text=""))
    if not dialog.get("saved"):
        return after_refusal(bot, dialog, msg)
    added = new_contacts(dialog, [msg.shared] if msg.shared else find_contacts(msg.text))
    if added:  # the manager must see it: a row with every contact (one more email, no lead lost)
        return lead_with_contact(bot, dialog, msg, with_contacts(dialog, added))
    kept = dialog.get("after", []) + [{"text": msg.text or msg.shared, "at": round(time.time())}]
    dialog["after"] = kept[-AFTER_KEPT:]
    bot.say(msg.chat_id, bot.text("after_lead"), buttons=[bot.text("new_request_button")])
    return "done"


def after_refusal(bot, dialog, msg):
    """After a refusal a contact is the lead after all; a refusal again, «ок» or «спасибо» hear the
    goodbye again (no request is made of them); anything else begins anew."""
    contact = contact_in(bot, msg)
    if contact:
        return lead_with_contact(bot, dialog, msg, contact)
    if is_refusal(msg.text) or NOTHING_SAID.fullmatch(plain_words(msg.text)):
        bot.say(msg.chat_id, bot.text("refused"), remove_keyboard=True)
        return "done"
    return start_over(bot, dialog, msg)


def start_over(bot, dialog, msg):
    """Begins a new dialog and takes this message as the answer to the first question."""
    renew(bot, dialog, msg)
    return take_answer(bot, dialog, msg)


def renew(bot, dialog, msg):
    """The dialog begins anew in place: nothing of the old one (offer, notes) but what is to run."""
    old = dict(dialog)
    dialog.clear()
    dialog.update(new_dialog(msg.chat_id, old["name"], bot.source), waiting=old["waiting"],
                  seen=old["seen"])


STAGES = {
    "greeting": greet,                   # /start or a first message -> greeting, first question
    "qualifying": take_answer,           # an answer -> the next question, or the offer is started
    "offering": make_offer,              # the LLM's recommendation -> sent, contact asked
    "collecting_contact": take_contact,  # a contact -> the lead; a refusal -> goodbye
    "done": after_end,                   # after a lead: kept, a new request offered
}
AFTER_KEPT = 10  # the client's messages after a lead kept in the dialog (dialog["after"])
REASK_CAP = 2  # answers without a contact at the contact step before the dialog ends politely
RETURN_AFTER = 3600  # seconds of silence after which a client in mid-dialog is welcomed back
# seconds a stop waits for an email on its way (doc/deploy.md gives systemd 30)
STOP_WAIT = mailer.TIMEOUT + 2


def remind(bot, dialog, msg):
    """Welcomes a returning client back and repeats the open question."""
    bot.say(msg.chat_id, bot.text("returning"))
    if dialog["stage"] == "qualifying":
        ask_question(bot, msg.chat_id, len(dialog["answers"]))
    else:
        ask_contact(bot, msg.chat_id)
    return dialog["stage"]


def question_at(bot, index):
    """The question at index, or the last one if prompt.txt lost some while a client was
    answering."""
    return bot.prompt.questions[min(index, len(bot.prompt.questions) - 1)]


def ask_question(bot, chat_id, index):
    question = question_at(bot, index)
    bot.say(chat_id, question.text, buttons=question.buttons, remove_keyboard=not question.buttons)


def ask_contact(bot, chat_id):
    text = bot.text("contact_request")
    if bot.cfg.privacy_url:
        text += "\n\n" + bot.text("privacy").replace("{url}", bot.cfg.privacy_url)
    bot.say(chat_id, text, contact_button=bot.source == "telegram")


def button_text(question, answer):
    """A button's number («2») counts as that button."""
    if answer.strip().isdigit() and 1 <= int(answer) <= len(question.buttons):
        return question.buttons[int(answer) - 1]
    return answer


def new_dialog(chat_id, name, source):
    return {"id": secrets.token_hex(6), "stage": "greeting", "answers": [], "name": name,
            "source": source, "started": time.time(), "updated_at": time.time(), "seen": [],
            "waiting": [], "busy": False}


def valid_dialog(dialog):
    """The shape the dispatcher relies on; the journal sets other entries aside."""
    kinds = dict(id=str, answers=list, name=str, updated_at=(int, float), seen=list, waiting=list,
                 busy=bool)
    return (dialog.get("stage") in STAGES
            and all(isinstance(dialog.get(key), kind) for key, kind in kinds.items())
            and all(isinstance(msg, dict) and "chat_id" in msg and set(msg) <= set(Incoming._fields)
                    for msg in dialog["waiting"]) and valid_replies(dialog.get("replies", [])))


def valid_replies(replies):
    """[text, markup, id] each: what the client has still to read (older dialogs have none)."""
    markups = {"buttons", "contact_button", "remove_keyboard"}
    return isinstance(replies, list) and all(
        isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and isinstance(r[2], str)
        and isinstance(r[1], dict) and set(r[1]) <= markups for r in replies)


# --- The dispatcher: one message through a command or the stage table, saved once -------------


def handle(bot, msg):
    """Runs one client message; the dialog is saved once, after its stage function decided."""
    old = bot.journal.dialogs.get(msg.chat_id)
    if old and msg.update_id is not None and msg.update_id in old["seen"]:
        return  # Telegram sent it again after a crash
    if not within_rate(bot, msg.chat_id) and not (msg.shared or find_contacts(msg.text)):
        return
    if held(bot, msg.chat_id, old) and command_of(msg.text) not in ("start", *COMMANDS):
        # its messages wait their turn, in order (commands do not wait)
        old = old or new_dialog(msg.chat_id, msg.first_name, bot.source)
        waiting = queued(old["waiting"], msg._asdict())
        return save(bot, msg.chat_id, {**old, "waiting": waiting,
                                       "seen": seen_with(old, msg.update_id)})
    dispatch(bot, msg, old)


def held(bot, chat_id, dialog):
    """Whether the chat's messages wait: the LLM is writing for it, or its /forget is not answered
    yet (a message after «удалены» starts anew, so it must not be answered before it)."""
    return bool(dialog and dialog["busy"]) or str(chat_id) in bot.ledger.forgetting()


def queued(waiting, msg, limit=20):
    """The waiting list with msg at its end; past `limit` the oldest message without a contact goes,
    so a phone sent before twenty short messages is never the one dropped."""
    waiting = waiting + [msg]
    if len(waiting) > limit:
        plain = [m for m in waiting if not (m.get("shared") or find_contacts(m.get("text", "")))]
        waiting.remove(plain[0] if plain else waiting[0])
    return waiting


def dispatch(bot, msg, old):
    """A command, a refusal of media, or the stage table."""
    command = command_of(msg.text)
    if command in COMMANDS:
        return COMMANDS[command](bot, msg, old)
    if msg.media == "voice":
        return listen(bot, msg)
    # Someone else's contact: said so at the contact step (take_contact), a photo's fate elsewhere.
    if msg.media or (not msg.own_contact and (not old or old["stage"] != "collecting_contact")):
        return bot.say(msg.chat_id, bot.text("text_only"))
    if old and not expired(bot, old) and command != "start":
        dialog = copy.deepcopy(old)
    else:
        dialog = begun_anew(bot, msg, old)
    step = STAGES[dialog["stage"]]
    if dialog["stage"] in ("qualifying", "collecting_contact") and idle(dialog) > RETURN_AFTER:
        step = remind
    advance(bot, msg, dialog, step)


def begun_anew(bot, msg, old):
    """A new dialog; /start in mid-dialog keeps the contact given in it, which the bot said it
    would not ask for again."""
    dialog = new_dialog(msg.chat_id, msg.first_name, bot.source)
    if old and old["stage"] != "done" and old.get("contact") and not expired(bot, old):
        dialog["contact"] = old["contact"]
    return dialog


def replay(bot, chat_id):
    """Runs the messages that waited for the LLM, oldest first, texts in a row as one message:
    details a client added while the LLM wrote get one answer, not one each. Each leaves the queue
    with its answer's save."""
    while ((old := bot.journal.dialogs.get(chat_id)) and not held(bot, chat_id, old)
           and old["waiting"]):
        msgs = [Incoming(**msg) for msg in old["waiting"]]
        texts = next((i for i, msg in enumerate(msgs) if not msg.text or command_of(msg.text)),
                     len(msgs)) or 1
        joined = msgs[texts - 1]._replace(text="\n".join(msg.text for msg in msgs[:texts]))
        # written with its reply, like any save
        save(bot, chat_id, {**old, "waiting": old["waiting"][texts:]})
        dispatch(bot, joined, bot.journal.dialogs[chat_id])


def advance(bot, msg, dialog, step):
    """Runs a stage function, records what changed and saves the dialog."""
    before, started = dialog["stage"], dialog["id"]
    dialog["stage"] = step(bot, dialog, msg)
    if dialog["id"] != started or before == "greeting":
        bot.funnel.record(dialog["id"], "started", bot.source)
    if dialog["stage"] != before:
        log.info("stage changed: chat %s, %s -> %s", msg.chat_id, before, dialog["stage"])
        bot.funnel.record(dialog["id"], "stage", bot.source, stage=dialog["stage"])
    dialog["seen"] = seen_with(dialog, msg.update_id)
    save(bot, msg.chat_id, dialog)


def seen_with(dialog, *update_ids):
    """The dialog's last 20 update ids with these: enough to know a message Telegram sends again."""
    return (dialog["seen"] + [update_id for update_id in update_ids if update_id is not None])[-20:]


def save(bot, chat_id, dialog):
    """Keeps the dialog as the chat's next message sees it, with the replies this message made."""
    dialog["updated_at"] = time.time()
    keep(bot, chat_id, dialog)


def keep(bot, chat_id, dialog, sent=()):
    """Writes the dialog and every reply its client has still to read in one journal line: those
    of earlier messages not yet sent (less the `sent` ids), then the new ones. A crash loses
    neither the state nor the replies. Then the replies go to the chat's lane."""
    before = (bot.journal.dialogs.get(chat_id) or {}).get("replies", [])
    new = [[text, markup, secrets.token_hex(4)] for text, markup in bot.replies.pop(chat_id, [])]
    dialog["replies"] = [reply for reply in before if reply[2] not in sent] + new
    bot.journal.save(chat_id, dialog)
    bot.lanes.push(chat_id, new)


def flush(bot):
    """After the events at hand: what they said with no save after it. A chat with a dialog
    keeps it there (/help, a photo refused in mid-dialog), so it survives a crash too."""
    for chat_id in list(bot.replies):
        if dialog := bot.journal.dialogs.get(chat_id):
            keep(bot, chat_id, dict(dialog))
        else:
            # No dialog to keep it in (the answer to /forget or /cancel after the erase, «too
            # fast» or «text only» to a stranger, a group's /start): straight to the lane,
            # unsaved; a crash before it is sent loses it.
            replies = [[text, markup, None] for text, markup in bot.replies.pop(chat_id)]
            bot.lanes.push(chat_id, replies)


def handle_sent(bot, event):
    """A lane sent these replies: they leave the saved dialog. A client who blocked the bot has
    the dialog ended (the lane dropped the rest of its replies)."""
    dialog = bot.journal.dialogs.get(event.chat_id)
    if dialog and any(reply[2] in event.replies for reply in dialog.get("replies", [])):
        keep(bot, event.chat_id, dict(dialog), sent=event.replies)
    if event.gone and dialog:
        log.info("chat %s blocked the bot; dialog ended", event.chat_id)
        with contextlib.suppress(OSError):  # the file is rewritten with the next one that ends
            end_dialog(bot, event.chat_id, "blocked")


def handle_llm(bot, event):
    """The offer or the notes an LLM job wrote, for a dialog that is still waiting for them."""
    dialog = copy.deepcopy(bot.journal.dialogs.get(event.chat_id))
    if not dialog or dialog["id"] != event.dialog_id or not dialog["busy"]:
        return  # cancelled, forgotten or started anew meanwhile
    if event.offer is not None:
        return advance(bot, event, dialog, make_offer)
    dialog["intent"], dialog["notes"], dialog["busy"] = event.intent, event.notes, False
    if dialog["stage"] == "collecting_contact" and dialog.get("contact"):
        advance(bot, event, dialog, contact_given)  # given before the offer: saved with the notes
    else:  # the waiting messages stay saved until each is handled: a crash loses none
        save(bot, event.chat_id, dialog)
    replay(bot, event.chat_id)


def cancel_command(bot, msg, dialog):
    if dialog is None or dialog["stage"] == "done":  # a saved lead is not undone by /cancel
        return bot.say(msg.chat_id, bot.text("nothing_to_cancel"), remove_keyboard=True)
    end_dialog(bot, msg.chat_id, "cancelled")
    bot.say(msg.chat_id, bot.text("cancelled"), remove_keyboard=True)


def forget_command(bot, msg, dialog):
    """Ends the dialog and commits a /forget; the client is answered once every channel did its part
    (handle_forgotten)."""
    if bot.source == "console":  # every console dialog is chat 0: its rows are not this one's alone
        end_dialog(bot, msg.chat_id, "forgotten")
        return print("In the console /forget only ends this dialog; "
                     "leads.csv keeps the console's rows.")
    try:
        end_dialog(bot, msg.chat_id, "forgotten")
    except OSError as e:
        log.error("could not forget chat %s (%s)", msg.chat_id, type(e).__name__)
    if not bot.ledger.add({"forget": msg.chat_id}):
        return bot.say(msg.chat_id, bot.text("forget_failed"), remove_keyboard=True)
    log.info("forget of chat %s committed", msg.chat_id)


COMMANDS = {"help": lambda bot, msg, dialog: bot.say(msg.chat_id, bot.text("help")),
            "cancel": cancel_command, "forget": forget_command}


def end_dialog(bot, chat_id, why):
    """Drops the chat's dialog and rewrites the state file, so no earlier line keeps its answers."""
    dialog = bot.journal.dialogs.get(chat_id)
    if dialog:
        bot.funnel.record(dialog["id"], why, dialog.get("source", bot.source))
        log.info("dialog finished: chat %s, %s", chat_id, why)
    bot.journal.erase(chat_id)


def expired(bot, dialog):
    return idle(dialog) > bot.cfg.session_ttl_hours * 3600


def idle(dialog):
    return time.time() - dialog["updated_at"]


def within_rate(bot, chat_id, window=10.0, limit=12):
    """Flood guard: beyond `limit` messages in `window` seconds one note, then silence."""
    now = time.monotonic()
    times = [t for t in bot.recent.get(chat_id, []) if now - t <= window] + [now]
    bot.recent[chat_id] = times
    if len(times) == limit + 1:
        log.info("chat %s is sending too fast; slowing it down", chat_id)
        bot.say(chat_id, bot.text("too_fast"))
    return len(times) <= limit


def drop_idle(bot):
    """Forgets dialogs silent longer than SESSION_TTL_HOURS, finished ones too, and old rate
    counters."""
    gone = [chat for chat, dialog in bot.journal.dialogs.items()
            if expired(bot, dialog) and not dialog["busy"]]
    for chat_id in gone:
        bot.journal.save(chat_id, None)
    if gone:
        try:
            bot.journal.erase(gone[-1])  # one rewrite, so no earlier line keeps their answers
        except OSError as e:
            log.warning("could not rewrite the state file (%s)", type(e).__name__)
    bot.recent = {chat: times for chat, times in bot.recent.items()
                  if time.monotonic() - times[-1] < 10}


def keep_lock(bot):
    """DATA_DIR's .lock deleted while the bot runs is taken again at once; if a second copy took it,
    this one stops: two copies would answer every client twice."""
    try:
        bot.lock = store.relock(bot.cfg.data_dir, bot.lock)
    except store.StoreError as e:
        bot.fatal = str(e)
        bot.stopping.set()


# --- The loop: Telegram updates and LLM answers reach the dispatcher one at a time -------------


def run(bot):
    """The main loop: the poller thread and LLM jobs put what they get into bot.inbox; only this
    thread touches a dialog."""
    threading.Thread(target=poll_telegram, args=(bot,), daemon=True).start()
    channels = {name: threading.Thread(target=deliver_channel, args=(bot, name), daemon=True)
                for name in bot.ledger.cursors}
    for channel in channels.values():
        channel.start()
    last_cleanup = time.monotonic()
    while not bot.stopping.is_set():
        try:
            # short steps: a stop is noticed at once on any OS
            events = [bot.inbox.get(timeout=0.05)]
        except queue.Empty:
            events = []
        # all at hand: their replies go together
        while events and len(events) < 100 and not bot.inbox.empty():
            events.append(bot.inbox.get())
        for event in events:
            handle_event(bot, event)
        flush(bot)  # the dispatcher never waits for Telegram: lanes send, then post a Sent event
        for event in events:
            bot.inbox.task_done()
        if time.monotonic() - last_cleanup > min(60, bot.cfg.session_ttl_hours * 3600):
            drop_idle(bot)
            last_cleanup = time.monotonic()
        keep_lock(bot)  # two system calls
    # tells Telegram what is handled, so that after a restart none comes twice
    if bot.offset is not None:
        with contextlib.suppress(TelegramError):
            bot.out.call("getUpdates", http_timeout=2, offset=bot.offset, timeout=0, limit=1)
    settle_lanes(bot)
    # an email cut off after the server took it would go twice: let it finish
    if bot.mailing.is_set():
        log.info("waiting up to %d s for the mail server to take an email on its way", STOP_WAIT)
        channels["email"].join(STOP_WAIT)
    deadline = time.monotonic() + 0.5
    for channel in channels.values():  # a record in hand is finished, cursor and all (briefly)
        channel.join(max(0.0, deadline - time.monotonic()))


def settle_lanes(bot, wait=1.0):
    """At a stop: sends on their way may finish (briefly), and what the lanes sent leaves the saved
    dialogs, so a stop sends nothing twice; the replies still pending go out after the restart."""
    bot.lanes.quiet(min(wait, bot.cfg.telegram_timeout))
    while True:
        try:
            event = bot.inbox.get_nowait()
        except queue.Empty:
            return
        if isinstance(event, Sent):  # the rest comes again: updates, LLM jobs (recover)
            handle_event(bot, event)


def handle_event(bot, event):
    """An update, an LLM job's answer or a lane's report, start to end; an error is logged without
    content, never stops the bot."""
    try:
        if isinstance(event, Sent):
            handle_sent(bot, event)
        elif isinstance(event, Written):
            handle_llm(bot, event)
        elif isinstance(event, Forgotten):
            handle_forgotten(bot, event)
        elif isinstance(event, Heard):
            handle_heard(bot, event)
        elif msg := incoming_from(bot, event):
            handle(bot, msg)
    except Exception as e:  # noqa: BLE001 - one poisoned update must not block the others
        where = traceback.extract_tb(e.__traceback__)[-1]
        log.error("update failed: %s at %s:%d",
                  type(e).__name__, Path(where.filename).name, where.lineno)
    finally:
        if isinstance(event, dict):
            bot.offset = event["update_id"] + 1


ALLOWED_UPDATES = ["message", "edited_message"]  # what getUpdates asks for; no other kind is sent


def poll_telegram(bot):
    """The poller thread: getUpdates, each update into the inbox; the next call's offset confirms
    the batch only once all of it is handled, so a crash loses none (ids need not grow: Telegram
    restarts them after a quiet week)."""
    failures = 0
    while not bot.stopping.is_set():
        try:
            updates = bot.out.call("getUpdates",
                                   http_timeout=bot.cfg.poll_timeout + bot.cfg.telegram_timeout,
                                   offset=bot.offset, timeout=bot.cfg.poll_timeout,
                                   allowed_updates=ALLOWED_UPDATES)
            if not isinstance(updates, list):
                raise TelegramError(0, "getUpdates answer is not a list")
            good = [u for u in updates if isinstance(u, dict) and type(u.get("update_id")) is int]
            if len(good) < len(updates):
                log.warning("skipped %d malformed updates from Telegram", len(updates) - len(good))
                if not good:
                    raise TelegramError(0, "only malformed updates")
        except TelegramError as e:
            failures += 1
            if e.error_code in (401, 404):
                bot.fatal = (f"Telegram отклонил TELEGRAM_BOT_TOKEN (HTTP {e.error_code}) — "
                             f"{TOKEN_FIX}")
                return bot.stopping.set()
            delay = e.retry_after or backoff(bot.cfg, failures)
            explain_poll_error(e, failures, delay)
            pause(bot.stopping, delay)
            continue
        failures = 0
        for update in good:
            bot.inbox.put(update)
        bot.inbox.join()


def explain_poll_error(e, failures, delay):
    if e.error_code != 409:
        log.warning("getUpdates failed (%s); retrying in %.2fs", e.reason, delay)
    elif failures == 1:  # explained once, not at every retry
        log.error("Telegram refuses polling because a webhook is set for this bot: "
                  "set DELETE_WEBHOOK=1 (see "
                  "README, Troubleshooting)" if "webhook" in e.description.lower() else
                  "another copy of this bot is polling Telegram with the same token: "
                  "stop the other copy")


# What a lane hands back to the dispatcher: the ids of the replies it sent (or dropped: chat gone).
Sent = collections.namedtuple("Sent", "chat_id replies gone update_id", defaults=(False, None))


class Lanes:
    """Each chat's replies, sent strictly in order by at most `workers` threads, chats at once. A
    chat waiting out a 429's retry_after or an outage's backoff is put back by a timer and holds no
    thread, so no chat waits for another and the dispatcher waits for none."""

    # 16: a burst of 20 clients with Telegram 50 ms away has most replies on their way at once
    # (with 8, its p50 doubled in tests/benchmark.py); still half the threads of the old sender
    # pool.
    def __init__(self, bot, workers=16):
        self.bot, self.lock, self.ready = bot, threading.Lock(), queue.SimpleQueue()
        self.changed, self.sending = threading.Condition(), 0  # sending: pieces on their way
        self.queues, self.failures = {}, {}  # chat -> deque of pieces, while it has a lane
        for _ in range(workers):
            threading.Thread(target=self.work, daemon=True).start()

    def push(self, chat_id, replies):
        """replies: [text, markup, id]; each is sent with its last piece (id None: no Sent)."""
        pieces = [(piece, markup if last else {}, rid if last else None)
                  for text, markup, rid in replies for last, piece in marked_last(split_text(text))]
        if not pieces:
            return
        with self.lock:
            if chat_id not in self.queues:  # else its lane is at work, or waits for its timer
                self.ready.put(chat_id)
            self.queues.setdefault(chat_id, collections.deque()).extend(pieces)

    def idle(self):
        with self.lock:
            return not self.queues

    def quiet(self, timeout):
        """Waits until no piece is on its way to Telegram (at most timeout seconds)."""
        with self.changed:
            self.changed.wait_for(lambda: not self.sending, timeout)

    def work(self):
        while True:
            chat_id = self.ready.get()
            delay = self.drain(chat_id)
            with self.lock:
                if self.bot.stopping.is_set():
                    continue  # what is left goes out after the next start
                if delay is not None:
                    timer = threading.Timer(delay, self.ready.put, (chat_id,))
                    timer.daemon = True
                    timer.start()
                elif self.queues.get(chat_id):
                    self.ready.put(chat_id)
                else:
                    self.queues.pop(chat_id, None)

    def drain(self, chat_id):
        """Sends the chat's pieces in order; returns None when none is left, or the seconds to wait
        before trying again. The dispatcher is told what was sent."""
        sent, delay, gone = [], None, False
        while not self.bot.stopping.is_set() and (piece := self.head(chat_id)):
            try:
                self.send(chat_id, piece)
            except ChatGone:
                with self.lock:
                    sent += [rid for _, _, rid in self.queues[chat_id] if rid]
                    self.queues[chat_id].clear()
                gone = True
                break
            except TelegramError as e:
                if not e.error_code or e.error_code == 429 or e.error_code >= 500:
                    delay = self.retry_delay(chat_id, e)
                    break
                log.error("a reply for chat %s failed (%s); skipped", chat_id, e.reason)  # 401 ...
            except Exception as e:  # noqa: BLE001 - a bug in one reply must not stop the lane
                log.error("a reply for chat %s failed (%s); skipped", chat_id, type(e).__name__)
            self.failures.pop(chat_id, None)
            with self.lock:
                sent += [rid for _, _, rid in [self.queues[chat_id].popleft()] if rid]
        if sent or gone:
            self.bot.inbox.put(Sent(chat_id, sent, gone))
        return delay

    def head(self, chat_id):
        with self.lock:
            return self.queues[chat_id][0] if self.queues.get(chat_id) else None

    def send(self, chat_id, piece):
        with self.changed:
            self.sending += 1
        try:
            self.bot.out.send(chat_id, piece[0], texts=self.bot.prompt.texts, **piece[1])
        finally:
            with self.changed:
                self.sending -= 1
                self.changed.notify_all()

    def retry_delay(self, chat_id, error):
        self.failures[chat_id] = failures = self.failures.get(chat_id, 0) + 1
        delay = error.retry_after or backoff(self.bot.cfg, failures)
        log.warning("Telegram sendMessage failed (%s) for chat %s; retrying in %.1fs",
                    error.reason, chat_id, delay)
        return delay


class Direct:
    """The console's lanes: each reply printed at once, in the dispatcher's own thread."""

    def __init__(self, bot):
        self.bot = bot

    def push(self, chat_id, replies):
        for text, markup, _ in replies:
            self.bot.out.send(chat_id, text, texts=self.bot.prompt.texts, **markup)
        if sent := [rid for _, _, rid in replies if rid]:
            self.bot.inbox.put(Sent(chat_id, sent))

    def idle(self):
        return True

    def quiet(self, timeout):
        """Nothing is ever on its way."""


def marked_last(pieces):
    """(True for the last one, piece) for each piece."""
    return [(i == len(pieces) - 1, piece) for i, piece in enumerate(pieces)]


# What an LLM job hands back to the dispatcher: the offer first, then the notes (no update behind
# it).
Written = collections.namedtuple("Written", "chat_id dialog_id offer intent notes update_id",
                                 defaults=(None, "", "", None))
# What a channel hands back once every channel is past a chat's /forget.
Forgotten = collections.namedtuple("Forgotten", "chat_id update_id", defaults=(None,))
# What a voice job hands back: the voice message and its text ("" when none came in time).
Heard = collections.namedtuple("Heard", "msg text")


def start_offer(bot, chat_id, dialog):
    """Parks the chat and starts writing the offer (unless it was sent) and the manager's notes."""
    dialog["busy"] = True
    # The client's request (the first message, or else the first answer), the answers as its
    # context; a contact typed into either never reaches the LLM.
    request = dialog.get("request") or dialog["answers"][0]
    answers = scrub(f"Контекст: {answers_text(bot, dialog)}\nЗапрос: {request}")
    args = (bot, chat_id, dialog["id"], answers, dialog["stage"] in ("qualifying", "offering"))
    threading.Thread(target=write_offer, args=args, daemon=True).start()


def write_offer(bot, chat_id, dialog_id, answers, offer_needed):
    """The LLM job: the recommendation, shown as a growing draft, then the manager's notes. Whatever
    fails, an offer (the fallback text at worst) and the notes are posted: the notes end `busy`, so
    a dialog can never stay parked with its waiting messages."""
    intent = notes = ""
    offer_owed = offer_needed  # until posted: the finally posts the fallback in its place
    try:
        if offer_owed:
            offer = ask_offer(bot, chat_id, dialog_id, answers)
            bot.inbox.put(Written(chat_id, dialog_id, offer=offer))
            offer_owed = False
        if not gone(bot, chat_id, dialog_id):  # /cancel, /forget, /start: no request after them
            lines = [line.strip() for line in (ask_llm(bot, bot.prompt.notes, answers, "notes")
                                               or "").splitlines()]
            intent, notes = (lines[0], " ".join(lines[1:])) if len(lines) >= 2 else ("", "")
    except Exception as e:  # noqa: BLE001 - the dialog goes on with the fallback text
        log.error("LLM job failed: %s", type(e).__name__)
    finally:
        if offer_owed:
            bot.inbox.put(Written(chat_id, dialog_id, offer=bot.text("llm_failed")))
        bot.inbox.put(Written(chat_id, dialog_id, intent=scrub(intent)[:200],
                              notes=scrub(notes)[:MAX_TEXT]))


# --- The voice job: a voice message's text, off the dispatcher's thread --------------------------

VOICE_BYTES = 20 * 1024 * 1024  # the largest file the Bot API lets a bot download


def listen(bot, msg):
    """Starts transcribing a voice message; the client is asked to write when STT is off, or the
    message is longer than VOICE_MAX_SECONDS or larger than 20 MB."""
    voice = msg.voice or {}
    if not bot.cfg.stt_model:
        return bot.say(msg.chat_id, bot.text("voice_off"))
    duration, size = voice.get("duration") or 0, voice.get("file_size") or 0
    if not voice.get("file_id") or duration > bot.cfg.voice_max_seconds or size > VOICE_BYTES:
        log.info("voice message not transcribed: chat %s, %d s, %d bytes", msg.chat_id, duration,
                 size)
        return bot.say(msg.chat_id, bot.text("voice_failed"))
    threading.Thread(target=hear, args=(bot, msg), daemon=True).start()


def hear(bot, msg):
    """The voice job: the file from Telegram, then its text, within TELEGRAM_TIMEOUT + LLM_TIMEOUT
    in all; the text goes to the dispatcher as Heard, "" when none came. Nothing of it is logged."""
    answer = queue.Queue()

    def call():
        try:
            answer.put(llm.transcribe(bot.cfg, voice_file(bot, msg.voice["file_id"])))
        except Exception as e:  # noqa: BLE001 - whatever failed, the client is asked to write
            reason = e if isinstance(e, llm.LLMError) else getattr(e, "reason", type(e).__name__)
            log.warning("voice message not transcribed: chat %s, %s", msg.chat_id, reason)
            answer.put("")
    threading.Thread(target=call, daemon=True).start()
    done = threading.Event()
    threading.Thread(target=bot.out.typing, args=(msg.chat_id, done.is_set), daemon=True).start()
    try:
        text = answer.get(timeout=bot.cfg.telegram_timeout + bot.cfg.llm_timeout)
    except queue.Empty:
        log.warning("voice message not transcribed: chat %s, not within the deadline", msg.chat_id)
        text = ""
    done.set()
    bot.inbox.put(Heard(msg, clean_text(text)))


def voice_file(bot, file_id):
    """The voice message's file, by getFile and a download of at most VOICE_BYTES; TelegramError
    otherwise (its text never holds the URL, which holds the token)."""
    found = bot.out.call("getFile", file_id=file_id) or {}
    path = found.get("file_path") if isinstance(found, dict) else None
    if not isinstance(path, str) or (found.get("file_size") or 0) > VOICE_BYTES:
        raise TelegramError(0, "no file to download, or over 20 MB")
    url = f"{bot.cfg.telegram_api_url}/file/bot{bot.cfg.telegram_bot_token}/{path}"
    audio = bytearray()
    try:
        with requests.get(url, stream=True, timeout=(10, bot.cfg.telegram_timeout)) as response:
            response.raise_for_status()
            for chunk in response.iter_content(1 << 16):
                audio += chunk
                if len(audio) > VOICE_BYTES:
                    raise TelegramError(0, "the file is over 20 MB")
    except requests.RequestException as e:  # its text holds the URL
        raise TelegramError(0, f"download failed ({type(e).__name__})") from None
    return bytes(audio)


def handle_heard(bot, event):
    """A voice message's text is the client's message (not one Telegram sent: no update id to
    remember); without one the client is asked to write."""
    if not event.text:
        return bot.say(event.msg.chat_id, bot.text("voice_failed"))
    handle(bot, event.msg._replace(text=event.text, media=False, voice=None, update_id=None))


def gone(bot, chat_id, dialog_id):
    """True once the dialog an LLM job writes for was cancelled, forgotten or started anew."""
    return (bot.journal.dialogs.get(chat_id) or {}).get("id") != dialog_id


def ask_offer(bot, chat_id, dialog_id, answers):
    if not bot.cfg.llm_base_url:
        return bot.text("no_llm")
    draft = Draft(bot, chat_id, dialog_id)
    threading.Thread(target=bot.out.typing, args=(chat_id, draft.typing_done), daemon=True).start()
    offer = ask_llm(bot, bot.prompt.system, answers, "offer", draft.show) or ""
    draft.close()
    safe = without_leak(offer, bot.prompt.system)  # as the drafts showed it: never taken back
    if safe != offer:
        log.warning("LLM offer repeated a rule of [system]: %s", "cut before it" if safe else
                    "the fallback text sent")
    return safe or bot.text("llm_failed")


def ask_llm(bot, system, user, what, on_text=None):
    """The LLM's clean answer, or None; never longer than LLM_TIMEOUT + 1 s, whatever the server
    does."""
    if not bot.cfg.llm_base_url:
        return None
    answer = queue.Queue()

    def call():
        try:
            with pooled(bot.llm_sessions) as session:
                answer.put(llm.complete(bot.cfg, system, user, on_text=on_text, session=session))
        # whatever failed, the client gets the honest fallback
        except Exception as e:  # noqa: BLE001
            log.warning("LLM %s failed: %s",
                        what, e if isinstance(e, llm.LLMError) else type(e).__name__)
            answer.put(None)
    threading.Thread(target=call, daemon=True).start()
    try:
        return answer.get(timeout=bot.cfg.llm_timeout + 1)
    except queue.Empty:
        log.warning("LLM %s failed: no answer within LLM_TIMEOUT (%g s)", what, bot.cfg.llm_timeout)
        return None


class Draft:
    """The recommendation as Telegram shows it while the LLM writes: at most two updates a second,
    each sent on a thread of its own, so that a slow Telegram never holds up the LLM's answer."""

    def __init__(self, bot, chat_id, dialog_id):
        self.bot, self.chat_id, self.dialog_id, self.id = (bot, chat_id, dialog_id,
                                                           random.randint(1, 2**31 - 1))
        self.live, self.lock, self.sending, self.closed = (threading.Event(), threading.Lock(),
                                                           None, False)
        self.last, self.words_since, self.refused = 0.0, None, not bot.cfg.llm_stream

    def gone(self):  # /cancel, /forget or /start meanwhile
        return gone(self.bot, self.chat_id, self.dialog_id)

    def typing_done(self):
        return self.live.is_set() or self.gone()

    def show(self, text):
        # ends the stream: the LLM server's slot is free for the next client at once
        if self.gone():
            raise Cancelled
        now = time.monotonic()
        self.words_since = self.words_since or (now if text else None)
        with self.lock:
            # An answer that arrives all at once within 0.1 s goes out as the message alone, not
            # after a draft of it.
            if (self.closed or self.sending and self.sending.is_alive() or now - self.last < 0.5
                    or self.refused or text and now - self.words_since < 0.1):
                return
            shown = without_leak(text, self.bot.prompt.system)[:4000]  # a rule never shows
            self.last = now
            self.sending = threading.Thread(target=self.send, args=(shown,), daemon=True)
            self.sending.start()

    def send(self, text):
        try:
            self.bot.out.call("sendMessageDraft", http_timeout=3, chat_id=self.chat_id,
                              draft_id=self.id, text=text)
            self.live.set()
        except TelegramError as e:
            if e.error_code in (400, 404, 501):  # this draft's text, or a Bot API without drafts:
                log.info("drafts for this answer are off (Telegram answered %s)", e.reason)
                self.refused = True  # ...for this answer only; the next one tries again

    def close(self):
        """No draft after this, and none on its way: a draft after the message would stay up
        for 30 s."""
        with self.lock:
            self.closed = True
        self.live.set()  # no more 'typing…' either
        if self.sending:
            # a draft call answers within 3 s; a Bot API slower still must not hold the offer
            self.sending.join(5)


def answers_text(bot, dialog):
    return "; ".join(f"{q.label}: {a}" for q, a in zip(bot.prompt.questions, dialog["answers"]))


RULE_MARK = "- "  # a [system] line that starts with it is a rule for the LLM, never for a client


def leaks_prompt(answer, prompt):
    """True when the answer repeats a rule of [system] word for word (see without_leak)."""
    return without_leak(answer, prompt) != answer


def without_leak(answer, prompt):
    """The answer up to its last whole sentence before a rule of [system] it repeats word for word
    (a line that starts with «- », of 40 characters or more); the whole answer when it repeats
    none. The rest of [system] (the company, its services) is there to be quoted."""
    rules = [line.strip()[len(RULE_MARK):].split() for line in prompt.splitlines()
             if line.strip().startswith(RULE_MARK) and len(line.strip()) >= 40 + len(RULE_MARK)]
    found = [re.search(r"\s+".join(map(re.escape, words)), answer, re.I) for words in rules]
    start = min((match.start() for match in found if match), default=None)
    if start is None:
        return answer
    ends = [end.end() for end in re.finditer(r"[.!?…](?=\s|$)", answer[:start])]
    return answer[:ends[-1]].strip() if ends else ""


# --- The lead's way to the manager: one ledger line, then each channel on its own -------------
# The promise "a lead reaches every channel exactly once" is kept here: commit_lead is the only
# place a lead is committed (store.Ledger.add: one fsynced line, never twice for one message), and
# deliver_channel the only place a channel takes it (in ledger order, its cursor moved only after).


def commit_lead(bot, dialog, msg, contact, status):
    """Commits the lead with one line in the ledger; False (nothing saved) when the disk refuses."""
    now = datetime.now(timezone.utc).astimezone()
    lead = {"timestamp": now.isoformat(timespec="seconds"), "chat_id": msg.chat_id,
            "client_name": dialog["name"], "contact": contact,
            "intent": dialog.get("intent") or scrub(" ".join(
                (dialog.get("request") or dialog["answers"][0]).split()[:8]))[:200],
            "notes": dialog.get("notes") or scrub(answers_text(bot, dialog))[:MAX_TEXT],
            "source": bot.source,
            "status": status, "offer": dialog.get("offer", ""),
            "answers": [[q.label, a] for q, a in zip(bot.prompt.questions, dialog["answers"])]}
    lead_id = (f"{msg.chat_id}-{msg.update_id}" if msg.update_id is not None
               else secrets.token_hex(8))
    # the same message after a crash: the same id
    if not bot.ledger.add({"id": lead_id, "lead": lead}):
        return False
    record_lead(bot, dialog, "contact" if status == "new" else "refused")
    log.info("lead saved: chat %s, status %s", msg.chat_id, status)
    return True


def record_lead(bot, dialog, end):
    bot.funnel.record(dialog["id"], end, bot.source,
                      seconds=round(time.time() - dialog.get("started", time.time())))


def deliver_channel(bot, name):
    """A channel's thread: every ledger record after its cursor, in order, each retried until
    done."""
    failures = 0
    while not bot.stopping.is_set():
        if (record := bot.ledger.next(name, timeout=0.2)) is None:  # a stop is seen soon
            continue
        try:
            skipped = CHANNELS[name](bot, record)
        except Exception as e:  # noqa: BLE001 - a channel never stops: it tries this record again
            failures += 1
            log.warning("%s for chat %s failed: %s", name, chat_of(record), failure_reason(name, e))
            if not (isinstance(e, TelegramError) and e.error_code == 400):
                pause(bot.stopping, backoff(bot.cfg, failures, outbox=True))
                continue
            skipped = True  # refused for good: retrying forever helps nobody
        failures = 0
        finish_record(bot, name, record, skipped)


def finish_record(bot, name, record, skipped):
    """Moves the channel's cursor past the record; after a /forget, tells the dispatcher once all
    are."""
    try:
        bot.ledger.done(name, record, skipped)
    # the cursor is moved in memory: at worst the record goes again after a restart
    except OSError as e:
        log.warning("cannot write %s.cursor (%s)", name, type(e).__name__)
    if "lead" in record and not skipped:
        log.info("%s delivered for chat %s", name, chat_of(record))
    if "lead" not in record and bot.ledger.settled(chat_of(record)):
        bot.inbox.put(Forgotten(chat_of(record)))


def chat_of(record):
    return (record["lead"]["chat_id"] if "lead" in record
            else record.get("forget", record.get("ask")))


def write_row(bot, record):
    """leads.csv: the lead's row appended; at a /forget the chat's rows the bot wrote removed, and
    the manager asked (an "ask" record for the other channels) to remove those someone changed."""
    if "forget" in record:
        left = bot.leads.remove(bot.ledger.delivered("csv", record))
        if left and not bot.ledger.add({"ask": record["forget"], "rows": left}):
            raise OSError("the ledger cannot be written")
        return True
    if "ask" in record or bot.ledger.forgotten(record):
        return True
    # Only the record the channel was at when the bot stopped can be in the file already.
    bot.leads.append(record["lead"], maybe_written=record["seq"] == bot.ledger.resumed["csv"])
    return False


def send_email(bot, record):
    """The lead to MANAGER_EMAIL; at a /forget, a deletion request for what the manager got."""
    if "lead" not in record:
        return send_deletion(bot, record, "email", lambda text: mailer.send_text(bot.cfg, *text))
    if record["lead"]["status"] != "new" or bot.ledger.forgotten(record):
        return True
    sent = []

    # asked just before the message: the client's /forget may have come during the login
    def sending():
        bot.mailing.set()
        return not bot.ledger.forgotten(record)

    def accepted():
        sent.append(True)
        with contextlib.suppress(OSError):  # the server has it: never again, even after a crash
            bot.ledger.done("email", record)
        bot.mailing.clear()  # a stop need not wait for the server's goodbye
    try:
        mailer.send_lead(bot.cfg, record["lead"], record["id"], accepted=accepted, sending=sending)
    finally:
        bot.mailing.clear()
    return not sent


def send_card(bot, record):
    """The lead's card to MANAGER_CHAT_ID; at a /forget, a deletion request for what the chat
    got."""
    if "lead" not in record:
        return send_deletion(bot, record, "telegram",
                             lambda text: send_manager(bot, "\n\n".join(text)))
    if record["lead"]["status"] != "new" or bot.ledger.forgotten(record):
        return True
    send_manager(bot, mailer.card(record["lead"]))
    return False


def send_manager(bot, text):
    for piece in split_text(text):
        bot.out.call("sendMessage", chat_id=bot.cfg.manager_chat_id, text=piece)


def send_deletion(bot, record, name, send):
    """Asks the manager to delete what this channel delivered of a forgotten chat (or, for an "ask"
    record, the leads.csv rows the bot could not remove); nothing to ask: skipped."""
    leads = [] if "ask" in record else bot.ledger.delivered(name, record)
    if not (leads or "ask" in record):
        return True
    send(mailer.deletion_request(leads, record.get("rows", 0), record.get("ask")))
    return False


CHANNELS = {"csv": write_row, "email": send_email, "telegram": send_card}


def failure_reason(channel, error):
    if channel == "csv" and isinstance(error, OSError):
        return f"could not write leads.csv ({error}); tried again later"  # a path at most, no data
    if isinstance(error, TelegramError) and error.error_code in (400, 403):
        return (f"Telegram refused the card ({error.error_code}): "
                "check MANAGER_CHAT_ID and that the manager "
                "sent /start" + ("; it is not sent again" if error.error_code == 400 else ""))
    if isinstance(error, (TelegramError, mailer.MailError)):
        return str(error) if isinstance(error, mailer.MailError) else error.reason
    # a bug: its name only, never its text (it may hold a client's data)
    return type(error).__name__


def handle_forgotten(bot, event):
    """Every channel is past the chat's /forget: its records leave the ledger, and the client hears
    what is true. The promise "/forget never says «удалены» falsely" is kept here."""
    if not bot.ledger.settled(event.chat_id):
        return  # answered already, or a channel is still on its way
    told = bot.ledger.manager_has(event.chat_id)
    try:
        bot.ledger.drop_chat(event.chat_id)
        store.drop_lines(bot.cfg.data_dir / "state.jsonl.bad", event.chat_id)
    except OSError as e:
        log.error("could not forget chat %s (%s)", event.chat_id, type(e).__name__)
        return bot.say(event.chat_id, bot.text("forget_failed"), remove_keyboard=True)
    log.info("forgot chat %s%s",
             event.chat_id, "; the manager was asked to delete the rest" if told else "")
    bot.say(event.chat_id, bot.text("forgotten_manager" if told else "forgotten"),
            remove_keyboard=True)
    replay(bot, event.chat_id)  # what the client wrote after the /forget, a new dialog


def recover(bot):
    """At start-up: sends the replies a stop cut off, restarts unfinished LLM jobs and runs the
    messages that waited for them."""
    for chat_id, dialog in bot.journal.dialogs.items():  # first: they come before anything said now
        bot.lanes.push(chat_id, dialog.get("replies", []))
    for chat_id, dialog in list(bot.journal.dialogs.items()):
        if dialog["busy"]:
            start_offer(bot, chat_id, dialog)
        elif dialog["waiting"]:
            replay(bot, chat_id)
    # a stop may have come between the last channel and the answer
    for chat_id in bot.ledger.forgetting():
        bot.inbox.put(Forgotten(int(chat_id)))
    flush(bot)


# --- The client's words --------------------------------------------------------------------------

MAX_TEXT = 2000  # kept of a client's message
# Every repetition in these is bounded: a search takes time linear in the text, whatever it holds.
# A phone keeps its extension («доб. 123», «ext. 12», «#123»); is_phone judges the number alone.
PHONE_RE = re.compile(r"(?<![\w+])(?P<number>\+?\d[\d \t().\-\u00a0\u202f\u2010-\u2015]{6,20}\d)"
                      r"(?!\w)(?:[ \t]{0,3},?[ \t]{0,3}(?i:доб(?:авочный)?\.?|ext\.?|#)[ \t]{0,3}"
                      r"\d{1,6}(?!\w))?")
# An email ends with a punycode, Latin or Cyrillic top-level domain; a Latin one ends before
# Cyrillic letters glued to it («ivan@mail.ruпишите» is ivan@mail.ru).
EMAIL_RE = re.compile(r"[\w%+-][\w.%+'-]{0,63}@[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}"
                      r"\.(?:xn--[A-Za-z0-9-]{1,59}(?![\w-])|[A-Za-z]{2,24}(?![A-Za-z0-9_-])"
                      r"|[а-яёА-ЯЁ]{2,24}(?![\w-]))")
USERNAME_RE = re.compile(r"(?<![\w@/.])(?:@|(?:https?://)?(?:www\.)?(?:t|telegram)\.me/)"
                         r"([A-Za-z][A-Za-z0-9_]{4,31})(?!\w)")
# A phone cut over two messages (joined_phone): the digits that end one, those that begin the next.
PHONE_HEAD = re.compile(r"(?<![\d+])\+?\d(?:[\d \t().\-]{0,20}\d)?$")
PHONE_TAIL = re.compile(r"\d(?:[\d \t().\-]{0,20}\d)?(?!\d)")
# Fullwidth + - ( ) . @ and space, as a Chinese or Japanese keyboard types them, made plain.
WIDE = str.maketrans("\uff0b\uff0d\uff08\uff09\uff0e\uff20\u3000", "+-().@ ")
# The word lists, all here, read on plain_words() (lower case, ё as е, no punctuation).
# A refusal: the message starts with one, after polite words («спасибо, не надо», «пожалуй, нет»).
REFUSAL_RE = re.compile(r"(?:(?:спасибо|благодарю|пожалуй|наверное|ну|извините|простите|пока|а|но"
                        r"|да|мне) )*(?:нет(?! (?:проблем|вопрос|возражен|не против))|неа|nope"
                        r"|no(?! problem)|не (?:хочу|буду|надо|нужно|дам|оставлю|стоит|сейчас"
                        r"|интересно|интересует|актуально)|неинтересно|отказ\w*|без контакт\w*"
                        r"|отстан\w*|отвали\w*)\b")
# After a «нет», words of sending the contact soon («нет-нет, сейчас напишу», «нет, погодите») and
# of another way («нет, лучше в WhatsApp», «нет, не звоните»): no refusal, the bot asks once more
# (REASK_CAP ends it after that).
SENDING_SOON = re.compile(r"(?<!\bне )(минут|секунд|погод|подожд|момент|напиш|скин|пришл|найд)")
OTHER_WAY = re.compile(r"пиш|пис|отправ|звон|набер|почт|мейл|mail|телеграм|\bтг\b|whatsapp|ватсап"
                       r"|вотсап|viber|вайбер|номер|лучше|давайте")
# «Пишите сюда», «лучше напишите», «нет почты, пишите в телеграм», «можно здесь», and «мой номер в
# профиле», «звоните на этот номер» (the bot cannot see it; the manager can write here): this chat
# is the contact, in any answer. Broad on purpose: a chat taken for a contact costs the manager a
# question in it; a missed one loses the lead.
WRITE_HERE = re.compile(r"^(?!.*\bне (?:на)?пиш).*?(?:\b(?:на)?пиши(?:те)?\b"
                        r"|\bв (?:моем )?профил|\b(?:этот|этому|этом) (?:же )?номер"
                        r"|(?<!\bне )\b(?:сюда|здесь|тут|в (?:этот|этом) чат\w*)$)")
# After a refusal, a message that says nothing new («ок», «спасибо», «👍», «?») starts no request.
NOTHING_SAID = re.compile(r"(?:(?:ок|окей|ok|хорошо|ладно|понятно|ясно|спасибо|большое|благодарю"
                          r"|угу|ага|да|пока|до свидания)(?: |$)){0,3}")
# A first message that only says hello is no request.
GREETING_ONLY = re.compile(r"(?:(?:здравствуй\w*|привет\w*|добр\w* (?:день|утро|вечер)|hi|hello"
                           r"|доброго времени суток|хай|start|старт|начать)(?: \w+)?)?")  # +1 word
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def find_contacts(text):
    """Every phone, email and @username in the text, as written (digits made ASCII), in order."""
    return [contact for _, _, contact in contact_spans(text)]


def contact_spans(text):
    """(start, end, contact) of each contact in normal_digits(text), in order; of two that overlap
    (79991234567@mail.ru) the one that starts first, or the longer, is kept."""
    text = normal_digits(text)
    found = [(m.start(), m.end(), m.group()) for m in EMAIL_RE.finditer(text)] + phone_spans(text)
    found += [(m.start(), m.end(), "@" + m.group(1)) for m in USERNAME_RE.finditer(text)]
    kept, end = [], 0
    for span in sorted(found, key=lambda span: (span[0], -span[1])):
        if span[0] >= end:
            kept.append(span)
            end = span[1]
    return kept


def phone_spans(text):
    """Phones within a line, then one a line break cuts («+7 999\\n123-45-67»), kept on one line."""
    spans = [(m.start(), m.end(), m.group()) for m in PHONE_RE.finditer(text)
             if is_phone(m["number"])]
    if "\n" in text:
        for m in PHONE_RE.finditer(text.replace("\n", " ")):
            if (text.count("\n", m.start(), m.end()) == 1 and is_phone(m["number"])
                    and not any(start < m.end() and m.start() < end for start, end, _ in spans)):
                spans.append((m.start(), m.end(), m.group()))
    return spans


def joined_phone(dialog, text):
    """«8 917 123», then «45 67»: at the contact step the digits that end the last message without
    a contact and those that begin this one are a phone when together they make a whole one. Two
    messages in a row only, the digits as typed: a number is never made up."""
    text = normal_digits(text).strip()
    head, tail = dialog.pop("digits", ""), PHONE_TAIL.match(text)
    if head and tail and PHONE_RE.fullmatch(phone := f"{head} {tail.group()}") and is_phone(phone):
        return phone
    if found := PHONE_HEAD.search(text):
        dialog["digits"] = found.group()  # for the next message only
    return ""


def normal_digits(text):
    """The text with every decimal digit as ASCII (fullwidth «８», Arabic-Indic «٨» …) and fullwidth
    + - ( ) . @ and space made plain; its length stays, so positions in it are those of the text."""
    if text.isascii():
        return text
    return re.sub(r"\d", lambda m: str(unicodedata.decimal(m.group(), m.group())),
                  text.translate(WIDE))


def is_phone(number):
    """+ and 8-15 digits (any country), a Russian 8/7 and ten more digits, or the ten digits of a
    Russian mobile without them («999 123 45 67»)."""
    digits = re.sub(r"\D", "", number)
    if number.startswith("+"):
        return 8 <= len(digits) <= 15
    return len(digits) == 11 and digits[0] in "78" or len(digits) == 10 and digits[0] == "9"


def plain_words(text):
    """The text as the word lists see it: lower case, ё as е, one space apart, no punctuation."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower().replace("ё", "е")).split())


def is_refusal(text):
    """«Нет, не хочу», «спасибо, не надо», «отстаньте» are refusals; «нет-нет, сейчас напишу» is
    not, nor «нет, лучше на почту» or «нет, не звоните» (asked once more: a lead lost is worse than
    a question)."""
    words = plain_words(text)
    return (bool(REFUSAL_RE.match(words)) and not SENDING_SOON.search(words)
            and not OTHER_WAY.search(words))


def scrub(text):
    """«[контакт]» for anything that looks like a contact, in text for the LLM or the notes; and
    <think> tags broken, which an LLM echoing them would take for the end of its reasoning."""
    text = normal_digits(re.sub(r"</?think", "<_think", text, flags=re.I))
    pieces, last = [], 0
    for start, end, _ in contact_spans(text):
        pieces += [text[last:start], "[контакт]"]
        last = end
    return "".join(pieces) + text[last:]


def clean_text(text):
    """Client text as the bot keeps it: no control or invisible characters, at most MAX_TEXT."""
    return CONTROL_CHARS.sub("", text[:MAX_TEXT * 2] if isinstance(text, str)
                             else "").strip()[:MAX_TEXT]


def command_of(text):
    """'start' for '/start', '/start@bot' or '/start payload'; None for ordinary text."""
    match = re.match(r"/([a-z]+)(@\w+)?(\s|$)", text)
    return match.group(1) if match else None


# One client message, reduced to what the dialog needs: `shared` is the phone of a contact shared
# with the button (own_contact: the sender's own), `media` a photo, sticker, voice … instead of
# text. `voice`: the file_id, duration and file_size of a voice message; `username`: the sender's
# @name.
Incoming = collections.namedtuple(
    "Incoming", "chat_id text shared own_contact media first_name update_id voice username",
    defaults=("", "", True, False, "", None, None, ""))
MEDIA_KINDS = ("photo", "sticker", "voice", "video", "video_note", "audio", "document", "location",
               "venue", "poll", "dice", "animation", "game", "caption")


def incoming_from(bot, update):
    """The client message in an update, or None for updates the bot does not answer. A caption is
    the message's text only when it holds a contact (the file itself goes nowhere); an edited
    message is taken, as a new message, only when it holds a contact and the bot asks for one."""
    message = update.get("message") or update.get("edited_message")
    if (not isinstance(message, dict) or not isinstance(message.get("from"), dict)
            or message["from"].get("is_bot")):
        return None
    sender, chat, text = message["from"], message.get("chat") or {}, clean_text(message.get("text"))
    in_group = chat.get("type") in ("group", "supergroup")
    if in_group and command_of(text) == "start" and chat["id"] not in bot.invited:
        bot.invited.add(chat["id"])
        bot.say(chat["id"], bot.text("private_only"))
    if chat.get("type") != "private" or type(chat.get("id")) is not int:
        return None
    if not text and find_contacts(caption := clean_text(message.get("caption"))):
        text = caption  # «мой номер …» under a photo: the number is what the client sends
    if "message" not in update and not edit_taken(bot, chat["id"], text):
        return None
    contact = message["contact"] if isinstance(message.get("contact"), dict) else None
    media = not text and not contact and next((k for k in MEDIA_KINDS if k in message), False)
    if not (text or contact or media):
        return None  # a service message (someone joined, a pin ...) is not the client talking
    return Incoming(chat["id"], text, clean_text((contact or {}).get("phone_number"))[:32],
                    not contact or contact.get("user_id") == sender.get("id"), media,
                    clean_text(sender.get("first_name"))[:64], update["update_id"],
                    voice_of(message) if media == "voice" else None,
                    clean_text(sender.get("username"))[:32])


def voice_of(message):
    """What the voice job needs of a voice message: its file id, duration and size, as numbers."""
    voice = message["voice"] if isinstance(message["voice"], dict) else {}
    numbers = {key: voice[key] if type(voice.get(key)) is int else 0
               for key in ("duration", "file_size")}
    return {"file_id": str(voice.get("file_id") or "")[:200], **numbers}


def edit_taken(bot, chat_id, text):
    """An edit counts when it adds the contact the bot asks for; any other is ignored, so an answer
    corrected later never answers a question again."""
    dialog = bot.journal.dialogs.get(chat_id)
    return bool(dialog and dialog["stage"] == "collecting_contact" and not expired(bot, dialog)
                and find_contacts(text))


# --- The Bot API -------------------------------------------------------------------------------


class TelegramError(Exception):
    """A Bot API call failed; error_code 0 means no answer came (description names the cause)."""

    def __init__(self, error_code, description, retry_after=None):
        super().__init__(f"Telegram API error {error_code}: {description}")
        self.error_code, self.description, self.retry_after = error_code, description, retry_after

    @property
    def reason(self):
        return self.description if self.error_code == 0 else f"HTTP {self.error_code}"


class Cancelled(Exception):
    """The dialog an LLM answer was being written for is gone: the answer is not read to its end."""


class ChatGone(Exception):
    """The client blocked the bot or deleted the chat."""


class Telegram:
    """Every Bot API request goes through call(); a pool of sessions keeps connections warm."""

    def __init__(self, cfg, stopping):
        self.base, self.cfg, self.stopping = (
            f"{cfg.telegram_api_url}/bot{cfg.telegram_bot_token}/", cfg, stopping)
        self.sessions = queue.SimpleQueue()

    def call(self, method, http_timeout=None, **params):
        """One request; raises TelegramError. http_timeout bounds the wait (default
        TELEGRAM_TIMEOUT)."""
        try:
            with pooled(self.sessions) as session:
                response = session.post(self.base + method, json=params,
                                        timeout=(10, http_timeout or self.cfg.telegram_timeout))
        except requests.RequestException as e:  # its text holds the URL, and the URL the token
            raise TelegramError(0, type(e).__name__) from None
        # requests' JSONDecodeError is a RequestException too: asked apart, so the status decides
        try:
            body = response.json()
        # a proxy's error page, a wrong TELEGRAM_API_URL path: 401/404 stop the bot
        except ValueError:
            raise TelegramError(0 if response.ok else response.status_code,
                                "answer is not JSON") from None
        if isinstance(body, dict) and body.get("ok"):
            return body.get("result")
        body = body if isinstance(body, dict) else {}
        retry_after = (body.get("parameters") or {}).get("retry_after")
        code = body.get("error_code")
        # a proxy may send it as text
        code = code if type(code) is int and code else response.status_code
        raise TelegramError(code, str(body.get("description", "")),
                            retry_after if isinstance(retry_after, (int, float)) else None)

    def call_patiently(self, method, **params):
        """call() that waits out flood control and outages (backoff) until the bot stops."""
        for failures in range(1, 10**9):
            try:
                return self.call(method, **params)
            except TelegramError as e:
                if e.error_code and e.error_code != 429 and e.error_code < 500:
                    raise
                delay = e.retry_after or backoff(self.cfg, failures)
                log.warning("Telegram %s failed (%s); retrying in %.1fs", method, e.reason, delay)
                if pause(self.stopping, delay):
                    raise

    def send(self, chat_id, text, buttons=(), contact_button=False, remove_keyboard=False,
             texts=None):
        """Plain-text messages of at most 4,000 characters, the keyboard with the last one; one try
        each (a lane waits out 429s and outages without holding a thread)."""
        pieces = split_text(text)
        for i, piece in enumerate(pieces):
            params = {"chat_id": chat_id, "text": piece}
            if i == len(pieces) - 1 and (markup := keyboard(texts, buttons, contact_button,
                                                            remove_keyboard)):
                params["reply_markup"] = markup
            try:
                self.call("sendMessage", **params)
            except TelegramError as e:
                if e.error_code == 403:
                    raise ChatGone(chat_id) from None
                if e.error_code != 400:
                    raise
                log.warning("Telegram refused a message (400) for chat %s; skipped", chat_id)

    def typing(self, chat_id, done, every=4.5):
        """Shows 'typing…' until done() is true, renewed every 4.5 s (Telegram shows it for 5 s)."""
        while not done():
            with contextlib.suppress(TelegramError):  # a missing indicator is not worth a retry
                self.call("sendChatAction", http_timeout=5, chat_id=chat_id, action="typing")
            if self.stopping.wait(every):
                return


@contextlib.contextmanager
def pooled(sessions):
    """A requests.Session from the pool, or a new one when all are in use; back after use, its
    connections warm."""
    try:
        session = sessions.get_nowait()
    except queue.Empty:
        session = requests.Session()
    try:
        yield session
    finally:
        sessions.put(session)


def keyboard(texts, buttons, contact_button, remove_keyboard):
    """The reply_markup: suggested answers, the share-contact button, or removal."""
    if contact_button:
        return {"keyboard": [[{"text": texts["share_button"], "request_contact": True}],
                             [{"text": texts["decline_button"]}]], "resize_keyboard": True,
                "one_time_keyboard": True,
                "input_field_placeholder": texts["contact_placeholder"][:64]}
    if buttons:
        return {"keyboard": [[{"text": b}] for b in buttons], "resize_keyboard": True,
                "one_time_keyboard": True}
    return {"remove_keyboard": True} if remove_keyboard else None


def split_text(text, limit=4000):  # under 4,096: Telegram counts some characters twice
    """Pieces Telegram accepts, cut at a paragraph, line, sentence or word end."""
    pieces = []
    while len(text) > limit:
        window = text[:limit]
        cut = next((c for c in (window.rfind("\n"),
                                max(window.rfind(". "), window.rfind("! "), window.rfind("? ")) + 1,
                                window.rfind(" "))
                    if c > limit // 2), limit)
        pieces.append(window[:cut].rstrip())
        text = text[cut:].lstrip()
    return pieces + [text] if text.strip() or not pieces else pieces


def backoff(cfg, failures, outbox=False):
    """Exponential backoff with jitter: base, 2*base, 4*base ... up to the maximum."""
    base, cap = ((cfg.outbox_retry_seconds, cfg.outbox_retry_max_seconds) if outbox
                 else (cfg.retry_base_seconds, cfg.retry_max_seconds))
    return min(base * 2 ** min(failures - 1, 30), cap) * random.uniform(0.75, 1.0)


def pause(stopping, seconds):
    """Waits in short steps (a long wait would not let Ctrl+C through on Windows); True when
    stopping."""
    deadline = time.monotonic() + seconds
    while not stopping.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
    return True


class Console:
    """The terminal stand-in for Telegram: the recommendation is printed as the LLM writes it (its
    drafts)."""
    streamed = ""

    def send(self, chat_id, text, buttons=(), **markup):
        print(text[len(self.streamed):] if self.streamed and text.startswith(self.streamed)
              else f"Бот: {text}")
        self.streamed = ""
        if buttons:
            print("     " + " | ".join(f"{i}. {b}" for i, b in enumerate(buttons, 1)))
        sys.stdout.flush()

    def call(self, method, http_timeout=None, chat_id=0, text="", **params):
        draft = method == "sendMessageDraft"
        if draft and text.startswith(self.streamed) and text != self.streamed:
            print(("Бот: " if not self.streamed else "") + text[len(self.streamed):],
                  end="", flush=True)
            self.streamed = text

    def typing(self, chat_id, done):
        """The terminal shows no 'typing…'."""


# --- prompt.txt: everything the client reads ----------------------------------------------------

# In the order of the shipped prompt.txt, which lists them at its top; a missing one is looked for
# after the one before it in this order.
TEXT_KEYS = ("greeting", "returning", "no_llm", "llm_failed", "contact_request", "privacy",
             "share_button", "decline_button", "contact_placeholder", "contact_format",
             "foreign_contact", "contact_noted", "thanks_saved",
             "thanks_after_hours", "after_lead", "new_request_button", "follow_up", "not_taken",
             "refused", "help", "cancelled", "nothing_to_cancel", "forgotten", "forgotten_manager",
             "forget_failed",
             "text_only", "voice_off", "voice_failed", "pick_button", "too_fast", "private_only",
             "pickup_alert", "text_only_relayed", "handback_button", "handed_back", "console_hint",
             "menu_start", "menu_help", "menu_cancel", "menu_forget")
SECTIONS = ("system", "notes") + TEXT_KEYS
RETIRED = ("thanks_sent", "thanks_later")  # texts of earlier versions, allowed in an owner's file
PLACEHOLDERS = {"greeting": "name", "privacy": "url", "thanks_after_hours": "when",
                "pickup_alert": "minutes"}  # the one {…} each of these sections has replaced
MANY_PARAGRAPHS = ("system", "notes", "help")  # in others a second paragraph: a lost header's text
SAMPLE = "образец — в prompt.txt новой версии: git show HEAD:prompt.txt"
RESTORE = "git checkout -- prompt.txt (без git — возьмите его из архива программы)"
CONFLICT_RE = re.compile(r"(<{7}|={7}|>{7}|\|{7})(?!\S)")  # what git leaves of a failed merge
HEADER_RE = re.compile(r"\s*\[\s*([^\[\]]*?)\s*\]\s*")
BUTTON_RE = re.compile(r"\*\s*\S")  # "* Да", also "*\tДа" and "*Да"
LIST_RE = re.compile(r"\s*[-–—•]\s*\S")  # "- Утром": meant as a button
PLACEHOLDER_RE = re.compile(r"\{(\w{0,30})\}")  # {name}, {nmae}, {Имя}; not JSON such as {"a": 1}

Question = collections.namedtuple("Question", "label text buttons")  # label: what the manager sees
Prompt = collections.namedtuple("Prompt", "system notes questions texts")


class PromptError(Exception):
    """prompt.txt cannot be used: .problems holds one line for each mistake, naming its line."""

    def __init__(self, *problems):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def conflict_problem(name, lines):
    """git's conflict marks left in a file, or None."""
    marks = [str(number) for number, line in enumerate(lines, 1) if CONFLICT_RE.match(line)]
    return marks and (f"{name}, строки {', '.join(marks[:12])}: метки конфликта git (<<<<<<<, "
                      "=======, >>>>>>>) остались после обновления — оставьте нужный вариант "
                      "текста и удалите строки с метками (doc/README.ru.md, «Обновление»)")


def read_prompt(path, cfg=None):
    """Sections of prompt.txt: [system], [notes], 2-4 [question Label] and the texts of TEXT_KEYS;
    [privacy] only when cfg has a PRIVACY_URL. Every mistake is named with its line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise PromptError(f"prompt.txt не найден в {path.parent} — верните: {RESTORE}") from None
    except (OSError, UnicodeError) as e:
        raise PromptError(f"{path} не читается ({type(e).__name__}) — сохраните его как текст "
                          "в кодировке UTF-8") from None
    if conflict := conflict_problem("prompt.txt", lines):
        raise PromptError(conflict)
    if not [line for line in lines if line.strip() and not line.lstrip().startswith("#")]:
        raise PromptError(f"prompt.txt пуст — в нём нет ни одного раздела; верните его: {RESTORE}, "
                          "и впишите свою компанию")  # not one line for each missing section
    sections, problems = split_sections(lines)
    prompt, more = build_prompt(sections, bool(cfg and cfg.privacy_url))
    if problems + more:
        raise PromptError(*problems, *more)
    return prompt


def split_sections(lines):
    """[(name, line number, [(line number, text)])] and the lines that fit no section."""
    sections, problems = [], []
    for number, line in enumerate(lines, 1):
        header = HEADER_RE.fullmatch(line)
        if header:
            sections.append((header.group(1), number, []))
        elif line.lstrip().startswith("#") or not (sections or line.strip()):
            continue
        elif line.lstrip().startswith("["):  # else it would reach the clients as text
            name = line.strip().lstrip("[").partition("]")[0].strip()
            problems.append(f"prompt.txt, строка {number}: заголовок раздела записан неверно — он "
                            f"стоит в строке один, в квадратных скобках: [{name}]")
            sections.append((name, number, []))  # what follows is still that section's text
        elif not sections:
            problems.append(f"prompt.txt, строка {number}: текст до первого раздела — перенесите "
                            "его в раздел или начните строку с #")
        else:
            sections[-1][2].append((number, line.rstrip()))
    return sections, problems


def build_prompt(sections, need_privacy):
    """The Prompt, and every problem of the sections as a whole (empty, unknown, twice, missing)."""
    named, questions, problems = {}, [], []
    for name, number, body in sections:
        problems += placeholder_problems(name, body) + section_problems(name, number, body, named)
        if name.split(" ")[0] == "question" and "".join(line for _, line in body).strip():
            question, found = parse_question(f"prompt.txt, строка {number}: [{name}]", name, body)
            questions.append((number, question))
            problems += found
        elif guess(name) not in named:  # a misspelt [refused] is named once, not missing too
            named[guess(name)] = (number, body)
    texts = {key: "\n".join(line for _, line in named.get(key, (0, ()))[1]).strip()
             for key in SECTIONS}
    prompt = Prompt(texts.pop("system"), texts.pop("notes"), [q for _, q in questions[:4]], texts)
    return prompt, problems + file_problems(named, questions, need_privacy)


def file_problems(named, questions, need_privacy):
    """Sections missing from the file, and too few or too many questions."""
    problems = [missing_problem(key, named) for key in SECTIONS
                if key not in named and (key != "privacy" or need_privacy)]
    if len(questions) > 4:
        problems.append(f"prompt.txt, строка {questions[4][0]}: пятый вопрос, а бот задаёт не "
                        "больше 4 — уберите лишние")
    elif len(questions) < 2:
        problems.append(f"prompt.txt: вопросов {len(questions)}, а нужно от 2 до 4 разделов "
                        "[question Метка]")
    return problems + label_problems(questions)


def label_problems(questions):
    """A label twice: the manager could not tell the two answers apart."""
    first, problems = {}, []
    for number, question in questions:
        before = first.setdefault(question.label.casefold(), number)
        if before != number and question.label:
            problems.append(f"prompt.txt, строка {number}: [question {question.label}] — метка "
                            f"«{question.label}» уже есть у вопроса в строке {before}: в заявке "
                            "ответы не различить, назовите вопросы по-разному")
    return problems


def guess(name):
    """The section meant by a header: itself, a close known name, or None."""
    close = difflib.get_close_matches(name, SECTIONS + ("question Метка",), 1, 0.6)
    return name if name in SECTIONS else close[0] if close else None


def section_problems(name, number, body, named):
    """A section that is empty, unknown or there a second time."""
    where = f"prompt.txt, строка {number}: [{name}]"
    if not "".join(line for _, line in body).strip():
        return [f"{where} пуст — напишите текст под заголовком"]
    if name in RETIRED:
        return []  # an older version's text, no longer read: the owner's file still starts
    if name.split(" ")[0] != "question" and name not in SECTIONS:
        return [f"{where} — такого раздела нет" + (f"; может быть, [{guess(name)}]?" if guess(name)
                                                    else "; список разделов — в начале prompt.txt")]
    if name in named:
        return [f"{where} встречается второй раз (первый — строка {named[name][0]}): оставьте один"]
    return []


def paragraphs(body):
    """(first line number, text) of each block of lines between empty lines."""
    blocks = []
    for (number, line), previous in zip(body, [(0, "")] + body):
        if line.strip() and not previous[1].strip():
            blocks.append((number, line))
        elif line.strip():
            blocks[-1] = (blocks[-1][0], blocks[-1][1] + "\n" + line)
    return blocks


def missing_problem(key, named):
    """A section the bot needs that the file lacks: where its lost text is, or where to add it."""
    before = [name for name in SECTIONS[:SECTIONS.index(key)] if name in named]
    if not before:
        return f"prompt.txt: нет раздела [{key}] — добавьте его в начало файла ({SAMPLE})"
    number, body = named[before[-1]]
    blocks = paragraphs(body)
    if len(blocks) > 1 and before[-1] not in MANY_PARAGRAPHS:
        return (f"prompt.txt, строка {blocks[-1][0]}: похоже, перед этой строкой потерян заголовок "
                f"[{key}] — её текст сейчас достаётся разделу [{before[-1]}]; вставьте перед ней "
                f"строку [{key}]")
    return (f"prompt.txt: нет раздела [{key}] — он нужен этой версии бота; добавьте его после "
            f"раздела [{before[-1]}] (строка {number}): заголовок [{key}] и текст под ним "
            f"({SAMPLE})")


def placeholder_problems(name, body):
    """Each {…} that would reach the client (or the LLM, in [system] and [notes]) as it is:
    unknown, or not replaced in this section."""
    allowed = PLACEHOLDERS.get(name)
    where = {value: key for key, value in PLACEHOLDERS.items()}
    reader = "нейросеть получит" if name in ("system", "notes") else "клиент прочтёт"
    return [f"prompt.txt, строка {number}: {{{found}}} " +
            (f"заменяется только в [{where[found]}]" if found in where
             else "— такой подстановки нет") +
            (f"; здесь можно только {{{allowed}}}" if allowed else f"; в [{name}] подстановок нет")
            + f" — сейчас {reader} «{{{found}}}» как есть: исправьте или уберите скобки"
            for number, line in body for found in PLACEHOLDER_RE.findall(line) if found != allowed]


def parse_question(where, name, body):
    """The Question and its problems: no label, a label the card has, no text, a lost header."""
    label = name[len("question"):].strip()
    buttons = [line[1:].strip() for _, line in body if BUTTON_RE.match(line)]
    lines = [(number, line) for number, line in body if not BUTTON_RE.match(line)]
    text = "\n".join(line for _, line in lines).strip()
    problems = [] if label else [f"{where} — нужна метка для менеджера, например [question Бюджет]"]
    if label.casefold() in {value.casefold() for value in mailer.LABELS.values()}:
        problems.append(f"{where} — метка «{label}» уже есть в карточке заявки, менеджер их "
                        "спутает: назовите вопрос иначе")
    if not text:
        problems.append(f"{where} — есть кнопки, но нет вопроса: напишите его над ними")
    return Question(label, text, buttons), problems + question_line_problems(name, body, lines)


def dash_buttons(lines):
    return [f"prompt.txt, строка {number}: кнопка пишется со звёздочкой: «* "
            f"{line.strip().lstrip('-–—•').strip()}»"
            for number, line in lines if LIST_RE.match(line)]


def question_line_problems(name, body, lines):
    """Lines that show a lost header or *: '- Утром', text after the buttons, a second question."""
    first_button = next((number for number, line in body if BUTTON_RE.match(line)), float("inf"))
    after = [number for number, line in lines if number > first_button and line.strip()
             and not LIST_RE.match(line)]
    asks = [number for number, text in paragraphs(lines) if text.rstrip().endswith("?")]
    problems = dash_buttons(lines)
    if after:
        problems.append(f"prompt.txt, строка {after[0]}: текст после кнопок вопроса [{name}] — "
                        "похоже, перед ним потерян заголовок раздела: вставьте его")
    elif len(asks) > 1:
        problems.append(f"prompt.txt, строка {asks[1]}: второй вопрос в разделе [{name}] — похоже, "
                        "перед этой строкой потерян заголовок [question Метка]; если это один "
                        "вопрос, уберите пустую строку перед ней")
    return problems


# --- Settings -------------------------------------------------------------------------------------


class ConfigError(Exception):
    """Settings that cannot work; .problems holds one line for each."""

    def __init__(self, problems):
        super().__init__("; ".join(problems))
        self.problems = problems


def checked(convert, ok, problem):
    """A setting's parser: convert(text) if ok, else ValueError(problem). The text given is never
    repeated: a token or password typed into the wrong line would go wherever the output goes."""
    def parse(raw):
        with contextlib.suppress(ValueError):
            if ok(value := convert(raw.strip())):
                return value
        raise ValueError(problem)
    return parse


def number_value(minimum, cast=float, above=False):
    kind = "целым числом" if cast is int else "числом"
    return checked(cast, lambda value: value > minimum if above else value >= minimum,
                   f"значение должно быть {kind} {'больше' if above else 'не меньше'} {minimum:g}")


def optional(parse):
    return lambda raw: parse(raw) if raw.strip() else None


def choice_value(*options):
    listed = ", ".join(f"«{option}»" for option in options[:-1]) + f" или «{options[-1]}»"
    return checked(lambda s: s.lower() if s.lower() in options else s.upper(), options.__contains__,
                   f"значение должно быть {listed}")


def flag_value(raw):
    parse = checked(str.lower, ("0", "1", "true", "false", "yes", "no").__contains__,
                    "значение должно быть 1 (да) или 0 (нет)")
    return parse(raw) in ("1", "true", "yes")


def pattern_value(pattern, explanation):  # a URL's last / would double in URLs built from it
    return checked(lambda s: s.rstrip("/"), lambda s: not s or re.fullmatch(pattern, s),
                   explanation)


url_value = pattern_value(r"https?://[^/\s]+(/\S*)?", "адрес должен начинаться с http:// или "
                                                      "https://")
email_value = pattern_value(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+", "это не адрес почты")


def emails_value(raw):
    """MANAGER_EMAIL: one address or several split by commas (or ;); each gets every lead."""
    try:
        return ", ".join(filter(None, map(email_value, re.split(r"[,;]", raw))))
    except ValueError:
        raise ValueError("это не адрес почты; несколько адресов пишите через запятую: "
                         "anna@clinic.ru, oleg@clinic.ru") from None


def path_value(raw):
    """Relative paths start at this folder, wherever the bot is started from (a service)."""
    return HERE / raw.strip() if raw.strip() else None


DAYS = {day: number % 7 for number, day in enumerate("mon tue wed thu fri sat sun "
                                                     "пн вт ср чт пт сб вс".split())}
HOURS_RE = re.compile(r"(?:(\w+)(?:\s*[-–]\s*(\w+))?:?\s+)?(\d\d?):(\d\d)\s*[-–]\s*(\d\d?):(\d\d)")


def hours_value(raw):
    """WORKING_HOURS 'Mon-Fri 09:00-18:00, Sat 10:00-14:00' as ((weekdays, from, to minute), …)."""
    return tuple(hours_range(part.strip()) for part in raw.split(",") if part.strip())


def hours_range(part):
    found = HOURS_RE.fullmatch(part)
    first, last, *clock = found.groups() if found else ("?", "?", 0, 0, 0, 0)
    first, last = (first or "mon").lower(), (last or first or "sun").lower()
    start, end = int(clock[0]) * 60 + int(clock[1]), int(clock[2]) * 60 + int(clock[3])
    if not (first in DAYS and last in DAYS and int(clock[1]) < 60 and int(clock[3]) < 60
            and start < end <= 1440):
        raise ValueError("нужны начало и конец через дефис, часы:минуты, перед ними дни: "
                         "«Пн-Пт 9:00-18:00» (или «Mon-Fri 09:00-18:00»); без дней — каждый "
                         "день: «9:00-18:00»; несколько — через запятую: «Пн-Пт 9:00-18:00, "
                         "Сб 10:00-14:00»")
    span = (DAYS[last] - DAYS[first]) % 7 + 1
    return frozenset((DAYS[first] + day) % 7 for day in range(span)), start, end


def zone_value(raw):
    """TIMEZONE as a ZoneInfo, None for the machine's own; Windows may need the tzdata package."""
    if not raw.strip():
        return None
    try:
        return zoneinfo.ZoneInfo(raw.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        if not zoneinfo.available_timezones():
            raise ValueError("на этом компьютере нет базы часовых поясов — установите её: "
                             f"{python_command()} -m pip install tzdata") from None
        raise ValueError("неизвестный часовой пояс — нужен вид Europe/Moscow") from None


SETTINGS = {  # name: (default, parser); cfg has each as an attribute, lower-cased
    "TELEGRAM_BOT_TOKEN": ("", pattern_value(r"\d+:[\w-]+", "это не токен бота: он выглядит как "
                                            "123456789:AAE…; скопируйте его ещё раз у @BotFather")),
    "TELEGRAM_API_URL": ("https://api.telegram.org", url_value),
    "DELETE_WEBHOOK": ("0", flag_value),
    "MANAGER_CHAT_ID": ("", pattern_value(r"-?\d+|@\w{5,}", "нужен числовой id чата (например "
                                                           "-1001234567890) или @имя_канала")),
    "LLM_BASE_URL": ("", url_value),
    "LLM_API_KEY": ("", str.strip),
    "LLM_MODEL": ("", str.strip),
    "LLM_TIMEOUT": ("30", number_value(1)),
    "LLM_STREAM": ("1", flag_value),
    "LLM_MAX_TOKENS": ("400", number_value(16, int)),
    "LLM_REASONING_UNTAGGED": ("0", flag_value),
    "STT_MODEL": ("", str.strip),
    "STT_BASE_URL": ("", url_value),
    "STT_API_KEY": ("", str.strip),
    "VOICE_MAX_SECONDS": ("120", number_value(1, int)),
    "SMTP_HOST": ("", str.strip),
    "SMTP_PORT": ("", optional(number_value(1, int))),
    "SMTP_USER": ("", str.strip),
    "SMTP_PASSWORD": ("", str),
    "SMTP_SECURITY": ("starttls", choice_value("ssl", "starttls", "none")),
    "MAIL_FROM": ("", email_value),
    "MANAGER_EMAIL": ("", emails_value),
    "WORKING_HOURS": ("", hours_value),
    "TIMEZONE": ("", zone_value),
    "PICKUP_ALERT_MINUTES": ("", optional(number_value(0, above=True))),
    "FOLLOW_UP_HOURS": ("0", number_value(0)),
    "DATA_DIR": ("data", path_value),
    "CSV_DELIMITER": (";", choice_value(";", ",")),
    "PRIVACY_URL": ("", url_value),
    "SESSION_TTL_HOURS": ("72", number_value(0, above=True)),
    "LOG_LEVEL": ("INFO", choice_value("DEBUG", "INFO", "WARNING", "ERROR")),
    "LOG_FORMAT": ("plain", choice_value("plain", "json")),
    "LOG_FILE": ("", path_value),
    "POLL_TIMEOUT": ("25", number_value(0, int)),
    "TELEGRAM_TIMEOUT": ("15", number_value(0.1)),
    "RETRY_BASE_SECONDS": ("1", number_value(0, above=True)),
    "RETRY_MAX_SECONDS": ("60", number_value(0, above=True)),
    "OUTBOX_RETRY_SECONDS": ("30", number_value(0, above=True)),
    "OUTBOX_RETRY_MAX_SECONDS": ("1800", number_value(0, above=True)),
}
OLD_NAMES = {"BOT_TOKEN": "TELEGRAM_BOT_TOKEN", "TOKEN": "TELEGRAM_BOT_TOKEN",
             "TG_TOKEN": "TELEGRAM_BOT_TOKEN", "TELEGRAM_TOKEN": "TELEGRAM_BOT_TOKEN"}


def read_config(env, telegram=True):
    """The settings from a mapping (the environment over .env), all problems collected first.

    Derived: smtp_port and mail_from get their defaults, stt_base_url and stt_api_key default to
    the LLM's; working_hours is a tuple of (weekdays, from minute, to minute), timezone a ZoneInfo
    or None (the machine's own), pickup_alert_minutes None when off.
    """
    cfg, problems = argparse.Namespace(), []
    for name, (default, parse) in SETTINGS.items():
        raw = env.get(name) or ""
        try:
            setattr(cfg, name.lower(), parse(raw if raw.strip() else default))
        except ValueError as e:
            problems.append(f"{name}: {e}")
            setattr(cfg, name.lower(), parse(default))
    cfg.smtp_port = cfg.smtp_port or {"ssl": 465, "starttls": 587, "none": 25}[cfg.smtp_security]
    cfg.mail_from = cfg.mail_from or (cfg.smtp_user if "@" in cfg.smtp_user
                                      else cfg.manager_email.split(",")[0])
    cfg.stt_base_url = cfg.stt_base_url or cfg.llm_base_url
    cfg.stt_api_key = cfg.stt_api_key or cfg.llm_api_key
    problems = missing_settings(env, cfg, telegram) + problems + pasted_tokens(env)
    if problems:
        raise ConfigError(problems)
    return cfg


def missing_settings(env, cfg, telegram):
    """Settings left empty that others need; one typed wrongly is named by its parser alone."""
    given = {name for name in SETTINGS if (env.get(name) or "").strip()}
    needs = [(telegram, "TELEGRAM_BOT_TOKEN", "впишите в .env токен от @BotFather"),
             ("SMTP_HOST" in given, "MANAGER_EMAIL", "он нужен, когда задан SMTP_HOST: на него "
                                                     "уходят заявки"),
             ("LLM_BASE_URL" in given, "LLM_MODEL", "он нужен, когда задан LLM_BASE_URL, например "
                                                   "qwen2.5:7b для Ollama"),
             (cfg.stt_model and not ({"STT_BASE_URL", "LLM_BASE_URL"} & given), "STT_BASE_URL",
              "он (или LLM_BASE_URL) нужен, когда задан STT_MODEL")]
    return [f"{name} не задан — {why}" for need, name, why in needs if need and name not in given]


LOOKALIKES = str.maketrans("АВЕКМНОРСТХУаеорсху", "ABEKMHOPCTXYaeopcxy")  # Cyrillic as Latin
TOKEN_RE = re.compile(r"\d{5,}:[\w-]{30,}")  # a token as @BotFather gives it
FREE_TEXT = (str, str.strip, path_value)  # parsers that take any text, a pasted token too


def typos(keys):
    """Keys of .env that are not settings but close to one: a typo the owner would never notice."""
    return [f"{key}: такой настройки нет — {hint}" for key in keys if key not in SETTINGS
            for hint in name_hints(key)]


def name_hints(key):
    """The setting a wrong name means. Cyrillic letters in it look Latin: say which they are."""
    latin = key.translate(LOOKALIKES).upper()
    close = [OLD_NAMES[latin]] if latin in OLD_NAMES else difflib.get_close_matches(
        latin, SETTINGS, 1, 0.8)
    cyrillic = ", ".join(sorted({letter for letter in key if "\u0400" <= letter <= "\u04ff"}))
    if not cyrillic:
        return [f"может быть, {name}?" for name in close]
    return [f"в имени русские буквы ({cyrillic}) вместо латинских: " +
            (f"наберите {close[0]} латиницей" if close else "имена настроек пишутся латиницей, "
             "как в .env.example")]


def pasted_tokens(env):
    """The bot's token in a line that takes any text: an error, not a warning, since the bot
    would send it to the LLM or SMTP server, or print it as the model's or the folder's name."""
    token = (env.get("TELEGRAM_BOT_TOKEN") or "").strip()
    return [f"{name}: похоже, это токен Telegram-бота — его место в TELEGRAM_BOT_TOKEN; сюда "
            "впишите своё значение (README, «Settings»)" for name, (_, parse) in SETTINGS.items()
            if parse in FREE_TEXT and (value := (env.get(name) or "").strip())
            and (value == token or TOKEN_RE.fullmatch(value))]


def doubts(env, keys):
    """Settings that work, but surely not as meant: ✗ in --check, a warning at start-up."""
    given = {name for name in ("SMTP_HOST", "MANAGER_EMAIL") if (env.get(name) or "").strip()}
    mail = ["MANAGER_EMAIL задан, а SMTP_HOST пуст — письма не уходят: впишите SMTP_HOST и другие "
            "SMTP_… или очистите MANAGER_EMAIL"] if given == {"MANAGER_EMAIL"} else []
    return typos(keys) + mail


def read_env():
    """The real environment over .env next to leadbot.py (only that one: a .env of whatever folder
    the bot is started from would be a surprise); and .env's keys."""
    path = HERE / ".env"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        text = ""
    except UnicodeError:
        raise ConfigError([f"{path} — не текст в UTF-8: откройте его в Блокноте и сохраните "
                           "в кодировке UTF-8"]) from None
    except OSError as e:  # made by another user (sudo nano) for a service that runs as its own
        raise ConfigError([f"{path} не читается ({type(e).__name__}) — дайте пользователю, от "
                           "имени которого работает бот, право его читать (chown или chmod)"]
                          ) from None
    keys = env_keys(text)
    values = dotenv_values(stream=io.StringIO(text))
    from_file = {key.lstrip("\ufeff"): value or "" for key, value in values.items()}
    return {**from_file, **os.environ}, keys


def env_keys(text):
    """.env's keys; ConfigError for conflict marks, for a line that sets nothing (python-dotenv
    skips it with an English warning) and for a key set twice: with README's block pasted at the
    top, the template's empty lines below would undo it silently."""
    lines, where = text.splitlines(), collections.defaultdict(list)
    for number, line in enumerate(lines, 1):
        if found := re.match(r"\s*(?:export\s+)?([^\s=#]+)\s*=", line):
            where[found.group(1).lstrip("\ufeff")].append(number)
    twice = [f".env: {key} задан {plural(len(numbers), 'раз', 'раза', 'раз')} (строки "
             f"{', '.join(map(str, numbers))}) — оставьте одну строку: действует только последняя"
             for key, numbers in where.items() if len(numbers) > 1]
    conflict = conflict_problem(".env", lines)
    if problems := [conflict] if conflict else unparsed(text) + twice:
        raise ConfigError(problems)
    return list(where)


def unparsed(text):
    """A line of .env without "=", named by its number and setting, never by its value."""
    found = [(binding.original.line, binding.original.string.split()[0].split("=")[0])
             for binding in parse_stream(io.StringIO(text))
             if binding.error or (binding.key and binding.value is None)]
    return [f".env, строка {number}: " + (f"{word} без знака «=»" if word in SETTINGS
                                          else "нет знака «=»") +
            " — строка не действует; пишите ИМЯ=значение, например SMTP_HOST=smtp.mail.ru "
            "(или # в начале строки, если это пояснение)" for number, word in found]


def shortest(path):
    """path as typed from the current folder: relative below it, else absolute, quoted if spaced."""
    path = str(path)
    with contextlib.suppress(ValueError):  # on Windows, another drive has no relative path
        relative = os.path.relpath(path)
        path = path if relative.startswith("..") else relative
    return f'"{path}"' if " " in path else path


def python_command():
    """The interpreter this runs under, as the owner would type it here: `python` may not exist
    (stock Debian) and `python3` may lack the packages, which are in the virtual environment."""
    path = shortest(sys.executable or "python3")
    return path if os.sep in path else f".{os.sep}{path}"  # a bare name would be looked up in PATH


def bot_command():
    """How to start this bot from the current folder, e.g. `.venv/bin/python leadbot.py`."""
    return f"{python_command()} {shortest(HERE / 'leadbot.py')}"


# --- Logs: one line per event, secrets masked ---------------------------------------------------


class JsonLines(logging.Formatter):
    """LOG_FORMAT=json: one object per line with the event's chat id and stage as fields."""

    def format(self, record):
        line = {"time": datetime.fromtimestamp(record.created,
                                               timezone.utc).astimezone().isoformat(),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for field, pattern, cast in (("chat_id", r"\bchat (-?\d+)", int),
                                     ("stage", r"-> (\w+)", str)):
            if found := re.search(pattern, line["message"]):
                line[field] = cast(found.group(1))
        return json.dumps(line, ensure_ascii=False)


def setup_logging(cfg, console_level=None):
    handlers = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(console_level or cfg.log_level)
    if cfg.log_file:
        try:
            handlers.append(logging.FileHandler(cfg.log_file, encoding="utf-8"))
        except OSError as e:
            raise ConfigError([f"LOG_FILE {cfg.log_file} cannot be written ({type(e).__name__}): "
                               "create its folder or choose another file"]) from None
    known = [s for s in (cfg.telegram_bot_token, cfg.llm_api_key, cfg.smtp_password) if len(s) >= 5]

    # the last line of defence: known secrets out of every line (shorter would mask words)
    def mask(record):
        message = record.getMessage()
        for secret in known:
            message = message.replace(secret, "***")
        record.msg, record.args = message, None
        return True

    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.addFilter(mask)
        handler.setFormatter(JsonLines() if cfg.log_format == "json" else plain)
    logging.basicConfig(level=cfg.log_level, handlers=handlers, force=True)
    # its lines carry URLs, and URLs the token
    logging.getLogger("urllib3").setLevel(logging.WARNING)


# --- Start-up ----------------------------------------------------------------------------------


class Bot:
    """What a running bot holds: settings, texts, the way out (Telegram or console) and its
    files."""

    def __init__(self, cfg, out, source):
        self.cfg, self.out, self.source = cfg, out, source
        self.prompt = read_prompt(HERE / "prompt.txt", cfg)
        self.lock = store.open_data_dir(cfg.data_dir)  # held while the process lives
        self.leads = store.Leads(cfg.data_dir / "leads.csv", cfg.csv_delimiter)
        self.journal = store.Journal(cfg.data_dir / "state.jsonl" if source == "telegram" else None,
                                     valid_dialog)
        self.funnel = store.Funnel(cfg.data_dir / "funnel.jsonl")
        self.inbox, self.offset = queue.Queue(), None  # offset: the next getUpdates offset
        self.stopping = getattr(out, "stopping", threading.Event())
        self.mailing = threading.Event()  # set while an email itself goes out: a stop waits for it
        self.recent, self.invited, self.llm_sessions = {}, set(), queue.SimpleQueue()
        self.replies = {}  # chat -> [text, markup] said since its last save
        self.lanes = Lanes(self) if source == "telegram" else Direct(self)
        self.fatal = None
        self.channels = (["email"] if cfg.smtp_host else []) + \
            (["telegram"] if cfg.manager_chat_id and source == "telegram" else [])
        self.ledger = store.Ledger(cfg.data_dir, ["csv", *self.channels])

    def text(self, key):
        return self.prompt.texts[key]

    def say(self, chat_id, text, **markup):
        self.replies.setdefault(chat_id, []).append([text, markup])  # saved, then sent by a lane


def run_telegram(cfg):
    """Start-up with Telegram (the token, DELETE_WEBHOOK=1, the command menu), then the loop until
    it stops."""
    stopping = threading.Event()
    # before anything else: a stop during start-up is clean too
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    bot = Bot(cfg, Telegram(cfg, stopping), "telegram")
    try:
        me = bot.out.call_patiently("getMe")
    except TelegramError:
        if bot.stopping.is_set():
            return 0
        raise ConfigError([f"Telegram отклонил TELEGRAM_BOT_TOKEN — {TOKEN_FIX}"]) from None
    log.info("started as @%s (email: %s, LLM: %s)", (me or {}).get("username"),
             "on" if cfg.smtp_host else "off", "on" if cfg.llm_base_url else "off")
    print("\n".join(startup_summary(cfg, bot.prompt, bot.channels)), flush=True)  # for the owner
    # One getChat, only with MANAGER_CHAT_ID set: a card to a chat the bot cannot see is lost.
    for _, problem in [line for line in check_manager_chat(cfg, bot.out) if line[0] is False]:
        print("Внимание: " + problem.removeprefix("Telegram: "), flush=True)
        log.warning("the bot cannot reach MANAGER_CHAT_ID (see --check)")
    if cfg.delete_webhook:
        try:
            bot.out.call_patiently("deleteWebhook")
            log.info("webhook deleted (DELETE_WEBHOOK=1)")
        except TelegramError as e:
            log.warning("could not delete the webhook (%s)", e.error_code)
    try:
        bot.out.call("setMyCommands",
                     commands=[{"command": c, "description": bot.text("menu_" + c)[:256]}
                               for c in ("start", "help", "cancel", "forget")])
    except TelegramError as e:
        log.warning("could not set the command menu (%s)", e.error_code)
    recover(bot)
    run(bot)
    log.info("stopped")
    if bot.fatal:
        raise ConfigError([bot.fatal])
    return 0


def run_console(cfg):
    """The whole dialog in the terminal; the lead goes to the same CSV with source 'console'."""
    for stream in (sys.stdin, sys.stdout):
        stream.reconfigure(encoding="utf-8", errors="replace")
    bot = Bot(cfg, Console(), "console")
    print(bot.text("console_hint"))
    line = "/start"
    try:
        while line:  # "" is the end of the input
            # an empty Enter is no answer: Telegram cannot send one either
            if text := clean_text(line):
                handle(bot, Incoming(chat_id=0, text=text))
                flush(bot)
            # The LLM writes its offer and notes; the replies printed leave the dialog (Sent)
            while (dialog := bot.journal.dialogs.get(0) or {}).get("busy") or not bot.inbox.empty():
                handle_event(bot, bot.inbox.get())
                flush(bot)
            if dialog.get("stage") == "done":
                break
            print("Вы: ", end="", flush=True)
            line = sys.stdin.readline()
    except KeyboardInterrupt:
        print()
    for name in bot.ledger.cursors:  # the console does not stay to retry
        if not deliver_now(bot, name):
            print(f"The lead's {name} could not be sent now; "
                  "it goes out at the next start of the bot.")
    return 0


def deliver_now(bot, name):
    """What the channel still owes, delivered at once (the console's way); False if one failed."""
    while (record := bot.ledger.next(name, timeout=0)) is not None:
        try:
            finish_record(bot, name, record, CHANNELS[name](bot, record))
        except (OSError, mailer.MailError) as e:
            log.warning("%s for the console failed: %s", name, failure_reason(name, e))
            return False
    return True


# --- --check, --stats and what start-up tells the owner ---------------------------------------


def plural(number, one, few, many):
    """'1 вопрос', '3 вопроса', '5 вопросов': Russian counts its nouns three ways."""
    tens, ones = number % 100, number % 10
    few_ok = 2 <= ones <= 4 and not 12 <= tens <= 14
    form = one if ones == 1 and tens != 11 else few if few_ok else many
    return f"{number} {form}"


def next_open(cfg, when):
    """When WORKING_HOURS next begin after when (an aware datetime), in TIMEZONE; None when they
    are on now or not set. Days are counted on the wall clock: a change to summer time is safe."""
    local = when.astimezone(cfg.timezone).replace(tzinfo=None)
    for day in range(8):
        date = datetime.combine(local.date() + timedelta(days=day), dtime())
        for weekdays, start, end in sorted(cfg.working_hours, key=lambda hours: hours[1]):
            opens, closes = date + timedelta(minutes=start), date + timedelta(minutes=end)
            if date.weekday() in weekdays and local < closes:
                zoned = opens.replace(tzinfo=cfg.timezone) if cfg.timezone else opens.astimezone()
                return None if opens <= local else zoned
    return None


WEEKDAYS = ("в понедельник", "во вторник", "в среду", "в четверг", "в пятницу", "в субботу",
            "в воскресенье")


def when_text(opens, now):
    """next_open's answer as the client reads it in {when}: «завтра в 09:00», «в среду в 10:00»."""
    days = (opens.date() - now.astimezone(opens.tzinfo).date()).days
    day = {0: "сегодня", 1: "завтра"}.get(days) or (WEEKDAYS[opens.weekday()] if days < 7
                                                     else opens.strftime("%d.%m"))
    return f"{day} в {opens:%H:%M}"


def startup_summary(cfg, prompt, channels):
    """The lines start-up prints for the owner: where the leads go, what is asked, what is on,
    how to stop. channels: the lead's ways besides leads.csv ("email", "telegram")."""
    def on(flag):
        return "вкл." if flag else "выкл."
    zone = getattr(cfg.timezone, "key", "часовой пояс компьютера")
    return [f"Папка данных: {cfg.data_dir} (заявки — в {cfg.data_dir / 'leads.csv'})",
            f"prompt.txt: {plural(len(prompt.questions), 'вопрос', 'вопроса', 'вопросов')} — "
            + ", ".join(question.label for question in prompt.questions),
            f"Заявки: leads.csv — вкл., почта менеджеру — {on('email' in channels)}, "
            f"чат менеджеров в Telegram — {on('telegram' in channels)}",
            f"Нейросеть: {on(cfg.llm_base_url)}, голосовые: {on(cfg.stt_model)}, рабочие часы: "
            + (f"заданы ({zone})" if cfg.working_hours else "круглосуточно"),
            "Остановить бота: Ctrl+C (если он работает как служба: sudo systemctl stop leadbot)"]


def run_check():
    """One ✓/✗/- line for each part, a ✗ saying what to change; exit 0 when nothing failed."""
    sys.stdout.reconfigure(encoding="utf-8", errors="replace")  # ✓ and ✗ on any Windows console
    failed, command = False, bot_command()
    try:
        for ok, text in checks():  # each line as soon as its part is checked
            print({True: "✓ ", False: "✗ ", None: "- "}[ok] + text, flush=True)
            failed |= ok is False
    except ConfigError:  # the settings cannot be used at all: the other parts cannot be checked
        print(f"Исправьте .env, как сказано выше, и запустите проверку снова: {command} --check")
        return 1
    print(f"Исправьте строки с ✗ и запустите проверку снова: {command} --check" if failed
          else f"Все проверки пройдены. Запуск бота: {command}")
    return int(failed)


def checks():
    """(ok, text) for .env, the settings, prompt.txt, Telegram and each module's part, in turn."""
    try:
        env, keys = read_env()
    except ConfigError as e:
        yield from ((False, problem) for problem in e.problems)
        raise
    problems = doubts(env, keys)
    try:
        cfg = read_config(env)
    except ConfigError as e:
        problems[:0] = e.problems
    yield from ((False, f"Настройки: {problem}") for problem in problems)
    if not problems:
        yield True, "Настройки: все заданы верно"
    cfg = read_config(env, telegram=False)  # without the token the rest can be checked; else raises
    try:
        prompt = read_prompt(HERE / "prompt.txt", cfg)
        asked = plural(len(prompt.questions), "вопрос", "вопроса", "вопросов")
        yield True, f"prompt.txt: {asked}, {plural(len(TEXT_KEYS), 'текст', 'текста', 'текстов')}"
    except PromptError as e:
        yield from ((False, problem) for problem in e.problems)
    yield from check_telegram(cfg) if cfg.telegram_bot_token else ()
    for part in (llm, mailer):
        yield from part.check(cfg)
    yield store.check(cfg)


TOKEN_FIX = "скопируйте токен ещё раз у @BotFather (/mybots → бот → API Token) в TELEGRAM_BOT_TOKEN"


def check_telegram(cfg):
    """getMe names the bot; then whether a webhook keeps polling from getting any message."""
    tg = Telegram(cfg, threading.Event())
    try:
        me = tg.call("getMe")
    except TelegramError as e:
        if e.error_code in (401, 404):
            return [(False, f"Telegram: токен отклонён (HTTP {e.error_code}) — {TOKEN_FIX}")]
        if e.error_code:
            return [(False, f"Telegram: ответил HTTP {e.error_code} — попробуйте через минуту; "
                            "если ошибка останется, проверьте TELEGRAM_API_URL")]
        return [(False, f"Telegram: нет связи ({e.description}) — проверьте интернет, файрвол или "
                        "прокси (HTTPS_PROXY) и TELEGRAM_API_URL")]
    token = (True, f"Telegram: токен работает, бот — @{(me or {}).get('username')}")
    try:
        hook = (tg.call("getWebhookInfo") or {}).get("url")
    except TelegramError as e:  # the token works, so this says nothing against the setup
        return [token, (None, f"Telegram: не удалось узнать, задан ли вебхук ({e.reason})")]
    if hook and not cfg.delete_webhook:
        return [token, (False, "Telegram: у бота задан вебхук, и сообщения до бота не дойдут — "
                               "впишите в .env DELETE_WEBHOOK=1, и бот удалит вебхук при запуске")]
    return [token, (True, "Telegram: задан вебхук; DELETE_WEBHOOK=1 удалит его при запуске" if hook
                    else "Telegram: вебхука нет, бот будет получать сообщения"),
            *check_manager_chat(cfg, tg)]


def check_manager_chat(cfg, tg):
    """Whether the bot can reach MANAGER_CHAT_ID: a card to a chat it cannot see is lost."""
    if not cfg.manager_chat_id:
        return []
    try:
        tg.call("getChat", chat_id=cfg.manager_chat_id)
    except TelegramError as e:
        if not e.error_code or e.error_code >= 500:
            return [(None, f"Telegram: не удалось проверить чат менеджеров ({e.reason})")]
        return [(False, f"Telegram: чат MANAGER_CHAT_ID недоступен боту (HTTP {e.error_code}) — "
                        "добавьте бота в группу (в канал — администратором) или пусть менеджер "
                        "напишет боту /start, и проверьте число в MANAGER_CHAT_ID")]
    return [(True, "Telegram: чат менеджеров доступен, карточки заявок дойдут")]


STAGE_NAMES = {"greeting": "после приветствия", "qualifying": "на вопросах",
               "offering": "пока писалась рекомендация",
               "collecting_contact": "на просьбе о контакте"}


def run_stats(cfg, as_json):
    """The funnel of the last 7 days, 30 days and all time, from DATA_DIR's files alone."""
    sys.stdout.reconfigure(encoding="utf-8", errors="replace")
    figures = store.stats(cfg.data_dir / "funnel.jsonl", time.time(), cfg.session_ttl_hours * 3600)
    if as_json:
        print(json.dumps(figures, ensure_ascii=False))
        return 0
    for title, p in (("За 7 дней", figures["7d"]), ("За 30 дней", figures["30d"]),
                     ("За всё время", figures["all"])):
        print(f"{title}: {plural(p['started'], 'диалог', 'диалога', 'диалогов')}")
        for key, label in (("qualified", "ответили на все вопросы"),
                           ("offered", "получили рекомендацию"), ("contacts", "оставили контакт")):
            share = f"{100 * p[key] / p['started']:.0f}%" if p["started"] else "-"
            print(f"  {label:<26}{p[key]:>6}  {share:>5}")
        dropped = ", ".join(f"{STAGE_NAMES.get(stage, stage)} {n}"
                            for stage, n in p["dropped"].items() if n) or "нет"
        median = p["median_seconds_to_contact"]
        print(f"  отказались: {p['refused']}, прервали (/cancel): {p['cancelled']}, ещё идут: "
              f"{p.get('open', 0)}, удалили данные (/forget): {p.get('forgotten', 0)}")
        print(f"  бросили: {dropped}")
        median = f"{median / 60:.1f} мин".replace(".", ",") if median is not None else "-"
        print(f"  медиана времени до контакта: {median}")
    console = figures["console"]
    print(f"Проверочные диалоги в консоли (выше не считаются): {console['started']}, "
          f"из них с контактом: {console['contacts']}")
    return 0


def quietly(write):
    """write() to stdout; a reader gone early (`--check | head -1`) ends it without a traceback."""
    try:
        code = write()
        sys.stdout.flush()  # here, not at exit, where a broken pipe could only be reported
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the flush at exit
        return 1


def main(argv=None):
    parser = argparse.ArgumentParser(description="Telegram lead bot (see README.md)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--console", action="store_true", help="talk to the bot in this terminal")
    mode.add_argument("--check", action="store_true", help="check the setup and say what to fix")
    mode.add_argument("--stats", action="store_true",
                      help="print the funnel of the last 7/30 days and all time")
    parser.add_argument("--json", action="store_true", help="with --stats: one JSON object")
    args = parser.parse_args(argv)
    # every file the bot makes (leads, dialogs, logs) is readable by this user alone
    os.umask(0o077)
    if args.check:
        return quietly(run_check)
    try:
        env, keys = read_env()
        try:
            cfg = read_config(env, telegram=not (args.console or args.stats))
        except ConfigError as e:  # a misspelt name is often why a setting seems missing
            raise ConfigError(e.problems + doubts(env, keys)) from None
        if args.stats:
            return quietly(lambda: run_stats(cfg, args.json))
        setup_logging(cfg, console_level="WARNING" if args.console else None)
        for doubt in doubts(env, keys):
            log.warning("%s", doubt)
        return run_console(cfg) if args.console else run_telegram(cfg)
    except (ConfigError, PromptError, store.StoreError) as e:
        sys.stderr.reconfigure(encoding="utf-8", errors="replace")  # Russian on any Windows console
        for problem in getattr(e, "problems", [str(e)]):  # one line each
            print(f"leadbot: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

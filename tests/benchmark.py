"""How fast leadbot is, measured against the local fakes of the end-to-end tests (tests/fakes.py).

    python tests/benchmark.py                   every figure
    python tests/benchmark.py burst overhead    some: burst streaming forget overhead growth shutdown lanes

Not a test: pytest does not collect it (the name does not start with test_). It runs a snapshot of the
program (fakes.copy_app) at its default settings, prints one table, each figure next to its target with
PASS or FAIL ("report" where there is no target), and exits 0. It takes about a minute.

  1. burst       20 new clients at once, each through the whole dialog (/start, the answers in ANSWERS,
                 a phone), the LLM taking 1.0 s per call: p50/p95 of the time from each client message
                 to the bot's complete reply (target p95 <= 1.2 s); and 50 clients the same way (reported);
                 and 20 again with every message, draft and 'typing' taking 50 ms to reach Telegram, as a
                 real Bot API does (reported: a dispatcher sending one reply after another shows here)
  2. streaming   from the client's last answer to the first visible words of the recommendation (the
                 chat's first sendMessageDraft with text), against the LLM's own time to first token
                 (target <= TTFT + 0.3 s); and to the recommendation's message, against the LLM's full
                 answer time (target <= full + 0.3 s)
  3. /forget     one chat after another sends /forget with 100,000 rows in leads.csv while 20 other
                 chats keep messaging: the others' worst wait for a complete reply (target <= 1 s)
  4. overhead    full dialogs per second through the bot with an instant LLM, against a floor: the same
                 number of HTTP calls made one after another with one requests.Session (ratio reported)
  5. growth      saving one lead (store.Leads.write) on a file of 10 vs 100,000 rows; one message with
                 10 vs 10,000 open dialogs in state.jsonl (target: flat, at most 1.5x)
  6. memory      peak RSS (VmHWM) of the bot process with 10,000 open dialogs (Linux /proc; reported)
  7. shutdown    SIGTERM while the bot waits in its long poll: time to exit (target <= 2 s, exit code 0)
  8. lanes       one chat's sendMessage answers 429 with retry_after=20 while 20 other new clients go
                 through the whole dialog at once (instant LLM): the others' reply p95 (target <= 1 s),
                 and when the waiting chat got its replies

Clients answer the moment the bot's reply is complete (no reading or typing time): the hardest case.
A reply is complete with the bot's last message for that step: the next question, the contact request
after the recommendation, the thank-you.
"""
import csv
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakes import (ANSWERS, APP_FILES, PROMPT, QUESTIONS, REPO, SUMMARY_PROMPT, TEXTS, FakeLLM,  # noqa: E402
                   FakeTelegram, copy_app, start_bot, wait_until)

import leadbot  # noqa: E402  (fakes put the repository on sys.path)
import store  # noqa: E402

PHONE = "+7 999 123-45-67"
STEPS = ["/start", *ANSWERS, PHONE]  # what each client writes, in order
OFFER_STEP = len(ANSWERS)  # the last answer: its reply is the recommendation and the contact request
LLM_SECONDS = 1.0  # per call in the bursts
RTT = 0.05  # a real Bot API is 30-150 ms away: each message, draft and 'typing' of the third burst waits this
OFFER = "Рекомендуем услугу «Лендинг под ключ»: это быстрый старт для вас."
NOTES = "Сайт для пекарни\nНужен сайт с онлайн-заказом, срок месяц, бюджет 50–200 тыс. ₽."
TTFT_DELAY, CHUNK_GAP = 0.5, 0.1  # the streaming LLM of figure 2: before the answer starts, between chunks
COLUMNS = ["timestamp", "chat_id", "client_name", "contact", "intent", "notes", "source", "status"]
BIG = 100_000  # rows in leads.csv
MANY = 10_000  # open dialogs in state.jsonl
OVERHEAD_DIALOGS, OVERHEAD_ROUNDS = 20, 5
TICK = 0.01  # how often wait_until looks


def completes(step, text):
    """True when text is the bot's last message in reply to STEPS[step]."""
    if step < OFFER_STEP:  # /start and every answer but the last: the next question
        return text == QUESTIONS[step][1]
    if step == OFFER_STEP:  # the recommendation, then the contact request
        return text.startswith(TEXTS["contact_request"])
    return text == TEXTS["thanks_saved"]


def answer_for(request):
    """The fake LLM's answer: two lines of notes for the notes prompt, the recommendation otherwise."""
    system = request["messages"][0]["content"]
    return NOTES if system == SUMMARY_PROMPT else OFFER


# --- Fakes that keep time --------------------------------------------------------------------------------


class TimedTelegram(FakeTelegram):
    """FakeTelegram that timestamps every message and draft the bot sends (time.monotonic()) and hands each
    message to .on_message(at, chat_id, text) before the bot gets its answer."""

    def __init__(self):
        self.sent_log, self.draft_log, self.on_message = [], [], None  # (at, chat_id, text)
        super().__init__()

    def _send_message(self, params):
        result = super()._send_message(params)
        at, chat, text = time.monotonic(), int(params["chat_id"]), str(params["text"])
        with self._cond:
            self.sent_log.append((at, chat, text))
        hook = self.on_message
        if hook:
            hook(at, chat, text)
        return result

    def _send_message_draft(self, params):
        result = super()._send_message_draft(params)
        with self._cond:
            self.draft_log.append((time.monotonic(), int(params["chat_id"]), str(params.get("text") or "")))
        return result

    def call_count(self):
        with self._cond:
            return len(self._calls)

    def calls_since(self, start):
        """(method, params) of every call from number `start` on, in order, failed ones included."""
        with self._cond:
            return [(method, dict(params)) for method, params in self._calls[start:]]


class TimedLLM(FakeLLM):
    """FakeLLM that notes for each request its system prompt and, in time.monotonic(), when it arrived, when
    the first bytes carrying answer text went out and when the answer ended."""

    def __init__(self):
        self.timings = []
        self._timings_lock = threading.Lock()
        super().__init__()
        self.reply_fn = answer_for

    def _handle(self, handler):
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        try:
            system = json.loads(body)["messages"][0]["content"]
        except (ValueError, LookupError, TypeError):
            system = None
        timing = {"system": system, "arrived": time.monotonic(), "first": None, "ended": None}
        with self._timings_lock:
            self.timings.append(timing)
        rfile, wfile = handler.rfile, handler.wfile
        handler.rfile, handler.wfile = io.BytesIO(body), WordsWatch(wfile, timing)  # FakeLLM reads the body again
        try:
            super()._handle(handler)
        finally:
            handler.rfile, handler.wfile, timing["ended"] = rfile, wfile, time.monotonic()


class WordsWatch:
    """A handler's wfile that notes when the first bytes carrying answer text went out."""

    def __init__(self, wfile, timing):
        self.wfile, self.timing = wfile, timing

    def write(self, data):
        written = self.wfile.write(data)
        if self.timing["first"] is None and carries_words(data):
            self.timing["first"] = time.monotonic()
        return written

    def __getattr__(self, name):
        return getattr(self.wfile, name)


def carries_words(data):
    """True for an HTTP chunk with a server-sent event whose delta has content, or a whole answer with content."""
    for line in bytes(data).decode("utf-8", "replace").splitlines():
        try:
            choice = json.loads(line.removeprefix("data:").strip())["choices"][0]
            if (choice.get("delta") or choice.get("message") or {}).get("content"):
                return True
        except (ValueError, LookupError, TypeError, AttributeError):
            continue
    return False


# --- Clients -------------------------------------------------------------------------------------------------


class Clients:
    """Clients in dialogs with the bot, driven from TimedTelegram.on_message: each writes its next message the
    moment the bot's reply to the last one is complete (or `think` seconds later).

    one_at_a_time: the next chat starts when the previous one's dialog ends. repeat: after the thank-you a
    chat starts again with /start, until stop(). Each answered message leaves (chat, step, sent_at, seconds)
    in .waits."""

    def __init__(self, telegram, chats, steps=len(STEPS), one_at_a_time=False, think=0.0, repeat=False):
        self.tg, self.chats, self.steps = telegram, list(chats), steps
        self.one_at_a_time, self.think, self.repeat = one_at_a_time, think, repeat
        self.lock = threading.Lock()
        self.pending = {}  # chat -> (step, sent_at) of the message waiting for its reply
        self.waits, self.sends, self.done = [], [], {}  # done: chat -> when its dialog ended
        self.started = self.ended = None
        self.stopped = False

    def start(self):
        self.tg.on_message = self._reply
        with self.lock, self.tg._cond:  # the condition held: the bot gets these first messages in one getUpdates
            self.started = time.monotonic()
            first = self.chats[:1] if self.one_at_a_time else self.chats
            for number, chat in enumerate(first):
                if self.think:  # spread out, or they would keep writing in step
                    self._later(number * self.think / len(first), chat, 0)
                else:
                    self._send(chat, 0)
        return self

    def run(self, timeout):
        """start(), wait until every dialog ended (at most timeout seconds), stop(); True if all ended."""
        self.start()
        try:
            wait_until(lambda: len(self.done) == len(self.chats), timeout, TICK)
            return True
        except AssertionError:
            return False
        finally:
            self.stop()

    def stop(self):
        with self.lock:
            self.stopped, self.ended = True, time.monotonic()
        if self.tg.on_message == self._reply:
            self.tg.on_message = None

    def _send(self, chat, step):  # with self.lock held
        sent_at = time.monotonic()
        self.pending[chat] = (step, sent_at)
        self.sends.append((sent_at, chat, step))
        self.tg.send_text(chat, STEPS[step])

    def _later(self, seconds, chat, step):
        def send():
            with self.lock:
                if not self.stopped:
                    self._send(chat, step)
        timer = threading.Timer(seconds, send)
        timer.daemon = True
        timer.start()

    def _reply(self, at, chat, text):
        with self.lock:
            if self.stopped or chat not in self.pending or not completes(self.pending[chat][0], text):
                return
            step, sent_at = self.pending.pop(chat)
            self.waits.append((chat, step, sent_at, at - sent_at))
            step += 1
            if step == self.steps:
                if not self.repeat:
                    self.done[chat] = at
                    index = self.chats.index(chat) + 1
                    if self.one_at_a_time and index < len(self.chats):
                        self._send(self.chats[index], 0)
                    return
                step = 0
            if self.think:
                self._later(self.think, chat, step)
            else:
                self._send(chat, step)

    def unanswered(self):
        """(chat, step, sent_at, seconds waited until stop()) of every message still without its reply."""
        with self.lock:
            return [(chat, step, sent_at, self.ended - sent_at) for chat, (step, sent_at) in self.pending.items()]

    def all_waits(self):
        """Seconds of every message; one still unanswered counts the time it had waited (a lower bound)."""
        return [w[3] for w in self.waits] + [w[3] for w in self.unanswered()]


def percentile(values, p):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --- The bot under test --------------------------------------------------------------------------------------


class Bench:
    """A scratch folder holding a snapshot of the program; bots run from it with their data in sub-folders."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="leadbot-bench-"))
        self.script = copy_app(self.root / "app")  # others may be editing the repository meanwhile
        self.names = set()

    def folder(self, name):
        folder = self.root / name
        while folder.name in self.names:
            folder = folder.with_name(folder.name + "+")
        self.names.add(folder.name)
        (folder / "data").mkdir(parents=True)
        return folder

    @contextmanager
    def bot(self, folder, telegram, llm, **settings):
        """leadbot.py at default settings but for these, once it polls; DATA_DIR is {folder}/data. Stopped after."""
        env = {"TELEGRAM_BOT_TOKEN": telegram.token, "TELEGRAM_API_URL": telegram.url, "LLM_BASE_URL": llm.url,
               "LLM_MODEL": "bench", "DATA_DIR": str(folder / "data"), **{k: str(v) for k, v in settings.items()}}
        polls = len(telegram.calls("getUpdates"))
        bot = start_bot(env, cwd=folder, script=self.script)
        try:
            try:
                wait_until(lambda: len(telegram.calls("getUpdates")) > polls or not bot.alive(), 60, TICK)
            except AssertionError:
                pass
            if not bot.alive() or len(telegram.calls("getUpdates")) <= polls:
                raise RuntimeError(f"the bot did not start polling:\n{bot.output()[-2000:]}")
            yield bot
        finally:
            stop_bot(bot)

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def fakes():
    telegram, llm = TimedTelegram(), TimedLLM()
    try:
        yield telegram, llm
    finally:
        telegram.stop()
        llm.stop()


def stop_bot(bot):
    if bot.alive():
        bot.terminate()
    try:
        bot.wait(15)
    except AssertionError:
        bot.kill()
        bot.wait(15)


def peak_rss_mb(pid):
    """VmHWM of a process in MB, or None without /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)


def lead_row(i, chat_id=None):
    return {"timestamp": f"2026-11-{1 + i % 28:02d}T12:{i // 60 % 60:02d}:{i % 60:02d}+03:00",
            "chat_id": 500_000_000 + i if chat_id is None else chat_id, "client_name": "Иван",
            "contact": "8 999 123-45-67", "intent": "Сайт для пекарни",
            "notes": "Задача: сайт с онлайн-заказом; Сроки: В течение месяца; Бюджет: 50–200 тыс. ₽",
            "source": "telegram", "status": "new"}


def write_leads_csv(path, rows, owners=(), per_owner=10):
    """leads.csv with a header and `rows` rows, ';' between cells; each chat in owners has per_owner rows
    spread through the file. Written with the csv module, as a spreadsheet would, not row by row by the bot."""
    owners, spots = list(owners), {}
    if owners:
        every = rows // (per_owner * len(owners))
        spots = {k * every + every // 2: owners[k % len(owners)] for k in range(per_owner * len(owners))}
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=";", lineterminator="\r\n")
        writer.writerow(COLUMNS)
        for i in range(rows):
            row = lead_row(i, spots.get(i))
            writer.writerow([row[c] for c in COLUMNS])


def chat_ids_in(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [row["chat_id"] for row in csv.DictReader(f, delimiter=";")]


def write_open_dialogs(data, n, first_chat):
    """state.jsonl with n open dialogs in the middle of the questions, in the shape leadbot.new_dialog makes."""
    with open(data / "state.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            dialog = leadbot.new_dialog(first_chat + i, "Иван", "telegram")
            dialog.update(stage="qualifying", answers=ANSWERS[:1 + i % (len(ANSWERS) - 1)], seen=[10_000 + i])
            assert leadbot.valid_dialog(dialog)
            f.write(json.dumps({"chat": first_chat + i, "dialog": dialog}, ensure_ascii=False) + "\n")


# --- 1. Burst --------------------------------------------------------------------------------------------------


def burst(bench, clients, cap, rtt=0.0):
    """Clients (finished or stopped at cap seconds) of `clients` new chats at once, the LLM taking LLM_SECONDS;
    and the LLM's timings. rtt: seconds each message, draft and 'typing' takes to reach Telegram."""
    with fakes() as (tg, llm):
        llm.delay = LLM_SECONDS
        for method in ("sendMessage", "sendMessageDraft", "sendChatAction") if rtt else ():
            tg.stall(method, rtt, times=100_000)
        with bench.bot(bench.folder(f"burst-{clients}"), tg, llm):
            first = 10_000_000 * (1 + clients)
            run = Clients(tg, range(first, first + clients))
            run.run(cap)
        return run, list(llm.timings)


def offer_step(run, timings):
    """Where the recommendation step's time goes: last answer -> the LLM request, the LLM, the LLM's last byte
    -> the contact request (the bot's complete reply). Requests and chats are matched in order of time, as the
    requests do not say which chat they are for."""
    answered = sorted(w[2] for w in run.waits if w[1] == OFFER_STEP)
    replied = sorted(w[2] + w[3] for w in run.waits if w[1] == OFFER_STEP)
    offers = [t for t in timings if t["system"] == PROMPT.system and t["ended"]]
    arrived, ended = sorted(t["arrived"] for t in offers), sorted(t["ended"] for t in offers)
    if not answered or len(offers) != len(answered):
        return f"{len(offers)} offer requests for {len(answered)} answered last answers"
    parts = [("last answer -> LLM request", [a - b for a, b in zip(arrived, answered)]),
             ("LLM", [t["ended"] - t["arrived"] for t in offers]),
             ("LLM's last byte -> contact request", [a - b for a, b in zip(replied, ended)])]
    return "; ".join(f"{name} p50 {statistics.median(s):.3f} / max {max(s):.3f} s" for name, s in parts)


def burst_rows(bench, row, notes):
    for clients, cap, target, rtt in ((20, 30, True, 0), (50, 40, False, 0), (20, 30, False, RTT)):
        run, timings = burst(bench, clients, cap, rtt)
        waits, finished = run.all_waits(), len(run.done) == clients
        p50, p95 = percentile(waits, 50), percentile(waits, 95)
        ended = f"all done in {max(run.done.values()) - run.started:.1f} s" if finished else \
            f"STOPPED at {cap} s with {len(run.done)}/{clients} dialogs done (figures are lower bounds)"
        row(f"1 burst: {clients} clients at once, LLM {LLM_SECONDS:g} s per call"
            + (f", Telegram {RTT * 1000:g} ms away" if rtt else ""),
            f"p50 {p50:.3f} s, p95 {p95:.3f} s, max {max(waits):.3f} s ({len(waits)} messages); {ended}",
            "p95 <= 1.2 s" if target else "report", (finished and p95 <= 1.2) if target else None)
        by_step = []
        for step, text in enumerate(STEPS):
            seconds = [w[3] for w in run.waits if w[1] == step]
            if seconds:
                by_step.append(f"{text[:12]!r} p50 {statistics.median(seconds):.2f} / max {max(seconds):.2f}")
        if not rtt:
            notes.append(f"burst {clients}, seconds per step: " + "; ".join(by_step))
            notes.append(f"burst {clients}, the recommendation step: " + offer_step(run, timings))


# --- 2. Streaming ------------------------------------------------------------------------------------------------


def streaming(bench, runs=3):
    """Per run, from the last answer: the first draft with text, the recommendation's message; the LLM's own
    time to the first words and to the end of the answer, from the offer request's arrival."""
    results = []
    with fakes() as (tg, llm):
        llm.delay, llm.chunk_delay, llm.chunks = TTFT_DELAY, CHUNK_GAP, None  # three words a chunk
        with bench.bot(bench.folder("streaming"), tg, llm):
            chats = list(range(20_000_001, 20_000_001 + runs))
            run = Clients(tg, chats, one_at_a_time=True)
            finished = run.run(10 * runs)
            for chat in chats:
                answered = next((at for at, c, step in run.sends if c == chat and step == OFFER_STEP), None)
                if answered is None:
                    results.append({"error": "the dialog did not reach the last answer"})
                    continue
                offer = next((t for t in list(llm.timings)
                              if t["system"] == PROMPT.system and t["arrived"] >= answered and t["ended"]), None)
                with tg._cond:
                    draft = next((at for at, c, text in tg.draft_log if c == chat and at >= answered and text.strip()),
                                 None)
                    message = next(((at, text) for at, c, text in tg.sent_log if c == chat and at >= answered), None)
                if offer is None or message is None:
                    results.append({"error": "no offer request or no message after the last answer"})
                elif message[1] != OFFER:
                    results.append({"error": f"the first message after the last answer is not the LLM's words: "
                                             f"{message[1][:60]!r}"})
                else:
                    results.append({"draft": None if draft is None else draft - answered,
                                    "message": message[0] - answered,
                                    "ttft": (offer["first"] or offer["ended"]) - offer["arrived"],
                                    "full": offer["ended"] - offer["arrived"]})
    return results, finished


def streaming_rows(bench, row, notes):
    results, finished = streaming(bench)
    errors = [r["error"] for r in results if "error" in r]
    good = [r for r in results if "error" not in r]
    if errors or not good:
        row("2 streaming", f"not measured: {errors[0] if errors else 'no run'}", "<= TTFT + 0.3 s", False)
        return
    drafted = [r for r in good if r["draft"] is not None]
    if len(drafted) < len(good):
        row("2 streaming: last answer -> first draft with text",
            f"no draft in {len(good) - len(drafted)}/{len(good)} runs", "<= TTFT + 0.3 s", False)
    if drafted:
        worst = max(drafted, key=lambda r: r["draft"] - r["ttft"])
        row("2 streaming: last answer -> first draft with text",
            f"{worst['draft']:.2f} s vs the LLM's TTFT {worst['ttft']:.2f} s (+{worst['draft'] - worst['ttft']:.2f} s;"
            f" worst of {len(drafted)})", "<= TTFT + 0.3 s", worst["draft"] - worst["ttft"] <= 0.3)
    worst = max(good, key=lambda r: r["message"] - r["full"])
    row("2 streaming: last answer -> recommendation message",
        f"{worst['message']:.2f} s vs the LLM's full answer {worst['full']:.2f} s "
        f"(+{worst['message'] - worst['full']:.2f} s; worst of {len(good)})", "<= full + 0.3 s",
        worst["message"] - worst["full"] <= 0.3)
    if not finished:
        notes.append("streaming: not every dialog reached the thank-you in time")


# --- 3. /forget ------------------------------------------------------------------------------------------------


def forget(bench, others=20, rounds=3):
    """`rounds` chats, one after another, send /forget (each has 10 of the BIG rows) while `others` chats keep
    going through dialogs, each writing 1 s after its reply (under the bot's flood guard of 12 messages in
    10 s). Returns the others' Clients, the /forget reply times, the forgotten rows left and the rows kept."""
    forgetters = list(range(30_000_001, 30_000_001 + rounds))
    folder = bench.folder("forget")
    leads = folder / "data" / "leads.csv"
    write_leads_csv(leads, BIG, forgetters)
    replies = []
    with fakes() as (tg, llm):
        with bench.bot(folder, tg, llm):
            run = Clients(tg, range(31_000_001, 31_000_001 + others), think=1.0, repeat=True).start()
            try:
                time.sleep(2.0)  # every chat mid-dialog
                for chat in forgetters:
                    seen = len(tg.texts(chat))
                    sent = time.monotonic()
                    tg.send_text(chat, "/forget")
                    wait_until(lambda: len(tg.texts(chat)) > seen, 30, TICK, f"no answer to /forget in chat {chat}")
                    with tg._cond:
                        at, text = next((at, text) for at, c, text in tg.sent_log if c == chat and at >= sent)
                    replies.append((at - sent, text))
                    time.sleep(1.5)
            finally:
                run.stop()
    left = [c for c in chat_ids_in(leads) if int(c) in forgetters]
    return run, replies, left, len(chat_ids_in(leads))


def forget_rows(bench, row, notes):
    run, replies, left, rows = forget(bench)
    waits = run.all_waits()
    wrong = [text for _, text in replies if text != TEXTS["forgotten"]]
    row(f"3 /forget with {BIG:,} rows: other chats' wait for a reply",
        f"max {max(waits):.2f} s, p50 {statistics.median(waits):.2f} s ({len(waits)} messages of "
        f"{len(run.chats)} chats); /forget answered in {max(s for s, _ in replies):.2f} s (worst of {len(replies)})",
        "max <= 1 s", max(waits) <= 1.0 and not wrong and not left)  # a /forget that forgot nothing proves nothing
    notes.append(f"/forget: replies {'all «' + TEXTS['forgotten'] + '»' if not wrong else 'WRONG: ' + repr(wrong[0])}; "
                 f"forgotten rows left in leads.csv: {len(left)}; rows now {rows:,}")


# --- 4. Overhead ------------------------------------------------------------------------------------------------


def bot_round(tg, first_chat):
    """Seconds per dialog for OVERHEAD_DIALOGS dialogs through the bot, one after another."""
    run = Clients(tg, range(first_chat, first_chat + OVERHEAD_DIALOGS), one_at_a_time=True)
    if not run.run(60):
        raise RuntimeError(f"the bot finished {len(run.done)}/{OVERHEAD_DIALOGS} dialogs in 60 s")
    return (max(run.done.values()) - run.started) / OVERHEAD_DIALOGS


def floor_script(tg, llm, call_start, llm_start, chat):
    """The HTTP calls of a recorded round as one dialog's calls per step: every call the bot made to `chat`,
    split at the message that completes each step, its LLM requests at the recommendation's step, and the
    round's getUpdates calls per dialog (one per step, the rest at the end). Also the calls per dialog."""
    window = tg.calls_since(call_start)
    requests_made = llm.requests[llm_start:]
    per_dialog = {"chat/completions": len(requests_made) / OVERHEAD_DIALOGS}
    for method, _params in window:
        per_dialog[method] = per_dialog.get(method, 0) + 1 / OVERHEAD_DIALOGS
    script, step = [[("getUpdates", None)] for _ in STEPS], 0
    for method, params in window:
        if method == "getUpdates" or str(params.get("chat_id")) != str(chat):
            continue
        script[min(step, len(STEPS) - 1)].append((method, params))
        if method == "sendMessage" and step < len(STEPS) and completes(step, str(params.get("text"))):
            step += 1
    llm_calls = round(per_dialog["chat/completions"])
    script[OFFER_STEP][1:1] = [("llm", r["json"]) for r in requests_made[len(requests_made) - llm_calls:]]
    script[-1] += [("getUpdates", None)] * max(0, round(per_dialog["getUpdates"]) - len(STEPS))
    return script, per_dialog


def floor_round(tg, llm, script, first_chat):
    """Seconds per dialog for the script's calls made one after another with one requests.Session."""
    base, session, offset = f"{tg.url}/bot{tg.token}/", requests.Session(), None

    def call(method, params, chat):
        nonlocal offset
        if method == "llm":  # read to the end, streamed or not
            return session.post(llm.url + "/chat/completions", json=params, timeout=30).content
        if method != "getUpdates":
            return session.post(base + method, json={**params, "chat_id": chat}, timeout=30).json()
        updates = session.post(base + method, json={"offset": offset, "timeout": 0, "allowed_updates": ["message"]},
                               timeout=30).json()["result"]
        offset = updates[-1]["update_id"] + 1 if updates else offset

    call("getUpdates", None, None)
    started = time.perf_counter()
    for chat in range(first_chat, first_chat + OVERHEAD_DIALOGS):
        for text, calls in zip(STEPS, script):
            tg.send_text(chat, text)
            for method, params in calls:
                call(method, params, chat)
    spent = (time.perf_counter() - started) / OVERHEAD_DIALOGS
    session.close()
    return spent


def overhead(bench):
    """Best seconds per dialog through the bot and for the floor, and the bot's HTTP calls per dialog. Bot and
    floor rounds take turns, the floor against its own fakes, so that other work on the machine hits both alike."""
    with fakes() as (tg, llm), fakes() as (floor_tg, floor_llm):
        with bench.bot(bench.folder("overhead"), tg, llm):
            Clients(tg, range(40_000_001, 40_000_004), one_at_a_time=True).run(30)  # warm-up
            call_start, llm_start = tg.call_count(), len(llm.requests)
            bot_round(tg, 40_001_000)
            script, per_dialog = floor_script(tg, llm, call_start, llm_start, 40_001_000 + OVERHEAD_DIALOGS - 1)
            bot_s, floor_s = [], []
            for number in range(OVERHEAD_ROUNDS):
                bot_s.append(bot_round(tg, 40_002_000 + 1000 * number))
                floor_s.append(floor_round(floor_tg, floor_llm, script, 40_002_000 + 1000 * number))
    made = {}
    for calls in script:
        for method, _params in calls:
            method = "chat/completions" if method == "llm" else method
            made[method] = made.get(method, 0) + 1
    return min(bot_s), min(floor_s), per_dialog, made


def overhead_rows(bench, row, notes):
    bot_s, floor_s, per_dialog, made = overhead(bench)
    row("4 overhead: dialogs/s through the bot vs the floor (instant LLM)",
        f"{1 / bot_s:.1f} vs {1 / floor_s:.1f} dialogs/s: the bot takes {bot_s / floor_s:.2f}x the floor's time",
        "report", None)
    notes.append("overhead: HTTP calls per dialog by the bot: " +
                 ", ".join(f"{n:.2f} {m}" for m, n in sorted(per_dialog.items())) +
                 f" ({len(STEPS)} getUpdates would do: one per client message)")
    off = {m: f"{made.get(m, 0)} vs {n:.2f}" for m, n in per_dialog.items() if abs(made.get(m, 0) - n) > 0.5}
    if off:
        notes.append(f"overhead: the floor's dialog differs from the bot's average: {off}")


# --- 5. Growth and 6. memory ------------------------------------------------------------------------------------


def lead_save_seconds(bench, sizes, repeats=40):
    """Median seconds of store.Leads.write as the bot calls it (since = position()) for each file size; the files
    take turns, so a busy moment of the disk hits both alike."""
    folder, files = bench.folder("lead-save"), []
    for rows in sizes:
        path = folder / f"leads-{rows}.csv"
        write_leads_csv(path, rows)
        files.append(store.Leads(path, ";"))
    times = [[] for _ in sizes]
    for i in range(repeats):
        for leads, spent in zip(files, times):
            lead = lead_row(BIG + i)
            started = time.perf_counter()
            leads.write(lead, since=leads.position())
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in times]


def one_message(bench, dialogs, chats=40):
    """(median seconds per message, /start and the first answer of new chats, with `dialogs` open dialogs in
    state.jsonl; peak RSS of the bot in MB or None)."""
    folder = bench.folder(f"dialogs-{dialogs}")
    write_open_dialogs(folder / "data", dialogs, 50_000_000)
    with fakes() as (tg, llm):
        with bench.bot(folder, tg, llm) as bot:
            first = 51_000_000 + dialogs
            run = Clients(tg, range(first, first + chats), steps=2, one_at_a_time=True)
            if not run.run(60):
                raise RuntimeError(f"only {len(run.done)}/{chats} chats answered in 60 s")
            rss = peak_rss_mb(bot.proc.pid)
    return statistics.median([w[3] for w in run.waits if w[0] >= first + 5]), rss  # the first five warm up


def growth_rows(bench, row, notes):
    small, large = lead_save_seconds(bench, (10, BIG))
    row(f"5 growth: save one lead, 10 -> {BIG:,} rows in leads.csv",
        f"{small * 1000:.1f} ms -> {large * 1000:.1f} ms ({large / small:.2f}x)", "flat: <= 1.5x", large / small <= 1.5)
    (small, small_rss), (large, rss) = one_message(bench, 10), one_message(bench, MANY)
    row(f"5 growth: one message, 10 -> {MANY:,} open dialogs",
        f"{small * 1000:.1f} ms -> {large * 1000:.1f} ms ({large / small:.2f}x)", "flat: <= 1.5x", large / small <= 1.5)
    if rss is None:
        row(f"6 memory: peak RSS with {MANY:,} open dialogs", "not measured: no /proc on this system", "report", None)
    else:
        row(f"6 memory: peak RSS with {MANY:,} open dialogs",
            f"{rss:.0f} MB (with 10 dialogs: {small_rss:.0f} MB)", "report", None)


# --- 7. Shutdown ------------------------------------------------------------------------------------------------


def shutdown(bench):
    """(seconds from SIGTERM to exit, exit code) while the bot waits in its long poll (POLL_TIMEOUT default)."""
    with fakes() as (tg, llm):
        with bench.bot(bench.folder("shutdown"), tg, llm) as bot:
            time.sleep(0.5)  # the first getUpdates came; nothing to answer: the fake holds it
            if tg._updates:
                raise RuntimeError("updates are pending: the bot is not waiting in a long poll")
            started = time.monotonic()
            bot.terminate()
            code = bot.wait(30)
            return time.monotonic() - started, code


def shutdown_row(bench, row, notes):
    seconds, code = shutdown(bench)
    row("7 shutdown: SIGTERM during the long poll", f"exit code {code} after {seconds:.2f} s", "<= 2 s, exit code 0",
        code == 0 and seconds <= 2)


# --- 8. Lanes ------------------------------------------------------------------------------------------------


RETRY_AFTER = 20  # seconds: what Telegram asks of a chat under flood control


def lanes(bench, others=20):
    """One chat's greeting gets 429 retry_after=RETRY_AFTER; once refused, `others` new chats go through the
    whole dialog at once. Returns their Clients, the waiting chat's texts, and seconds from its 429 to its
    retry and to its last reply."""
    slow = 50_000_001
    with fakes() as (tg, llm):
        tg.fail_chat(slow, "sendMessage", 429, f"Too Many Requests: retry after {RETRY_AFTER}",
                     {"retry_after": RETRY_AFTER})
        with bench.bot(bench.folder("lanes"), tg, llm):
            tg.send_text(slow, "/start")
            wait_until(lambda: tg.calls("sendMessage"), 10, TICK, "no greeting tried")
            run = Clients(tg, range(50_000_101, 50_000_101 + others))
            run.run(RETRY_AFTER - 5)
            wait_until(lambda: len(tg.texts(slow)) >= 2, RETRY_AFTER + 10, TICK, "the waiting chat's replies")
            with tg._cond:
                tries = [at for at, what, method, chat in tg._timeline
                         if (what, method, chat) == ("in", "sendMessage", str(slow))]
                last = max(at for at, chat, _ in tg.sent_log if chat == slow)
    return run, tg.texts(slow), tries[1] - tries[0], last - tries[0]


def lanes_rows(bench, row, notes):
    run, texts, retried, replied = lanes(bench)
    waits, finished = run.all_waits(), len(run.done) == len(run.chats)
    p95 = percentile(waits, 95)
    row(f"8 lanes: {len(run.chats)} clients while one chat waits out 429 retry_after={RETRY_AFTER}",
        f"others' reply p50 {percentile(waits, 50):.3f} s, p95 {p95:.3f} s, max {max(waits):.3f} s "
        f"({len(waits)} messages)" + ("" if finished else "; NOT every dialog ended"),
        "p95 <= 1 s", finished and p95 <= 1.0)
    notes.append(f"lanes: the 429 chat's retry came {retried:.1f} s after its 429, its last reply after "
                 f"{replied:.1f} s; it read {len(texts)} messages, in order: "
                 f"{texts[:2] == [TEXTS['greeting'].replace('{name}', ', Иван'), QUESTIONS[0][1]]}")


def measured_program():
    """Which program the snapshot is: the commit, and the program's files with changes not committed."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout
    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--", *APP_FILES).splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return "the program in " + str(REPO)
    return f"commit {head}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


# --- The table -------------------------------------------------------------------------------------------------


SECTIONS = {"burst": ("1 burst", burst_rows, "p95 <= 1.2 s"),
            "streaming": ("2 streaming", streaming_rows, "<= TTFT + 0.3 s"),
            "forget": ("3 /forget", forget_rows, "max <= 1 s"),
            "overhead": ("4 overhead", overhead_rows, "report"),
            "growth": ("5 growth, 6 memory", growth_rows, "flat: <= 1.5x"),
            "shutdown": ("7 shutdown", shutdown_row, "<= 2 s, exit code 0"),
            "lanes": ("8 lanes", lanes_rows, "p95 <= 1 s")}


def main(names):
    """Runs the sections named (all without names) and prints the table."""
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        print(f"unknown section {unknown[0]!r}; the sections are: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    began, rows, notes = time.monotonic(), [], []
    assert len(ANSWERS) == len(QUESTIONS), "ANSWERS must answer every question of prompt.txt"
    assert COLUMNS == store.COLUMNS, f"leads.csv columns changed: {store.COLUMNS}"

    def row(figure, measured, target, met):
        rows.append((figure, measured, target, "report" if met is None else "PASS" if met else "FAIL"))
        print(f"  {figure}: {measured}", file=sys.stderr, flush=True)

    bench, program = Bench(), measured_program()
    try:
        for name, section, target in (SECTIONS[key] for key in names or SECTIONS):
            try:
                section(bench, row, notes)
            except Exception as e:  # noqa: BLE001 - one broken figure must not hide the others
                row(name, f"not measured: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200],
                    target, False)
                notes.append(f"{name} failed:\n" + traceback.format_exc().rstrip())
    finally:
        bench.close()
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
               f"{platform.python_version()}, {datetime.now(timezone.utc):%Y-%m-%d}")
    notes.append(f"measured: a snapshot of {program}")
    notes.append(f"default settings; LLM {LLM_SECONDS:g} s per call in the bursts, instant elsewhere; streaming: "
                 f"{TTFT_DELAY:g} s before the answer starts, then {CHUNK_GAP:g} s between chunks; {machine}; "
                 f"the benchmark took {time.monotonic() - began:.0f} s")
    print_table(rows, notes)
    return 0


def print_table(rows, notes):
    header = ("figure", "measured", "target", "result")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

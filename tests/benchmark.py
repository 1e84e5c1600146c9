"""How fast leadbot is, against the local fake Telegram and LLM of the end-to-end tests.

    python tests/benchmark.py

Not a test (pytest does not collect it): it prints one table, each figure next to its target.
  1. overhead  full dialogs/s through the real bot with an instant LLM, against the floor: the same
               HTTP calls (counted from the fakes' records) made directly with one requests.Session
  2. growth    saving one lead with 10 vs 100,000 rows in leads.csv; one message with 10 vs 10,000
               open dialogs
  3. memory    peak RSS of the bot with 10,000 open dialogs
  4. burst     50 new chats send /start at once and go through the whole dialog while the LLM takes
               1 s per call, with WORKERS=1 and 8; and the target: 20 clients, WORKERS=8 -> p95 reply
               under 3 s. A WORKERS=1 run is stopped at a time cap (it would take minutes).
Clients answer the moment a reply is complete (no reading or typing time): the hardest case.
"""
import csv
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from itertools import accumulate
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakes import ANSWERS, REPO, FakeLLM, FakeTelegram, start_bot, wait_until  # noqa: E402

sys.path.insert(0, str(REPO))
import store  # noqa: E402

STEPS = ["/start", *ANSWERS, "+7 999 123-45-67"]  # what each client writes, in order
REPLIES = [2, 1, 1, 2, 1]  # messages the bot sends for each step
DONE_AFTER = list(accumulate(REPLIES))  # messages a chat has once a step is answered
OVERHEAD_DIALOGS = 20  # per round
ROUNDS = 5
ROUND_TRIPS = 40
BURSTS = [  # WORKERS, clients, stop after seconds, p95 target in seconds
    (1, 50, 20, None),
    (8, 50, 60, None),
    (8, 20, 60, 3),
    (1, 20, 12, None),  # the sequential loop, for comparison with the line above
]
LLM_SECONDS = 1.0


class TimedTelegram(FakeTelegram):
    """FakeTelegram that timestamps every message the bot sends and wakes a waiting driver at once."""

    def __init__(self):
        self.arrivals = []  # (time.monotonic(), chat_id) per message sent
        super().__init__()

    def _send_message(self, params):
        result = super()._send_message(params)
        with self._cond:
            self.arrivals.append((time.monotonic(), int(params["chat_id"])))
            self._cond.notify_all()
        return result

    def all_calls(self):
        with self._cond:
            return list(self._calls)


class Fakes:
    def __init__(self):
        self.telegram, self.llm = TimedTelegram(), FakeLLM()
        self.dir = Path(tempfile.mkdtemp(prefix="leadbot-bench-"))

    def start_bot(self, name, **settings):
        data = self.dir / name
        data.mkdir(exist_ok=True)
        env = {"TELEGRAM_BOT_TOKEN": self.telegram.token, "TELEGRAM_API_URL": self.telegram.url,
               "LLM_BASE_URL": self.llm.url, "LLM_MODEL": "bench", "LLM_TIMEOUT": "30",
               "DATA_DIR": str(data / "data"), **{k: str(v) for k, v in settings.items()}}
        polls = len(self.telegram.calls("getUpdates"))
        bot = start_bot(env, cwd=data)
        wait_until(lambda: len(self.telegram.calls("getUpdates")) > polls or not bot.alive(), 60)
        if not bot.alive():
            raise SystemExit(f"the bot did not start:\n{bot.output()[-3000:]}")
        return bot

    def stop(self):
        self.telegram.stop()
        self.llm.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def stop_bot(bot):
    bot.terminate()
    try:
        bot.wait(15)
    except AssertionError:
        bot.kill()
        bot.wait()


# --- Clients ----------------------------------------------------------------------------------------

class Burst:
    """Clients going through the whole dialog at once; each writes the moment its reply is complete."""

    def __init__(self, telegram, chats, steps=len(STEPS)):
        self.telegram, self.chats, self.steps = telegram, list(chats), steps
        self.step = dict.fromkeys(self.chats, 0)
        self.got = dict.fromkeys(self.chats, 0)
        self.sent_at, self.greeted, self.latencies, self.done_at = {}, {}, [], {}
        self.answered = set()  # chats whose current message has its first reply

    def run(self, cap=60):
        """Returns the seconds it took; stops at cap seconds with dialogs unfinished."""
        tg = self.telegram
        with tg._cond:
            seen = len(tg.arrivals)
            self.started = time.monotonic()
            for chat in self.chats:  # one lock: the bot finds them all in one getUpdates
                self.write(chat)
        deadline = self.started + cap
        pending = set(self.chats)
        while pending and time.monotonic() < deadline:
            with tg._cond:
                tg._cond.wait_for(lambda: len(tg.arrivals) > seen, max(0, deadline - time.monotonic()))
                new, seen = tg.arrivals[seen:], len(tg.arrivals)
            for at, chat in new:
                if chat in self.step and self.take_reply(chat, at):
                    pending.discard(chat)
        self.stopped = min(time.monotonic(), deadline)
        return self.stopped - self.started

    def write(self, chat):
        self.sent_at[chat] = time.monotonic()
        self.answered.discard(chat)
        self.telegram.send_text(chat, STEPS[self.step[chat]])

    def take_reply(self, chat, at):
        """Counts one message to chat; True when the chat's dialog is over."""
        self.got[chat] += 1
        if chat not in self.answered:
            self.answered.add(chat)
            self.latencies.append(at - self.sent_at[chat])
            if self.step[chat] == 0:
                self.greeted[chat] = at - self.started
        if self.got[chat] < DONE_AFTER[self.step[chat]]:
            return False
        self.step[chat] += 1
        if self.step[chat] == self.steps:
            self.done_at[chat] = at - self.started
            return True
        self.write(chat)
        return False

    def waits(self):
        """Seconds from each message to its first reply; a message still unanswered counts its wait so far."""
        return self.latencies + [self.stopped - self.sent_at[c] for c in self.chats
                                 if c not in self.answered and self.step[c] < self.steps]

    def finished(self):
        return len(self.done_at)


def p95(values):
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


# --- 1. Overhead ----------------------------------------------------------------------------------

def overhead(fakes):
    """Seconds per dialog through the bot and for the floor (best round of each), and one dialog's calls.

    Bot and floor rounds take turns, the floor against its own pair of fakes, so that other work on
    the machine slows both alike."""
    tg, llm = fakes.telegram, fakes.llm
    llm.delay = 0
    bot = fakes.start_bot("overhead")
    for chat in range(1000, 1003):  # warm-up: imports, connections, first file writes
        Burst(tg, [chat]).run()
    calls_before, llm_before = len(tg.all_calls()), len(llm.requests)
    bot_round(tg, 2000)
    script, counts = floor_script(tg.all_calls()[calls_before:], llm.requests[llm_before:],
                                  2000 + OVERHEAD_DIALOGS - 1, OVERHEAD_DIALOGS)
    floor_fakes = Fakes()
    try:
        rounds = [(bot_round(tg, first), floor(floor_fakes, script, first))
                  for first in range(3000, 3000 + ROUNDS * 1000, 1000)]
    finally:
        floor_fakes.stop()
        stop_bot(bot)
    return min(r[0] for r in rounds), min(r[1] for r in rounds), counts


def bot_round(tg, first_chat):
    """Seconds per dialog for OVERHEAD_DIALOGS dialogs through the bot, one after another."""
    started = time.perf_counter()
    for chat in range(first_chat, first_chat + OVERHEAD_DIALOGS):
        Burst(tg, [chat]).run()
    return (time.perf_counter() - started) / OVERHEAD_DIALOGS


def floor_script(window, llm_window, chat, dialogs):
    """The calls of one dialog per step, rebuilt from the records, and the calls per dialog."""
    counts = {}
    for method, _params in window:
        counts[method] = counts.get(method, 0) + 1
    counts["chat/completions"] = len(llm_window)
    counts = {method: n / dialogs for method, n in counts.items()}
    own = iter([(m, p) for m, p in window if m != "getUpdates" and str(p.get("chat_id")) == str(chat)])
    script = [[("getUpdates", 25)] for _ in STEPS]  # the long poll returns at once: an update waits
    for step, replies in enumerate(REPLIES):
        for method, params in own:  # typing goes with the message it comes before
            script[step].append((method, params))
            replies -= method == "sendMessage"
            if not replies:
                break
    offer_step = script[STEPS.index(ANSWERS[-1])]
    offer_step[1:1] = [("llm", r["json"]) for r in llm_window[-round(counts["chat/completions"]):]]
    script[-1] += [("getUpdates", 0)] * (round(counts["getUpdates"]) - len(STEPS))
    made = {}
    for method, _params in (call for step in script for call in step):
        made[method] = made.get(method, 0) + 1
    made["chat/completions"] = made.pop("llm")
    if any(abs(made.get(method, 0) - n) > 0.5 for method, n in counts.items()):
        raise SystemExit(f"cannot rebuild one dialog's calls: the bot made {counts}, the floor {made}")
    return script, counts


def floor(fakes, script, first_chat):
    """Seconds per dialog for the same HTTP calls made in a plain loop with one requests.Session."""
    tg, llm = fakes.telegram, fakes.llm
    base = f"{tg.url}/bot{tg.token}/"
    session = requests.Session()
    offset = None

    def call(method, params, chat):
        nonlocal offset
        if method == "llm":
            return session.post(llm.url + "/chat/completions", json=params, timeout=30).json()
        if method != "getUpdates":
            return session.post(base + method, json={**params, "chat_id": chat}, timeout=30).json()
        updates = session.post(base + method, json={"offset": offset, "timeout": params,
                                                    "allowed_updates": ["message"]}, timeout=40).json()["result"]
        offset = updates[-1]["update_id"] + 1 if updates else offset

    call("getUpdates", 0, None)  # confirms whatever the bot left
    started = time.perf_counter()
    for chat in range(first_chat, first_chat + OVERHEAD_DIALOGS):
        for text, calls in zip(STEPS, script):
            tg.send_text(chat, text)
            for method, params in calls:
                call(method, params, chat)
    return (time.perf_counter() - started) / OVERHEAD_DIALOGS


# --- 2. Growth and 3. memory ------------------------------------------------------------------------

def lead(i):
    return {"timestamp": f"2026-11-24T12:{i // 60 % 60:02d}:{i % 60:02d}+00:00", "chat_id": 500000 + i,
            "client_name": "Иван", "contact": "+7 999 123-45-67", "intent": "Сайт для пекарни",
            "notes": "Задача: сайт с онлайн-заказом; Сроки: месяц; Бюджет: 50–200 тыс. ₽",
            "source": "telegram", "status": "new"}


def lead_save_seconds(directory, sizes, repeats=40):
    """Median seconds for one lead through the bot's path (lead_exists, then append_lead) per file size;
    the files take turns, so a busy moment of the disk hits both alike."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(store.neutralise(str(v)) for v in lead(0).values())
    paths = [Path(directory) / f"leads-{rows}.csv" for rows in sizes]
    for path, rows in zip(paths, sizes):
        with open(path, "wb") as f:
            f.write(store.BOM + (",".join(store.COLUMNS) + "\r\n").encode())
            f.write(buffer.getvalue().encode() * rows)
    times = [[] for _ in sizes]
    for i in range(1, repeats + 1):
        row = lead(i)
        for path, spent in zip(paths, times):
            started = time.perf_counter()
            if not store.lead_exists(path, row["chat_id"], row["timestamp"]):
                store.append_lead(path, row)
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in times]


def prefill_dialogs(data, n):
    """state.jsonl with n open dialogs, half of them waiting for a contact after the offer."""
    data.mkdir(parents=True, exist_ok=True)
    now = time.time()
    with open(data / "state.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            answers = {"task": f"Нужен сайт для пекарни №{i} с онлайн-заказом и доставкой"}
            stage, offer = "qualifying", ""
            if i % 2:
                answers.update(timeline="В течение месяца", budget="50–200 тыс. ₽")
                stage, offer = "collecting_contact", "Рекомендуем услугу «Лендинг под ключ»: это быстрый старт."
            dialog = {"stage": stage, "answers": answers, "last_llm_suggestion": offer,
                      "started_at": "2026-11-24T10:00:00+00:00", "updated_at": now, "name": "Иван",
                      "last_update_id": 1000 + i}
            f.write(json.dumps({"chat": 10_000_000 + i, "dialog": dialog}) + "\n")


def open_dialogs(fakes, n):
    """(median seconds per message for /start and the first answer in a new chat, peak RSS in MB or None)."""
    fakes.llm.delay = 0
    prefill_dialogs(fakes.dir / f"dialogs-{n}" / "data", n)
    bot = fakes.start_bot(f"dialogs-{n}")
    times = []
    for chat in range(20_000_000 + n, 20_000_000 + n + ROUND_TRIPS):
        burst = Burst(fakes.telegram, [chat], steps=2)  # two messages: the first one's state is saved
        times.append(burst.run() / 2)
    del times[:5]  # warm-up
    rss = peak_rss_mb(bot.proc.pid)
    stop_bot(bot)
    return statistics.median(times), rss


def peak_rss_mb(pid):
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kilobytes = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kilobytes / 1024


# --- 4. Burst ------------------------------------------------------------------------------------------

def burst(fakes, workers, clients, cap):
    """The finished Burst, and whether the bot's log suggested raising WORKERS."""
    fakes.llm.delay = LLM_SECONDS
    bot = fakes.start_bot(f"burst-{workers}-{clients}", WORKERS=workers)
    first = 30_000_000 + 1000 * workers + clients * 100_000
    run = Burst(fakes.telegram, range(first, first + clients))
    run.run(cap)
    stop_bot(bot)
    return run, "consider raising WORKERS" in bot.output()


def describe(run, cap):
    waits = run.waits()
    clients = len(run.chats)
    greeted = f"{max(run.greeted.values()):.1f} s" if len(run.greeted) == clients else \
        f"{len(run.greeted)}/{clients} greeted"
    stopped = run.finished() < clients
    text = (f"all greeted {greeted}; reply p50 {statistics.median(waits):.1f} s, "
            f"p95 {'>= ' if stopped else ''}{p95(waits):.1f} s")
    if stopped:
        return text + f"; stopped at {cap} s, {run.finished()}/{clients} dialogs done"
    return text + f"; all done {max(run.done_at.values()):.1f} s"


# --- 5. Shutdown ---------------------------------------------------------------------------------------

def shutdown_seconds(fakes):
    """Seconds from SIGTERM to exit while the bot sits in a 25-second long poll."""
    bot = fakes.start_bot("shutdown", POLL_TIMEOUT=25)
    time.sleep(0.3)  # into the blocking read of the long poll
    started = time.monotonic()
    bot.terminate()
    code = bot.wait(30)
    return time.monotonic() - started, code


# --- The table ----------------------------------------------------------------------------------------

def ms(seconds):
    return f"{seconds * 1000:.1f} ms"


def main():
    began = time.monotonic()
    fakes = Fakes()
    rows, notes = [], []

    def row(figure, measured, target, met):
        rows.append((figure, measured, target, "-" if met is None else "yes" if met else "NO"))
        print(f"  {figure}: {measured}", file=sys.stderr, flush=True)

    try:
        bot_s, floor_s, counts = overhead(fakes)
        ratio = bot_s / floor_s
        row("1 overhead: bot / floor time per dialog",
            f"{ratio:.2f}x ({1 / bot_s:.0f} vs {1 / floor_s:.0f} dialogs/s)", "<= 1.3x", ratio <= 1.3)
        notes.append("one dialog = " + ", ".join(f"{n:g} {m}" for m, n in sorted(counts.items())))

        small, large = lead_save_seconds(fakes.dir, (10, 100_000))
        row("2 growth: save one lead, 10 -> 100,000 rows", f"{ms(small)} -> {ms(large)} ({large / small:.2f}x)",
            "<= 1.5x", large / small <= 1.5)
        (small, _), (large, rss) = open_dialogs(fakes, 10), open_dialogs(fakes, 10_000)
        row("2 growth: one message, 10 -> 10,000 dialogs", f"{ms(small)} -> {ms(large)} ({large / small:.2f}x)",
            "<= 1.5x", large / small <= 1.5)
        row("3 memory: peak RSS, 10,000 dialogs", "n/a (no /proc)" if rss is None else f"{rss:.0f} MB",
            "< 100 MB", rss is not None and rss < 100)

        suggested = []
        for workers, clients, cap, target in BURSTS:
            run, hint = burst(fakes, workers, clients, cap)
            if hint:
                suggested.append(f"WORKERS={workers}, {clients} clients")
            met = p95(run.waits()) < target and run.finished() == clients if target else None
            row(f"4 burst: {clients} {'new chats' if clients == 50 else 'clients at once'}, WORKERS={workers}",
                describe(run, cap), f"p95 < {target:g} s" if target else "(reported)", met)
        seconds, code = shutdown_seconds(fakes)
        row("5 shutdown: SIGTERM in a 25 s long poll", f"exit {code} after {seconds:.2f} s", "exit 0 < 2 s",
            code == 0 and seconds < 2)
        notes.append("a run stopped at its cap counts each unanswered message with the time it had waited, "
                     "so its p50/p95 are lower bounds")
        notes.append("the bot's log suggested raising WORKERS in: " + ("; ".join(suggested) or "no run"))
    finally:
        fakes.stop()

    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
               f"{platform.python_version()}, {datetime.now(timezone.utc):%Y-%m-%d}")
    print_table(rows, notes + [f"LLM {LLM_SECONDS:g} s per call in the burst; {machine}; "
                               f"benchmark took {time.monotonic() - began:.0f} s"])


def print_table(rows, notes):
    header = ("figure", "measured", "target", "met")
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
    main()

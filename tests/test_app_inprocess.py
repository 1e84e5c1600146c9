"""The dispatcher and the loop driven in-process, with a recording stand-in for Telegram."""
import threading
import time

import pytest

import leadbot
from fakes import QUESTIONS, TEXTS, wait_until


class Recorder:
    """Telegram as the bot sees it: send(), call() and typing(); getUpdates hangs like a long poll."""

    def __init__(self):
        self.sent, self.stopping, self.release = [], threading.Event(), threading.Event()

    def send(self, chat_id, text, texts=None, **markup):
        self.sent.append(text)

    def call(self, method, http_timeout=None, **params):
        if method == "getUpdates":
            self.release.wait(30)
            return []
        return True

    def typing(self, chat_id, until):
        pass


def make_bot(tmp_path, **settings):
    cfg = leadbot.read_config({"DATA_DIR": str(tmp_path / "data"), **settings}, telegram=False)
    return leadbot.Bot(cfg, Recorder(), "telegram")


def say(bot, text, update_id=None):
    leadbot.handle(bot, leadbot.Incoming(chat_id=7, text=text, update_id=update_id))
    leadbot.flush(bot)  # as the loop does after each batch: the dialog is saved with its replies, the lanes send
    handed_on(bot)
    return bot.out.sent[-1]


def handed_on(bot):
    """What the lanes sent and what an LLM job answered, as the loop would hand it on, until the lanes are idle."""
    while wait_until(bot.lanes.idle, 5) and not bot.inbox.empty():
        leadbot.handle_event(bot, bot.inbox.get())
        leadbot.flush(bot)


def settle(bot):
    wait_until(lambda: not bot.journal.dialogs[7]["busy"] or not bot.inbox.empty(), 5)
    while not bot.inbox.empty() or bot.journal.dialogs[7]["busy"]:
        leadbot.handle_event(bot, bot.inbox.get(timeout=5))
        leadbot.flush(bot)
    handed_on(bot)


def test_a_returning_client_is_reminded_and_asked_the_open_question_again(tmp_path):
    bot = make_bot(tmp_path)
    say(bot, "/start")
    assert say(bot, "Сайт для кафе") == QUESTIONS[1][1]
    bot.journal.dialogs[7]["updated_at"] -= leadbot.RETURN_AFTER + 1  # the client went away for a while
    before = len(bot.out.sent)
    assert say(bot, "Привет, я вернулся") == QUESTIONS[1][1]
    assert bot.out.sent[before] == TEXTS["returning"]
    assert bot.journal.dialogs[7]["stage"] == "qualifying" and len(bot.journal.dialogs[7]["answers"]) == 1


def test_a_redelivered_update_is_not_handled_twice(tmp_path):
    bot = make_bot(tmp_path)
    say(bot, "/start", update_id=1)
    say(bot, "Сайт для кафе", update_id=2)
    sent = len(bot.out.sent)
    leadbot.handle(bot, leadbot.Incoming(chat_id=7, text="Сайт для кафе", update_id=2))
    handed_on(bot)
    assert len(bot.out.sent) == sent and len(bot.journal.dialogs[7]["answers"]) == 1


def test_without_an_llm_the_offer_says_the_manager_will_choose_and_the_contact_is_asked(tmp_path):
    bot = make_bot(tmp_path)
    for text in ["/start", "Сайт", "3", "Пока не знаю"]:
        say(bot, text)
    settle(bot)
    assert TEXTS["no_llm"] in bot.out.sent and TEXTS["llm_failed"] not in bot.out.sent
    assert bot.journal.dialogs[7]["stage"] == "collecting_contact"
    assert bot.journal.dialogs[7]["answers"][1] == QUESTIONS[1][2][2]  # «3» is the third button


def test_a_contact_typed_into_an_answer_is_not_sent_to_the_llm(tmp_path, monkeypatch):
    bot = make_bot(tmp_path, LLM_BASE_URL="http://127.0.0.1:9/v1", LLM_MODEL="m")
    asked = []
    monkeypatch.setattr(leadbot.llm, "complete", lambda cfg, system, user, **kw: asked.append(user) or "Совет\nСуть")
    for text in ["/start", "Сайт, звоните +7 999 123-45-67", "Не срочно", "пишите на ivan@example.ru"]:
        say(bot, text)
    settle(bot)
    assert len(asked) == 2  # the offer and the manager's notes
    assert all("123-45-67" not in user and "ivan@example.ru" not in user for user in asked)


def test_a_stop_ends_the_loop_at_once_on_every_os_while_the_long_poll_still_hangs(tmp_path):
    bot = make_bot(tmp_path)
    loop = threading.Thread(target=leadbot.run, args=(bot,), daemon=True)
    loop.start()
    time.sleep(0.1)
    bot.stopping.set()  # what the Ctrl+C / SIGTERM handler does
    loop.join(2)
    assert not loop.is_alive() and not bot.out.release.is_set()  # the poll was abandoned, not waited for
    bot.out.release.set()


@pytest.mark.parametrize("args", [[], ["--check"], ["--console"]])
def test_an_env_file_the_bot_may_not_read_gives_one_line_and_exit_2(monkeypatch, capsys, args):
    read_text = leadbot.Path.read_text

    def unreadable(path, *args, **kwargs):  # chmod 600 by another user; as root this cannot be made for real
        if path.name == ".env":
            raise PermissionError(13, "Permission denied")
        return read_text(path, *args, **kwargs)
    monkeypatch.setattr(leadbot.Path, "read_text", unreadable)
    assert leadbot.main(args) == (1 if args == ["--check"] else 2)  # --check: 1 = a check failed
    out = capsys.readouterr()
    lines = (out.out if args == ["--check"] else out.err).strip().splitlines()
    assert ".env не читается (PermissionError)" in lines[0] and "chown" in lines[0]
    assert len(lines) == (2 if args == ["--check"] else 1)  # --check adds what to run next


def test_a_lead_forgotten_while_leads_csv_is_held_gets_no_row_and_the_client_hears_after(tmp_path):
    bot = make_bot(tmp_path)
    leads = bot.cfg.data_dir / "leads.csv"
    leads.mkdir(parents=True)  # the row cannot be written now (Excel holds the file)
    for text in ["/start", "Сайт", "3", "Пока не знаю"]:
        say(bot, text)
    settle(bot)
    assert say(bot, "+7 999 123-45-67", update_id=5) == TEXTS["thanks_saved"]  # committed in the ledger
    assert not leadbot.deliver_now(bot, "csv")  # the csv channel holds it, the lead is not lost
    before = len(bot.out.sent)
    say(bot, "/forget")
    assert bot.out.sent[before:] == []  # no «удалены» while the lead is still on its way to leads.csv
    leads.rmdir()
    assert leadbot.deliver_now(bot, "csv")  # reaches the forgotten lead: skipped, then the /forget
    handed_on(bot)
    assert bot.out.sent[-1] == TEXTS["forgotten"]
    assert not leads.exists() or b"123-45-67" not in leads.read_bytes()
    assert b"123-45-67" not in (bot.cfg.data_dir / "ledger.jsonl").read_bytes()

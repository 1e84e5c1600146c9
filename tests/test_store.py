"""store: the DATA_DIR lock and --check, the dialog journal, the outbox and the funnel.
leads.csv is tested in test_leads_units.py."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import store
from store import Funnel, Journal, Outbox, StoreError, check, open_data_dir, stats

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time, store
handle = store.open_data_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""
TRY = """
import sys, store
try:
    store.open_data_dir(sys.argv[1])
except store.StoreError as e:
    print(e)
    sys.exit(3)
print("locked")
"""
root_only = pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root may write anywhere")


def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def python(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def cfg(data_dir, delimiter=";"):
    return types.SimpleNamespace(data_dir=data_dir, csv_delimiter=delimiter)


# --- DATA_DIR -----------------------------------------------------------------------------------

def test_open_data_dir_creates_the_folder_with_its_parents(tmp_path):
    data = tmp_path / "a" / "b" / "data"
    handle = open_data_dir(data)
    assert data.is_dir() and (data / ".lock").exists()
    assert [p.name for p in data.iterdir()] == [".lock"]  # the write probe is gone
    handle.close()


def test_a_second_copy_is_refused_until_the_first_is_killed(tmp_path):
    data = tmp_path / "data"
    holder = python(HOLD, data)
    try:
        assert holder.stdout.readline() == "locked\n"
        message = f"на DATA_DIR {data} уже работает другая копия leadbot — сначала остановите её"
        with pytest.raises(StoreError) as error:
            open_data_dir(data)
        assert str(error.value) == message
        second = python(TRY, data)
        assert second.communicate(timeout=30) == (message + "\n", None) and second.returncode == 3
        assert check(cfg(data))[1].endswith("бот работает с этой папкой")
    finally:
        holder.send_signal(signal.SIGKILL if os.name != "nt" else signal.SIGTERM)
        holder.wait(timeout=30)
    assert (data / ".lock").exists()  # a stale file, yet no stale lock
    third = python(TRY, data)
    assert third.communicate(timeout=30)[0] == "locked\n"
    open_data_dir(data).close()


@pytest.mark.skipif(os.name == "nt", reason="Windows does not let an open file be deleted")
def test_a_deleted_lock_file_is_taken_again_or_names_the_copy_that_took_it(tmp_path):
    data = tmp_path / "data"
    handle = open_data_dir(data)
    assert store.relock(data, handle) is handle
    (data / ".lock").unlink()  # the owner cleaning up "junk"
    handle = store.relock(data, handle)  # taken again at the next check
    with pytest.raises(StoreError):
        open_data_dir(data)
    (data / ".lock").unlink()
    holder = python(HOLD, data)  # and a second copy starts before the next check
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(StoreError, match="пока .lock был удалён"):
            store.relock(data, handle)
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.skipif(os.name == "nt", reason="Windows does not let a folder with an open file be renamed")
def test_a_data_dir_renamed_or_deleted_while_the_bot_runs_is_no_reason_to_stop(tmp_path):
    data = tmp_path / "data"
    handle = open_data_dir(data)
    data.rename(tmp_path / "away")
    assert store.relock(data, handle) is handle  # renamed for a moment
    (tmp_path / "away").rename(data)
    assert store.relock(data, handle) is handle
    shutil.rmtree(data)
    assert store.relock(data, handle) is handle  # deleted: nothing to lock until a write makes it again
    data.mkdir()
    handle = store.relock(data, handle)
    with pytest.raises(StoreError):
        open_data_dir(data)
    handle.close()


def test_a_data_dir_that_is_a_file(tmp_path):
    data = tmp_path / "data"
    data.write_text("not a folder")
    with pytest.raises(StoreError) as error:
        open_data_dir(data)
    assert str(error.value) == f"DATA_DIR {data} — это файл, а не папка: укажите в DATA_DIR папку"
    assert check(cfg(data)) == (False, str(error.value))
    assert data.read_text() == "not a folder"


def test_a_data_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError) as error:
        open_data_dir(tmp_path / "file" / "data")
    assert str(error.value).startswith(f"DATA_DIR {tmp_path / 'file' / 'data'}: не удаётся создать папку (")
    assert len(str(error.value).splitlines()) == 1


def test_a_data_dir_that_is_not_writable(tmp_path, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store, "open", read_only, raising=False)
    with pytest.raises(StoreError) as error:
        open_data_dir(tmp_path / "data")
    assert str(error.value).startswith(f"DATA_DIR {tmp_path / 'data'}: папка недоступна для записи (PermissionError) — ")


@root_only
def test_a_read_only_data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o500)
    with pytest.raises(StoreError, match="недоступна для записи"):
        open_data_dir(data)


def test_a_relative_data_dir_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok, text = check(cfg(Path("data")))
    assert ok and text == (f"DATA_DIR: {tmp_path / 'data'} доступна для записи; заявки пишутся в {tmp_path / 'data' / 'leads.csv'}; "
                           "бот на ней сейчас не запущен")


def test_check_neither_keeps_the_lock_nor_touches_leads_csv(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    leads = data / "leads.csv"
    leads.write_bytes(b"timestamp,chat_id,client_name,contact,intent,notes,source,status\r\nx,1,a,b,c,d,e,f")
    assert check(cfg(data))[0] is True
    assert leads.read_bytes().endswith(b"d,e,f")
    open_data_dir(data).close()  # free again


@pytest.mark.parametrize("content, words", [
    (b"name,phone\r\n", "другие столбцы"),
    (b"timestamp;chat_id;client_name;contact;intent;notes;source;status\r\nx;1;\"open", "строки 2 "),
])
def test_check_reports_a_leads_csv_the_bot_would_refuse(tmp_path, content, words):
    (tmp_path / "leads.csv").write_bytes(content)
    ok, text = check(cfg(tmp_path))
    assert ok is False and words in text and str(tmp_path / "leads.csv") in text


def test_check_fails_for_a_leads_csv_the_bot_could_not_add_to(tmp_path, monkeypatch):
    (tmp_path / "leads.csv").write_bytes(b"")
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):  # chmod 444, or another user's file: root writes anyway
        if str(path).endswith("leads.csv") and "a" in mode:
            raise PermissionError(13, "Permission denied")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(store, "open", read_only, raising=False)
    ok, text = check(cfg(tmp_path))
    assert ok is False and "не открывается на запись (PermissionError)" in text
    monkeypatch.undo()
    assert check(cfg(tmp_path))[0] is True  # and the lock was let go


# --- journal ------------------------------------------------------------------------------------

def always(dialog):
    return True


def has_stage(dialog):
    return isinstance(dialog["stage"], str)  # raises KeyError for a dialog without one


@pytest.fixture
def state(tmp_path):
    return tmp_path / "state.jsonl"


def test_journal_keeps_the_last_state_of_each_chat_across_restarts(state):
    journal = Journal(state, always)
    assert journal.dialogs == {}
    dialog = {"stage": "name"}
    journal.save(1, dialog)
    assert journal.dialogs[1] is dialog  # the one copy
    journal.save("console", {"stage": "contact"})
    journal.save(2, {"stage": "x"})
    dialog["name"] = "Ann"
    journal.save(1, dialog)
    journal.save(2, None)
    assert Journal(state, always).dialogs == {1: {"stage": "name", "name": "Ann"}, "console": {"stage": "contact"}}


def test_journal_ignores_a_torn_last_line_and_drops_it_from_the_file(state):
    state.write_text('{"chat": 1, "dialog": {"stage": "a"}}\n{"chat": 1, "dialog": {"sta')
    journal = Journal(state, always)
    assert journal.dialogs == {1: {"stage": "a"}}
    assert state.read_text().endswith("\n")
    journal.save(2, {"stage": "b"})
    assert Journal(state, always).dialogs == {1: {"stage": "a"}, 2: {"stage": "b"}}


def test_journal_sets_malformed_entries_aside_and_loads_the_rest(state, caplog):
    bad = ['[1, 2]', '{"dialog": {"stage": "a"}}', '{"chat": 3, "dialog": "text"}', '{"chat": 4, "dialog": {}}',
           '{"chat": 5, "dialog": {"stage": 7}}', 'not json', '{"chat": [6], "dialog": null}']
    good = ['{"chat": 1, "dialog": {"stage": "a"}}', '{"chat": "console", "dialog": {"stage": "b"}}',
            '{"chat": 9, "dialog": {"stage": "c"}}', '{"chat": 9, "dialog": null}']
    state.write_text("\n".join(good[:2] + bad + good[2:]) + "\n")

    journal = Journal(state, has_stage)

    assert journal.dialogs == {1: {"stage": "a"}, "console": {"stage": "b"}}
    assert (state.parent / "state.jsonl.bad").read_text() == "\n".join(bad) + "\n"
    assert warnings(caplog) == [f"7 malformed entries of state.jsonl were set aside in {state}.bad"]
    caplog.clear()
    assert Journal(state, has_stage).dialogs == journal.dialogs and warnings(caplog) == []


def test_journal_compaction_keeps_the_file_small_and_the_last_state(state):
    journal = Journal(state, always)
    for n in range(1500):
        journal.save(n % 3, {"step": n})
        journal.save(100 + n, {"step": n})
        journal.save(100 + n, None)
    assert len(state.read_text().splitlines()) <= 2 * 3 + 1000
    assert Journal(state, always).dialogs == {0: {"step": 1497}, 1: {"step": 1498}, 2: {"step": 1499}}


def test_a_failed_save_is_retried_by_the_next_one(state, monkeypatch, caplog):
    journal = Journal(state, always)
    journal.save(1, {"stage": "a"})
    real_open, failures = open, []

    def torn_then_full(path, mode="r", *args, **kwargs):
        if not failures:
            failures.append(path)
            with real_open(path, "a") as f:
                f.write('{"chat": 2, "dia')  # half a line reached the disk
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(store, "open", torn_then_full, raising=False)
    journal.save(2, {"stage": "b"})
    assert warnings(caplog) == [f"cannot write {state} (OSError); dialog state is kept in memory"]
    assert journal.dialogs == {1: {"stage": "a"}, 2: {"stage": "b"}}
    journal.save(3, {"stage": "c"})
    assert Journal(state, always).dialogs == {1: {"stage": "a"}, 2: {"stage": "b"}, 3: {"stage": "c"}}
    assert "{" not in str(warnings(caplog))


@root_only
def test_a_read_only_folder_fails_saves_until_it_is_writable_again(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    journal = Journal(folder / "state.jsonl", always)
    folder.chmod(0o500)
    try:
        journal.save(1, {"stage": "a"})
        assert len(warnings(caplog)) == 1 and "cannot write" in caplog.text
    finally:
        folder.chmod(0o700)
    journal.save(2, {"stage": "b"})
    assert len(warnings(caplog)) == 1
    assert Journal(folder / "state.jsonl", always).dialogs == {1: {"stage": "a"}, 2: {"stage": "b"}}


def test_erase_leaves_no_line_with_the_chat(state):
    journal = Journal(state, always)
    journal.save(1, {"name": "SECRET-NAME"})
    journal.save(1, {"name": "SECRET-NAME", "stage": "b"})
    journal.save(2, {"name": "Bob"})
    journal.erase(1)
    assert "SECRET" not in state.read_text() and journal.dialogs == {2: {"name": "Bob"}}
    assert Journal(state, always).dialogs == {2: {"name": "Bob"}}


def test_erase_raises_when_the_file_cannot_be_rewritten(state, monkeypatch):
    journal = Journal(state, always)
    journal.save(1, {"name": "x"})
    monkeypatch.setattr(store.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "locked")))
    with pytest.raises(OSError):
        journal.erase(1)


def test_an_unreadable_journal_is_a_plain_error(state):
    state.mkdir()
    with pytest.raises(StoreError, match="не читается"):
        Journal(state, always)


def test_journal_is_thread_safe(state):
    journal = Journal(state, always)

    def talk(chat):
        for step in range(200):
            journal.save(chat, {"step": step})

    threads = [threading.Thread(target=talk, args=(chat,)) for chat in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Journal(state, always).dialogs == {chat: {"step": 199} for chat in range(6)}


# --- outbox -------------------------------------------------------------------------------------

LEAD = {"timestamp": "2026-11-24T12:00:00+00:00", "chat_id": 42, "client_name": "Anna", "contact": "a@b.c",
        "intent": "sofa", "notes": "", "source": "telegram", "status": "new", "answers": [["Q", "A"]]}


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "outbox"


def lead(chat_id=42):
    return {**LEAD, "chat_id": chat_id}


def get(outbox, lead_id):
    return next((item for item in outbox.items() if item["id"] == lead_id), None)


def test_add_writes_the_item_once(folder):
    outbox = Outbox(folder)
    before = time.time()
    item = outbox.add("42-1", lead(), ["csv", "email"], 120, 7)
    assert item == {"id": "42-1", "chat_id": 42, "lead": lead(), "owed": ["csv", "email"], "since": 120,
                    "update_id": 7, "confirmed": False, "due": item["due"], "attempts": 0}
    assert before <= item["due"] <= time.time()
    assert json.loads((folder / "42-1.json").read_text()) == item

    again = outbox.add("42-1", lead(), ["telegram"], 999, 8)
    assert again == item and get(Outbox(folder), "42-1") == item


def test_items_are_copies_earliest_due_first(folder):
    outbox = Outbox(folder)
    for n, due in enumerate([300.0, 100.0, 200.0]):
        item = outbox.add(f"i{n}", lead(), ["email"], 0, None)
        outbox.update({**item, "due": due})
    assert [i["id"] for i in outbox.items()] == ["i1", "i2", "i0"]
    outbox.items()[0]["owed"].append("x")
    outbox.items()[0]["lead"]["client_name"] = "changed"
    assert get(outbox, "i1")["owed"] == ["email"] and get(outbox, "i1")["lead"] == lead()
    assert get(outbox, "unknown") is None and outbox.next_due() == 100.0


def test_update_rewrites_and_a_confirmed_item_that_owes_nothing_goes(folder):
    outbox = Outbox(folder)
    item = outbox.add("a:1", lead(), ["csv", "email"], 0, None)
    item["owed"] = ["email"]
    outbox.update(item)
    assert get(Outbox(folder), "a:1")["owed"] == ["email"]

    item["owed"] = []
    outbox.update(item)  # owes nothing, but the client was not told yet
    assert get(outbox, "a:1") is not None and outbox.next_due() is None
    item["confirmed"] = True
    outbox.update(item)
    assert get(outbox, "a:1") is None and outbox.items() == [] and list(folder.iterdir()) == []


def test_an_item_dropped_meanwhile_is_never_written_back(folder):
    outbox = Outbox(folder)
    item = outbox.add("42-1", lead(), ["email"], 0, None)
    assert outbox.drop_chat("42") == 1
    outbox.update({**item, "owed": []})
    outbox.retry_later("42-1", 1.0)
    assert outbox.items() == [] and list(folder.glob("*.json")) == []


def test_retry_later_counts_the_attempt_and_persists_the_due_time(folder):
    outbox = Outbox(folder)
    outbox.add("a", lead(), ["email"], 0, None)
    before = time.time()
    for _ in range(3):
        outbox.retry_later("a", 60.0)
    item = get(Outbox(folder), "a")
    assert item["attempts"] == 3 and before + 60.0 <= item["due"] <= time.time() + 60.0
    assert outbox.next_due() == item["due"]


def test_retry_later_never_raises(folder, monkeypatch, caplog):
    outbox = Outbox(folder)
    outbox.add("a", lead(), ["email"], 0, None)
    monkeypatch.setattr(store.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
    outbox.retry_later("a", 5.0)
    assert get(outbox, "a")["attempts"] == 1 and len(warnings(caplog)) == 1


def test_add_that_cannot_write_says_so_and_keeps_the_item_in_memory_for_this_run(tmp_path, caplog):
    (tmp_path / "outbox").write_text("a file where the folder should be")
    outbox = Outbox(tmp_path / "outbox")
    item = outbox.add("a", lead(), ["email"], 0, None)
    assert item["id"] == "a" and item["owed"] == ["email"]
    assert [i["id"] for i in outbox.items()] == ["a"]  # the delivery thread still sees it
    assert "kept in memory only" in caplog.text
    assert Outbox(tmp_path / "outbox").items() == []


def test_drop_chat_removes_the_items_of_that_chat_for_good(folder):
    outbox = Outbox(folder)
    for n, chat in enumerate([1, "1", 2, 3]):
        outbox.add(f"i{n}", lead(chat), ["email"], 0, None)
    assert outbox.drop_chat("1") == 2 and outbox.drop_chat(5) == 0
    assert [i["id"] for i in Outbox(folder).items()] == ["i2", "i3"]
    assert sorted(p.name for p in folder.iterdir()) == ["i2.json", "i3.json"]


def test_malformed_outbox_files_are_moved_aside_and_the_rest_loads(folder, caplog):
    outbox = Outbox(folder)
    good = outbox.add("good", lead(), ["email"], 0, None)
    broken = {"torn.json": '{"id": "torn", "lead": {', "list.json": "[]", "binary.json": "\udcff",
              "no-owed.json": json.dumps({k: v for k, v in good.items() if k != "owed"}),
              "bool-due.json": json.dumps({**good, "id": "b", "due": True}),
              "str-attempts.json": json.dumps({**good, "id": "s", "attempts": "1"})}
    for name, text in broken.items():
        (folder / name).write_bytes(text.encode("utf-8", errors="surrogateescape"))

    reloaded = Outbox(folder)

    assert reloaded.items() == [good]
    assert sorted(p.name for p in (folder / "bad").iterdir()) == sorted(broken)
    assert sorted(warnings(caplog)) == sorted(f"outbox file {name} is malformed — moved to {folder / 'bad'}"
                                              for name in broken)


def test_outbox_is_thread_safe(folder):
    outbox = Outbox(folder)

    def work(n):
        for step in range(10):
            item = outbox.add(f"{n}-{step}", lead(n), ["email"], 0, None)
            outbox.retry_later(item["id"], 1.0)
            outbox.update({**item, "owed": [], "confirmed": True})
            outbox.items()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outbox.items() == [] and list(folder.glob("*.json")) == []


# --- funnel -------------------------------------------------------------------------------------

def test_funnel_lines_hold_only_the_opaque_id_event_source_and_numbers(tmp_path):
    funnel = Funnel(tmp_path / "funnel.jsonl")
    before = int(time.time())
    funnel.record("a1b2", "started", "telegram")
    funnel.record("a1b2", "contact", "telegram", seconds=42.5)
    lines = [json.loads(line) for line in (tmp_path / "funnel.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "t"} for line in lines] == [
        {"d": "a1b2", "e": "started", "s": "telegram"}, {"d": "a1b2", "e": "contact", "s": "telegram", "seconds": 42.5}]
    assert all(before <= line["t"] <= time.time() for line in lines)


def test_funnel_never_raises_and_works_again_later(tmp_path, caplog):
    funnel = Funnel(tmp_path / "missing" / "funnel.jsonl")
    funnel.record("a", "started", "telegram")
    assert warnings(caplog) == [f"cannot write {tmp_path / 'missing' / 'funnel.jsonl'} (FileNotFoundError); "
                                "a funnel event is lost"]
    (tmp_path / "missing").mkdir()
    funnel.record("a", "refused", "telegram")
    assert stats(tmp_path / "missing" / "funnel.jsonl", time.time())["all"]["started"] == 1


NOW = 1_800_000_000.0
DAY = 86400


def events(*dialogs):
    """Funnel lines for (id, source, start, [(event, offset, numbers), ...])."""
    lines = []
    for dialog_id, source, start, steps in dialogs:
        lines.append({"t": start, "d": dialog_id, "e": "started", "s": source})
        lines += [{"t": start + offset, "d": dialog_id, "e": event, "s": source, **numbers}
                  for event, offset, numbers in steps]
    return "".join(json.dumps(line) + "\n" for line in lines)


def stage(name, offset=1):
    return ("stage", offset, {"stage": name})


def zeros(**counts):
    period = {"started": 0, "qualified": 0, "offered": 0, "contacts": 0, "refused": 0, "cancelled": 0,
              "open": 0, "forgotten": 0,
              "dropped": {"greeting": 0, "qualifying": 0, "offering": 0, "collecting_contact": 0},
              "median_seconds_to_contact": None}
    period.update(counts)
    return period


@pytest.mark.parametrize("content", [None, "", "\n", "garbage\n[1]\n{\"d\": 5}\n"])
def test_stats_of_a_missing_empty_or_foreign_file_are_zeros(tmp_path, content):
    path = tmp_path / "funnel.jsonl"
    if content is not None:
        path.write_text(content)
    assert stats(path, NOW) == {"7d": zeros(), "30d": zeros(), "all": zeros(), "console": zeros()}


def test_stats_of_a_hand_edited_nan_stay_json_and_of_a_folder_give_one_line(tmp_path):
    path = tmp_path / "funnel.jsonl"
    path.write_text('{"t": %d, "d": "a", "e": "contact", "s": "telegram", "seconds": NaN}\n' % NOW)
    assert json.loads(json.dumps(stats(path, NOW), allow_nan=False))["all"]["median_seconds_to_contact"] is None
    path.unlink()
    path.mkdir()
    with pytest.raises(StoreError, match="не читается"):
        stats(path, NOW)


def test_stats_of_a_hand_made_funnel(tmp_path):
    path = tmp_path / "funnel.jsonl"
    full = [stage("greeting"), stage("qualifying", 5), stage("offering", 60), stage("collecting_contact", 70)]
    path.write_text(events(
        ("won1", "telegram", NOW - 1 * DAY, full + [("contact", 100, {"seconds": 100})]),
        ("won2", "telegram", NOW - 2 * DAY, full + [("contact", 300, {"seconds": 300}), ("forgotten", 400, {})]),
        ("won3", "telegram", NOW - 10 * DAY, full + [("contact", 50, {"seconds": 50})]),
        ("no", "telegram", NOW - 3 * DAY, full[:3] + [("refused", 80, {})]),
        ("quit", "telegram", NOW - 3 * DAY, full[:2] + [("cancelled", 20, {})]),
        ("idle", "telegram", NOW - 4 * DAY, full[:1]),
        ("gone", "telegram", NOW - 5 * DAY, full[:2] + [("expired", 9000, {})]),
        ("blk", "telegram", NOW - 20 * DAY, full + [("blocked", 90, {})]),
        ("old", "telegram", NOW - 40 * DAY, full[:3] + [("expired", 99, {})]),
        ("new", "telegram", NOW - 60, []),
        ("con", "console", NOW - 1 * DAY, full + [("contact", 30, {"seconds": 30})]),
        ("con2", "console", NOW - 50 * DAY, full[:1]),
    ) + '{"t": 1, "d": "torn", "e": "sta')

    got = stats(path, NOW)

    # "new" is still open (not dropped off), "won2" was erased by /forget (no longer a lead)
    dropped = {"greeting": 1, "qualifying": 1, "offering": 0, "collecting_contact": 0}
    same = {"refused": 1, "cancelled": 1, "open": 1, "forgotten": 1}
    assert got["7d"] == zeros(started=7, qualified=3, offered=2, contacts=1, dropped=dropped,
                              median_seconds_to_contact=100.0, **same)
    assert got["30d"] == zeros(started=9, qualified=5, offered=4, contacts=2,
                               dropped={**dropped, "collecting_contact": 1}, median_seconds_to_contact=75.0,
                               **same)
    assert got["all"] == zeros(started=10, qualified=6, offered=4, contacts=2,
                               dropped={**dropped, "offering": 1, "collecting_contact": 1},
                               median_seconds_to_contact=75.0, **same)
    assert stats(path, NOW, open_seconds=30)["7d"]["dropped"]["greeting"] == 2  # "new" past the TTL
    assert got["console"] == zeros(started=2, qualified=1, offered=1, contacts=1,
                                   dropped={**zeros()["dropped"], "greeting": 1}, median_seconds_to_contact=30.0)


def test_stats_count_a_lead_even_if_the_dialog_is_cancelled_later(tmp_path):
    path = tmp_path / "funnel.jsonl"
    path.write_text(events(("a", "telegram", NOW - 10, [stage("offering"), ("contact", 5, {"seconds": 5}),
                                                       ("cancelled", 6, {})])))
    assert stats(path, NOW)["all"]["contacts"] == 1 and stats(path, NOW)["all"]["cancelled"] == 0


def test_a_journal_without_a_path_keeps_dialogs_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    journal = Journal(None, always)
    journal.save(1, {"stage": "a"})
    assert journal.dialogs == {1: {"stage": "a"}}
    journal.erase(1)
    journal.save(2, None)
    assert journal.dialogs == {} and list(tmp_path.iterdir()) == []


def test_an_outbox_write_that_fails_leaves_no_copy_on_disk_and_the_item_in_memory(folder, monkeypatch):
    outbox = Outbox(folder)
    item = outbox.add("7-1", {"chat_id": 7, "contact": "+79991234567"}, ["csv"], 0, 1)

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(OSError):
        outbox.update({**item, "confirmed": True})  # a half-written copy holding the phone must not stay
    assert [p.name for p in folder.iterdir()] == ["7-1.json"]
    assert outbox.items()[0]["confirmed"]  # the delivery thread sends it all the same
    monkeypatch.undo()
    outbox.drop_chat(7)
    assert list(folder.iterdir()) == []


def test_an_item_delivered_while_its_file_cannot_be_removed_is_not_delivered_again(folder, monkeypatch):
    outbox = Outbox(folder)
    item = outbox.add("7-1", {"chat_id": 7}, ["email"], 0, 1)
    outbox.update({**item, "confirmed": True})

    def read_only(self, *args, **kwargs):  # a read-only disk, or an antivirus holding the file on Windows
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OSError):
        outbox.update({**item, "confirmed": True, "owed": []})  # the email went out
    assert outbox.items() == [] and outbox.next_due() is None  # so it is not sent again every 50 ms


def test_a_torn_journal_line_on_a_full_disk_never_stops_a_start(tmp_path, monkeypatch):
    # A crash cut the last line short, and the disk is still full at the next start.
    path = tmp_path / "state.jsonl"
    dialog = {"stage": "qualifying"}
    path.write_text(json.dumps({"chat": 1, "dialog": dialog}) + "\n" + '{"chat": 2, "dia', encoding="utf-8")
    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store, "_write_atomically", full)
    journal = store.Journal(path, lambda d: True)
    assert journal.dialogs == {1: dialog}
    journal.save(3, {"stage": "greeting"})  # kept in memory; nothing glued to the torn line
    assert path.read_text(encoding="utf-8").endswith('{"chat": 2, "dia')
    monkeypatch.undo()  # room again: the next save rewrites the file whole
    journal.save(4, {"stage": "greeting"})
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["chat"] for line in lines] == [1, 3, 4]

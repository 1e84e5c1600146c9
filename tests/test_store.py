import csv
import json
import logging
import random
import threading
import time

import pytest

import store
from store import (COLUMNS, Journal, Outbox, StoreError, append_lead, forget_chat, lead_exists,
                   neutralise, prepare_leads, read_leads)

BOM = b"\xef\xbb\xbf"
TS = "2026-11-24T12:00:00+00:00"


def make_lead(**fields):
    lead = {"timestamp": TS, "chat_id": 42, "client_name": "Anna", "contact": "anna@example.com",
            "intent": "buy a sofa", "notes": "", "source": "telegram", "status": "new"}
    lead.update(fields)
    return lead


def header(delimiter=","):
    return delimiter.join(COLUMNS).encode() + b"\r\n"


def warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture
def leads(tmp_path):
    return tmp_path / "data" / "leads.csv"


# --- leads CSV ---------------------------------------------------------------------------------

@pytest.mark.parametrize("delimiter", [",", ";"])
def test_bom_and_header_are_written_once(leads, delimiter):
    prepare_leads(leads, delimiter)
    append_lead(leads, make_lead(chat_id=1), delimiter)
    append_lead(leads, make_lead(chat_id=2), delimiter)

    raw = leads.read_bytes()
    assert raw.startswith(BOM + header(delimiter))
    assert raw.count(BOM) == 1 and raw.count(b"client_name") == 1
    assert raw.endswith(b"\r\n")
    rows = read_leads(leads, delimiter)
    assert [row["chat_id"] for row in rows] == ["1", "2"]
    assert rows[0]["client_name"] == "Anna"


@pytest.mark.parametrize("delimiter", [",", ";"])
def test_multiline_notes_with_quotes_stay_one_field(leads, delimiter):
    notes = 'first line\nsecond "quoted", part; end\r\nthird'
    leads.parent.mkdir()
    append_lead(leads, make_lead(notes=notes), delimiter)
    append_lead(leads, make_lead(chat_id=7), delimiter)

    with open(leads, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    assert len(rows) == 3
    assert rows[1][COLUMNS.index("notes")] == notes
    assert rows[2][1] == "7"
    quoted = b'"first line\nsecond ""quoted"", part; end\r\nthird"'
    assert delimiter.encode() + quoted + delimiter.encode() + b"telegram" in leads.read_bytes()


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@", "\t", "\r"])
def test_formula_prefixes_get_an_apostrophe(prefix):
    assert neutralise(prefix + "SUM(A1)") == "'" + prefix + "SUM(A1)"


@pytest.mark.parametrize("value", ["", "Anna", "'=already", " =x", "7 999", "a=b"])
def test_other_values_are_unchanged(value):
    assert neutralise(value) == value


def test_phone_number_keeps_its_digits(leads):
    leads.parent.mkdir()
    append_lead(leads, make_lead(contact="+7 999 123-45-67", client_name="=HYPERLINK(1)"))
    row = read_leads(leads)[0]
    assert row["contact"] == "'+7 999 123-45-67"
    assert row["client_name"] == "'=HYPERLINK(1)"
    assert row["timestamp"] == TS and row["source"] == "telegram"


SPECIALS = "=+-@\t\r\n\"';,\x00 яЁ€😀\u202e\u200b"


def random_text(rng):
    """Arbitrary Unicode (no surrogates), biased towards what breaks CSV files and spreadsheets."""
    def char():
        if rng.random() < 0.5:
            return rng.choice(SPECIALS)
        code = rng.randrange(0x110000)
        return chr(code) if not 0xD800 <= code <= 0xDFFF else "x"
    return "".join(char() for _ in range(rng.randrange(12)))


CASES = [({field: random_text(random.Random(seed * 10 + i)) for i, field in enumerate(store.TEXT_FIELDS)},
          ",;"[seed % 2]) for seed in range(150)]


@pytest.mark.parametrize("texts, delimiter", CASES)
def test_any_text_round_trips_neutralised(tmp_path, texts, delimiter):
    path = tmp_path / "leads.csv"
    append_lead(path, make_lead(**texts), delimiter)
    append_lead(path, make_lead(**texts), delimiter)

    rows = read_leads(path, delimiter)
    assert len(rows) == 2
    for field, text in texts.items():
        assert rows[1][field] == neutralise(text)
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f, delimiter=delimiter):
            assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)


def test_prepare_creates_the_directory_but_not_the_file(leads):
    prepare_leads(leads)
    assert leads.parent.is_dir() and not leads.exists()


@pytest.mark.parametrize("torn", [
    b'2026-11-24T13:00:00+00:00,3,Bo',                            # no newline at the end
    b'2026-11-24T13:00:00+00:00,3,Bob,x,y,"half a note\r\n',     # ends inside an open quote
])
def test_torn_last_line_is_cut_off(leads, caplog, torn):
    prepare_leads(leads)
    append_lead(leads, make_lead(chat_id=1, notes="multi\nline"))
    append_lead(leads, make_lead(chat_id=2))
    intact = leads.read_bytes()
    with open(leads, "ab") as f:
        f.write(torn)

    prepare_leads(leads)

    assert leads.read_bytes() == intact
    assert [w.getMessage() for w in warnings(caplog)] == ["repaired a torn last line in leads.csv"]
    append_lead(leads, make_lead(chat_id=3))
    assert [row["chat_id"] for row in read_leads(leads)] == ["1", "2", "3"]


def test_torn_header_of_a_new_file_is_repaired(leads):
    leads.parent.mkdir()
    leads.write_bytes(BOM + b"timestamp,chat_id,cli")
    prepare_leads(leads)
    append_lead(leads, make_lead())
    assert leads.read_bytes().startswith(BOM + header())
    assert len(read_leads(leads)) == 1


@pytest.mark.parametrize("first_line", [
    b"\xef\xbb\xbf" + header(";"),                                        # other delimiter
    b"timestamp,chat_id,contact,client_name,intent,notes,source,status\r\n",  # other order
    b"timestamp,chat_id,client_name,contact,intent,notes,source\r\n",         # column missing
    b"name,phone",                                                           # foreign, no newline
])
def test_incompatible_file_is_refused_and_left_alone(leads, first_line):
    leads.parent.mkdir()
    content = first_line + b'x,"unfinished'
    leads.write_bytes(content)
    with pytest.raises(StoreError, match="leads.csv has columns/delimiter different") as error:
        prepare_leads(leads)
    assert len(str(error.value).splitlines()) == 1
    assert leads.read_bytes() == content


def test_file_without_bom_is_accepted_and_appended_to(leads):
    leads.parent.mkdir()
    leads.write_bytes(header() + b"2026-11-24T10:00:00+00:00,1,Old,x,y,,console,new\r\n")
    prepare_leads(leads)
    append_lead(leads, make_lead(chat_id=2))
    raw = leads.read_bytes()
    assert BOM not in raw
    assert [row["chat_id"] for row in read_leads(leads)] == ["1", "2"]


def test_empty_file_is_accepted_and_gets_a_header(leads):
    leads.parent.mkdir()
    leads.touch()
    prepare_leads(leads)
    append_lead(leads, make_lead())
    assert leads.read_bytes().startswith(BOM + header())


def test_lead_exists(leads):
    assert not lead_exists(leads, 42, TS)
    leads.parent.mkdir()
    append_lead(leads, make_lead(chat_id=42, notes="a\nb"))
    assert lead_exists(leads, 42, TS)
    assert lead_exists(leads, "42", TS)
    assert not lead_exists(leads, 43, TS)
    assert not lead_exists(leads, 42, "2026-11-24T12:00:01+00:00")


def test_lead_exists_is_fast_in_a_100000_row_file(leads):
    leads.parent.mkdir()
    rows = (f'2026-01-01T00:00:00+00:00,{n},Client {n},"+1 555 {n}",intent,"note\nline 2",telegram,new\r\n'
            for n in range(100_000))
    leads.write_bytes(BOM + header() + "".join(rows).encode())
    append_lead(leads, make_lead(chat_id=777_777))

    started = time.perf_counter()
    assert lead_exists(leads, 777_777, TS)
    assert lead_exists(leads, 99_999, "2026-01-01T00:00:00+00:00")
    assert not lead_exists(leads, 777_777, "2026-01-01T00:00:00+00:00")
    assert time.perf_counter() - started < 0.1


def test_lead_exists_is_not_fooled_by_rows_inside_a_long_note(leads):
    leads.parent.mkdir()
    leads.write_bytes(BOM + header() + b"2026-01-01T00:00:00+00:00,5,a,b,c,d,console,new\r\n" * 3000)
    fake_row = f'{TS},999,x,y,z,n,telegram,new\r\n'
    append_lead(leads, make_lead(chat_id=1, notes=fake_row * 2500))  # 100 KiB in one field
    assert lead_exists(leads, 1, TS)
    assert not lead_exists(leads, 999, TS)


def test_forget_chat_removes_only_that_chat_and_keeps_other_bytes(leads):
    leads.parent.mkdir()
    records = [
        header(),
        b'2026-11-24T10:00:00+00:00,1,Ann,x,y,"keep\nme ""please""",telegram,new\r\n',
        b'2026-11-24T10:01:00+00:00,2,Bob,x,y,"forget\r\nme, 1",telegram,new\r\n',
        b'2026-11-24T10:02:00+00:00,"3",Cy,x,y,plain,console,rejected\n',  # odd but valid
        b'2026-11-24T10:03:00+00:00,2,Bob,x,y,,telegram,new\r\n',
        b'2026-11-24T10:04:00+00:00,22,Dee,x,y,"2\n2",telegram,new\r\n',
    ]
    leads.write_bytes(BOM + b"".join(records))

    assert forget_chat(leads, 2) == 2

    assert leads.read_bytes() == BOM + b"".join(records[:2] + records[3:4] + records[5:])
    assert [row["chat_id"] for row in read_leads(leads)] == ["1", "3", "22"]
    assert forget_chat(leads, "3") == 1
    assert [row["chat_id"] for row in read_leads(leads)] == ["1", "22"]
    assert not list(leads.parent.glob("*.tmp"))


def test_forget_chat_without_matches_changes_nothing(leads):
    assert forget_chat(leads, 1) == 0
    assert not leads.exists()
    leads.parent.mkdir()
    append_lead(leads, make_lead(chat_id=5))
    before = leads.read_bytes()
    assert forget_chat(leads, 6) == 0
    assert leads.read_bytes() == before


# --- journal -----------------------------------------------------------------------------------

def test_journal_keeps_last_state_across_restarts(tmp_path):
    path = tmp_path / "dialogs.jsonl"
    journal = Journal(path)
    assert journal.load() == {}
    journal.save(1, {"stage": "name"})
    journal.save("2", {"stage": "name"})
    journal.save("console", {"stage": "contact"})
    journal.save(1, {"stage": "contact", "name": "Ann"})
    journal.save(2, None)
    journal.close()

    assert Journal(path).load() == {1: {"stage": "contact", "name": "Ann"}, "console": {"stage": "contact"}}


def test_journal_ignores_a_torn_last_line_and_keeps_working(tmp_path):
    path = tmp_path / "dialogs.jsonl"
    path.write_text('{"chat": 1, "dialog": {"stage": "a"}}\n{"chat": 1, "dialog": {"sta')
    journal = Journal(path)
    assert journal.load() == {1: {"stage": "a"}}
    journal.save(2, {"stage": "b"})
    journal.close()
    assert Journal(path).load() == {1: {"stage": "a"}, 2: {"stage": "b"}}


def test_journal_compaction_keeps_the_last_state(tmp_path):
    path = tmp_path / "dialogs.jsonl"
    journal = Journal(path)
    journal.load()
    for n in range(3000):
        journal.save(n % 3, {"step": n})
        journal.save(100 + n, {"step": n})
        journal.save(100 + n, None)
    journal.close()

    assert len(path.read_text().splitlines()) <= 2 * 3 + 1000
    assert Journal(path).load() == {0: {"step": 2997}, 1: {"step": 2998}, 2: {"step": 2999}}


def test_journal_is_thread_safe(tmp_path):
    path = tmp_path / "dialogs.jsonl"
    journal = Journal(path)
    journal.load()

    def talk(chat):
        for step in range(300):
            journal.save(chat, {"step": step})

    threads = [threading.Thread(target=talk, args=(chat,)) for chat in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    journal.close()
    assert Journal(path).load() == {chat: {"step": 299} for chat in range(8)}


def test_journal_works_from_memory_when_it_cannot_write(tmp_path, caplog):
    (tmp_path / "not-a-dir").write_text("")
    journal = Journal(tmp_path / "not-a-dir" / "dialogs.jsonl")
    assert journal.load() == {}
    for n in range(5):
        journal.save(n, {"stage": "name"})
    journal.close()
    assert len(warnings(caplog)) == 1


# --- outbox ------------------------------------------------------------------------------------

def item(item_id, chat_id=42, next_at=100.0, channel="email"):
    return {"id": item_id, "channel": channel, "chat_id": chat_id, "lead": make_lead(chat_id=chat_id),
            "attempts": 0, "next_at": next_at}


def test_outbox_hands_out_due_items_earliest_first(tmp_path):
    outbox = Outbox(tmp_path)
    assert len(outbox) == 0 and outbox.next_due() is None and outbox.due(1e12) == []
    outbox.put(item("late", next_at=300.0))
    outbox.put(item("early", next_at=100.0))
    outbox.put(item("middle", next_at=200.0))

    assert len(outbox) == 3 and outbox.has("late") and not outbox.has("other")
    assert outbox.next_due() == 100.0
    assert [i["id"] for i in outbox.due(250.0)] == ["early", "middle"]
    assert outbox.due(250.0)[0]["lead"] == make_lead()


def test_outbox_put_replaces_by_id(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.put(item("a", next_at=100.0))
    outbox.put(item("a", next_at=50.0))
    assert len(outbox) == 1 and outbox.next_due() == 50.0


def test_retry_later_backs_off_up_to_the_cap(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.put(item("a"))
    delays = [outbox.retry_later("a", 1000.0, first=10.0, cap=60.0) for _ in range(6)]
    assert delays == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    assert outbox.next_due() == 1060.0 and outbox.due(1059.0) == []
    assert Outbox(tmp_path).due(1060.0)[0]["attempts"] == 6


def test_outbox_survives_a_restart(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.put(item(f"csv-42-{TS}", channel="csv"))
    outbox.put(item("telegram-7", chat_id=7, channel="telegram"))
    reloaded = Outbox(tmp_path)
    assert len(reloaded) == 2
    assert {i["id"]: i for i in reloaded.due(1e12)} == {i["id"]: i for i in outbox.due(1e12)}


def test_done_and_drop_chat_remove_items_for_good(tmp_path):
    outbox = Outbox(tmp_path)
    for n, chat in enumerate([1, "1", 2, 3]):
        outbox.put(item(f"i{n}", chat_id=chat))
    outbox.done("i3")
    outbox.done("unknown")
    assert outbox.drop_chat("1") == 2
    assert outbox.drop_chat(5) == 0

    assert not outbox.has("i3") and not outbox.has("i0") and len(outbox) == 1
    reloaded = Outbox(tmp_path)
    assert [i["id"] for i in reloaded.due(1e12)] == ["i2"]
    assert len(list((tmp_path / "outbox").iterdir())) == 1


def test_outbox_works_from_memory_when_it_cannot_write(tmp_path, caplog):
    (tmp_path / "outbox").write_text("")  # a file where the directory should be
    outbox = Outbox(tmp_path)
    outbox.put(item("a", next_at=100.0))
    outbox.put(item("b", chat_id=7, next_at=200.0))
    assert outbox.retry_later("a", 1000.0, first=5.0, cap=60.0) == 5.0

    assert outbox.has("a") and len(outbox) == 2
    assert [i["id"] for i in outbox.due(1e12)] == ["b", "a"]
    outbox.done("b")
    assert outbox.drop_chat(42) == 1 and len(outbox) == 0
    assert len(warnings(caplog)) == 1


def test_outbox_files_are_plain_json(tmp_path):
    Outbox(tmp_path).put(item("a"))
    files = list((tmp_path / "outbox").iterdir())
    assert [f.name for f in files] == ["a.json"]
    assert json.loads(files[0].read_text())["lead"]["client_name"] == "Anna"

"""store.Leads: leads.csv belongs to the owner. The bot appends exactly once, removes rows only for /forget,
and never repairs, truncates or rewrites what the owner saved. (The mailer unit tests follow at the end.)"""
import csv
import logging
import random
import socket
import types

import pytest
from aiosmtpd.controller import Controller

import mailer
import store
from store import COLUMNS, Leads, StoreError

BOM = b"\xef\xbb\xbf"
TS = "2026-11-24T12:00:00+00:00"
# typed into a cell in Notepad: an unquoted cell with one quote in it
ROMASHKA = 'Нужен лендинг для ООО "Ромашка'


def make_lead(**fields):
    lead = {"timestamp": TS, "chat_id": 42, "client_name": "Anna", "contact": "anna@example.com",
            "intent": "buy a sofa", "notes": "", "source": "telegram", "status": "new",
            "offer": "not a column", "answers": [["Задача", "x"]]}
    lead.update(fields)
    return lead


def header(delimiter=","):
    return delimiter.join(COLUMNS).encode() + b"\r\n"


def rows(path, delimiter=","):
    """Every record as the csv module reads the file (the header included)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))


def append(leads, lead):
    """What the bot does: remember where the row will start, then write it."""
    leads.write(lead, leads.position())


@pytest.fixture
def path(tmp_path):
    return tmp_path / "leads.csv"


# --- a new file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("delimiter", [",", ";"])
def test_a_new_file_gets_bom_and_header_once_and_crlf_rows(path, delimiter):
    leads = Leads(path, delimiter)
    assert not path.exists() and leads.position() == 0
    append(leads, make_lead(chat_id=1))
    append(leads, make_lead(chat_id=2))

    raw = path.read_bytes()
    assert raw.startswith(BOM + header(delimiter)) and raw.count(BOM) == 1 and raw.count(b"client_name") == 1
    assert raw.endswith(b"\r\n") and leads.position() == len(raw)
    assert rows(path, delimiter) == [COLUMNS] + [
        [TS, str(chat), "Anna", "anna@example.com", "buy a sofa", "", "telegram", "new"] for chat in (1, 2)]


@pytest.mark.parametrize("content", [b"", BOM])
def test_an_empty_file_or_one_with_only_a_bom_gets_one_bom_and_the_header(path, content):
    path.write_bytes(content)
    append(Leads(path, ";"), make_lead())
    assert path.read_bytes().startswith(BOM + header(";"))
    assert path.read_bytes().count(BOM) == 1 and len(rows(path, ";")) == 2


def test_multiline_notes_with_quotes_stay_one_field(path):
    notes = 'first line\nsecond "quoted", part; end\r\nthird'
    leads = Leads(path, ",")
    append(leads, make_lead(notes=notes))
    append(leads, make_lead(chat_id=7))
    assert [row[COLUMNS.index("notes")] for row in rows(path)[1:]] == [notes, ""]
    assert b',"first line\nsecond ""quoted"", part; end\r\nthird",telegram' in path.read_bytes()


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@", "\t", "\r"])
def test_text_cells_that_look_like_formulas_get_an_apostrophe(path, prefix):
    append(Leads(path, ","), make_lead(client_name=prefix + "SUM(A1)", contact=prefix + "1", intent=prefix,
                                       notes=prefix + "x"))
    row = rows(path)[1]
    assert row[2:6] == ["'" + prefix + "SUM(A1)", "'" + prefix + "1", "'" + prefix, "'" + prefix + "x"]


def test_other_cells_are_written_as_they_are(path):
    append(Leads(path, ","), make_lead(chat_id=-100123, client_name="'=already", contact=" =x", intent="a=b",
                                       notes=None, status="rejected"))
    assert rows(path)[1] == [TS, "-100123", "'=already", " =x", "a=b", "", "telegram", "rejected"]


SPECIALS = "=+-@\t\r\n\"';,\x00 яЁ€😀\u202e\u200b"


def random_text(rng):
    """Arbitrary Unicode (no surrogates), biased towards what breaks CSV files and spreadsheets."""
    def char():
        if rng.random() < 0.5:
            return rng.choice(SPECIALS)
        code = rng.randrange(0x110000)
        return chr(code) if not 0xD800 <= code <= 0xDFFF else "x"
    return "".join(char() for _ in range(rng.randrange(12)))


def test_any_text_round_trips_neutralised_and_the_file_stays_readable(tmp_path):
    for seed in range(60):
        rng, delimiter = random.Random(seed), ",;"[seed % 2]
        path = tmp_path / f"leads{seed}.csv"
        texts = {field: random_text(rng) for field in store.TEXT_FIELDS}
        leads = Leads(path, delimiter)
        append(leads, make_lead(**texts))
        append(leads, make_lead(**texts))  # the same lead twice, each with its own position: two rows
        Leads(path, delimiter)  # and a restart accepts what was written

        written = rows(path, delimiter)
        assert len(written) == 3 and written[1] == written[2]
        for field, text in texts.items():
            cell = written[1][COLUMNS.index(field)]
            assert cell == ("'" + text if text.startswith(store.FORMULA_STARTS) else text)


# --- files the owner has touched ----------------------------------------------------------------

def owner_file(path, *lines, delimiter=",", bom=True):
    path.write_bytes((BOM if bom else b"") + header(delimiter) + b"".join(lines))
    return path.read_bytes()


def test_a_cell_edited_to_hold_one_quote_loses_nothing(path):
    before = owner_file(path,
                        b"2026-11-20T10:00:00+03:00,1,Ann,+7 900,site,plain,telegram,new\r\n",
                        f"2026-11-21T10:00:00+03:00,2,Bob,+7 901,{ROMASHKA},x,telegram,new\r\n".encode(),
                        b"2026-11-22T10:00:00+03:00,3,Cy,+7 902,shop,\"multi\nline\",telegram,new\r\n")
    leads = Leads(path, ",")
    assert path.read_bytes() == before
    append(leads, make_lead(chat_id=4))

    assert path.read_bytes().startswith(before)
    got = rows(path)
    assert [row[1] for row in got[1:]] == ["1", "2", "3", "4"]
    assert got[2][4] == ROMASHKA and got[3][5] == "multi\nline"
    assert all(len(row) == len(COLUMNS) for row in got)
    Leads(path, ",")  # still accepted at the next start


@pytest.mark.parametrize("ending, completion", [(b"", b"\r\n"), (b"\r", b"\n")])
def test_a_file_without_a_final_line_break_keeps_its_last_row(path, ending, completion):
    before = owner_file(path, b"2026-11-20T10:00:00+03:00,1,Ann,x,y,z,telegram,new\r\n",
                        b"2026-11-21T10:00:00+03:00,2,Bob,x,y,last row," + ROMASHKA.encode() + ending)
    leads = Leads(path, ",")
    append(leads, make_lead(chat_id=3))

    after = path.read_bytes()
    assert after.startswith(before + completion + TS.encode())
    assert [row[1] for row in rows(path)[1:]] == ["1", "2", "3"]
    assert rows(path)[2][6] == ROMASHKA


@pytest.mark.parametrize("content, line", [
    (b'2026-11-20T10:00:00+03:00,1,Ann,x,y,"never closed\r\nsecond line\r\n', 2),
    (b'a,1,"two\r\nlines",x,y,ok,telegram,new\r\nb,2,Bob,x,y,"opens here\r\nand goes on', 4),
    (b'a,1,Ann,x,y,z,telegram,new\r\nb,2,"quoted ""twice"" then open', 3),
])
def test_a_file_ending_inside_an_open_quoted_cell_is_refused_and_untouched(path, content, line):
    before = owner_file(path, content)
    with pytest.raises(StoreError) as error:
        Leads(path, ",")
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert f"строки {line} " in message and str(path) in message and "редакторе" in message
    assert path.read_bytes() == before


def test_a_closed_quote_at_the_very_end_is_fine(path):
    owner_file(path, b'a,1,Ann,x,y,"closed ""here"""')
    append(Leads(path, ","), make_lead(chat_id=2))
    assert [row[1] for row in rows(path)[1:]] == ["1", "2"]


def test_the_file_keeps_its_own_delimiter(path, caplog):
    before = owner_file(path, b"2026-11-20T10:00:00+03:00;1;Ann;x;y;z;telegram;new\r\n", delimiter=";")
    caplog.set_level(logging.INFO, logger="store")
    leads = Leads(path, ",")
    assert leads.delimiter == ";"
    append(leads, make_lead(chat_id=2, notes="a, b"))

    assert path.read_bytes().startswith(before)
    assert [row[1] for row in rows(path, ";")[1:]] == ["1", "2"] and rows(path, ";")[2][5] == "a, b"
    assert [r.getMessage() for r in caplog.records] == [
        "leads.csv uses ';', CSV_DELIMITER says ',' — appending with ';'"]
    assert Leads(path, ";").delimiter == ";"


def test_a_file_without_bom_gets_none(path):
    before = owner_file(path, b"2026-11-20T10:00:00+03:00,1,Old,x,y,,console,new\r\n", bom=False)
    append(Leads(path, ","), make_lead(chat_id=2))
    assert path.read_bytes().startswith(before) and BOM not in path.read_bytes()


@pytest.mark.parametrize("content", [
    "Имя;Телефон\r\nОльга;+7\r\n".encode("cp1251"),
    (";".join(COLUMNS) + "\r\n2026-11-01;1;Ольга;+7;сайт;;telegram;new\r\n").encode("cp1251"),
    (";".join(COLUMNS) + "\r\n").encode("utf-16"),
])
def test_a_file_that_is_not_utf8_is_refused_and_untouched(path, content):
    path.write_bytes(content)
    with pytest.raises(StoreError, match="не в кодировке UTF-8"):
        Leads(path, ";")
    assert path.read_bytes() == content


@pytest.mark.parametrize("content", [
    b"timestamp,chat_id,contact,client_name,intent,notes,source,status\r\nx,1\r\n",  # other order
    b"timestamp,chat_id,client_name,contact,intent,notes,source\r\n",               # a column missing
    b"timestamp\tchat_id\tclient_name\tcontact\tintent\tnotes\tsource\tstatus\r\n",  # other delimiter
    b"name,phone",                                                                  # foreign, no newline
    BOM + b"\r\n" + header(),                                                       # an empty first line
])
def test_a_file_with_other_columns_is_refused_and_untouched(path, content):
    path.write_bytes(content)
    with pytest.raises(StoreError) as error:
        Leads(path, ",")
    assert str(error.value) == (f"в leads.csv {path} другие столбцы, а нужны {','.join(COLUMNS)} — "
                                "переименуйте или уберите файл и запустите бота снова")
    assert path.read_bytes() == content


def test_a_folder_named_leads_csv_is_a_plain_error(path):
    path.mkdir()
    with pytest.raises(StoreError, match="не читается"):
        Leads(path, ",")


# --- exactly once -------------------------------------------------------------------------------

def test_three_identical_leads_make_three_rows(path):
    leads = Leads(path, ",")
    for _ in range(3):
        append(leads, make_lead())
    assert len(rows(path)) == 4


@pytest.mark.parametrize("existing", [False, True])
def test_a_write_repeated_after_a_crash_adds_no_second_row(path, existing):
    if existing:
        owner_file(path, b"2026-11-20T10:00:00+03:00,1,Ann,x,y,z,telegram,new")  # no final line break
    leads = Leads(path, ",")
    since = leads.position()
    leads.write(make_lead(notes="a\nb"), since)
    written = path.read_bytes()

    Leads(path, ",").write(make_lead(notes="a\nb"), since)  # after the restart, with the recorded position

    assert path.read_bytes() == written
    assert len(rows(path)) == 2 + existing


def test_a_repeat_finds_its_row_behind_later_rows(path):
    leads = Leads(path, ",")
    since = leads.position()
    leads.write(make_lead(chat_id=1), since)
    append(leads, make_lead(chat_id=2))
    leads.write(make_lead(chat_id=1), since)
    assert [row[1] for row in rows(path)[1:]] == ["1", "2"]


def test_a_row_before_the_position_does_not_count(path):
    leads = Leads(path, ",")
    append(leads, make_lead())
    leads.write(make_lead(), leads.position() + 1000)  # e.g. after /forget made the file shorter
    assert len(rows(path)) == 3


def test_a_failed_write_leaves_exactly_the_bytes_that_were_there(path, monkeypatch):
    before = owner_file(path, b"2026-11-20T10:00:00+03:00,1,Ann,x,y,z,telegram,new")  # to be completed

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full_disk)
    leads = Leads(path, ",")
    with pytest.raises(OSError):
        leads.write(make_lead(), leads.position())
    assert path.read_bytes() == before


def test_a_file_that_cannot_be_opened_raises_oserror(path, monkeypatch):
    leads = Leads(path, ",")

    def locked_by_excel(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store, "open", locked_by_excel, raising=False)
    with pytest.raises(OSError):
        leads.write(make_lead(), 0)


# --- /forget ------------------------------------------------------------------------------------

def test_forget_removes_only_that_chat_and_keeps_every_other_byte(path):
    records = [
        b'2026-11-24T10:00:00+00:00,1,Ann,x,y,"keep\nme ""please"" 2",telegram,new\r\n',
        b'2026-11-24T10:01:00+00:00,2,Bob,x,y,"forget\r\nme, 1",telegram,new\r\n',
        b'2026-11-24T10:02:00+00:00,"3",Cy,x,y,plain,console,rejected\n',  # odd but valid
        f"2026-11-24T10:02:30+00:00,5,Eve,x,{ROMASHKA},2,telegram,new\r\n".encode(),
        b'2026-11-24T10:03:00+00:00,2,Bob,x,y,,telegram,new\r\n',
        "2026-11-24T10:03:30+00:00,6,Ольга,x,y,z,telegram,new\r\n".encode("cp1251"),  # saved by Excel
        b'2026-11-24T10:04:00+00:00,22,Dee,x,y,"2\n2",telegram,new',  # no final line break
    ]
    leads = Leads(path, ",")
    owner_file(path, *records)  # edited while the bot runs, one row saved by Excel in ANSI

    assert leads.forget(2) == 2
    kept = [records[i] for i in (0, 2, 3, 5, 6)]
    assert path.read_bytes() == BOM + header() + b"".join(kept)
    assert leads.forget("3") == 1
    assert path.read_bytes() == BOM + header() + b"".join(kept[:1] + kept[2:])
    assert leads.forget(77) == 0 and leads.forget("chat_id") == 0
    assert path.read_bytes().startswith(BOM + header())
    assert not list(path.parent.glob("*.tmp"))


def test_forget_without_a_file_or_a_match_changes_nothing(path):
    leads = Leads(path, ",")
    assert leads.forget(1) == 0 and not path.exists()
    append(leads, make_lead(chat_id=5))
    before = path.read_bytes()
    assert leads.forget(6) == 0 and path.read_bytes() == before


def test_forget_in_a_100000_row_file(path):
    """Linear, not timed here: a parse that is quadratic in the rows would take minutes."""
    def record(n):
        return f'2026-01-01T00:00:00+00:00,{n % 50_000},Client {n},"+1 {n}",intent,"note\nline 2",telegram,new\r\n'

    before = BOM + header() + "".join(record(n) for n in range(100_000)).encode()
    path.write_bytes(before)
    assert Leads(path, ",").forget(49_999) == 2
    assert path.read_bytes() == before.replace(record(49_999).encode(), b"").replace(record(99_999).encode(), b"")


def test_start_up_checks_a_100000_row_file_with_an_open_quote_at_the_end(path):
    body = "".join(f'2026-01-01T00:00:00+00:00,{n},Client {n},x,y,"a\nb",telegram,new\r\n' for n in range(100_000))
    path.write_bytes(BOM + header() + body.encode() + b'z,1,"open')
    with pytest.raises(StoreError, match="строки 200002 "):
        Leads(path, ",")


# --- mailer (in-process SMTP conversation order; no store involved) ---------------------------

LEAD = {"timestamp": "2026-11-24T12:00:00+00:00", "chat_id": 4242, "client_name": "Анна",
        "contact": "+7 900 123-45-67", "intent": "Сайт", "notes": "Лендинг", "source": "telegram",
        "status": "new"}


class Server:
    """aiosmtpd handler that accepts every message and answers QUIT with quit_reply (None: hangs up)."""

    def __init__(self, quit_reply="221 Bye"):
        self.quit_reply = quit_reply
        self.events = []

    async def handle_DATA(self, server, session, envelope):
        self.events.append("accepted")
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        self.events.append("quit")
        if self.quit_reply is None:
            server.transport.close()
        return self.quit_reply or "221 Bye"


@pytest.fixture
def serve():
    controllers = []

    def start(handler):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="test")
        controller.start()
        controllers.append(controller)
        return types.SimpleNamespace(smtp_host="127.0.0.1", smtp_port=port, smtp_security="none",
                                     smtp_user="", smtp_password="", mail_from="bot@example.com",
                                     manager_email="manager@example.com")

    yield start
    for controller in controllers:
        controller.stop()


def test_accepted_is_called_before_quit(serve):
    server = Server()
    mailer.send_lead(serve(server), LEAD, "4242-1", accepted=lambda: server.events.append("told"))
    assert server.events == ["accepted", "told", "quit"]


@pytest.mark.parametrize("quit_reply", ["421 4.3.2 Shutting down", None])
def test_a_failed_quit_after_acceptance_is_not_a_failure(serve, quit_reply):
    told = []
    mailer.send_lead(serve(Server(quit_reply)), LEAD, "4242-1", accepted=lambda: told.append(True))
    assert told == [True]


def test_a_refused_message_is_a_failure_and_not_reported_as_accepted(serve):
    class Refusing(Server):
        async def handle_DATA(self, server, session, envelope):
            return "554 5.7.1 Rejected"

    told = []
    with pytest.raises(mailer.MailError) as error:
        mailer.send_lead(serve(Refusing()), LEAD, "4242-1", accepted=lambda: told.append(True))
    assert error.value.kind == "rejected" and told == []


def test_leads_csv_resaved_with_the_other_delimiter_while_the_bot_runs(tmp_path):
    """Excel re-saves the file with "," while the bot runs: /forget still finds the chat, new rows follow ","."""
    path = tmp_path / "leads.csv"
    leads = Leads(path, ";")
    append(leads, make_lead(chat_id=42))
    append(leads, make_lead(chat_id=43))
    records = rows(path, ";")
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f, delimiter=",").writerows(records)
    assert leads.forget(42) == 1
    append(leads, make_lead(chat_id=44))
    assert [row[1] for row in rows(path, ",")] == ["chat_id", "43", "44"]
    path.write_bytes(b"")  # emptied by hand
    assert leads.forget(44) == 0


def test_forget_on_a_file_with_other_columns_now_fails_instead_of_claiming_it_deleted(tmp_path):
    path = tmp_path / "leads.csv"
    leads = Leads(path, ";")
    append(leads, make_lead(chat_id=42))
    path.write_bytes(path.read_bytes().replace(b"chat_id", b"chat", 1))  # a column renamed while the bot runs
    with pytest.raises(OSError):
        leads.forget(42)
    assert b"anna@example.com" in path.read_bytes()


@pytest.mark.parametrize("edit", [
    ('";telegram;new', ";telegram;new"),  # the closing quote of a notes cell deleted in Notepad
    (";срочно;", ';"срочно, потом;'),  # a cell typed to start with a quote that is never closed
])
@pytest.mark.parametrize("chat", [111, 222, 333, 444])
def test_forget_after_an_unclosed_quote_never_removes_another_chats_row_nor_keeps_its_own(path, edit, chat):
    leads = Leads(path, ";")
    for n in (111, 222, 333, 444):
        append(leads, make_lead(chat_id=n, contact=f"+7900000{n}", intent="срочно" if n == 111 else "сайт",
                                notes=f"Задача: сайт {n}; Бюджет: 50"))
    lines = path.read_bytes().decode("utf-8-sig").split("\r\n")
    broken = next(i for i, line in enumerate(lines) if ";111;" in line)
    lines[broken] = lines[broken].replace(*edit, 1)
    path.write_bytes(BOM + "\r\n".join(lines).encode())
    before = path.read_bytes()
    try:
        removed = leads.forget(chat)
    except OSError:  # the client hears «не получилось», and nothing was changed
        assert path.read_bytes() == before
        return
    after = path.read_bytes().decode("utf-8-sig")
    assert f"+7900000{chat}" not in after  # what the client is told is gone is gone
    assert all(f"+7900000{n}" in after for n in (111, 222, 333, 444) if n != chat)
    assert removed == 1


@pytest.mark.parametrize("resave", [
    lambda text: text.replace("client_name;contact", "contact;client_name", 1).encode("utf-8"),  # columns moved
    lambda text: text.encode("cp1251"),  # Excel's «CSV (разделители — запятые)»: ANSI
    lambda text: text.encode("utf-16"),
])
def test_a_file_re_saved_with_other_columns_or_encoding_while_the_bot_runs_gets_no_row(path, resave):
    leads = Leads(path, ";")
    append(leads, make_lead(chat_id=1, client_name="Борис"))
    path.write_bytes(resave(path.read_bytes().decode("utf-8-sig")))
    before = path.read_bytes()
    with pytest.raises(OSError):  # the lead stays in the outbox and the log says what to fix
        append(leads, make_lead(chat_id=2, client_name="Ольга"))
    assert path.read_bytes() == before


def test_a_file_with_old_mac_line_ends_is_read_written_and_forgotten_in(path):
    path.write_bytes(BOM + header(";").rstrip(b"\r\n") + b"\r" + f"{TS};7;Ann;x;y;z;telegram;new\r".encode())
    leads = Leads(path, ";")  # not "other columns": its lines end with \r alone
    append(leads, make_lead(chat_id=8))
    assert leads.forget(7) == 1 and [row[1] for row in rows(path, ";")] == ["chat_id", "8"]


@pytest.mark.parametrize("delimiter, row, other", [
    (",", f'{TS},7,Ann,x,y,"first line\nсумма 1,500,000",telegram,new\r\n', ""),  # numbers in the owner's note
    (";", f'{TS};7;Ann;x;y;"заказ\nИтог;25000;оплачено";telegram;new\r\n', ""),
    (",", f'{TS},7,Ann,x,y,"Бюджет: 150\n150,000, можно обсудить",telegram,new\r\n', ""),  # a comma file
    (",", f'{TS},7,Ann,x,y,"Тираж:\n100,200,300,500,1000,2000 шт",telegram,new\r\n', ""),
    (";", f"{TS};7.0;Ann;x;y;z;telegram;new\r\n", ""),  # re-saved by pandas
    (";", f"{TS}; 7 ;Ann;x;y;z;telegram;new\r\n", ""),  # typed with spaces
    (";", f"{TS};7;Ann;x;y;z;telegram;new\r\n", f'{TS};8;Bob;x;y;"заказ\nпозиция;7;шт";telegram;new\r\n'),
])
def test_forget_takes_rows_the_owner_edited_and_not_a_cell_that_only_looks_like_a_row(path, delimiter, row, other):
    path.write_bytes(BOM + header(delimiter) + (row + other).encode())
    assert Leads(path, delimiter).forget(7) == 1
    assert path.read_bytes() == BOM + header(delimiter) + other.encode()


def test_forget_never_takes_the_owners_own_row_without_a_time_when_a_quote_joins_it(path):
    rows = [f'{TS};7;"Иван;+79991112233;сайт;перезвонить;telegram;new\r\n',  # a quote typed before the name
            ';99;"ООО ""Ромашка""";+74950000000;лендинг;звонил сам;manual;new\r\n',  # the owner's row, no time
            f"{TS};12;Пётр;@petr;магазин;каталог;telegram;new\r\n"]
    path.write_bytes(BOM + header(";") + "".join(rows).encode())
    before = path.read_bytes()
    with pytest.raises(OSError):  # «не получилось», and nothing changed
        Leads(path, ";").forget(7)
    assert path.read_bytes() == before


def test_forget_never_says_done_while_a_row_of_the_chat_with_a_two_line_contact_sits_inside_another(path):
    rows = [f'{TS},5,Ann,x,y,"VIP клиент,telegram,new\r\n',  # a quote typed into another client's notes
            f'{TS},42,Борис,"+7 999 111-22-33\n+7 999 444-55-66",y,z,telegram,new\r\n',  # Alt+Enter in Excel
            f"{TS},12,Пётр,x,y,z,telegram,new\r\n"]
    path.write_bytes(BOM + header(",") + "".join(rows).encode())
    before = path.read_bytes()
    with pytest.raises(OSError):  # «не получилось», never «удалены» with Борис's phones still in the file
        Leads(path, ",").forget(42)
    assert path.read_bytes() == before


@pytest.mark.parametrize("delimiter", [",", ";"])
def test_forget_never_says_done_for_a_row_run_into_the_line_before_it(path, delimiter):
    d = delimiter
    rows = [f"{TS}{d}111{d}Ann{d}x{d}y{d}z{d}telegram{d}new",  # the line break after it deleted in Notepad
            f"{TS}{d}222{d}Борис{d}+79991112233{d}y{d}z{d}telegram{d}new\r\n"]
    path.write_bytes(BOM + header(d) + "".join(rows).encode())
    before = path.read_bytes()
    with pytest.raises(OSError):
        Leads(path, d).forget(222)
    assert path.read_bytes() == before


def test_forget_never_cuts_a_row_with_a_line_break_in_its_first_cells_swallowed_by_a_quote(path):
    rows = [f'{TS},111,Ann,x,y,z,telegram,"new\r\n',  # a quote typed before the status
            f'{TS},222,Борис,+79991112233,"Ремонт\nванной",Вопрос,tg,new\r\n',  # Alt+Enter in the intent
            f'{TS},333,Пётр,x,y,z,telegram,new"\r\n']
    path.write_bytes(BOM + header(",") + "".join(rows).encode())
    before = path.read_bytes()
    with pytest.raises(OSError):
        Leads(path, ",").forget(111)
    assert path.read_bytes() == before

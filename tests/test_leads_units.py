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
    leads.append(lead)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "leads.csv"


# --- a new file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("delimiter", [",", ";"])
def test_a_new_file_gets_bom_and_header_once_and_crlf_rows(path, delimiter):
    leads = Leads(path, delimiter)
    assert not path.exists()
    append(leads, make_lead(chat_id=1))
    append(leads, make_lead(chat_id=2))

    raw = path.read_bytes()
    assert raw.startswith(BOM + header(delimiter)) and raw.count(BOM) == 1 and raw.count(b"client_name") == 1
    assert raw.endswith(b"\r\n")
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
        append(leads, make_lead(**texts))  # the same lead twice (two records of the ledger): two rows
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
def test_the_first_row_after_a_restart_is_not_written_twice(path, existing):
    """The csv channel's cursor could not move past the row before a crash: the next start offers it
    again, and finds it at the file's end."""
    if existing:
        owner_file(path, b"2026-11-20T10:00:00+03:00,1,Ann,x,y,z,telegram,new")  # no final line break
    Leads(path, ",").append(make_lead(notes="a\nb"))
    written = path.read_bytes()
    after_restart = Leads(path, ",")
    after_restart.append(make_lead(notes="a\nb"), maybe_written=True)
    assert path.read_bytes() == written and len(rows(path)) == 2 + existing
    after_restart.append(make_lead(notes="a\nb"))  # a second, identical lead of this run is a row
    assert len(rows(path)) == 3 + existing


def test_a_failed_write_leaves_exactly_the_bytes_that_were_there(path, monkeypatch):
    before = owner_file(path, b"2026-11-20T10:00:00+03:00,1,Ann,x,y,z,telegram,new")  # to be completed

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full_disk)
    leads = Leads(path, ",")
    with pytest.raises(OSError):
        leads.append(make_lead())
    assert path.read_bytes() == before


def test_a_file_that_cannot_be_opened_raises_oserror(path, monkeypatch):
    leads = Leads(path, ",")

    def locked_by_excel(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store, "open", locked_by_excel, raising=False)
    with pytest.raises(OSError):
        leads.append(make_lead())


# --- /forget: exactly the rows the bot wrote -----------------------------------------------------

def test_forget_removes_exactly_the_rows_the_bot_wrote_and_keeps_every_other_byte(path):
    leads = Leads(path, ",")
    mine = [make_lead(chat_id=2, notes="forget\r\nme, 1"), make_lead(chat_id=2, intent="=SUM(A1)")]
    owner = [b'2026-11-24T10:00:00+00:00,1,Ann,x,y,"keep\nme ""please"" 2",telegram,new\r\n',
             "2026-11-24T10:03:30+00:00,6,Ольга,x,y,z,telegram,new\r\n".encode("cp1251")]  # saved by Excel
    append(leads, mine[0])
    path.write_bytes(path.read_bytes() + owner[0])
    append(leads, mine[1])
    path.write_bytes(path.read_bytes() + owner[1] + b'2026-11-24T10:04:00+00:00,22,Dee,x,y,"2\n2",tg,new')
    assert leads.remove(mine) == 0
    assert path.read_bytes() == (BOM + header() + b"".join(owner)
                                 + b'2026-11-24T10:04:00+00:00,22,Dee,x,y,"2\n2",tg,new')
    assert leads.remove([make_lead(chat_id=77)]) == 1  # nothing of it there: one left for the manager
    assert not list(path.parent.glob("*.tmp"))


def test_a_row_the_owner_changed_is_left_and_counted(path):
    leads = Leads(path, ";")
    append(leads, make_lead(chat_id=7, contact="+79990001122"))
    append(leads, make_lead(chat_id=7, contact="ivan@mail.ru"))
    path.write_bytes(path.read_bytes().replace(b"+79990001122", b"+79990001122 (called)"))
    before_other = path.read_bytes()
    assert leads.remove([make_lead(chat_id=7, contact="+79990001122"),
                         make_lead(chat_id=7, contact="ivan@mail.ru")]) == 1
    text = path.read_bytes().decode("utf-8-sig")
    assert "(called)" in text and "ivan@mail.ru" not in text and len(before_other) > len(text)


def test_forget_without_a_file_or_a_match_changes_nothing(path):
    leads = Leads(path, ",")
    assert leads.remove([make_lead(chat_id=1)]) == 1 and not path.exists()
    append(leads, make_lead(chat_id=5))
    before = path.read_bytes()
    assert leads.remove([make_lead(chat_id=6)]) == 1 and path.read_bytes() == before
    assert leads.remove([]) == 0 and path.read_bytes() == before


def test_forget_in_a_100000_row_file(path):
    """Linear, not timed here: a parse that is quadratic in the rows would take minutes."""
    def record(n):
        return f'2026-01-01T00:00:00+00:00,{n % 50_000},Client {n},"1 {n}",intent,"note\nline 2",telegram,new\r\n'

    before = BOM + header() + "".join(record(n) for n in range(100_000)).encode()
    path.write_bytes(before)
    lead = make_lead(timestamp="2026-01-01T00:00:00+00:00", chat_id=49_999, client_name="Client 99999",
                     contact="1 99999", intent="intent", notes="note\nline 2")
    assert Leads(path, ",").remove([lead]) == 0
    assert path.read_bytes() == before.replace(record(99_999).encode(), b"")


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
    """Excel re-saves the file with "," while the bot runs: /forget still finds the rows by their
    cells, new rows follow ","."""
    path = tmp_path / "leads.csv"
    leads = Leads(path, ";")
    append(leads, make_lead(chat_id=42))
    append(leads, make_lead(chat_id=43))
    records = rows(path, ";")
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f, delimiter=",").writerows(records)
    assert leads.remove([make_lead(chat_id=42)]) == 0
    append(leads, make_lead(chat_id=44))
    assert [row[1] for row in rows(path, ",")] == ["chat_id", "43", "44"]


@pytest.mark.parametrize("edit", [
    ('";telegram;new', ";telegram;new"),  # the closing quote of a notes cell deleted in Notepad
    (";срочно;", ';"срочно, потом;'),  # a cell typed to start with a quote that is never closed
])
@pytest.mark.parametrize("chat", [111, 222, 333, 444])
def test_forget_after_an_unclosed_quote_never_removes_another_chats_row(path, edit, chat):
    leads = Leads(path, ";")
    made = {n: make_lead(chat_id=n, contact=f"+7900000{n}", intent="срочно" if n == 111 else "сайт",
                         notes=f"Задача: сайт {n}; Бюджет: 50") for n in (111, 222, 333, 444)}
    for lead in made.values():
        append(leads, lead)
    lines = path.read_bytes().decode("utf-8-sig").split("\r\n")
    broken = next(i for i, line in enumerate(lines) if ";111;" in line)
    lines[broken] = lines[broken].replace(*edit, 1)
    path.write_bytes(BOM + "\r\n".join(lines).encode())
    left = leads.remove([made[chat]])
    after = path.read_bytes().decode("utf-8-sig")
    assert all(f"+7900000{n}" in after for n in (111, 222, 333, 444) if n != chat)
    assert (f"+7900000{chat}" in after) == (left == 1)  # what is not removed is counted for the manager


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
    with pytest.raises(OSError):  # the csv channel holds the lead in the ledger; the log says what to fix
        append(leads, make_lead(chat_id=2, client_name="Ольга"))
    assert path.read_bytes() == before


def test_a_file_with_old_mac_line_ends_is_read_written_and_forgotten_in(path):
    path.write_bytes(BOM + header(";").rstrip(b"\r\n") + b"\r" + f"{TS};7;Ann;x;y;z;telegram;new\r".encode())
    leads = Leads(path, ";")  # not "other columns": its lines end with \r alone
    append(leads, make_lead(chat_id=8))
    assert leads.remove([make_lead(chat_id=8)]) == 0 and [row[1] for row in rows(path, ";")] == ["chat_id", "7"]

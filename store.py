"""Everything leadbot keeps in DATA_DIR: the lock, the ledger and its channels' cursors, leads.csv,
the dialog journal and the funnel."""

import codecs
import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import re
import statistics
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = ["timestamp", "chat_id", "client_name", "contact", "intent", "notes", "source", "status"]
TEXT_FIELDS = ("client_name", "contact", "intent", "notes")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
BOM = "\ufeff".encode()
STAGES = ["greeting", "qualifying", "offering", "collecting_contact"]
PROBE = "leadbot-end-of-file-probe"
# a never-closed quote makes the rest of leads.csv one cell: parse, do not fail
csv.field_size_limit(2**31 - 1)


class StoreError(Exception):
    """One plain line naming the file or folder, the problem and what to do."""


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half copy (of a client's data) behind
        raise


def _usable_dir(path: Path) -> Path:
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise StoreError(f"DATA_DIR {path} — это файл, а не папка: укажите в DATA_DIR папку")
    problem, probe = "не удаётся создать папку", path / f".probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        problem = "папка недоступна для записи"
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise StoreError(f"DATA_DIR {path}: {problem} ({type(e).__name__}) — дайте этому "
                         "пользователю право записи или укажите в DATA_DIR другую папку") from None
    return path


def _try_lock(folder: Path):
    """The open .lock if this process now holds its OS lock (which ends with the process, kill -9
    too), else None."""
    try:
        f = open(folder / ".lock", "a+b")
    except OSError as e:
        raise StoreError(f"не удаётся открыть {folder / '.lock'} ({type(e).__name__}) — "
                         "дайте этому пользователю право записи в него") from None
    try:
        if os.name == "nt":
            import msvcrt
            f.seek(0)  # the same byte in every process
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except OSError:
        f.close()
        return None


def open_data_dir(path: Path) -> object:
    """Create DATA_DIR and lock it; keep the returned handle for the life of the process."""
    path = _usable_dir(path)
    if (handle := _try_lock(path)) is None:
        raise StoreError(f"на DATA_DIR {path} уже работает другая копия leadbot — "
                         "сначала остановите её")
    _make_private(path)
    return handle


def _make_private(folder: Path) -> None:
    """Client data is for this user alone: the folder 0700, its files 0600, whatever the umask made
    them (new files get the same from leadbot's umask 077). Windows keeps its own access lists."""
    for path in [folder, *folder.glob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)


def relock(path: Path, handle) -> object:
    """The lock handle to keep: `handle` while its file is still DATA_DIR's .lock; if the owner
    deleted the file (a second copy could then start), a new one taken now; raises StoreError when
    another copy took it first."""
    path = Path(path).absolute()
    with contextlib.suppress(OSError):  # deleted: FileNotFoundError
        if os.name == "nt" or os.path.samestat(os.fstat(handle.fileno()), os.stat(path / ".lock")):
            return handle  # Windows does not let a file another process has open be deleted
    try:
        new = _try_lock(path)
    # the folder itself is gone or renamed for now: each file's write says so; tried again
    except StoreError:
        return handle
    if new is None:
        raise StoreError(f"на DATA_DIR {path} запустилась другая копия leadbot, "
                         "пока .lock был удалён — "
                         "остановите одну из них и не удаляйте .lock")
    handle.close()
    log.warning("%s was deleted while the bot ran; it is back (leave it in place)", path / ".lock")
    return new


def check(cfg) -> tuple[bool | None, str]:
    """For --check: the folder is usable, leads.csv is readable, and whether a bot holds the
    lock."""
    try:
        path = _usable_dir(cfg.data_dir)
        leads = Leads(path / "leads.csv", cfg.csv_delimiter)
        if leads.path.exists():
            open(leads.path, "ab").close()  # opened for adding, as the bot does; nothing written
        handle = _try_lock(path)
    except StoreError as e:
        return False, str(e)
    except OSError as e:
        return False, (f"DATA_DIR: {leads.path} не открывается на запись "
                       f"({type(e).__name__}) — закройте его в "
                       "других программах или дайте пользователю бота право записи")
    if handle:
        handle.close()  # only a momentary try: closing the file releases the lock
    running = "бот на ней сейчас не запущен" if handle else "бот работает с этой папкой"
    return True, f"DATA_DIR: {path} доступна для записи; заявки пишутся в {leads.path}; {running}"


def _delimiter_of(text: str) -> str | None:
    """";" or "," as leads.csv's header line shows it; None for another header."""
    # a line ends at \r\n, \n or \r (old Macs)
    header = re.match(r"[^\r\n]*", text.removeprefix("\ufeff")).group()
    return next((d for d in ";," if header == d.join(COLUMNS)), None)


class Leads:
    """{data_dir}/leads.csv, the owner's file: the bot only appends rows, and /forget removes
    exactly the rows the bot wrote; it is never repaired."""

    def __init__(self, path: Path, delimiter: str):
        self.path, self.delimiter, self._lock = Path(path).absolute(), delimiter, threading.Lock()
        try:
            text = (self.path.read_bytes().decode("utf-8").removeprefix("\ufeff")
                    if self.path.exists() else "")
        except UnicodeError:
            raise StoreError(f"leads.csv {self.path} не в кодировке UTF-8 "
                             "(сохранён как ANSI или Юникод?) — "
                             "в Excel сохраните его как «CSV UTF-8» "
                             "или уберите файл и запустите бота снова") from None
        except OSError as e:
            raise StoreError(f"leads.csv {self.path} не читается ({type(e).__name__}) — "
                             "закройте его в других программах "
                             "или исправьте права доступа") from None
        if not text:
            return
        found = _delimiter_of(text)
        if found is None:
            raise StoreError(f"в leads.csv {self.path} другие столбцы, "
                             f"а нужны {','.join(COLUMNS)} — "
                             "переименуйте или уберите файл и запустите бота снова")
        if found != delimiter:
            log.warning("leads.csv uses %r, CSV_DELIMITER says %r — appending with %r",
                        found, delimiter, found)
        self.delimiter = found
        # Refuse a file that ends inside a quoted cell: it would swallow every row appended.
        text += "" if text.endswith(("\n", "\r")) else "\r\n"
        for row in csv.reader(io.StringIO(text + PROBE + "\r\n", newline=""),
                              delimiter=self.delimiter):
            pass
        if row != [PROBE]:
            cell = row[-1]  # the open cell is '"' + its text with quotes doubled, up to the end
            line = text.count("\n", 0, len(text) + len(PROBE) + 1 - len(cell) - cell.count('"')) + 1
            raise StoreError(f"leads.csv {self.path}: "
                             f"ячейка в кавычках со строки {line} не закрыта "
                             "— допишите закрывающую \" в редакторе и запустите бота снова")

    def append(self, lead: dict, maybe_written=False) -> None:
        """Append the lead's row; raises OSError, and writes nothing, when the file is not in the
        shape the bot writes. maybe_written: the lead the csv channel was at when the bot stopped
        (its cursor moves only after the row): not written again when it is the file's last row."""
        with self._lock, open(self.path, "a+b", buffering=0) as f:
            # the owner may have re-saved it while the bot ran: with the other delimiter is fine
            f.seek(0)
            head = f.read(200).decode("utf-8", "replace")
            found = _delimiter_of(head)
            # a row under the wrong columns would be silent harm
            if head.lstrip("\ufeff") and not found:
                raise OSError(f"в leads.csv теперь другие столбцы, а нужны {','.join(COLUMNS)} — "
                              "верните эту строку заголовка")
            self.delimiter = found or self.delimiter
            buffer = io.StringIO()
            csv.writer(buffer, delimiter=self.delimiter,
                       lineterminator="\r\n").writerow(row_cells(lead))
            row = buffer.getvalue().encode("utf-8")
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - max(4096, len(row) + 3), 0))
            tail = f.read()
            if maybe_written and tail.endswith(row) and (len(tail) == len(row)
                                                         or tail[:-len(row)].endswith(b"\n")):
                return  # written before a crash: exactly once
            try:  # re-saved as ANSI, the owner's Excel would show a UTF-8 row as «Р‘РѕСЂРёСЃ»
                codecs.getincrementaldecoder("utf-8")().decode(
                    tail.lstrip(bytes(range(0x80, 0xC0))))
            except UnicodeDecodeError:
                raise OSError("leads.csv теперь не в UTF-8 (сохранён как ANSI?) — сохраните его "
                              "как «CSV UTF-8»") from None
            end = tail[-3:]
            if size <= len(BOM) and end in (b"", BOM):  # new, or emptied down to its BOM
                row = (b"" if end else BOM) + (self.delimiter.join(COLUMNS) + "\r\n").encode() + row
            # complete the last line (saved by Notepad, or an earlier cut)
            elif not end.endswith(b"\n"):
                row = (b"\n" if end.endswith(b"\r") else b"\r\n") + row
            try:
                view = memoryview(row)
                while view:
                    view = view[f.write(view):]
                os.fsync(f.fileno())
            except OSError:
                # only the bytes this call wrote: never half a row for the next one
                f.truncate(size)
                raise

    def remove(self, leads: list[dict]) -> int:
        """/forget: removes each row whose cells are exactly what the bot wrote for one of these
        leads, every other byte identical; returns how many of the leads have no such row left to
        remove (the owner changed or moved it). Raises OSError."""
        with self._lock:
            if not leads or not self.path.exists():
                return len(leads)
            # every byte comes back
            text = self.path.read_bytes().decode("utf-8", errors="surrogateescape")
            self.delimiter = _delimiter_of(text) or self.delimiter
            wanted = [row_cells(lead) for lead in leads]
            # split where csv splits: at \r\n, \n and \r
            lines = io.StringIO(text, newline="").readlines()
            reader, kept, start = csv.reader(lines, delimiter=self.delimiter), [], 0
            for row in reader:  # reader.line_num tells which lines a record took
                if row in wanted:
                    wanted.remove(row)
                else:
                    kept += lines[start:reader.line_num]
                start = reader.line_num
            if len(wanted) < len(leads):
                _write_atomically(self.path,
                                  "".join(kept).encode("utf-8", errors="surrogateescape"))
            return len(wanted)


def row_cells(lead: dict) -> list[str]:
    """The cells of the lead's row as the bot writes them: a text cell that Excel would take for a
    formula gets a leading apostrophe."""
    values = ["" if lead.get(c) is None else str(lead[c]) for c in COLUMNS]
    return ["'" + v if c in TEXT_FIELDS and v.startswith(FORMULA_STARTS) else v
            for c, v in zip(COLUMNS, values)]


class Journal:
    """{data_dir}/state.jsonl: dialog states, appended without fsync, a chat's last line wins; None:
    in memory only."""

    def __init__(self, path: Path | None, valid):
        self.path, self._valid, self.dialogs, self._lock = (path and Path(path).absolute(), valid,
                                                            {}, threading.Lock())
        if path is None:
            return
        try:
            text = (self.path.read_text(encoding="utf-8", errors="replace")
                    if self.path.exists() else "")
        except OSError as e:
            raise StoreError(f"{self.path} не читается ({type(e).__name__}) — "
                             "исправьте права доступа") from None
        # torn is "" when the file ends with a line break, else ignored
        *lines, torn = text.split("\n")
        bad = [line for line in lines if line.strip() and not self._apply(line)]
        # The bot's own torn or bad lines (a crash, a full disk) never stop a start: they are set
        # aside, and while the file cannot be rewritten (the disk still full) the dialogs live in
        # memory, each save trying the rewrite again; no line is appended to a torn one meanwhile.
        self._lines, self._rewrite = len(lines), bool(bad or torn)
        try:
            if bad:
                with open(f"{self.path}.bad", "a", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in bad))
                log.warning("%d malformed entries of %s were set aside in %s.bad",
                            len(bad), self.path.name, self.path)
            if self._rewrite:
                self._compact()
        except OSError as e:
            log.warning("cannot clean up %s (%s); "
                        "dialogs are kept in memory until it can be rewritten",
                        self.path, type(e).__name__)

    def _apply(self, line: str) -> bool:
        """Take one line into self.dialogs; False if it is not a well-formed entry."""
        try:
            entry = json.loads(line)
            chat, dialog = entry["chat"], entry["dialog"]
            ok = (isinstance(chat, (int, str))
                  and (dialog is None or isinstance(dialog, dict) and self._valid(dialog)))
        # whatever is wrong with one entry (the validator's errors too) sets only it aside
        except Exception:
            return False
        if ok:
            self._set(chat, dialog)
        return bool(ok)

    def _set(self, chat, dialog: dict | None) -> None:
        if dialog is None:
            self.dialogs.pop(chat, None)
        else:
            self.dialogs[chat] = dialog

    def save(self, chat_id, dialog: dict | None, remember=True) -> None:
        """Record the dialog of a chat (None deletes it), in .dialogs too unless remember is False
        (the caller keeps a newer one there); a write failure is logged and mended by the next
        save."""
        with self._lock:
            if remember:
                self._set(chat_id, dialog)
            if self.path is None:
                return
            try:
                if self._rewrite or self._lines >= 2 * len(self.dialogs) + 1000:
                    self._compact()
                else:
                    with open(self.path, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"chat": chat_id, "dialog": dialog}) + "\n")
                    self._lines += 1
            except OSError as e:
                log.warning("cannot write %s (%s); dialog state is kept in memory",
                            self.path, type(e).__name__)
                self._rewrite = True  # a half-written line must not stay in the middle

    def erase(self, chat_id) -> None:
        """Remove the chat and rewrite the file so that no earlier line keeps its data; raises
        OSError."""
        with self._lock:
            self.dialogs.pop(chat_id, None)
            if self.path is not None:
                self._compact()

    def _compact(self) -> None:
        lines = [json.dumps({"chat": chat, "dialog": d}) + "\n" for chat, d in self.dialogs.items()]
        _write_atomically(self.path, "".join(lines).encode())
        self._lines, self._rewrite = len(lines), False


class Ledger:
    """{data_dir}/ledger.jsonl, written by the bot alone: each lead and each /forget as one fsynced
    line with a sequence number. A lead is committed exactly when its line is on disk; every channel
    (leads.csv, email, the manager's card) delivers from here with its own cursor file
    {name}.cursor (the last seq it finished, and the forgotten leads it skipped)."""

    def __init__(self, folder: Path, channels):
        self.path, self._cond = Path(folder).absolute() / "ledger.jsonl", threading.Condition()
        self.records, self._rewrite = _read_jsonl(self.path, lambda r: type(r.get("seq")) is int)
        self.cursors = {name: self._read_cursor(name) for name in channels}
        # The record each channel was at when the bot stopped (see Leads.append), None if it was
        # done.
        self.resumed = {name: next((r["seq"] for r in self.records if r["seq"] > cursor["seq"]),
                                   None)
                        for name, cursor in self.cursors.items()}
        for name in channels:  # a new channel starts at the end: it is not sent the owner's history
            self._write_cursor(name)

    def _read_cursor(self, name):
        try:
            cursor = json.loads((self.path.parent / f"{name}.cursor").read_text(encoding="utf-8"))
            return {"seq": int(cursor["seq"]), "skipped": [str(i) for i in cursor["skipped"]]}
        except FileNotFoundError:
            return {"seq": self.last(), "skipped": []}
        # the bot's own torn write: redo from the start
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s.cursor is unreadable; that channel starts again at the ledger's start",
                        name)
            return {"seq": 0, "skipped": []}

    def _write_cursor(self, name) -> None:
        _write_atomically(self.path.parent / f"{name}.cursor",
                          json.dumps(self.cursors[name]).encode())

    def last(self) -> int:
        seqs = ([r["seq"] for r in self.records]
                + [c["seq"] for c in getattr(self, "cursors", {}).values()])
        return max(seqs, default=0)

    def has(self, lead_id: str) -> bool:
        with self._cond:
            return any(r.get("id") == lead_id for r in self.records)

    def add(self, record: dict) -> bool:
        """Append the record (a lead: {"id", "lead"}; a /forget: {"forget": chat_id}) as the next
        seq, fsynced; a lead already there is not added twice. False, nothing written, when the disk
        refuses."""
        with self._cond:
            if "id" in record and any(r.get("id") == record["id"] for r in self.records):
                return True
            record = {"seq": self.last() + 1, **record}
            try:
                # a torn line of an earlier crash must not have a record glued to it
                if self._rewrite:
                    self._compact()
                _append_synced(self.path, json.dumps(record, ensure_ascii=False) + "\n")
            except OSError as e:
                log.error("cannot write %s (%s)", self.path.name, type(e).__name__)
                return False
            self.records.append(record)
            self._cond.notify_all()
            return True

    def next(self, name, timeout: float) -> dict | None:
        """The first record after the channel's cursor, waiting up to timeout for one."""
        with self._cond:
            self._cond.wait_for(lambda: self._after(name), timeout)
            return copy.deepcopy(self._after(name)[0]) if self._after(name) else None

    def _after(self, name):
        return [r for r in self.records if r["seq"] > self.cursors[name]["seq"]]

    def forgotten(self, record) -> bool:
        """True for a lead whose chat a later /forget erased."""
        with self._cond:
            chat = str(record["lead"]["chat_id"])
            return any(str(r.get("forget")) == chat and r["seq"] > record["seq"]
                       for r in self.records)

    def done(self, name, record, skipped=False) -> None:
        """The channel finished this record (skipped: a forgotten lead it never sent); raises
        OSError."""
        with self._cond:
            cursor = self.cursors[name]
            if record["seq"] > cursor["seq"]:
                cursor["seq"] = record["seq"]
                if skipped and "lead" in record:
                    cursor["skipped"].append(record["id"])
                self._write_cursor(name)

    def delivered(self, name, forget) -> list[dict]:
        """The leads of the forgotten chat this channel had delivered before the /forget."""
        with self._cond:
            chat, skipped = str(forget["forget"]), self.cursors[name]["skipped"]
            return [r["lead"] for r in self.records if "lead" in r and r["seq"] < forget["seq"]
                    and str(r["lead"]["chat_id"]) == chat and r["id"] not in skipped]

    def _marks(self, chat):
        """The chat's /forget records and the "ask" records the csv channel added for them."""
        return [r for r in self.records
                if "lead" not in r and str(r.get("forget", r.get("ask"))) == str(chat)]

    def forgetting(self) -> set[str]:
        """The chats whose /forget the client has not been answered yet (their marks leave with
        it)."""
        with self._cond:
            return {str(r.get("forget", r.get("ask"))) for r in self.records if "lead" not in r}

    def settled(self, chat) -> bool:
        """True once every channel is past the chat's /forget (and what it asked of the others)."""
        with self._cond:
            last = max((r["seq"] for r in self._marks(chat)), default=None)
            return last is not None and all(c["seq"] >= last for c in self.cursors.values())

    def manager_has(self, chat) -> bool:
        """Whether the manager holds some of the chat's data the bot cannot remove itself."""
        with self._cond:
            marks = self._marks(chat)
            return any("ask" in r for r in marks) or any(
                self.delivered(name, r) for name in self.cursors if name != "csv"
                for r in marks if "forget" in r)

    def drop_chat(self, chat) -> None:
        """Once settled: the chat's records up to its last /forget leave the ledger; raises
        OSError."""
        with self._cond:
            last = max(r["seq"] for r in self._marks(chat))
            mine = [r for r in self.records
                    if r["seq"] <= last and str(r.get("forget", r.get("ask", r.get(
                        "lead", {}).get("chat_id")))) == str(chat)]
            ids = {r.get("id") for r in mine}
            self.records = [r for r in self.records if r not in mine]
            for name, cursor in self.cursors.items():
                cursor["skipped"] = [i for i in cursor["skipped"] if i not in ids]
                self._write_cursor(name)
            self._compact()
            drop_lines(self.path.with_name(self.path.name + ".bad"), chat)

    def _compact(self) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records)
        _write_atomically(self.path, lines.encode())
        self._rewrite = False


def _append_synced(path: Path, line: str) -> None:
    """One line at the file's end, on disk when this returns; on failure the file is as it was."""
    with open(path, "ab") as f:
        size = f.seek(0, os.SEEK_END)
        try:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(size)
            raise


def _read_jsonl(path: Path, valid) -> tuple[list, bool]:
    """The well-formed records of a file the bot wrote, and whether it must be rewritten: a torn or
    bad line (a crash, a full disk) is set aside in {name}.bad and never stops a start."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    except OSError as e:
        raise StoreError(f"{path} не читается ({type(e).__name__}) — "
                         "исправьте права доступа") from None
    records, bad = [], []
    for line in filter(str.strip, text.split("\n")):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and valid(record)
        except Exception:  # whatever is wrong with one line sets only it aside
            ok = False
        records.append(record) if ok else bad.append(line)
    if bad:
        with contextlib.suppress(OSError):
            with open(path.with_name(path.name + ".bad"), "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in bad))
            log.warning("%d malformed lines of %s were set aside in %s.bad",
                        len(bad), path.name, path.name)
    return records, bool(bad)


def drop_lines(path: Path, chat) -> None:
    """/forget in a .bad copy: every line that names the chat goes (a torn line is judged by its
    text)."""
    if path.exists():
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = [line for line in lines if str(chat) not in re.findall(r"-?\d+", line)]
        if len(kept) < len(lines):
            _write_atomically(path, "".join(kept).encode())


class Funnel:
    """{data_dir}/funnel.jsonl: the anonymous conversion funnel (never a chat id, name, contact or
    text)."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()

    def record(self, dialog_id: str, event: str, source: str, **numbers) -> None:
        """Append one event line: opened, written, closed, O(1). Never raises."""
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"t": int(time.time()), "d": dialog_id, "e": event, "s": source,
                                    **numbers}) + "\n")
        except OSError as e:
            log.warning("cannot write %s (%s); a funnel event is lost", self.path, type(e).__name__)


LAST_ENDS = ("contact", "forgotten")  # a lead stays a lead, unless /forget erased it


def _period(dialogs: list[dict]) -> dict:
    ends = [d["end"] for d in dialogs]
    seconds = [d["seconds"] for d in dialogs
               if d["end"] == "contact" and isinstance(d["seconds"], (int, float))
               # a hand-edited NaN would make --stats --json invalid JSON
               and math.isfinite(d["seconds"])]
    stages = [STAGES[d["stage"]] for d in dialogs
              if not d["open"] and d["end"] in (None, "blocked")]
    return {"started": len(dialogs),
            "qualified": sum(d["stage"] >= STAGES.index("offering") for d in dialogs),
            "offered": sum(d["stage"] >= STAGES.index("collecting_contact") for d in dialogs),
            "contacts": ends.count("contact"), "refused": ends.count("refused"),
            "cancelled": ends.count("cancelled"),
            "open": sum(d["open"] for d in dialogs), "forgotten": ends.count("forgotten"),
            "dropped": {stage: stages.count(stage) for stage in STAGES},
            "median_seconds_to_contact": float(statistics.median(seconds)) if seconds else None}


def stats(path: Path, now: float, open_seconds: float = 72 * 3600) -> dict:
    """Funnel counts of telegram dialogs started in the last 7 and 30 days and ever, and of console
    ones. A dialog with no end and an event within open_seconds (SESSION_TTL_HOURS) is open, not
    dropped; /forget takes a lead out of the leads."""
    path, dialogs = Path(path), {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    except OSError as e:
        raise StoreError(f"{path} не читается ({type(e).__name__}) — это должен быть файл, "
                         "который этот пользователь может читать") from None
    for line in text.split("\n"):
        try:
            ev = json.loads(line)  # a dialog starts with its first event
            d = dialogs.setdefault(ev["d"], {"start": float(ev["t"]), "source": ev.get("s"),
                                             "stage": 0, "end": None})
            d["last"] = float(ev["t"])
        except (ValueError, TypeError, KeyError, AttributeError):
            continue  # a torn or foreign line
        if ev.get("e") == "stage" and ev.get("stage") in STAGES:
            d["stage"] = max(d["stage"], STAGES.index(ev["stage"]))
        elif ev.get("e") in ("contact", "refused", "cancelled") and d["end"] not in LAST_ENDS:
            d["end"], d["seconds"] = ev["e"], ev.get("seconds")
        elif ev.get("e") == "forgotten" or (ev.get("e") == "blocked" and d["end"] is None):
            d["end"] = ev["e"]
    for d in dialogs.values():
        d["open"] = d["end"] is None and now - d["last"] < open_seconds
    telegram = [d for d in dialogs.values() if d["source"] == "telegram"]
    return {"7d": _period([d for d in telegram if d["start"] >= now - 7 * 86400]),
            "30d": _period([d for d in telegram if d["start"] >= now - 30 * 86400]),
            "all": _period(telegram),
            "console": _period([d for d in dialogs.values() if d["source"] == "console"])}

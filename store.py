"""Everything leadbot keeps in DATA_DIR: the lock, leads.csv, the dialog journal, the outbox and the funnel."""

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
from urllib.parse import quote

log = logging.getLogger(__name__)

COLUMNS = ["timestamp", "chat_id", "client_name", "contact", "intent", "notes", "source", "status"]
TEXT_FIELDS = ("client_name", "contact", "intent", "notes")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
BOM = "\ufeff".encode()
STAGES = ["greeting", "qualifying", "offering", "collecting_contact"]
PROBE = "leadbot-end-of-file-probe"
csv.field_size_limit(2**31 - 1)  # a never-closed quote makes the rest of leads.csv one cell: parse, do not fail


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
    """The open .lock if this process now holds its OS lock (which ends with the process, kill -9 too), else None."""
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
        raise StoreError(f"на DATA_DIR {path} уже работает другая копия leadbot — сначала остановите её")
    _make_private(path)
    return handle


def _make_private(folder: Path) -> None:
    """Client data is for this user alone: the folder 0700, its files 0600, whatever the umask made them
    (new files get the same from leadbot's umask 077). Windows keeps its own access lists."""
    for path in [folder, *folder.glob("*"), *folder.glob("outbox/*")]:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)


def relock(path: Path, handle) -> object:
    """The lock handle to keep: `handle` while its file is still DATA_DIR's .lock; if the owner deleted the file (a
    second copy could then start), a new one taken now; raises StoreError when another copy took it first."""
    path = Path(path).absolute()
    with contextlib.suppress(OSError):  # deleted: FileNotFoundError
        if os.name == "nt" or os.path.samestat(os.fstat(handle.fileno()), os.stat(path / ".lock")):
            return handle  # Windows does not let a file another process has open be deleted
    try:
        new = _try_lock(path)
    except StoreError:  # the folder itself is gone or renamed for now: each file's write says so; tried again
        return handle
    if new is None:
        raise StoreError(f"на DATA_DIR {path} запустилась другая копия leadbot, пока .lock был удалён — "
                         "остановите одну из них и не удаляйте .lock")
    handle.close()
    log.warning("%s was deleted while the bot ran; it is back (leave it in place)", path / ".lock")
    return new


def check(cfg) -> tuple[bool | None, str]:
    """For --check: the folder is usable, leads.csv is readable, and whether a bot holds the lock."""
    try:
        path = _usable_dir(cfg.data_dir)
        leads = Leads(path / "leads.csv", cfg.csv_delimiter)
        if leads.path.exists():
            open(leads.path, "ab").close()  # opened for adding, as the bot does; nothing written
        handle = _try_lock(path)
    except StoreError as e:
        return False, str(e)
    except OSError as e:
        return False, (f"DATA_DIR: {leads.path} не открывается на запись ({type(e).__name__}) — закройте его в "
                       "других программах или дайте пользователю бота право записи")
    if handle:
        handle.close()  # only a momentary try: closing the file releases the lock
    running = "бот на ней сейчас не запущен" if handle else "бот работает с этой папкой"
    return True, f"DATA_DIR: {path} доступна для записи; заявки пишутся в {leads.path}; {running}"


def _delimiter_of(text: str) -> str | None:
    """";" or "," as leads.csv's header line shows it; None for another header."""
    header = re.match(r"[^\r\n]*", text.removeprefix("\ufeff")).group()  # a line ends at \r\n, \n or \r (old Macs)
    return next((d for d in ";," if header == d.join(COLUMNS)), None)


def _chat_of(cell: str) -> str:
    """A chat id cell as the bot wrote it: Excel or pandas may have made 42 into " 42", "42" or 42.0."""
    return re.sub(r"\.0+$", "", cell.strip().strip('"').strip())


def _row_chat(line: str, delimiter: str) -> str | None:
    """The chat id of the row a physical line of leads.csv starts, else None: a first cell that is a date in any
    shape (or empty: the owner's own row), then a number. Lines of notes such as "Итог;25000;…" or "100,200,…" are
    not."""
    fields = line.split(delimiter, 2)
    if len(fields) < 2 or not re.fullmatch(r'\s*"?(\d{1,4}[-./]\d{1,2}.*)?', fields[0]):
        return None
    return chat if (chat := _chat_of(fields[1])).lstrip("-").isdigit() else None


class Leads:
    """{data_dir}/leads.csv, the owner's file: rows are appended, or removed by /forget; it is never repaired."""

    def __init__(self, path: Path, delimiter: str):
        self.path, self.delimiter, self._lock = Path(path).absolute(), delimiter, threading.Lock()
        try:
            text = self.path.read_bytes().decode("utf-8").removeprefix("\ufeff") if self.path.exists() else ""
        except UnicodeError:
            raise StoreError(f"leads.csv {self.path} не в кодировке UTF-8 (сохранён как ANSI или Юникод?) — "
                             "в Excel сохраните его как «CSV UTF-8» или уберите файл и запустите бота снова") from None
        except OSError as e:
            raise StoreError(f"leads.csv {self.path} не читается ({type(e).__name__}) — "
                             "закройте его в других программах или исправьте права доступа") from None
        if not text:
            return
        found = _delimiter_of(text)
        if found is None:
            raise StoreError(f"в leads.csv {self.path} другие столбцы, а нужны {','.join(COLUMNS)} — "
                             "переименуйте или уберите файл и запустите бота снова")
        if found != delimiter:
            log.warning("leads.csv uses %r, CSV_DELIMITER says %r — appending with %r", found, delimiter, found)
        self.delimiter = found
        # Refuse a file that ends inside a quoted cell: it would swallow every row appended.
        text += "" if text.endswith(("\n", "\r")) else "\r\n"
        for row in csv.reader(io.StringIO(text + PROBE + "\r\n", newline=""), delimiter=self.delimiter):
            pass
        if row != [PROBE]:
            cell = row[-1]  # the open cell is '"' + its text with quotes doubled, up to the end
            line = text.count("\n", 0, len(text) + len(PROBE) + 1 - len(cell) - cell.count('"')) + 1
            raise StoreError(f"leads.csv {self.path}: ячейка в кавычках со строки {line} не закрыта "
                             "— допишите закрывающую \" в редакторе и запустите бота снова")

    def position(self) -> int:
        """Where the next row will start: the size of the file (0 if it is missing)."""
        return self.path.stat().st_size if self.path.exists() else 0

    def write(self, lead: dict, since: int, wanted=lambda: True) -> bool:
        """Append the lead unless its exact row already stands at or after byte `since`, or wanted() (asked under
        the file's lock, which forget() takes too) says it was forgotten meanwhile (then False); raises
        OSError."""
        with self._lock, open(self.path, "a+b", buffering=0) as f:
            if not wanted():
                return False
            f.seek(0)  # the owner may have re-saved it while the bot ran: with the other delimiter is fine
            head = f.read(200).decode("utf-8", "replace")
            found = _delimiter_of(head)
            if head.lstrip("\ufeff") and not found:  # a row under the wrong columns would be silent harm
                raise OSError(f"leads.csv has other columns than {','.join(COLUMNS)} now — put that header back")
            self.delimiter = found or self.delimiter
            buffer, values = io.StringIO(), ["" if lead.get(c) is None else str(lead[c]) for c in COLUMNS]
            csv.writer(buffer, delimiter=self.delimiter, lineterminator="\r\n").writerow(  # defuse formulas:
                "'" + v if c in TEXT_FIELDS and v.startswith(FORMULA_STARTS) else v for c, v in zip(COLUMNS, values))
            row = buffer.getvalue().encode("utf-8")
            size = f.seek(0, os.SEEK_END)
            f.seek(since)
            if row in f.read():
                return True  # written before a crash: exactly once
            f.seek(max(size - 4096, 0))
            tail = f.read()
            try:  # re-saved as ANSI, the owner's Excel would show a UTF-8 row as «Р‘РѕСЂРёСЃ»
                codecs.getincrementaldecoder("utf-8")().decode(tail.lstrip(bytes(range(0x80, 0xC0))))
            except UnicodeDecodeError:
                raise OSError("leads.csv is not UTF-8 now (saved as ANSI?) — save it as «CSV UTF-8»") from None
            end = tail[-3:]
            if size <= len(BOM) and end in (b"", BOM):  # new, or emptied down to its BOM
                row = (b"" if end else BOM) + (self.delimiter.join(COLUMNS) + "\r\n").encode() + row
            elif not end.endswith(b"\n"):  # complete the last line (saved by Notepad, or an earlier cut)
                row = (b"\n" if end.endswith(b"\r") else b"\r\n") + row
            try:
                view = memoryview(row)
                while view:
                    view = view[f.write(view):]
                os.fsync(f.fileno())
            except OSError:
                f.truncate(size)  # only the bytes this call wrote: never half a row for the next one
                raise
            return True

    def forget(self, chat_id) -> int:
        """Remove every row of that chat, every other byte identical; returns how many. Raises OSError, and removes
        nothing, when a row of the chat is not a clean record of its own (a quote the owner left open joins rows)."""
        with self._lock:
            if not self.path.exists():
                return 0
            text = self.path.read_bytes().decode("utf-8", errors="surrogateescape")  # every byte comes back
            delimiter = _delimiter_of(text)  # as it is now: the owner may have re-saved it
            if text.strip() and not delimiter:  # never say «удалены» unsure
                raise OSError("leads.csv has other columns now")
            self.delimiter = delimiter or self.delimiter
            lines = io.StringIO(text, newline="").readlines()  # split where csv splits: at \r\n, \n and \r
            reader, chat = csv.reader(lines, delimiter=self.delimiter), str(chat_id)
            kept, kept_from, start, removed = [], 0, 0, 0
            for row in reader:  # csv's own rules; reader.line_num tells which lines a record took
                if start and len(row) != len(COLUMNS) and chat in map(_chat_of, row):  # rows run together
                    raise OSError("leads.csv: a row of that chat runs into another (a quote left open, a line "
                                  "break deleted?)")
                if start and len(row) > 1 and _chat_of(row[1]) == chat:  # start == 0: the header
                    if any(_row_chat(line, self.delimiter) for line in lines[start + 1:reader.line_num]):
                        raise OSError("leads.csv: a row of that chat runs into other rows (a quote left open?)")
                    kept += lines[kept_from:start]
                    kept_from, removed = reader.line_num, removed + 1
                start = reader.line_num
            kept += lines[kept_from:]
            if any(chat in line and _row_chat(line, self.delimiter) == chat for line in kept):  # inside a cell
                raise OSError("leads.csv: a row of that chat is inside another row (a quote left open?)")
            if removed:
                _write_atomically(self.path, "".join(kept).encode("utf-8", errors="surrogateescape"))
            return removed


class Journal:
    """{data_dir}/state.jsonl: dialog states, appended without fsync, a chat's last line wins; None: in memory only."""

    def __init__(self, path: Path | None, valid):
        self.path, self._valid, self.dialogs, self._lock = path and Path(path).absolute(), valid, {}, threading.Lock()
        if path is None:
            return
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace") if self.path.exists() else ""
        except OSError as e:
            raise StoreError(f"{self.path} не читается ({type(e).__name__}) — исправьте права доступа") from None
        *lines, torn = text.split("\n")  # torn is "" when the file ends with a line break, else ignored
        bad = [line for line in lines if line.strip() and not self._apply(line)]
        # The bot's own torn or bad lines (a crash, a full disk) never stop a start: they are set aside, and
        # while the file cannot be rewritten (the disk still full) the dialogs live in memory, each save
        # trying the rewrite again; no line is appended to a torn one meanwhile.
        self._lines, self._rewrite = len(lines), bool(bad or torn)
        try:
            if bad:
                with open(f"{self.path}.bad", "a", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in bad))
                log.warning("%d malformed entries of %s were set aside in %s.bad", len(bad), self.path.name, self.path)
            if self._rewrite:
                self._compact()
        except OSError as e:
            log.warning("cannot clean up %s (%s); dialogs are kept in memory until it can be rewritten",
                        self.path, type(e).__name__)

    def _apply(self, line: str) -> bool:
        """Take one line into self.dialogs; False if it is not a well-formed entry."""
        try:
            entry = json.loads(line)
            chat, dialog = entry["chat"], entry["dialog"]
            ok = isinstance(chat, (int, str)) and (dialog is None or isinstance(dialog, dict) and self._valid(dialog))
        except Exception:  # whatever is wrong with one entry (the validator's errors too) sets only it aside
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
        """Record the dialog of a chat (None deletes it), in .dialogs too unless remember is False (the caller keeps
        a newer one there); a write failure is logged and mended by the next save."""
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
                log.warning("cannot write %s (%s); dialog state is kept in memory", self.path, type(e).__name__)
                self._rewrite = True  # a half-written line must not stay in the middle

    def erase(self, chat_id) -> None:
        """Remove the chat and rewrite the file so that no earlier line keeps its data; raises OSError."""
        with self._lock:
            self.dialogs.pop(chat_id, None)
            if self.path is not None:
                self._compact()

    def _compact(self) -> None:
        lines = [json.dumps({"chat": chat, "dialog": d}) + "\n" for chat, d in self.dialogs.items()]
        _write_atomically(self.path, "".join(lines).encode())
        self._lines, self._rewrite = len(lines), False


def _well_formed(item) -> bool:
    kinds = {"id": str, "lead": dict, "owed": list, "due": (int, float), "attempts": int, "chat_id": (int, str)}
    return isinstance(item, dict) and all(
        isinstance(item.get(key), kind) and not isinstance(item[key], bool) for key, kind in kinds.items())


class Outbox:
    """{data_dir}/outbox/: one JSON file per lead with the deliveries still owed (its write-ahead log)."""

    def __init__(self, folder: Path):
        self.folder, self._lock, self._items = Path(folder).absolute(), threading.RLock(), {}
        for file in sorted(self.folder.glob("*.json")):
            try:
                item = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                item = None
            if _well_formed(item):
                self._items[item["id"]] = item
            else:  # kept for the owner to look at; start-up goes on
                (self.folder / "bad").mkdir(exist_ok=True)
                os.replace(file, self.folder / "bad" / file.name)
                log.warning("outbox file %s is malformed — moved to %s", file.name, self.folder / "bad")

    def _file(self, lead_id: str) -> Path:
        return self.folder / (quote(lead_id, safe="") + ".json")  # any id makes one plain file name

    def _save(self, item: dict) -> None:
        """Keep the item, then write its file; raises OSError, the item still kept in memory (and delivered)."""
        self._items[item["id"]] = copy.deepcopy(item)
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self._file(item["id"]), json.dumps(item).encode())

    def add(self, lead_id: str, lead: dict, owed: list[str], since: int, update_id: int | None) -> dict:
        """Create the item once (an existing one is returned unchanged); a write failure is logged, never raised."""
        item = {"id": lead_id, "chat_id": lead["chat_id"], "lead": lead, "owed": list(owed), "since": since,
                "update_id": update_id, "confirmed": False, "due": time.time(), "attempts": 0}
        with self._lock:
            try:
                if lead_id not in self._items:
                    self._save(item)
            except OSError as e:  # the channels are still tried now, and again while this process runs
                log.error("cannot write %s (%s); the lead is kept in memory only", self.folder, type(e).__name__)
            return copy.deepcopy(self._items[lead_id])

    def has(self, lead_id: str) -> bool:
        with self._lock:
            return lead_id in self._items

    def items(self) -> list[dict]:
        with self._lock:
            return copy.deepcopy(sorted(self._items.values(), key=lambda item: item["due"]))

    def update(self, item: dict) -> None:
        """Rewrite one item; a confirmed one that owes nothing is removed instead. Raises OSError."""
        with self._lock:
            if item["id"] not in self._items:
                return  # dropped by /forget meanwhile: never write it back
            if item["owed"] or not item.get("confirmed"):
                return self._save(item)
            self.drop(item["id"])

    def retry_later(self, lead_id: str, delay: float) -> None:
        """Count a failed attempt and try again after delay seconds. Never raises."""
        with self._lock:
            if (item := self._items.get(lead_id)) is None:
                return  # dropped by /forget while it was being sent
            item.update(attempts=item["attempts"] + 1, due=time.time() + delay)
            try:
                self._save(item)
            except OSError as e:
                log.warning("cannot write %s (%s); the retry is kept in memory", self.folder, type(e).__name__)

    def next_due(self) -> float | None:
        with self._lock:
            return min((item["due"] for item in self._items.values() if item["owed"]), default=None)

    def drop(self, lead_id: str) -> None:
        """Forget the item, then remove its file; raises OSError, the item gone from memory all the same (a stale
        copy there would be delivered again and again)."""
        with self._lock:
            self._items.pop(lead_id, None)
            self._file(lead_id).unlink(missing_ok=True)
            self._file(lead_id).with_suffix(".json.tmp").unlink(missing_ok=True)  # left by a crash mid-write

    def drop_chat(self, chat_id) -> int:
        """Remove every item of that chat (/forget); returns how many; raises OSError."""
        with self._lock:
            ids = [key for key, item in self._items.items() if str(item["chat_id"]) == str(chat_id)]
            for lead_id in ids:
                self.drop(lead_id)
            return len(ids)


class Funnel:
    """{data_dir}/funnel.jsonl: the anonymous conversion funnel (never a chat id, name, contact or text)."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()

    def record(self, dialog_id: str, event: str, source: str, **numbers) -> None:
        """Append one event line: opened, written, closed, O(1). Never raises."""
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"t": int(time.time()), "d": dialog_id, "e": event, "s": source, **numbers}) + "\n")
        except OSError as e:
            log.warning("cannot write %s (%s); a funnel event is lost", self.path, type(e).__name__)


LAST_ENDS = ("contact", "forgotten")  # a lead stays a lead, unless /forget erased it


def _period(dialogs: list[dict]) -> dict:
    ends = [d["end"] for d in dialogs]
    seconds = [d["seconds"] for d in dialogs if d["end"] == "contact" and isinstance(d["seconds"], (int, float))
               and math.isfinite(d["seconds"])]  # a hand-edited NaN would make --stats --json invalid JSON
    stages = [STAGES[d["stage"]] for d in dialogs if not d["open"] and d["end"] in (None, "blocked")]
    return {"started": len(dialogs), "qualified": sum(d["stage"] >= STAGES.index("offering") for d in dialogs),
            "offered": sum(d["stage"] >= STAGES.index("collecting_contact") for d in dialogs),
            "contacts": ends.count("contact"), "refused": ends.count("refused"), "cancelled": ends.count("cancelled"),
            "open": sum(d["open"] for d in dialogs), "forgotten": ends.count("forgotten"),
            "dropped": {stage: stages.count(stage) for stage in STAGES},
            "median_seconds_to_contact": float(statistics.median(seconds)) if seconds else None}


def stats(path: Path, now: float, open_seconds: float = 72 * 3600) -> dict:
    """Funnel counts of telegram dialogs started in the last 7 and 30 days and ever, and of console ones.
    A dialog with no end and an event within open_seconds (SESSION_TTL_HOURS) is open, not dropped;
    /forget takes a lead out of the leads."""
    path, dialogs = Path(path), {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    except OSError as e:
        raise StoreError(f"{path} не читается ({type(e).__name__}) — это должен быть файл, который этот пользователь может читать") from None
    for line in text.split("\n"):
        try:
            ev = json.loads(line)  # a dialog starts with its first event
            d = dialogs.setdefault(ev["d"], {"start": float(ev["t"]), "source": ev.get("s"), "stage": 0, "end": None})
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
            "all": _period(telegram), "console": _period([d for d in dialogs.values() if d["source"] == "console"])}

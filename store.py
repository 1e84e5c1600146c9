"""Everything leadbot keeps on disk: the leads CSV, the dialog-state journal and the outbox."""

import contextlib
import copy
import csv
import io
import json
import logging
import os
import re
import threading
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

COLUMNS = ["timestamp", "chat_id", "client_name", "contact", "intent", "notes", "source", "status"]
TEXT_FIELDS = ("client_name", "contact", "intent", "notes")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
BOM = "\ufeff".encode()
TAIL_BYTES = 64 * 1024


class StoreError(Exception):
    """The leads file cannot be used safely (message names the file and the problem, no client data)."""


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace path with data so that a crash leaves either the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _split_records(data: bytes) -> tuple[list[bytes], bytes]:
    """Split raw CSV into complete records (each with its newline) and the torn rest after them."""
    records, start, pos, quoted = [], 0, 0, False
    while (newline := data.find(b"\n", pos)) != -1:
        quoted ^= data.count(b'"', pos, newline) % 2 == 1
        pos = newline + 1
        if not quoted:
            records.append(data[start:pos])
            start = pos
    return records, data[start:]


def _record_start(data: bytes) -> int | None:
    """Offset of the first record that starts inside data, a chunk that ends where a record ends.

    A newline lies outside quotes exactly when an even number of quotes follows it up to the end,
    so the end of a file can be parsed without reading its beginning.
    """
    quotes_after, pos = data.count(b'"'), 0
    while (newline := data.find(b"\n", pos, len(data) - 1)) != -1:
        quotes_after -= data.count(b'"', pos, newline)
        if quotes_after % 2 == 0:
            return newline + 1
        pos = newline + 1
    return None


def _parse(text: str, delimiter: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))


def _check_header(path: Path, data: bytes, delimiter: str) -> None:
    expected = delimiter.join(COLUMNS)
    line, newline, _ = data.removeprefix(BOM).partition(b"\n")
    line = line.decode("utf-8", errors="replace")
    complete = bool(newline) and line.rstrip("\r") == expected
    torn = not newline and (expected + "\r").startswith(line)  # cut off while being written
    if not (complete or torn):
        raise StoreError(f"{path} has columns/delimiter different from this version "
                         f"(expected {expected}); rename or move it and start again")


def prepare_leads(path: Path, delimiter: str = ",") -> None:
    """Create the data directory, refuse a leads file of another format and repair a torn last record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    _check_header(path, data, delimiter)
    _, torn = _split_records(data)
    if torn:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(torn))
            os.fsync(f.fileno())
        log.warning("repaired a torn last line in %s", path.name)


def neutralise(value: str) -> str:
    """Defuse CSV injection: prefix an apostrophe to a cell a spreadsheet would read as a formula."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def append_lead(path: Path, lead: dict, delimiter: str = ",") -> None:
    """Append one lead row, with BOM and header first if the file is empty; raises OSError on failure."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\r\n")
    with open(path, "ab", buffering=0) as f:
        start = f.tell()
        if start == 0:
            buffer.write("\ufeff")
            writer.writerow(COLUMNS)
        writer.writerow(neutralise(lead[c]) if c in TEXT_FIELDS else lead[c] for c in COLUMNS)
        data = memoryview(buffer.getvalue().encode("utf-8"))
        try:
            while data:
                data = data[f.write(data):]
            os.fsync(f.fileno())
        except OSError:
            f.truncate(start)  # never leave half a row for the next append to continue
            raise


def lead_exists(path: Path, chat_id, timestamp: str, delimiter: str = ",") -> bool:
    """True if one of the last records of the file has this chat_id and timestamp; reads only the tail."""
    if not path.exists():
        return False
    with open(path, "rb") as f:
        size, span = f.seek(0, os.SEEK_END), TAIL_BYTES
        while True:
            start = max(0, size - span)
            f.seek(start)
            data = f.read()
            cut = 0 if start == 0 else _record_start(data)
            if cut is not None:
                break
            span *= 2
    if timestamp.encode() not in data[cut:]:  # the usual answer, without parsing the tail
        return False
    rows = _parse(data[cut:].decode("utf-8-sig", errors="replace"), delimiter)
    return any(row[:2] == [timestamp, str(chat_id)] for row in rows)


def _chat_of(record: bytes, delimiter: str) -> str | None:
    """The chat_id cell of one raw record."""
    rows = _parse(record.decode("utf-8", errors="replace"), delimiter)
    return rows[0][1] if rows and len(rows[0]) > 1 else None


def forget_chat(path: Path, chat_id, delimiter: str = ",") -> int:
    """Remove every row of that chat, keeping all other bytes identical; returns how many were removed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    records, torn = _split_records(data)
    header, rows = records[:1], records[1:]
    kept = [record for record in rows if _chat_of(record, delimiter) != str(chat_id)]
    removed = len(rows) - len(kept)
    if removed:
        _write_atomically(path, b"".join(header + kept) + torn)
    return removed


def read_leads(path: Path, delimiter: str = ",") -> list[dict]:
    """All rows as dicts; a missing file has none."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter=delimiter))
    except FileNotFoundError:
        return []


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def _chat_key(chat_id) -> int | str:
    text = str(chat_id)
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else text


class Journal:
    """Dialog state per chat in an append-only JSON-lines file where the last line of a chat wins.
    Appends are flushed, not fsynced: a process crash keeps the page cache."""

    def __init__(self, path: Path):
        self._path = path
        self._lock = threading.Lock()
        self._live = {}  # chat -> its latest journal line
        self._lines = 0  # lines in the file, superseded ones included
        self._file = None
        self._failed = False

    def load(self) -> dict:
        """Read the journal and return chat_id -> dialog; call once, before save()."""
        with self._lock:
            text = self._guard(_read_text, self._path) or ""
            dialogs = {}
            for line in text.split("\n"):
                try:
                    entry = json.loads(line)
                    chat, dialog = _chat_key(entry["chat"]), entry["dialog"]
                except (ValueError, TypeError, KeyError):
                    continue  # torn or foreign line
                if dialog is None:
                    dialogs.pop(chat, None)
                else:
                    dialogs[chat] = dialog
            self._live = {chat: json.dumps({"chat": chat, "dialog": d}) for chat, d in dialogs.items()}
            self._lines = text.count("\n")
            if text and not text.endswith("\n"):
                self._guard(self._compact)  # the next append must not continue a torn line
            return dialogs

    def save(self, chat_id, dialog: dict | None) -> None:
        """Record the dialog of a chat; None deletes it."""
        chat = _chat_key(chat_id)
        line = json.dumps({"chat": chat, "dialog": dialog})
        with self._lock:
            if dialog is None:
                self._live.pop(chat, None)
            else:
                self._live[chat] = line
            self._lines += 1
            if self._lines > 2 * len(self._live) + 1000:
                self._guard(self._compact)
            else:
                self._guard(self._append, line)

    def compact(self) -> None:
        """Rewrite the file with only the latest state of each chat; superseded lines are gone from disk."""
        with self._lock:
            self._guard(self._compact)

    def close(self) -> None:
        with self._lock:
            self._close_file()

    def _append(self, line: str) -> None:
        if self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a", encoding="utf-8", newline="")
        self._file.write(line + "\n")
        self._file.flush()

    def _compact(self) -> None:
        self._close_file()  # Windows cannot replace a file that is open
        self._lines = len(self._live)
        _write_atomically(self._path, "".join(line + "\n" for line in self._live.values()).encode())

    def _guard(self, action, *args):
        """Run a file operation unless one has failed before; the first failure logs a warning."""
        if self._failed:
            return None
        try:
            return action(*args)
        except OSError as e:
            log.warning("cannot use %s (%s); dialog state is kept in memory only",
                        self._path.name, type(e).__name__)
            self._failed = True
            self._close_file()
            return None

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):  # a failed flush was reported already
                file.close()


class Outbox:
    """Deliveries still owed: items (dicts with id, channel, chat_id, lead, attempts, next_at) kept in
    memory and as one JSON file each in data_dir/outbox; if that cannot be written, in memory only."""

    def __init__(self, data_dir: Path):
        self._dir = Path(data_dir) / "outbox"
        self._lock = threading.Lock()
        self._items = {}
        self._warned = False
        for file in self._dir.glob("*.json"):
            try:
                item = json.loads(file.read_text(encoding="utf-8"))
                self._items[item["id"]] = item
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("skipped unreadable outbox file %s", file.name)

    def put(self, item: dict) -> None:
        """Add the item, or replace the one with the same id."""
        item = copy.deepcopy(item)
        with self._lock:
            self._items[item["id"]] = item
            self._save(item)

    def has(self, item_id: str) -> bool:
        with self._lock:
            return item_id in self._items

    def due(self, now: float) -> list[dict]:
        """Copies of the items whose next_at has come, earliest first."""
        with self._lock:
            items = sorted(self._items.values(), key=lambda item: item["next_at"])
            return [copy.deepcopy(item) for item in items if item["next_at"] <= now]

    def next_due(self) -> float | None:
        with self._lock:
            return min((item["next_at"] for item in self._items.values()), default=None)

    def done(self, item_id: str) -> None:
        """Forget a delivered item."""
        with self._lock:
            self._remove(item_id)

    def retry_later(self, item_id: str, now: float, first: float, cap: float) -> float:
        """Count a failed attempt and schedule the next one with exponential backoff; returns the delay."""
        with self._lock:
            item = self._items.get(item_id)
            if item is None:  # forgotten (/forget) while it was being sent: nothing to retry
                return 0.0
            item["attempts"] += 1
            # the exponent is bounded so that very many attempts cannot overflow a float
            delay = min(first * 2 ** min(item["attempts"] - 1, 64), cap)
            item["next_at"] = now + delay
            self._save(item)
            return delay

    def drop_chat(self, chat_id) -> int:
        """Remove every item of that chat; returns how many."""
        with self._lock:
            ids = [key for key, item in self._items.items() if str(item["chat_id"]) == str(chat_id)]
            for item_id in ids:
                self._remove(item_id)
            return len(ids)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _file(self, item_id: str) -> Path:
        return self._dir / (quote(item_id, safe="") + ".json")  # ids may hold ':' (not on Windows)

    def _save(self, item: dict) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            _write_atomically(self._file(item["id"]), json.dumps(item).encode())
        except OSError as e:
            self._warn(e)

    def _remove(self, item_id: str) -> None:
        self._items.pop(item_id, None)
        try:
            self._file(item_id).unlink(missing_ok=True)
        except OSError as e:
            self._warn(e)

    def _warn(self, error: OSError) -> None:
        if not self._warned:
            log.warning("cannot write %s (%s); undelivered items are kept in memory only",
                        self._dir, type(error).__name__)
            self._warned = True

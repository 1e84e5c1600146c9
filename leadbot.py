"""leadbot: a Telegram assistant that qualifies prospective clients and hands leads to a manager.

    python leadbot.py            talk to clients in Telegram (long polling)
    python leadbot.py --console  the same dialog in this terminal, no Telegram needed
    python leadbot.py --check    check every configured part and say what to fix

Flow: update -> stage function (STAGES) -> llm / store / mailer -> reply.
"""
import argparse
import copy
import dataclasses
import functools
import logging
import os
import queue
import random
import re
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path

import requests
from dotenv import load_dotenv

import llm
import mailer
import store

log = logging.getLogger("leadbot")
HERE = Path(__file__).resolve().parent

# --- What the client reads (Russian, addressing the client as «вы») -------------------------

QUESTIONS = [  # (answer key, question, suggested answers shown as buttons)
    ("task", "Расскажите в двух словах, какая у вас задача?", []),
    ("timeline", "Когда вам нужен результат?",
     ["В течение недели", "В течение месяца", "Не срочно"]),
    ("budget", "На какой бюджет вы ориентируетесь?",
     ["До 50 тыс. ₽", "50–200 тыс. ₽", "Больше 200 тыс. ₽", "Пока не знаю"]),
]
ANSWER_LABELS = {"task": "Задача", "timeline": "Сроки", "budget": "Бюджет"}

TEXTS = {
    "greeting": "Здравствуйте{name}! Я помощник компании: задам пару коротких вопросов, "
                "подскажу подходящую услугу и передам заявку менеджеру.",
    "contact_request": "Оставьте, пожалуйста, один контакт для связи: телефон, @username в Telegram "
                       "или email. Он нужен только для того, чтобы менеджер ответил вам по этой "
                       "заявке; отправляя его, вы соглашаетесь на его обработку.{privacy}",
    "privacy": " Политика обработки данных: {url}",
    "share_button": "📱 Поделиться номером",
    "contact_placeholder": "или напишите телефон, @username или email",
    "contact_format": "Не получилось распознать контакт. Пришлите телефон (например, "
                      "+7 999 123-45-67), @username или email (name@example.ru) — "
                      "или напишите «нет», если не хотите оставлять контакт.",
    "foreign_contact": "Пожалуйста, поделитесь своим номером или напишите контакт текстом.",
    "thanks_saved": "Спасибо! Заявка сохранена, менеджер свяжется с вами в ближайшее время.",
    "thanks_unsaved": "Спасибо! Ваш контакт передан менеджеру, он свяжется с вами.",
    "refused": "Понимаю, без проблем. Если появятся вопросы — напишите сюда или отправьте /start.",
    "returning": "С возвращением! Продолжим с того места, где мы остановились.",
    "help": "Я помогаю подобрать услугу: задам пару вопросов, порекомендую подходящий вариант "
            "и передам заявку менеджеру.\n\n"
            "/start — начать заново\n/cancel — прервать диалог (ничего не сохранится)\n"
            "/forget — удалить мои данные\n\n"
            "Чтобы поговорить с человеком, оставьте контакт в конце диалога — менеджер напишет вам.",
    "cancelled": "Диалог прерван, ничего не сохранено. Чтобы начать заново, отправьте /start.",
    "nothing_to_cancel": "Сейчас нечего прерывать. Чтобы удалить уже оставленные данные, отправьте /forget.",
    "forgotten": "Готово: ваши данные удалены.",
    "forget_failed": "Не получилось удалить ваши данные из заявок. Попробуйте, пожалуйста, ещё раз позже.",
    "text_only": "Пожалуйста, напишите ответ текстом — так я смогу помочь.",
    "too_fast": "Вы пишете быстрее, чем я успеваю отвечать. Подождите немного, и продолжим.",
    "private_only": "Я отвечаю только в личных сообщениях — напишите мне в личный чат, пожалуйста.",
    "console_hint": "(Режим консоли: отвечайте и нажимайте Enter. Выход — Ctrl+D, в Windows — Ctrl+Z и Enter.)",
}

COMMANDS = [
    ("start", "Начать заново"),
    ("help", "Что умеет бот и как связаться с человеком"),
    ("cancel", "Прервать диалог, ничего не сохранится"),
    ("forget", "Удалить мои данные"),
]

# What the LLM is asked for the manager's notes (the client's contact is never sent to it).
SUMMARY_PROMPT = (
    "Ты помогаешь менеджеру. По ответам клиента напиши ровно две строки на русском. "
    "Первая: суть запроса в 3–6 словах. Вторая: краткое резюме для менеджера в одном-двух "
    "предложениях. Не пиши имён, телефонов, адресов почты и других персональных данных."
)

# --- Settings ---------------------------------------------------------------------------------

REQUIRED_IN_TELEGRAM_MODE = ("TELEGRAM_BOT_TOKEN",)
SMTP_DEFAULT_PORTS = {"ssl": 465, "starttls": 587, "none": 25}


@dataclasses.dataclass(frozen=True)
class Config:
    token: str = ""
    telegram_api_url: str = "https://api.telegram.org"
    llm_base_url: str = ""
    llm_api_key: str = ""
    llm_model: str = ""
    llm_timeout: float = 30.0
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_user: str = ""
    smtp_password: str = ""
    smtp_security: str = "starttls"
    mail_from: str = ""
    manager_email: str = ""
    manager_chat_id: str = ""
    data_dir: Path = Path("data")
    csv_delimiter: str = ","
    log_level: str = "INFO"
    log_file: str = ""
    session_ttl_hours: float = 72.0
    privacy_url: str = ""
    delete_webhook: bool = False
    workers: int = 1
    poll_timeout: int = 25
    telegram_timeout: float = 15.0
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    outbox_retry_seconds: float = 30.0
    outbox_retry_max_seconds: float = 1800.0

    @property
    def llm_on(self):
        return bool(self.llm_base_url)

    @property
    def email_on(self):
        return bool(self.smtp_host)

    @property
    def leads_path(self):
        return self.data_dir / "leads.csv"

    def secrets(self):
        # Very short values would mask pieces of ordinary words; real secrets are longer.
        return [s for s in (self.token, self.llm_api_key, self.smtp_password) if len(s) >= 5]


class ConfigError(Exception):
    """Settings are missing or malformed; .problems holds one line per setting."""

    def __init__(self, problems):
        super().__init__("; ".join(problems))
        self.problems = problems


def read_config(env, telegram=True):
    """Builds Config from a mapping of settings, collecting every problem before failing."""
    problems = []
    get = lambda name, default="": (env.get(name) or default).strip()

    def number(name, default, cast=float, minimum=0):
        raw = get(name, str(default))
        try:
            value = cast(raw)
        except ValueError:
            value = None
        if value is None or value < minimum:
            problems.append(f"{name} must be a number >= {minimum}, got {raw!r}")
            return default
        return value

    def url(name, default=""):
        value = get(name, default).rstrip("/")
        if value and not re.match(r"https?://[^/\s]+", value):
            problems.append(f"{name} must start with http:// or https://")
        return value

    if telegram:
        problems += [f"{name} is missing (set it in .env)" for name in REQUIRED_IN_TELEGRAM_MODE
                     if not get(name)]
    token = get("TELEGRAM_BOT_TOKEN")

    llm_base_url = url("LLM_BASE_URL")
    llm_model = get("LLM_MODEL")

    security = get("SMTP_SECURITY", "starttls").lower()
    if security not in SMTP_DEFAULT_PORTS:
        problems.append(f"SMTP_SECURITY must be ssl, starttls or none, got {security!r}")
        security = "starttls"
    smtp_host = get("SMTP_HOST")
    smtp_user = get("SMTP_USER")
    manager_email = get("MANAGER_EMAIL")
    mail_from = get("MAIL_FROM") or (smtp_user if "@" in smtp_user else manager_email)
    if smtp_host and not manager_email:
        problems.append("MANAGER_EMAIL is missing (required when SMTP_HOST is set)")

    manager_chat_id = get("MANAGER_CHAT_ID")
    if manager_chat_id and not re.fullmatch(r"-?\d+|@\w{5,}", manager_chat_id):
        problems.append("MANAGER_CHAT_ID must be a numeric chat id (or @channelname)")

    delimiter = get("CSV_DELIMITER", ",")
    if delimiter not in (",", ";"):
        problems.append(f"CSV_DELIMITER must be , or ; got {delimiter!r}")
        delimiter = ","

    level = get("LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        level = "INFO"

    delete_webhook = get("DELETE_WEBHOOK", "0").lower()
    if delete_webhook not in ("0", "1", "true", "false", "yes", "no"):
        problems.append("DELETE_WEBHOOK must be 1 or 0")

    cfg = Config(
        token=token,
        telegram_api_url=url("TELEGRAM_API_URL", Config.telegram_api_url),
        llm_base_url=llm_base_url,
        llm_api_key=get("LLM_API_KEY"),
        llm_model=llm_model,
        llm_timeout=number("LLM_TIMEOUT", 30.0, minimum=1),
        smtp_host=smtp_host,
        smtp_port=number("SMTP_PORT", SMTP_DEFAULT_PORTS[security], int, minimum=1),
        smtp_user=smtp_user,
        smtp_password=env.get("SMTP_PASSWORD") or "",
        smtp_security=security,
        mail_from=mail_from,
        manager_email=manager_email,
        manager_chat_id=manager_chat_id,
        data_dir=Path(get("DATA_DIR", "data")),
        csv_delimiter=delimiter,
        log_level=level,
        log_file=get("LOG_FILE"),
        session_ttl_hours=number("SESSION_TTL_HOURS", 72.0, minimum=0.0001),
        privacy_url=get("PRIVACY_URL"),
        delete_webhook=delete_webhook in ("1", "true", "yes"),
        workers=number("WORKERS", 1, int, minimum=1),
        poll_timeout=number("POLL_TIMEOUT", 25, int, minimum=0),
        telegram_timeout=number("TELEGRAM_TIMEOUT", 15.0, minimum=0.1),
        retry_base_seconds=number("RETRY_BASE_SECONDS", 1.0, minimum=0.001),
        retry_max_seconds=number("RETRY_MAX_SECONDS", 60.0, minimum=0.001),
        outbox_retry_seconds=number("OUTBOX_RETRY_SECONDS", 30.0, minimum=0.001),
        outbox_retry_max_seconds=number("OUTBOX_RETRY_MAX_SECONDS", 1800.0, minimum=0.001),
    )
    if problems:
        raise ConfigError(problems)
    return cfg


def setup_logging(cfg, console_level=None):
    """INFO lines to stderr (and LOG_FILE); every known secret is masked in every line."""
    handlers = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(console_level or cfg.log_level)
    if cfg.log_file:
        handlers.append(logging.FileHandler(cfg.log_file, encoding="utf-8"))
    masker = SecretMask(cfg.secrets())
    for handler in handlers:
        handler.addFilter(masker)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=cfg.log_level, handlers=handlers, force=True)
    # urllib3 logs request lines with the URL path, and the Telegram path carries the token.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


class SecretMask(logging.Filter):
    """Last line of defence: replaces known secrets in a formatted log line."""

    def __init__(self, secrets):
        super().__init__()
        self.secrets = secrets

    def filter(self, record):
        message = record.getMessage()
        for secret in self.secrets:
            message = message.replace(secret, "***")
        record.msg, record.args = message, None
        return True


# --- Telegram Bot API --------------------------------------------------------------------------

class TelegramError(Exception):
    """A Bot API call failed. error_code 0 means the request never got an answer."""

    def __init__(self, error_code, description, retry_after=None):
        super().__init__(f"Telegram API error {error_code}: {description}")
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after

    @property
    def bad_token(self):
        return self.error_code in (401, 404)

    @property
    def transient(self):
        return self.error_code == 0 or self.error_code == 429 or self.error_code >= 500


class Stopped(Exception):
    """Shutdown was requested while waiting."""


class ChatGone(Exception):
    """The client blocked the bot or deleted the chat."""


@contextmanager
def pooled(sessions):
    """An idle requests.Session from the queue (or a new one), put back afterwards: its connection is
    reused by whichever thread calls next, so a remote server is not asked for a TLS handshake each time."""
    try:
        session = sessions.get_nowait()
    except queue.Empty:
        session = requests.Session()
    try:
        yield session
    finally:
        sessions.put(session)


class Telegram:
    """Every Bot API call goes through call(); pooled HTTP sessions keep connections warm."""

    def __init__(self, cfg, stopping):
        self.base = f"{cfg.telegram_api_url}/bot{cfg.token}/"
        self.cfg = cfg
        self.stopping = stopping
        self.sessions = queue.SimpleQueue()

    def call(self, method, http_timeout=None, **params):
        """One Bot API request; http_timeout (default TELEGRAM_TIMEOUT) bounds the wait for the answer."""
        try:
            with pooled(self.sessions) as session:
                response = session.post(self.base + method, json=params,
                                        timeout=(10, http_timeout or self.cfg.telegram_timeout))
        except requests.RequestException as e:  # its message holds the URL, hence the token
            raise TelegramError(0, type(e).__name__) from None
        try:
            body = response.json()
        except ValueError:  # a proxy's error page; 0 (worth a retry) when the status is no error
            raise TelegramError(0 if response.ok else response.status_code, "answer is not JSON") from None
        if isinstance(body, dict) and body.get("ok"):
            return body.get("result")
        body = body if isinstance(body, dict) else {}
        parameters = body.get("parameters") or {}
        raise TelegramError(body.get("error_code") or response.status_code,
                            str(body.get("description", "")), parameters.get("retry_after"))

    def call_patiently(self, method, http_timeout=None, **params):
        """call() that waits out rate limits and outages (backoff with jitter) until stopped."""
        failures = 0
        while True:
            try:
                return self.call(method, http_timeout, **params)
            except TelegramError as e:
                if not e.transient:
                    raise
                failures += 1
                delay = e.retry_after or backoff(self.cfg, failures)
                log.warning("Telegram %s failed (%s); retrying in %.1fs",
                            method, e.description if e.error_code == 0 else e.error_code, delay)
                if pause(self.stopping, delay):
                    raise Stopped() from None

    def send(self, chat_id, text, buttons=None, contact_button=False, remove_keyboard=False):
        """Sends text as plain-text messages of at most 4096 characters; buttons go on the last one."""
        pieces = split_text(text)
        for i, piece in enumerate(pieces):
            params = {"chat_id": chat_id, "text": piece}
            if i == len(pieces) - 1:
                markup = keyboard(buttons, contact_button, remove_keyboard)
                if markup:
                    params["reply_markup"] = markup
            try:
                self.call_patiently("sendMessage", **params)
            except TelegramError as e:
                if e.error_code == 403:
                    raise ChatGone() from None
                if e.error_code != 400:
                    raise
                log.warning("Telegram refused a message (400) for chat %s; skipped", chat_id)

    @contextmanager
    def typing(self, chat_id):
        """Shows 'typing…' from now until the block ends, renewed every 4.5 s (Telegram shows it for 5 s)."""
        done = threading.Event()

        def show():
            try:
                self.call("sendChatAction", http_timeout=5, chat_id=chat_id, action="typing")
            except TelegramError:
                pass  # a missing indicator is not worth a retry

        def renew():
            while not done.wait(4.5):
                show()

        show()  # before the block, so the client sees it before the slow part starts
        thread = threading.Thread(target=renew, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()


def keyboard(buttons, contact_button, remove_keyboard):
    """The reply_markup for a message: suggested answers, the share-contact button, or removal."""
    if contact_button:
        return {"keyboard": [[{"text": TEXTS["share_button"], "request_contact": True}]],
                "resize_keyboard": True, "one_time_keyboard": True,
                "input_field_placeholder": TEXTS["contact_placeholder"]}
    if buttons:
        return {"keyboard": [[{"text": b}] for b in buttons],
                "resize_keyboard": True, "one_time_keyboard": True}
    if remove_keyboard:
        return {"remove_keyboard": True}
    return None


def pause(stopping, seconds):
    """Waits seconds, or less when stopping is set (then True); in short steps, as a long wait
    on Windows would not let Ctrl+C through."""
    deadline = time.monotonic() + seconds
    while not stopping.wait(min(max(deadline - time.monotonic(), 0), 0.2)):
        if time.monotonic() >= deadline:
            return False
    return True


def backoff(cfg, failures):
    """Exponential backoff with jitter: base, 2*base, 4*base ... capped at RETRY_MAX_SECONDS."""
    delay = min(cfg.retry_base_seconds * 2 ** (failures - 1), cfg.retry_max_seconds)
    return delay * random.uniform(0.5, 1.0)


def split_text(text, limit=4000):  # under 4096: Telegram counts some characters twice
    """Splits text into pieces Telegram accepts, at paragraph, line, sentence or word ends."""
    pieces = []
    while len(text) > limit:
        window = text[:limit]
        cut = max(window.rfind("\n\n"), window.rfind("\n"))
        if cut < limit // 2:
            cut = max(window.rfind(". "), window.rfind("! "), window.rfind("? ")) + 1
        if cut < limit // 2:
            cut = window.rfind(" ")
        if cut < limit // 2:
            cut = limit
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text.strip() or not pieces:
        pieces.append(text)
    return pieces


class Console:
    """The terminal stand-in for Telegram: same send()/typing() as Telegram."""

    def send(self, chat_id, text, buttons=None, contact_button=False, remove_keyboard=False):
        print(f"Бот: {text}")
        if buttons:
            print("     [" + " | ".join(buttons) + "]")
        sys.stdout.flush()

    @contextmanager
    def typing(self, chat_id):
        yield


# --- Understanding the client ------------------------------------------------------------------

PHONE_RE = re.compile(r"\+?\d[\d\s()\-]{8,18}\d")
EMAIL_RE = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}")
USERNAME_RE = re.compile(r"(?<![\w@/.])(?:@|(?:https?://)?t\.me/)([A-Za-z][A-Za-z0-9_]{4,31})\b")
REFUSAL_RE = re.compile(r"(нет|неа|no|не (хочу|буду|надо|нужно|дам|оставлю|стоит|сейчас)|"
                        r"отказ\w*|без контакт\w*)\b")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
MAX_TEXT = 2000  # kept of a client's message for the LLM and the stored fields


def find_phone(text):
    """A Russian phone number in text: +7 or 8 (or 7) and ten more digits, with any spacing."""
    for match in PHONE_RE.finditer(text):
        candidate = match.group().strip()
        digits = re.sub(r"\D", "", candidate)
        if len(digits) == 11 and digits[0] in "78" and not (candidate[0] == "+" and digits[0] != "7"):
            return candidate
    return None


def parse_contact(text):
    """The first phone, email or @username in text, as written; None when there is none."""
    email = EMAIL_RE.search(text)
    if email:
        return email.group()
    phone = find_phone(text)
    if phone:
        return phone
    username = USERNAME_RE.search(text)
    return "@" + username.group(1) if username else None


def is_refusal(text):
    words = re.sub(r"[^\w\s]", " ", text.lower().replace("ё", "е")).split()
    return bool(REFUSAL_RE.match(" ".join(words)))


def scrub(text):
    """Removes anything that looks like a contact, for fields that must carry no personal data."""
    text = EMAIL_RE.sub("[контакт]", text)
    text = PHONE_RE.sub(lambda m: "[контакт]" if find_phone(m.group()) else m.group(), text)
    return USERNAME_RE.sub("[контакт]", text)


def clean_text(text):
    """Client text as the bot keeps it: no control or invisible characters, at most MAX_TEXT."""
    return CONTROL_CHARS.sub("", text or "").strip()[:MAX_TEXT]


def leaks_prompt(answer, prompt):
    """True when the answer repeats a sizeable line of the system prompt word for word."""
    flat = " ".join(answer.split()).lower()
    lines = (" ".join(line.split()).lower() for line in prompt.splitlines())
    return any(len(line) >= 40 and line in flat for line in lines)


@dataclasses.dataclass
class Incoming:
    """One client message, reduced to what the dialog needs."""
    chat_id: int
    text: str = ""
    contact: str | None = None       # phone from a contact the client shared
    own_contact: bool = True         # the shared contact is the sender's own
    media: bool = False              # photo, sticker, voice ... instead of text
    first_name: str = ""
    update_id: int | None = None


# --- The dialog --------------------------------------------------------------------------------

def greet(app, d, msg):
    """Greets the client and asks the first question."""
    name = f", {d['name']}" if d["name"] else ""
    app.out.send(msg.chat_id, TEXTS["greeting"].format(name=name))
    ask_question(app, msg.chat_id, 0)
    return "qualifying"


def take_answer(app, d, msg):
    """Stores the answer; asks the next question or, after the last one, makes the offer."""
    key = QUESTIONS[len(d["answers"])][0]
    d["answers"][key] = msg.text
    if len(d["answers"]) < len(QUESTIONS):
        ask_question(app, msg.chat_id, len(d["answers"]))
        return "qualifying"
    # Saved before the slow LLM call: after a crash the redelivered answer resumes at the offer.
    d["stage"] = "offering"
    app.keep(msg.chat_id, d)
    return make_offer(app, d, msg)


def make_offer(app, d, msg):
    """Recommends a service written by the LLM, then asks for a contact."""
    with app.out.typing(msg.chat_id):
        # scrub(): a contact typed into an answer is not sent to the LLM either
        offer = app.ask_llm(app.prompt, scrub(f"Контекст: {answers_summary(d)}\nЗапрос: {msg.text}"))
    app.summarise_soon(msg.chat_id, d)
    if offer is None or leaks_prompt(offer, app.prompt):
        offer = llm.FALLBACK
    d["last_llm_suggestion"] = offer
    app.out.send(msg.chat_id, offer, remove_keyboard=True)
    ask_contact(app, msg.chat_id)
    return "collecting_contact"


def take_contact(app, d, msg):
    """Saves the lead from a contact; a refusal ends the dialog; anything else gets the format again."""
    if msg.contact is not None and not msg.own_contact:
        app.out.send(msg.chat_id, TEXTS["foreign_contact"], contact_button=True)
        return "collecting_contact"
    contact = msg.contact or parse_contact(msg.text)
    if contact:
        return save_lead(app, d, msg, contact, "new")
    if is_refusal(msg.text):
        return save_lead(app, d, msg, "", "rejected")
    app.out.send(msg.chat_id, TEXTS["contact_format"])
    ask_contact(app, msg.chat_id)
    return "collecting_contact"


def start_over(app, d, msg):
    """Begins a new dialog after a finished one."""
    d.clear()
    d.update(new_dialog(app, msg))
    return greet(app, d, msg)


STAGES = {
    "greeting": greet,
    "qualifying": take_answer,
    "offering": make_offer,
    "collecting_contact": take_contact,
    "done": start_over,
}


def ask_question(app, chat_id, index):
    _key, question, buttons = QUESTIONS[index]
    app.out.send(chat_id, question, buttons=buttons, remove_keyboard=not buttons)


def ask_contact(app, chat_id):
    privacy = TEXTS["privacy"].format(url=app.cfg.privacy_url) if app.cfg.privacy_url else ""
    app.out.send(chat_id, TEXTS["contact_request"].format(privacy=privacy),
                 contact_button=app.source == "telegram")


def remind(app, d, msg):
    """Tells a returning client where the dialog stopped and repeats the open question."""
    app.out.send(msg.chat_id, TEXTS["returning"])
    if d["stage"] == "qualifying":
        ask_question(app, msg.chat_id, len(d["answers"]))
    elif d["stage"] == "collecting_contact":
        ask_contact(app, msg.chat_id)
    else:
        return STAGES[d["stage"]](app, d, msg)
    return d["stage"]


def answers_summary(d):
    return "; ".join(f"{ANSWER_LABELS[key]}: {d['answers'][key]}"
                     for key, _q, _b in QUESTIONS if key in d["answers"])


def summarise(app, d):
    """(intent, notes) for the manager: written by the LLM, or assembled from the answers."""
    summary = app.ask_llm(SUMMARY_PROMPT, scrub(answers_summary(d)))
    lines = [line.strip() for line in (summary or "").splitlines() if line.strip()]
    if len(lines) >= 2:
        intent = re.sub(r"^(суть[^:]*:)\s*", "", lines[0], flags=re.I)
        notes = re.sub(r"^(резюме[^:]*:)\s*", "", " ".join(lines[1:]), flags=re.I)
    else:
        intent = " ".join(d["answers"].get("task", "").split()[:8])
        notes = answers_summary(d)
    return scrub(intent)[:200], scrub(notes)[:MAX_TEXT]


def save_lead(app, d, msg, contact, status):
    """Writes the lead (contact or refusal), thanks the client, then notifies the manager."""
    intent, notes = app.summary_for(msg.chat_id, d)
    now = datetime.now(timezone.utc).astimezone()
    lead = {"timestamp": now.isoformat(timespec="seconds"), "chat_id": msg.chat_id,
            "client_name": d["name"], "contact": contact, "intent": intent,
            "notes": notes, "source": app.source, "status": status}
    # Recorded first, so a crash from here on is finished at start-up instead of lost or doubled.
    d["pending_lead"] = {"id": f"{msg.chat_id}-{now.strftime('%Y%m%dT%H%M%S%f')}", "lead": lead}
    d["last_update_id"] = msg.update_id
    app.keep(msg.chat_id, d)
    return finish_lead(app, msg.chat_id, d)


def finish_lead(app, chat_id, d):
    """Commits a pending lead, says goodbye and ends the dialog; safe to repeat after a crash."""
    pending = d["pending_lead"]
    saved = app.commit_lead(pending["id"], pending["lead"])
    status = pending["lead"]["status"]
    if status == "rejected":
        text = TEXTS["refused"]
    else:
        text = TEXTS["thanks_saved"] if saved else TEXTS["thanks_unsaved"]
    # Thanked before the dialog is marked done: a crash in between thanks twice rather than never.
    try:
        app.out.send(chat_id, text, remove_keyboard=True)
    except TelegramError as e:
        log.warning("could not thank chat %s (Telegram error %s)", chat_id, e.error_code)
    del d["pending_lead"]
    d["stage"] = "done"
    app.keep(chat_id, d)
    log.info("dialog finished: chat %s, status %s", chat_id, status)
    app.deliver_owed(pending["id"])
    return "done"


def new_dialog(app, msg):
    log.info("dialog started: chat %s", msg.chat_id)
    return {"stage": "greeting", "answers": {}, "last_llm_suggestion": "",
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "updated_at": time.time(), "name": msg.first_name[:64]}


def in_background(function, *args):
    """Runs function(*args) in a daemon thread and returns its Future; exiting never waits for it."""
    future = Future()

    def run():
        try:
            future.set_result(function(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the result
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


class App:
    """Everything a running bot holds: settings, the way out (Telegram or console) and storage."""

    RETURN_AFTER = 3600        # seconds of silence after which a client is greeted back
    RATE_WINDOW, RATE_LIMIT = 10.0, 12  # messages per chat per window before the bot slows it
    QUEUE_WARN_SECONDS = 5.0

    def __init__(self, cfg, out, journal, source="telegram"):
        self.cfg, self.out, self.journal, self.source = cfg, out, journal, source
        self.prompt = read_prompt(HERE / "prompt.txt")
        self.outbox = store.Outbox(cfg.data_dir)
        self.dialogs = journal.load()
        self.stopping = getattr(out, "stopping", None) or threading.Event()
        self.leads_lock = threading.Lock()
        self.dialogs_lock = threading.RLock()  # a dialog and its journal line change together
        self.delivering = set()
        self.delivering_lock = threading.Lock()
        self.recent = {}          # chat -> tuple of recent message times, for the rate limit
        self.invited = set()      # group chats already told to write privately
        self.llm_sessions = queue.SimpleQueue()
        self.summaries = {}       # chat -> (answers, Future of (intent, notes)), see summarise_soon
        self.last_queue_warning = 0.0
        self.polling = False      # in the long poll, where a signal may interrupt the request
        self.channels = (["email"] if cfg.email_on else []) + \
            (["telegram"] if cfg.manager_chat_id and source == "telegram" else [])

    # -- LLM --
    def ask_llm(self, system, user):
        if not self.cfg.llm_on:
            return None
        with pooled(self.llm_sessions) as session:
            return llm.complete(self.cfg, system, user, session=session)

    def summarise_soon(self, chat_id, d):
        """Starts the manager's notes in the background while the client reads the offer and types a
        contact; asked after the offer, so an LLM that serves one request at a time answers the client first."""
        answers = dict(d["answers"])
        # Not a thread pool: Ctrl+C must not wait up to LLM_TIMEOUT for notes a restart writes anew.
        self.summaries[chat_id] = (answers, in_background(summarise, self, {"answers": answers}))

    def summary_for(self, chat_id, d):
        """(intent, notes) for the lead: the ones started with the offer, or written now (after a restart)."""
        answers, future = self.summaries.pop(chat_id, (None, None))
        return future.result() if answers == d["answers"] else summarise(self, d)

    def summary_pending(self, chat_id):
        """The Future of the notes still being written for this chat, or None."""
        _answers, future = self.summaries.get(chat_id, (None, None))
        return future if future and not future.done() else None

    # -- messages --
    def handle(self, msg):
        """Runs one client message through commands or the stage table and saves the dialog."""
        d = copy.deepcopy(self.dialogs.get(msg.chat_id))
        if d and self.expired(d):
            d = None  # the periodic cleanup has not come round to it yet
        last_handled = (d or {}).get("last_update_id")
        if msg.update_id is not None and last_handled is not None and msg.update_id <= last_handled:
            return  # Telegram redelivered an update that was already handled
        if not self.within_rate(msg.chat_id):
            return
        command = command_of(msg.text)
        if command in ("cancel", "forget", "help"):
            return getattr(self, "command_" + command)(msg, d)
        if msg.media or (msg.contact and (not d or d["stage"] != "collecting_contact")):
            return self.out.send(msg.chat_id, TEXTS["text_only"])
        if d is None or command == "start":
            d = new_dialog(self, msg)
        before = d["stage"]
        if before != "greeting" and time.time() - d["updated_at"] > self.RETURN_AFTER:
            d["stage"] = remind(self, d, msg)
        else:
            d["stage"] = STAGES[before](self, d, msg)
        if d["stage"] != before:
            log.info("stage changed: chat %s, %s -> %s", msg.chat_id, before, d["stage"])
        d["last_update_id"] = msg.update_id
        self.keep(msg.chat_id, d)

    def keep(self, chat_id, d):
        """Makes d the chat's dialog, in memory and in the state journal."""
        d["updated_at"] = time.time()
        with self.dialogs_lock:
            self.dialogs[chat_id] = d
            self.journal.save(chat_id, d)

    def within_rate(self, chat_id):
        """Per-chat flood guard: beyond RATE_LIMIT messages in RATE_WINDOW one note, then silence."""
        now = time.monotonic()
        # A new tuple each time: drop_idle reads these from another thread.
        times = tuple(t for t in self.recent.get(chat_id, ()) if now - t <= self.RATE_WINDOW) + (now,)
        self.recent[chat_id] = times
        if len(times) == self.RATE_LIMIT + 1:
            log.info("chat %s is sending too fast; slowing it down", chat_id)
            self.out.send(chat_id, TEXTS["too_fast"])
        return len(times) <= self.RATE_LIMIT

    def command_help(self, msg, d):
        self.out.send(msg.chat_id, TEXTS["help"])

    def command_cancel(self, msg, d):
        if d is None or d["stage"] == "done":  # a saved lead is not undone by /cancel: say how
            return self.out.send(msg.chat_id, TEXTS["nothing_to_cancel"], remove_keyboard=True)
        self.erase_dialog(msg.chat_id, "cancelled")
        self.out.send(msg.chat_id, TEXTS["cancelled"], remove_keyboard=True)

    def command_forget(self, msg, d):
        """Deletes the chat's dialog, leads.csv rows and undelivered items; logs counts only."""
        self.erase_dialog(msg.chat_id, "forgotten")
        items = self.outbox.drop_chat(msg.chat_id)  # first, so no owed row is written back
        with self.leads_lock:
            try:
                rows = store.forget_chat(self.cfg.leads_path, msg.chat_id, self.cfg.csv_delimiter)
            except OSError as e:
                rows = None
                log.error("could not remove leads of chat %s (%s)", msg.chat_id, type(e).__name__)
        if rows is None:
            return self.out.send(msg.chat_id, TEXTS["forget_failed"], remove_keyboard=True)
        log.info("forgot chat %s: %d lead rows, %d outbox items", msg.chat_id, rows, items)
        self.out.send(msg.chat_id, TEXTS["forgotten"], remove_keyboard=True)

    def end_dialog(self, chat_id, why):
        self.summaries.pop(chat_id, None)
        with self.dialogs_lock:
            if self.dialogs.pop(chat_id, None) is not None:
                log.info("dialog finished: chat %s, %s", chat_id, why)
            self.journal.save(chat_id, None)

    def erase_dialog(self, chat_id, why):
        """end_dialog that also rewrites the state file, so no earlier line keeps the client's answers."""
        self.end_dialog(chat_id, why)
        self.journal.compact()

    # -- leads --
    def commit_lead(self, lead_id, lead):
        """Writes the row (or queues it) and queues the manager's notices; True when on disk."""
        saved = self.write_row(lead)
        if not saved:
            self.owe("csv", lead_id, lead)
        if lead["status"] == "new":
            for channel in self.channels:
                self.owe(channel, lead_id, lead)
        return saved

    def write_row(self, lead):
        path, delimiter = self.cfg.leads_path, self.cfg.csv_delimiter
        with self.leads_lock:
            try:
                if not store.lead_exists(path, lead["chat_id"], lead["timestamp"], delimiter):
                    store.append_lead(path, lead, delimiter)
            except OSError as e:
                log.error("could not write leads.csv (%s); lead for chat %s kept in the outbox",
                          type(e).__name__, lead["chat_id"])
                return False
        log.info("lead saved: chat %s, status %s", lead["chat_id"], lead["status"])
        return True

    def owe(self, channel, lead_id, lead):
        item_id = f"{lead_id}-{channel}"
        if not self.outbox.has(item_id):
            self.outbox.put({"id": item_id, "channel": channel, "chat_id": lead["chat_id"],
                             "lead": lead, "attempts": 0,
                             "next_at": time.time() + self.cfg.outbox_retry_seconds})

    def deliver_owed(self, lead_id=None):
        """Tries what the outbox holds: everything due, or now everything of one lead."""
        now = time.time()
        items = self.outbox.due(float("inf") if lead_id else now)
        for item in items:
            if lead_id is None or item["id"].startswith(lead_id + "-"):
                self.deliver(item)

    def deliver(self, item):
        """One attempt at an owed item, which leaves the outbox the moment the receiver has it;
        False when the attempt failed."""
        with self.delivering_lock:
            # Another thread may be sending it, or may have delivered it since this copy was taken.
            if item["id"] in self.delivering or not self.outbox.has(item["id"]):
                return True
            self.delivering.add(item["id"])
        try:
            self.send_item(item, lambda: self.outbox.done(item["id"]))
            log.info("%s delivered for chat %s", item["channel"], item["chat_id"])
            return True
        except Exception as e:  # noqa: BLE001 - whatever failed, the item stays owed
            delay = self.outbox.retry_later(item["id"], time.time(), self.cfg.outbox_retry_seconds,
                                            self.cfg.outbox_retry_max_seconds)
            log.warning("%s for chat %s failed: %s; next try in %.0fs",
                        item["channel"], item["chat_id"], failure_reason(e), delay)
            return False
        finally:
            with self.delivering_lock:
                self.delivering.discard(item["id"])

    def send_item(self, item, delivered):
        """Sends one owed item and calls delivered() as soon as the receiver has it."""
        lead = item["lead"]
        if item["channel"] == "email":
            return mailer.send_lead(self.cfg, lead, item["id"].rsplit("-", 1)[0], accepted=delivered)
        if item["channel"] == "telegram":
            self.out.call("sendMessage", chat_id=self.cfg.manager_chat_id, text=mailer.lead_card(lead))
        elif not self.write_row(lead):
            raise OSError("leads.csv is not writable")
        delivered()

    def recover(self):
        """At start-up: finishes leads a crash interrupted, then tries everything still owed once."""
        for chat_id, d in list(self.dialogs.items()):
            if d.get("pending_lead"):
                log.info("finishing an interrupted lead: chat %s", chat_id)
                try:
                    finish_lead(self, chat_id, d)
                except ChatGone:
                    self.end_dialog(chat_id, "blocked")
        # An owner who fixed a setting and restarted expects the backlog now, not after the backoff;
        # one failure says the channel is still broken, and the rest need not wait out its timeout.
        broken = set()
        for item in self.outbox.due(float("inf")):
            if item["channel"] not in broken and not self.deliver(item):
                broken.add(item["channel"])

    def expired(self, d):
        """True when the dialog is idle longer than SESSION_TTL_HOURS; a lead being saved never expires."""
        idle = time.time() - d.get("updated_at", 0)
        return idle > self.cfg.session_ttl_hours * 3600 and not d.get("pending_lead")

    def drop_idle(self):
        """Forgets dialogs idle longer than SESSION_TTL_HOURS, to keep memory and the state file bounded."""
        dropped = False
        for chat_id in list(self.dialogs):
            with self.dialogs_lock:  # a worker may be saving a new message of this chat right now
                d = self.dialogs.get(chat_id)
                if d and self.expired(d):
                    self.end_dialog(chat_id, "expired")
                    dropped = True
        if dropped:
            self.journal.compact()  # the file shrinks, and no earlier line keeps a dropped dialog's answers
        now = time.monotonic()
        for chat_id, times in list(self.recent.items()):  # chats without a dialog have entries too
            if now - times[-1] > self.RATE_WINDOW:
                self.recent.pop(chat_id, None)


def failure_reason(error):
    """Why a delivery failed, naming what to check; never personal data."""
    if isinstance(error, mailer.MailError):
        return str(error)
    if isinstance(error, TelegramError) and error.error_code in (400, 403):
        return (f"Telegram refused the card ({error.error_code}): check MANAGER_CHAT_ID and that "
                "the manager has sent /start to the bot")
    if isinstance(error, TelegramError):
        return f"Telegram error {error.description if error.error_code == 0 else error.error_code}"
    return type(error).__name__


def read_prompt(path):
    """The system prompt; lines starting with '#' are notes for the owner, not for the LLM."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("#")).strip()


def command_of(text):
    """'start' for '/start', '/start@bot' or '/start payload'; None for ordinary text."""
    match = re.match(r"/([a-z]+)(@\w+)?(\s|$)", text)
    return match.group(1) if match else None


# --- Telegram updates ----------------------------------------------------------------------------

MEDIA_KINDS = ("photo", "sticker", "voice", "video", "video_note", "audio", "document",
               "location", "venue", "poll", "dice", "animation", "game")


def incoming_from(update):
    """The client message in an update, or None for updates the bot does not answer."""
    message = update.get("message")
    if not message or "from" not in message or message["from"].get("is_bot"):
        return None
    sender, chat = message["from"], message.get("chat", {})
    if chat.get("type") != "private":
        return None
    msg = Incoming(chat_id=chat["id"], first_name=clean_text(sender.get("first_name", "")),
                   update_id=update["update_id"], text=clean_text(message.get("text")))
    if "contact" in message:
        contact = message["contact"]
        msg.contact = clean_text(contact.get("phone_number"))
        msg.own_contact = contact.get("user_id") == sender.get("id")
    elif not msg.text:
        msg.media = any(kind in message for kind in MEDIA_KINDS) or "caption" in message
        if not msg.media:
            return None
    return msg


def handle_update(app, update):
    """One update, start to end; an error in it is logged without content and never stops the bot."""
    try:
        group_invite(app, update)
        msg = incoming_from(update)
        if msg:
            app.handle(msg)
    except ChatGone:
        chat_id = update["message"]["chat"]["id"]
        log.info("chat %s blocked the bot; dialog ended", chat_id)
        app.end_dialog(chat_id, "blocked")
    except Stopped:
        raise
    except Exception as e:  # noqa: BLE001 - one poisoned update must not block the queue
        frame = e.__traceback__
        while frame.tb_next:
            frame = frame.tb_next
        log.error("update %s failed: %s at %s:%d", update.get("update_id"), type(e).__name__,
                  Path(frame.tb_frame.f_code.co_filename).name, frame.tb_lineno)


def group_invite(app, update):
    message = update.get("message") or {}
    chat = message.get("chat", {})
    if chat.get("type") in ("group", "supergroup") and command_of(message.get("text", "")) == "start" \
            and chat["id"] not in app.invited:
        app.invited.add(chat["id"])
        app.out.send(chat["id"], TEXTS["private_only"])


class ChatQueues:
    """WORKERS > 1: up to N chats served at once, each chat's updates strictly in order."""

    def __init__(self, app, workers):
        self.app = app
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="chat")
        self.changed = threading.Condition()
        self.queues = {}       # chat key -> deque of (update, received_at)
        self.unfinished = set()

    def submit(self, update, received_at):
        key = chat_key(update)
        with self.changed:
            self.unfinished.add(update["update_id"])
            waiting = self.queues.setdefault(key, deque())
            waiting.append((update, received_at))
            if len(waiting) == 1:
                self.pool.submit(self.drain, key)

    def drain(self, key):
        while not self.app.stopping.is_set():
            notes = self.app.summary_pending(key)
            if notes:  # the chat's next step needs them: it waits without holding a worker
                notes.add_done_callback(lambda _: self.resume(key))
                return
            with self.changed:
                update, received_at = self.queues[key][0]
            try:
                run_update(self.app, update, received_at)
            except Stopped:
                return
            with self.changed:
                self.queues[key].popleft()
                self.unfinished.discard(update["update_id"])
                self.changed.notify_all()
                if not self.queues[key]:
                    del self.queues[key]
                    return

    def resume(self, key):
        with self.changed:  # the time spent waiting for notes is no wait for a worker
            self.queues[key][0] = (self.queues[key][0][0], time.monotonic())
        with suppress(RuntimeError):  # the pool is shut down: the bot is stopping
            self.pool.submit(self.drain, key)

    def offset(self, next_offset):
        """Confirms only what is finished, so a crash loses no queued update."""
        with self.changed:
            return min(self.unfinished, default=next_offset)

    def wait_for_progress(self, seconds):
        with self.changed:
            self.changed.wait(seconds)

    def close(self):
        self.pool.shutdown(wait=True)


def chat_key(update):
    for kind in ("message", "edited_message", "channel_post", "callback_query", "my_chat_member"):
        if kind in update:
            body = update[kind]
            return (body.get("chat") or body.get("message", {}).get("chat") or {}).get("id")
    return None


def run_update(app, update, received_at):
    waited = time.monotonic() - received_at
    if waited > app.QUEUE_WARN_SECONDS and time.monotonic() - app.last_queue_warning > 3600:
        app.last_queue_warning = time.monotonic()
        log.info("updates waited %.0fs in the queue; consider raising WORKERS (now %d)",
                 waited, app.cfg.workers)
    handle_update(app, update)


def poll(app, tg):
    """The main loop: long-poll Telegram, hand each update on, retry what the outbox owes."""
    queues = ChatQueues(app, app.cfg.workers) if app.cfg.workers > 1 else None
    next_offset, failures, conflict_logged, last_cleanup = None, 0, False, 0.0
    try:
        while not app.stopping.is_set():
            app.deliver_owed()
            if time.monotonic() - last_cleanup > min(60, app.cfg.session_ttl_hours * 3600):
                app.drop_idle()
                last_cleanup = time.monotonic()
            offset = queues.offset(next_offset) if queues else next_offset
            try:
                updates = fetch_updates(app, tg, offset)
            except TelegramError as e:
                failures += 1
                delay = e.retry_after or backoff(app.cfg, failures)
                conflict_logged = explain_poll_error(e, conflict_logged, delay)
                pause(app.stopping, delay)
                continue
            failures, conflict_logged = 0, False
            received_at = time.monotonic()
            # With WORKERS > 1 the offset stays at the oldest unfinished update, so Telegram sends
            # again what is queued or done since; only what lies beyond next_offset is new.
            fresh = [u for u in updates if u["update_id"] >= (next_offset or 0)]
            for update in fresh:
                if queues:
                    queues.submit(update, received_at)
                elif app.stopping.is_set():
                    break  # the rest stays unconfirmed and comes again
                else:
                    run_update(app, update, received_at)
                next_offset = update["update_id"] + 1
            if queues and updates and not fresh:
                queues.wait_for_progress(0.2)  # nothing new: poll again once an update is done
    except Stopped:
        pass
    finally:
        if queues:
            queues.close()
        confirm_handled(tg, queues.offset(next_offset) if queues else next_offset)


def confirm_handled(tg, offset):
    """Tells Telegram which updates are handled, so that after a restart none comes twice."""
    if offset is not None:
        with suppress(TelegramError):
            tg.call("getUpdates", http_timeout=2, offset=offset, timeout=0, limit=1)


# Windows does not let Ctrl+C through a blocking socket read: there the long poll runs in a helper
# thread while the main thread waits in short steps. Elsewhere the signal handler interrupts the read.
POLL_IN_THREAD = os.name == "nt"


def fetch_updates(app, tg, offset):
    """getUpdates; Ctrl+C or SIGTERM ends this wait at once, but never the handling of an update."""
    timeout = app.cfg.poll_timeout
    due = app.outbox.next_due()
    if due is not None:
        # At least 1 s: an item another thread is still sending must not make this loop spin.
        timeout = max(1, min(timeout, int(due - time.time()) + 1))
    if app.stopping.is_set():
        raise Stopped()
    # The read timeout exceeds the long-poll timeout, or a dead connection would hang forever.
    request = functools.partial(tg.call, "getUpdates", http_timeout=timeout + app.cfg.telegram_timeout,
                                offset=offset, timeout=timeout, allowed_updates=["message"])
    if POLL_IN_THREAD:
        return wait_in_steps(app.stopping, in_background(request))
    app.polling = True  # from here the signal handler may raise Stopped
    try:
        return request()
    finally:
        app.polling = False


def wait_in_steps(stopping, answer):
    """The result of a Future, waited for in short steps so that stopping is noticed at once."""
    while True:
        try:
            return answer.result(timeout=0.2)
        except TimeoutError:
            if stopping.is_set():
                raise Stopped() from None  # the abandoned request only confirms what is handled


def explain_poll_error(e, conflict_logged, delay):
    """Logs why polling failed; a 409 is explained once, not on every retry."""
    if e.bad_token:
        raise SystemExit("Telegram rejected TELEGRAM_BOT_TOKEN (HTTP %d)" % e.error_code)
    if e.error_code == 409:
        if not conflict_logged:
            if "webhook" in e.description.lower():
                log.error("Telegram refuses polling because a webhook is set for this bot: "
                          "set DELETE_WEBHOOK=1 (see README, Troubleshooting)")
            else:
                log.error("another copy of this bot is polling Telegram with the same token: "
                          "stop the other copy")
        return True
    log.warning("getUpdates failed (%s); retrying in %.2fs",
                e.description if e.error_code == 0 else f"HTTP {e.error_code}", delay)
    return conflict_logged


def install_signal_handlers(app):
    def on_signal(signum, frame):
        app.stopping.set()
        if app.polling:
            raise Stopped()  # leaves the long poll at once; an update in hand is finished first

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


class MemoryJournal:
    """Dialog state for console mode: lives as long as the process."""

    def load(self):
        return {}

    def save(self, chat_id, dialog):
        pass

    def compact(self):
        pass

    def close(self):
        pass


def prepare_data_dir(cfg):
    """Creates DATA_DIR and checks leads.csv; an unusable dir only warns, a foreign file stops start-up."""
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        store.prepare_leads(cfg.leads_path, cfg.csv_delimiter)
    except OSError as e:
        log.warning("DATA_DIR %s is not writable (%s): leads wait in memory until it is",
                    cfg.data_dir, type(e).__name__)


def run_telegram(cfg):
    stopping = threading.Event()
    tg = Telegram(cfg, stopping)
    prepare_data_dir(cfg)
    app = App(cfg, tg, store.Journal(cfg.data_dir / "state.jsonl"))
    install_signal_handlers(app)
    try:
        me = start_telegram(app, tg)
        log.info("started as @%s (workers: %d, email: %s, LLM: %s)", me.get("username"),
                 cfg.workers, "on" if cfg.email_on else "off", "on" if cfg.llm_on else "off")
        app.drop_idle()
        app.recover()
        poll(app, tg)
    except Stopped:
        pass
    finally:
        app.journal.close()
    log.info("stopped")
    return 0


def start_telegram(app, tg):
    """getMe (a rejected token stops start-up), then webhook removal and the command menu."""
    cfg = app.cfg
    try:
        me = tg.call_patiently("getMe")
    except TelegramError as e:
        if e.bad_token:
            raise SystemExit("Telegram rejected TELEGRAM_BOT_TOKEN") from None
        raise SystemExit(f"Telegram refused getMe (HTTP {e.error_code})") from None
    if not cfg.email_on:
        log.info("email to the manager is off (SMTP_HOST is empty); leads are still saved")
    if cfg.llm_on and not cfg.llm_model:
        log.warning("LLM_MODEL is empty: most LLM servers refuse a request without a model name")
    if cfg.delete_webhook:
        try:
            tg.call_patiently("deleteWebhook")
            log.info("webhook deleted (DELETE_WEBHOOK=1)")
        except TelegramError as e:
            log.warning("could not delete the webhook (%s)", e.error_code)
    try:
        tg.call("setMyCommands", commands=[{"command": c, "description": d} for c, d in COMMANDS])
    except TelegramError as e:
        log.warning("could not set the command menu (%s)", e.error_code)
    return me


def run_console(cfg):
    """The whole dialog in the terminal; the lead goes to the same CSV with source 'console'."""
    for stream in (sys.stdin, sys.stdout):
        stream.reconfigure(encoding="utf-8", errors="replace")
    prepare_data_dir(cfg)
    app = App(cfg, Console(), MemoryJournal(), source="console")
    print(TEXTS["console_hint"])
    app.handle(Incoming(chat_id=0, text="/start"))
    while app.dialogs.get(0, {}).get("stage") != "done":
        print("Вы: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            print()
            break
        app.handle(Incoming(chat_id=0, text=clean_text(line)))
    return 0


# --- --check ----------------------------------------------------------------------------------------

def run_check(env):
    """Checks every configured part; one ✓/✗ line each, a ✗ with what to do. Exit 0 when all pass."""
    sys.stdout.reconfigure(encoding="utf-8", errors="replace")  # ✓ and ✗ on any Windows console
    results = []

    def report(ok, text):
        results.append(ok)
        print(("✓ " if ok else "✗ ") + text)

    try:
        cfg = read_config(env)
        report(True, "Settings: complete and valid")
    except ConfigError as e:
        for problem in e.problems:
            report(False, f"Settings: {problem}")
        try:  # without a token the other parts can still be checked
            cfg = read_config(env, telegram=False)
        except ConfigError:
            print("Fix the settings above in .env, then run python leadbot.py --check again.")
            return 1
    setup_logging(cfg, console_level="WARNING")
    if cfg.token:
        check_telegram(cfg, report)
    check_llm(cfg, report)
    check_smtp(cfg, report)
    check_data_dir(cfg, report)
    if all(results):
        print("All checks passed. Start the bot: python leadbot.py")
        return 0
    print("Fix the ✗ lines above, then run python leadbot.py --check again.")
    return 1


def check_telegram(cfg, report):
    """getMe (prints the bot's @username), then whether a webhook keeps polling from getting messages."""
    tg = Telegram(cfg, threading.Event())
    try:
        me = tg.call("getMe")
        report(True, f"Telegram: the token works, the bot is @{me.get('username')}")
    except TelegramError as e:
        if e.bad_token:
            report(False, f"Telegram: the token was rejected (HTTP {e.error_code}) — copy it again from "
                          "@BotFather (/mybots → your bot → API Token) into TELEGRAM_BOT_TOKEN")
        elif e.error_code:
            report(False, f"Telegram: answered HTTP {e.error_code} — try again in a minute; "
                          "if it stays, check TELEGRAM_API_URL")
        else:
            report(False, f"Telegram: cannot connect ({e.description}) — check the internet connection, "
                          "a firewall or proxy (HTTPS_PROXY) and TELEGRAM_API_URL")
        return
    try:
        hook = tg.call("getWebhookInfo")
    except TelegramError as e:  # the token works, so this says nothing against the setup
        print(f"- Telegram: could not ask whether a webhook is set ({e.description or e.error_code})")
        return
    if not hook.get("url"):
        report(True, "Telegram: no webhook is set, so polling gets the messages")
    elif cfg.delete_webhook:
        report(True, "Telegram: a webhook is set; DELETE_WEBHOOK=1 deletes it at start-up")
    else:
        report(False, "Telegram: a webhook is set, so polling gets no messages — set DELETE_WEBHOOK=1 "
                      "in .env and the bot deletes the webhook at start-up")


def check_llm(cfg, report):
    """Asks the model for one word."""
    if not cfg.llm_on:
        print("- LLM: off (LLM_BASE_URL is empty), clients get a short fallback text "
              "instead of a recommendation")
        return
    try:
        llm.ask(cfg, "Ответь одним словом.", "Скажи: готово")
        report(True, f"LLM: model {cfg.llm_model} answers")
    except llm.LLMError as e:
        report(False, f"LLM: {e} — {llm_advice(cfg, e)}")


def llm_advice(cfg, e):
    """What the owner can do about an LLM failure, in plain words."""
    if e.status in (401, 403):
        return "the server refused the key: check LLM_API_KEY"
    if e.status in (400, 404):
        return (f"the server does not know model {cfg.llm_model!r} or this address: check LLM_MODEL "
                "(for Ollama: ollama pull <model>) and that LLM_BASE_URL ends with /v1")
    if e.status == 429:
        return "too many requests or the quota is used up: check your plan with the LLM provider"
    if e.status:
        return "the LLM server itself failed: look at its log or try again later"
    if "ReadTimeout" in str(e):
        return (f"no answer within LLM_TIMEOUT ({cfg.llm_timeout:g} s): raise LLM_TIMEOUT "
                "or pick a faster model")
    if "malformed" in str(e):
        return "this is not an OpenAI-compatible API: LLM_BASE_URL usually ends with /v1"
    return "cannot connect: start the LLM server (for Ollama: ollama serve) or correct LLM_BASE_URL"


def check_smtp(cfg, report):
    """Connects and logs in exactly as a real send would, and sends nothing."""
    if not cfg.email_on:
        print("- Email: off (SMTP_HOST is empty), leads are saved to leads.csv only")
        return
    server = f"{cfg.smtp_host}:{cfg.smtp_port}"
    try:
        mailer.check_login(cfg)
    except mailer.MailError as e:
        return report(False, f"Email: {e}")
    if cfg.smtp_user:
        report(True, f"Email: SMTP server {server} accepts the login (nothing was sent)")
    else:
        report(True, f"Email: SMTP server {server} answers (SMTP_USER is empty, so no login is tried)")


def check_data_dir(cfg, report):
    """DATA_DIR can be created and written, and a leads.csv in it has this version's columns."""
    probe = cfg.data_dir / ".write-test"
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
        store.prepare_leads(cfg.leads_path, cfg.csv_delimiter)
        report(True, f"DATA_DIR: {cfg.data_dir} is writable, leads go to {cfg.leads_path}")
    except OSError as e:
        report(False, f"DATA_DIR: cannot write to {cfg.data_dir} ({type(e).__name__}) — set DATA_DIR "
                      "to a folder this user may write to, or fix the folder's permissions")
    except store.StoreError as e:
        report(False, f"DATA_DIR: {e}")


# --- Start-up -------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Telegram lead bot")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--console", action="store_true", help="talk to the bot in this terminal")
    mode.add_argument("--check", action="store_true", help="check the setup and say what to fix")
    args = parser.parse_args(argv)
    # Real environment variables win over .env (load_dotenv does not override).
    load_dotenv(Path.cwd() / ".env")
    load_dotenv(HERE / ".env")
    env = dict(os.environ)
    if args.check:
        return run_check(env)
    try:
        cfg = read_config(env, telegram=not args.console)
    except ConfigError as e:
        for problem in e.problems:
            print(f"leadbot: {problem}", file=sys.stderr)
        return 2
    setup_logging(cfg, console_level="WARNING" if args.console else None)
    try:
        return run_console(cfg) if args.console else run_telegram(cfg)
    except store.StoreError as e:
        print(f"leadbot: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"leadbot: {e.code}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

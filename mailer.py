"""The lead card for the manager, and e-mailing it over SMTP."""

import contextlib
import datetime
import email.message
import email.utils
import smtplib
import socket
import ssl
import textwrap

TIMEOUT = 20  # seconds, for connecting and for each SMTP reply
# Keyed by the CSV columns (store.COLUMNS order), then the extras a lead may carry.
LABELS = {"timestamp": "Время", "chat_id": "Чат", "client_name": "Имя", "contact": "Контакт",
          "intent": "Запрос", "notes": "Заметки", "source": "Источник", "status": "Статус",
          "offer": "Рекомендация", "answers": "Ответы"}
VALUES = {"status": {"new": "новая", "rejected": "отказ"},
          "source": {"telegram": "Telegram", "console": "консоль"}}
# SMTP allows 998 bytes a line, 240 characters are <= 960 bytes; wrapped lines are indented like
# answers.
_WRAPPER = textwrap.TextWrapper(width=240, subsequent_indent="    ", break_on_hyphens=False)

# kind: (English for the log, Russian for the owner's --check); {} is the reason, if known.
_ADVICE = {
    "auth": ("the SMTP server rejected the login — check SMTP_USER and SMTP_PASSWORD",
             "SMTP-сервер не принял логин — проверьте SMTP_USER и SMTP_PASSWORD"),
    "connect": ("cannot reach the SMTP server{} — check SMTP_HOST, SMTP_PORT and SMTP_SECURITY",
                "SMTP-сервер недоступен{} — проверьте SMTP_HOST, SMTP_PORT и SMTP_SECURITY"),
    "rejected": ("the SMTP server refused the message — check MAIL_FROM and MANAGER_EMAIL",
                 "SMTP-сервер отверг письмо — проверьте MAIL_FROM и MANAGER_EMAIL"),
    "tls": ("the SMTP server's certificate is not trusted (self-signed, expired or for another "
            "host name), so nothing was sent, not even the password — check SMTP_HOST / the "
            "server's certificate", "сертификату SMTP-сервера нет доверия (самоподписанный, "
            "просрочен или выдан другому имени), поэтому ничего не отправлено, даже пароль — "
            "проверьте SMTP_HOST и сертификат сервера"),
    "other": ("the SMTP server does not offer STARTTLS or login — check SMTP_SECURITY (465: ssl, "
              "587: starttls)", "SMTP-сервер не предлагает STARTTLS или вход — проверьте "
              "SMTP_SECURITY (465: ssl, 587: starttls)"),
}
# First match wins, other OSErrors are "connect"; smtplib.SMTPException and ssl.SSLError are
# OSErrors too.
_KINDS = ((smtplib.SMTPAuthenticationError, "auth"), (ssl.SSLCertVerificationError, "tls"),
          ((smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError),
           "rejected"), ((smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected), "connect"),
          (smtplib.SMTPException, "other"))
_REASONS = ((ConnectionRefusedError, "refused"), (socket.gaierror, "unknown host"),
            (TimeoutError, "no answer"))


class MailError(Exception):
    """E-mail failed. .kind is a key of _ADVICE; str() is one English line for the log, .advice
    the same in Russian for the owner; neither holds addresses or server text."""

    def __init__(self, kind: str, reason: str = ""):
        english, russian = (text.format(f" ({reason})" if reason else "") for text in _ADVICE[kind])
        super().__init__("Email: " + english)
        self.kind, self.advice = kind, "Email: " + russian


def card(lead: dict) -> str:
    """The lead as plain text for the manager (e-mail body and Telegram message), one field a
    line."""
    def line(key, value=None):
        value = _one_line(lead.get(key) if value is None else value)
        return f"{LABELS[key]}: {VALUES.get(key, {}).get(value, value) or '—'}"

    when = str(lead.get("timestamp", ""))
    # '2026-11-24T18:03:11+03:00' as '24.11.2026 18:03 (UTC+03:00)', or as it is
    with contextlib.suppress(ValueError):
        moment = datetime.datetime.fromisoformat(when)
        offset = moment.strftime("%z")  # "+0300"; "" for a time without an offset
        zone = f" (UTC{offset[:3]}:{offset[3:5]})" if offset else ""
        when = moment.strftime("%d.%m.%Y %H:%M") + zone
    answers = [f"  {_one_line(label)}: {_one_line(text) or '—'}"
               for label, text in lead.get("answers") or ()]
    offer = [line("offer", _shorten(_one_line(lead["offer"]), 700))] if lead.get("offer") else []
    return "\n".join([_headline(lead), line("client_name"), line("contact"), line("intent"),
                      *([LABELS["answers"] + ":"] + answers if answers else []),
                      *offer, line("notes"), line("source"), line("status"), line("chat_id"),
                      line("timestamp", when)])


def subject(lead: dict) -> str:
    """«Новая заявка: <intent> — <name>» on one line of at most about 120 characters."""
    intent = _shorten(_one_line(lead.get("intent")), 60)
    name = _shorten(_one_line(lead.get("client_name")), 40)
    return _headline(lead) + (f": {intent}" if intent else "") + (f" — {name}" if name else "")


def send_lead(cfg, lead: dict, lead_id: str, accepted=lambda: None, sending=lambda: True) -> None:
    """E-mail the card to the manager; raises MailError. sending() is asked just before the message
    itself goes out (False: send nothing after all), accepted() runs once the server took it,
    before QUIT."""
    # The Message-ID depends on lead_id only, so the manager's mail system can drop a resend.
    send_text(cfg, subject(lead), card(lead), f"<{lead_id}@leadbot>", accepted, sending)


def send_text(cfg, title: str, text: str, message_id=None, accepted=lambda: None,
              sending=lambda: True) -> None:
    """E-mail a text to the manager, as send_lead describes; raises MailError."""
    body = "\n".join(line if len(line) <= _WRAPPER.width else _WRAPPER.fill(line)
                     for line in text.split("\n"))
    with contextlib.closing(_login(cfg)) as smtp:
        with _translated():
            message = email.message.EmailMessage()
            message["From"], message["To"] = cfg.mail_from, cfg.manager_email
            message["Subject"] = title
            message["Date"] = datetime.datetime.now().astimezone()
            message["Message-ID"] = message_id or email.utils.make_msgid("leadbot")
            eight_bit = smtp.has_extn("8bitmime")  # then the body is readable UTF-8
            message.set_content(body, charset="utf-8", cte="8bit" if eight_bit else "base64")
            if not sending():
                return
            smtp.send_message(message, mail_options=["BODY=8BITMIME"] if eight_bit else [])
        accepted()  # from here on the message must never be sent again, whatever happens next
        with contextlib.suppress(OSError):  # a failed goodbye changes nothing: the server has it
            smtp.quit()


def deletion_request(leads: list[dict], rows: int = 0, chat=None) -> tuple[str, str]:
    """The subject and text that ask the manager to delete a forgotten client's data: the leads
    this channel delivered, or the rows of leads.csv that someone changed and the bot left."""
    lines = ["Клиент попросил удалить свои данные (команда /forget). Бот удалил их у себя."]
    lines += [f"Удалите и у себя заявку «{subject(lead)}» от {lead.get('timestamp', '')}."
              for lead in leads]
    if rows:
        lines.append(f"В leads.csv осталось строк этого клиента (chat_id {chat}), "
                     f"изменённых вручную: {rows}. "
                     "Бот не трогает изменённые строки — удалите их сами.")
    return "Удалите данные клиента", "\n".join(lines)


def check(cfg) -> list[tuple[bool | None, str]]:
    """Lines for --check, in Russian: connect, secure and log in exactly as send_lead does, without
    sending anything; and a ✗ when the password would cross the network unencrypted."""
    if not cfg.smtp_host:
        return [(None, "Email: выключена (SMTP_HOST пуст) — заявки сохраняются только в leads.csv")]
    local = cfg.smtp_host in ("localhost", "::1") or cfg.smtp_host.startswith("127.")
    lines = [] if local or not cfg.smtp_user or cfg.smtp_security != "none" else [(False, (
        f"Email: пароль SMTP_USER уходит на {cfg.smtp_host} без шифрования (SMTP_SECURITY=none)"
        " — поставьте SMTP_SECURITY=starttls (порт 587) или ssl (465)"))]
    try:
        with contextlib.closing(_login(cfg)) as smtp, contextlib.suppress(OSError):
            smtp.quit()
    except MailError as error:
        return [(False, error.advice)] + lines
    server = f"Email: SMTP-сервер {cfg.smtp_host}:{cfg.smtp_port}"
    return [(True, server + (" принимает логин (ничего не отправлено)" if cfg.smtp_user
                             else " отвечает (SMTP_USER пуст, вход не проверялся)"))] + lines


def _headline(lead: dict) -> str:
    return "Отказ" if lead.get("status") == "rejected" else "Новая заявка"


def _one_line(value) -> str:
    """value on one line: every kind of line break (\\r, \\n, \\u2028, \\x85 …) becomes " / "."""
    lines = str("" if value is None else value).splitlines()
    return " / ".join(part.strip() for part in lines if part.strip())


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", limit // 2, limit)  # at a word boundary, unless the words are very long
    return text[:cut if cut > 0 else limit].rstrip(" /") + "…"


def _login(cfg) -> smtplib.SMTP:
    """A connection secured and logged in per cfg; raises MailError."""
    # Verifies certificate and host name; smtplib's default verifies nothing: a man in the middle
    # gets the password.
    context = ssl.create_default_context() if cfg.smtp_security in ("ssl", "starttls") else None
    with _translated(), contextlib.ExitStack() as on_failure:
        address = (cfg.smtp_host, int(cfg.smtp_port))
        smtp = (smtplib.SMTP_SSL(*address, timeout=TIMEOUT, context=context)
                if cfg.smtp_security == "ssl" else smtplib.SMTP(*address, timeout=TIMEOUT))
        on_failure.callback(smtp.close)
        if cfg.smtp_security == "starttls":
            smtp.starttls(context=context)
        smtp.ehlo_or_helo_if_needed()
        if cfg.smtp_user:
            smtp.login(cfg.smtp_user, cfg.smtp_password)
        on_failure.pop_all()  # logged in: the caller closes it
    return smtp


@contextlib.contextmanager
def _translated():
    """Socket, TLS and SMTP errors (all OSError) become MailError, without their text: it may
    hold addresses."""
    try:
        yield
    except OSError as error:
        kind = next((kind for kinds, kind in _KINDS if isinstance(error, kinds)), "connect")
        reason = next((text for kinds, text in _REASONS if isinstance(error, kinds)), "")
        raise MailError(kind, reason) from None

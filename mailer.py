"""E-mail a new lead to the manager over SMTP."""

import contextlib
import email.message
import email.utils
import smtplib
import ssl
import textwrap

SUBJECT = "Новая заявка (leadbot)"
TIMEOUT = 20  # seconds, for connecting and for each SMTP reply

LABELS = {"timestamp": "Время", "chat_id": "Чат", "client_name": "Имя", "contact": "Контакт",
          "intent": "Запрос", "notes": "Заметки", "source": "Источник", "status": "Статус"}

_MESSAGES = {
    "auth": "SMTP server rejected the login: check SMTP_USER and SMTP_PASSWORD",
    "connect": "cannot reach SMTP server ({}): check SMTP_HOST, SMTP_PORT and SMTP_SECURITY",
    "rejected": "SMTP server refused the message ({}): check MAIL_FROM and MANAGER_EMAIL",
    "other": "SMTP error ({}): check SMTP_SECURITY and the server's settings",
}


class MailError(Exception):
    """Sending failed. .kind is 'auth' | 'connect' | 'rejected' | 'other'; the text holds no personal data."""

    def __init__(self, kind: str, cause: str):
        super().__init__(_MESSAGES[kind].format(cause))
        self.kind = kind


def lead_card(lead: dict) -> str:
    """Plain-text card: 'Новая заявка', then one 'Label: value' line per lead field in column order."""
    return "\n".join(["Новая заявка"] + [f"{label}: {lead[key]}" for key, label in LABELS.items()])


def build_message(cfg, lead: dict, lead_id: str, eight_bit: bool = False) -> email.message.EmailMessage:
    """The e-mail for one lead; its Message-ID depends only on lead_id, so a resend can be deduplicated.

    eight_bit: the body goes as plain UTF-8 (readable even in the raw message), for servers with
    8BITMIME; otherwise base64 keeps it 7-bit clean."""
    message = email.message.EmailMessage()
    message["From"] = cfg.mail_from
    message["To"] = cfg.manager_email
    message["Subject"] = SUBJECT
    message["Date"] = email.utils.formatdate(localtime=True)
    message["Message-ID"] = f"<{lead_id}@leadbot>"
    if eight_bit:  # SMTP allows at most 998 bytes a line; a long note is wrapped
        body = "\n".join(textwrap.fill(line, 300) for line in lead_card(lead).splitlines())
        message.set_content(body, charset="utf-8", cte="8bit")
    else:
        message.set_content(lead_card(lead), charset="utf-8", cte="base64")
    return message


def send_lead(cfg, lead: dict, lead_id: str, accepted=lambda: None) -> None:
    """Send the lead card to cfg.manager_email; raises MailError when the server did not take it.

    accepted() runs as soon as the server has taken the message, before QUIT: from then on it
    must never be sent again, whatever happens to the connection or the process.
    """
    with _session(cfg) as smtp:
        smtp.ehlo_or_helo_if_needed()
        smtp.send_message(build_message(cfg, lead, lead_id, smtp.has_extn("8bitmime")))
        accepted()


def check_login(cfg) -> None:
    """Connect and log in exactly as send_lead does, without sending; raises MailError."""
    with _session(cfg):
        pass


@contextlib.contextmanager
def _session(cfg):
    """An SMTP connection, secured and logged in per cfg; any failure inside becomes MailError."""
    # smtplib's own default context does not verify the server certificate.
    context = ssl.create_default_context()
    smtp = None
    try:
        smtp = _connect(cfg, context)
        if cfg.smtp_security == "starttls":
            smtp.starttls(context=context)
        if cfg.smtp_user:
            smtp.login(cfg.smtp_user, cfg.smtp_password)
        yield smtp
        # A failed goodbye changes nothing: what the server accepted stays accepted.
        with contextlib.suppress(OSError):
            smtp.quit()
    except OSError as error:  # smtplib.SMTPException is an OSError too
        # "from None": the original text may contain addresses or server replies.
        raise MailError(_kind(error), type(error).__name__) from None
    finally:
        if smtp is not None:
            smtp.close()


def _connect(cfg, context: ssl.SSLContext) -> smtplib.SMTP:
    """A connected client, encrypted from the start when cfg.smtp_security is 'ssl'."""
    if cfg.smtp_security == "ssl":
        return smtplib.SMTP_SSL(cfg.smtp_host, int(cfg.smtp_port), timeout=TIMEOUT, context=context)
    return smtplib.SMTP(cfg.smtp_host, int(cfg.smtp_port), timeout=TIMEOUT)


def _kind(error: OSError) -> str:
    """MailError kind for an smtplib or socket error."""
    if isinstance(error, smtplib.SMTPAuthenticationError):
        return "auth"
    if isinstance(error, (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError)):
        return "rejected"
    if isinstance(error, smtplib.SMTPException) and not isinstance(
            error, (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected)):
        return "other"
    return "connect"

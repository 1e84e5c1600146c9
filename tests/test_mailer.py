import email
import email.policy
import socket
import types

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

import mailer

USER, PASSWORD = "bot@example.com", "s3cret-pass"
MANAGER = "manager@example.com"
LEAD = {"timestamp": "2026-11-24T12:00:00+00:00", "chat_id": 4242, "client_name": "Анна Петрова",
        "contact": "+7 900 123-45-67", "intent": "Интернет-магазин", "notes": "Нужна оплата картой",
        "source": "telegram", "status": "new"}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Recorder:
    """aiosmtpd handler and authenticator that remembers what it was sent."""

    def __init__(self):
        self.envelopes = []
        self.logins = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 Message accepted"

    def __call__(self, server, session, envelope, mechanism, auth_data):
        ok = auth_data == LoginPassword(USER.encode(), PASSWORD.encode())
        if ok:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def server():
    recorder = Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port(),
                            authenticator=recorder, auth_require_tls=False)
    controller.start()
    recorder.port = controller.port
    yield recorder
    controller.stop()


def make_cfg(port, **overrides):
    values = dict(smtp_host="127.0.0.1", smtp_port=port, smtp_security="none", smtp_user="",
                  smtp_password="", mail_from="bot@example.com", manager_email=MANAGER)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def received(envelope):
    return email.message_from_bytes(envelope.original_content, policy=email.policy.default)


def test_plain_smtp_delivers_exactly_one_message(server):
    mailer.send_lead(make_cfg(server.port), LEAD, "lead-1")
    assert len(server.envelopes) == 1
    assert server.envelopes[0].mail_from == "bot@example.com"
    assert server.envelopes[0].rcpt_tos == [MANAGER]
    assert server.logins == []


def test_cyrillic_card_arrives_readable(server):
    mailer.send_lead(make_cfg(server.port), LEAD, "lead-1")
    message = received(server.envelopes[0])
    assert message["Subject"] == "Новая заявка (leadbot)"
    assert message["To"] == MANAGER
    assert message["Date"]
    body = message.get_content()
    assert body.startswith("Новая заявка")
    assert "Контакт: +7 900 123-45-67" in body
    assert "Имя: Анна Петрова" in body
    for label in mailer.LABELS.values():
        assert f"{label}: " in body
    raw = server.envelopes[0].original_content.decode("utf-8")  # readable without decoding the MIME
    assert "Контакт: +7 900 123-45-67" in raw


def test_without_8bitmime_the_body_is_7bit_clean():
    message = mailer.build_message(make_cfg(25), {**LEAD, "notes": "Заметка " * 400}, "lead-1")
    assert message.as_bytes().isascii()
    assert "Контакт: +7 900 123-45-67" in message.get_content()


def test_a_long_note_keeps_every_smtp_line_short(server):
    mailer.send_lead(make_cfg(server.port), {**LEAD, "notes": "Заметка " * 400}, "lead-1")
    raw = server.envelopes[0].original_content
    assert max(len(line) for line in raw.splitlines()) <= 998
    assert received(server.envelopes[0]).get_content().count("Заметка") == 400


def test_lead_card_lists_fields_in_column_order():
    lines = mailer.lead_card(LEAD).splitlines()
    assert lines == ["Новая заявка", "Время: 2026-11-24T12:00:00+00:00", "Чат: 4242", "Имя: Анна Петрова",
                     "Контакт: +7 900 123-45-67", "Запрос: Интернет-магазин", "Заметки: Нужна оплата картой",
                     "Источник: telegram", "Статус: new"]


def test_message_id_is_stable_per_lead(server):
    cfg = make_cfg(server.port)
    mailer.send_lead(cfg, LEAD, "lead-7")
    mailer.send_lead(cfg, LEAD, "lead-7")
    mailer.send_lead(cfg, LEAD, "lead-8")
    ids = [received(envelope)["Message-ID"] for envelope in server.envelopes]
    assert ids == ["<lead-7@leadbot>", "<lead-7@leadbot>", "<lead-8@leadbot>"]


def test_login_with_right_credentials_sends(server):
    mailer.send_lead(make_cfg(server.port, smtp_user=USER, smtp_password=PASSWORD), LEAD, "lead-1")
    assert server.logins == [USER]
    assert len(server.envelopes) == 1


def test_wrong_password_is_auth_error_without_secrets(server):
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(server.port, smtp_user=USER, smtp_password="wrong-pass"), LEAD, "lead-1")
    assert caught.value.kind == "auth"
    assert "SMTP_USER" in str(caught.value) and "SMTP_PASSWORD" in str(caught.value)
    assert USER not in str(caught.value) and "wrong-pass" not in str(caught.value)
    assert server.envelopes == []


def test_check_login_logs_in_and_sends_nothing(server):
    mailer.check_login(make_cfg(server.port, smtp_user=USER, smtp_password=PASSWORD))
    assert server.logins == [USER]
    assert server.envelopes == []


def test_check_login_reports_wrong_credentials(server):
    with pytest.raises(mailer.MailError) as caught:
        mailer.check_login(make_cfg(server.port, smtp_user=USER, smtp_password="wrong-pass"))
    assert caught.value.kind == "auth"


def test_nothing_listening_is_connect_error_not_chained():
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(free_port()), LEAD, "lead-1")
    assert caught.value.kind == "connect"
    assert str(caught.value) == ("cannot reach SMTP server (ConnectionRefusedError): "
                                 "check SMTP_HOST, SMTP_PORT and SMTP_SECURITY")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_refused_recipient_is_rejected_without_address(server):
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(server.port, manager_email="nobody@example.com"), LEAD, "lead-1")
    assert caught.value.kind == "rejected"
    assert "nobody" not in str(caught.value)
    assert server.envelopes == []


def test_starttls_against_server_without_it_is_mail_error(server):
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(server.port, smtp_security="starttls"), LEAD, "lead-1")
    assert caught.value.kind == "other"
    assert "SMTP_SECURITY" in str(caught.value)
    assert server.envelopes == []


def test_ssl_against_plain_server_is_connect_error(server):
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(server.port, smtp_security="ssl"), LEAD, "lead-1")
    assert caught.value.kind == "connect"
    assert server.envelopes == []

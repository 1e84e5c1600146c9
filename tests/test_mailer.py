"""mailer.py against real SMTP servers on 127.0.0.1 (aiosmtpd), plain and TLS."""
import smtplib
import ssl
import types

import pytest

import mailer
import store
from fakes import CERTIFICATES, FakeSMTP, _free_port

USER, PASSWORD = "bot@example.com", "s3cret-pass"
MANAGER = "manager@example.com"
LEAD = {"timestamp": "2026-11-24T18:03:11+03:00", "chat_id": 4242, "client_name": "Ольга",
        "contact": "+7 912 345-67-89, info@primer-studio.ru", "intent": "сайт для пекарни",
        "notes": "Нужна оплата картой", "source": "telegram", "status": "new",
        "offer": "Рекомендуем «Лендинг под ключ»: быстрый старт.\nСрок — две недели.",
        "answers": [["Задача", "Сайт для пекарни"], ["Сроки", "В течение месяца"], ["Бюджет", "50–200 тыс. ₽"]]}
FORGED = ("Bcc: evil@example.com", "Контакт: +7 000 000-00-00", "Статус: отказ")
# Every line break str.splitlines() knows, and so may a mail client or Telegram.
BREAKS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def make_cfg(port, **overrides):
    values = dict(smtp_host="127.0.0.1", smtp_port=port, smtp_security="none", smtp_user="",
                  smtp_password="", mail_from="bot@example.com", manager_email=MANAGER)
    return types.SimpleNamespace(**{**values, **overrides})


@pytest.fixture
def servers():
    """serve(fake=FakeSMTP, **options) starts a server; .cfg holds make_cfg's settings for it, login included."""
    started = []

    def serve(fake=FakeSMTP, **options):
        server = fake(**options)
        started.append(server)
        login = dict(smtp_user=USER, smtp_password=PASSWORD) if options.get("auth") else {}
        server.cfg = make_cfg(server.port, smtp_security=options.get("tls") or "none", **login)
        return server

    yield serve
    for server in started:
        server.stop()


@pytest.fixture
def server(servers):
    return servers()


@pytest.fixture
def trusting(monkeypatch):
    """Make mailer trust one test certificate, as if a real CA had signed it."""
    default_context = ssl.create_default_context

    def trust(certificate):
        cafile = str(CERTIFICATES / f"{certificate}.pem")
        monkeypatch.setattr(mailer.ssl, "create_default_context",
                            lambda *args, **kwargs: default_context(*args, cafile=cafile, **kwargs))

    return trust


def forged_lines(text):
    """Lines that start like a field although no field of the card has that label there."""
    labels = mailer.LABELS.values()
    known = ("Новая заявка", "Отказ", f"{mailer.LABELS['answers']}:", *(f"{label}: " for label in labels))
    lines = text.splitlines()
    return [line for line in lines if not line.startswith(" ") and not line.startswith(known)] + [
        line for line in lines if line.startswith(FORGED)]


def hostile(text):
    """text, then each forged field after each kind of line break."""
    return text + "".join(f"{br}{field}" for br in BREAKS for field in FORGED)


# Delivery


def test_plain_smtp_delivers_exactly_one_message(server):
    mailer.send_lead(server.cfg, LEAD, "lead-1")
    [message] = server.messages
    assert (message.mail_from, message.rcpt_tos) == ("bot@example.com", [MANAGER])
    assert server.logins == []


def test_card_arrives_readable_as_8bit_utf8(server):
    mailer.send_lead(server.cfg, LEAD, "lead-1")
    [message] = server.messages
    assert message["Subject"] == "Новая заявка: сайт для пекарни — Ольга"
    assert message["To"] == MANAGER and message["Date"]
    assert message.get_content().splitlines() == mailer.card(LEAD).splitlines()
    assert "BODY=8BITMIME" in message.mail_options
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert "Контакт: +7 912 345-67-89" in message.raw.decode("utf-8")  # readable without decoding MIME


def test_without_8bitmime_the_body_goes_as_base64(server, monkeypatch):
    has_extn = smtplib.SMTP.has_extn
    monkeypatch.setattr(smtplib.SMTP, "has_extn", lambda smtp, name: name != "8bitmime" and has_extn(smtp, name))
    mailer.send_lead(server.cfg, {**LEAD, "notes": "Заметка " * 400}, "lead-1")
    [message] = server.messages
    assert message.raw.isascii() and message["Content-Transfer-Encoding"] == "base64"
    assert "BODY=8BITMIME" not in message.mail_options
    assert message.get_content().count("Заметка") == 400


@pytest.mark.parametrize("notes", ["Заметка " * 400, "😀" * 3000, "Bcc: evil@example.com " * 80],
                         ids=["cyrillic", "one long emoji word", "forged fields"])
def test_long_values_keep_every_smtp_line_short_and_wrap_indented(server, notes):
    mailer.send_lead(server.cfg, {**LEAD, "notes": notes}, "lead-1")
    [message] = server.messages
    assert max(len(line) for line in message.raw.splitlines()) <= 998
    body = message.get_content()
    assert "".join(body.split()).count("".join(notes.split())) == 1  # all of it, wrapped at spaces only
    assert forged_lines(body) == []


def test_message_id_is_stable_per_lead(server):
    mailer.send_lead(server.cfg, LEAD, "lead-7")
    mailer.send_lead(server.cfg, LEAD, "lead-7")
    mailer.send_lead(server.cfg, LEAD, "lead-8")
    assert [m["Message-ID"] for m in server.messages] == ["<lead-7@leadbot>", "<lead-7@leadbot>", "<lead-8@leadbot>"]


def test_accepted_is_called_after_the_server_took_the_message_and_before_quit(server):
    seen = []
    mailer.send_lead(server.cfg, LEAD, "lead-1", accepted=lambda: seen.append((len(server.messages), server.quits)))
    assert seen == [(1, 0)] and server.quits == 1


def test_a_failing_accepted_callback_is_not_taken_for_a_mail_error(server):
    def accepted():
        raise PermissionError("the outbox file cannot be removed")

    with pytest.raises(PermissionError):  # a MailError would say the mail was not sent, and it was
        mailer.send_lead(server.cfg, LEAD, "lead-1", accepted=accepted)
    assert len(server.messages) == 1


class HangingUp(FakeSMTP):
    async def handle_QUIT(self, server, session, envelope):
        server.transport.close()


@pytest.mark.parametrize("fake", [FakeSMTP, HangingUp])
def test_a_failed_quit_after_acceptance_is_not_a_failure(servers, fake):
    server = servers(fake)
    server.quit_reply = "421 4.3.2 Shutting down"
    told = []
    mailer.send_lead(server.cfg, LEAD, "lead-1", accepted=lambda: told.append(True))
    assert told == [True] and len(server.messages) == 1


def test_login_with_the_right_password_sends(servers):
    server = servers(auth=(USER, PASSWORD))
    mailer.send_lead(server.cfg, LEAD, "lead-1")
    assert server.logins == [USER] and len(server.messages) == 1


# Failures: one plain line saying what to check, no addresses, no server text, no chained cause


def test_wrong_password_is_an_auth_error_without_secrets(servers):
    server = servers(auth=(USER, PASSWORD))
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(server.port, smtp_user=USER, smtp_password="wrong-pass"), LEAD, "lead-1")
    assert caught.value.kind == "auth"
    assert str(caught.value) == "Email: the SMTP server rejected the login — check SMTP_USER and SMTP_PASSWORD"
    assert server.messages == []


def test_nothing_listening_is_a_connect_error_not_chained():
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(_free_port()), LEAD, "lead-1")
    assert caught.value.kind == "connect"
    assert str(caught.value) == ("Email: cannot reach the SMTP server (refused) — "
                                 "check SMTP_HOST, SMTP_PORT and SMTP_SECURITY")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_refused_recipient_is_rejected_without_the_address(server):
    server.refused.add("nobody@example.com")
    told = []
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(server.port, manager_email="nobody@example.com"), LEAD, "lead-1",
                         accepted=lambda: told.append(True))
    assert caught.value.kind == "rejected" and "MANAGER_EMAIL" in str(caught.value)
    assert "nobody" not in str(caught.value) and "550" not in str(caught.value)
    assert server.messages == [] and told == []


def test_a_refused_message_is_rejected_and_not_reported_as_accepted(servers):
    class Refusing(FakeSMTP):
        async def handle_DATA(self, server, session, envelope):
            return "554 5.7.1 Rejected as spam"

    server = servers(Refusing)
    told = []
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(server.cfg, LEAD, "lead-1", accepted=lambda: told.append(True))
    assert caught.value.kind == "rejected" and told == [] and "spam" not in str(caught.value)


def test_starttls_against_a_server_without_it_is_other_error(server):
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(server.port, smtp_security="starttls"), LEAD, "lead-1")
    assert caught.value.kind == "other" and "SMTP_SECURITY" in str(caught.value)
    assert server.messages == []


def test_ssl_against_a_plain_server_is_connect_error(server):
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(make_cfg(server.port, smtp_security="ssl"), LEAD, "lead-1")
    assert caught.value.kind == "connect" and "SMTP_SECURITY" in str(caught.value)
    assert server.messages == []


# TLS: the certificate and the host name are verified before the password goes out


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_an_untrusted_certificate_is_refused_before_the_password_is_sent(servers, security):
    server = servers(auth=(USER, PASSWORD), tls=security)
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(server.cfg, LEAD, "lead-1")
    assert caught.value.kind == "tls"
    assert "certificate is not trusted" in str(caught.value) and "SMTP_HOST" in str(caught.value)
    assert mailer.check(server.cfg) == [(False, caught.value.advice)]
    assert server.logins == [] and server.messages == []


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_a_trusted_certificate_for_another_host_is_refused(servers, trusting, security):
    server = servers(auth=(USER, PASSWORD), tls=security, certificate="otherhost")
    trusting("otherhost")
    with pytest.raises(mailer.MailError) as caught:
        mailer.send_lead(server.cfg, LEAD, "lead-1")
    assert caught.value.kind == "tls"
    assert mailer.check(server.cfg) == [(False, caught.value.advice)]
    assert server.logins == [] and server.messages == []


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_a_trusted_certificate_for_this_host_is_used(servers, trusting, security):
    server = servers(auth=(USER, PASSWORD), tls=security)
    trusting("selfsigned")
    mailer.send_lead(server.cfg, LEAD, "lead-1")
    assert server.logins == [USER] and len(server.messages) == 1
    assert mailer.check(server.cfg)[0][0] is True


# check()


def test_check_is_off_without_smtp_host():
    assert mailer.check(make_cfg(25, smtp_host="")) == [
        (None, "Email: выключена (SMTP_HOST пуст) — заявки сохраняются только в leads.csv")]


def test_check_logs_in_and_sends_nothing(servers):
    server = servers(auth=(USER, PASSWORD))
    assert mailer.check(server.cfg) == [
        (True, f"Email: SMTP-сервер 127.0.0.1:{server.port} принимает логин (ничего не отправлено)")]
    assert server.logins == [USER] and server.messages == [] and server.quits == 1


def test_check_without_smtp_user_tries_no_login(server):
    assert mailer.check(server.cfg) == [
        (True, f"Email: SMTP-сервер 127.0.0.1:{server.port} отвечает (SMTP_USER пуст, вход не проверялся)")]
    assert server.messages == []


def test_check_reports_wrong_credentials(servers):
    server = servers(auth=(USER, PASSWORD))
    [(ok, text)] = mailer.check(make_cfg(server.port, smtp_user=USER, smtp_password="wrong-pass"))
    assert (ok, text) == (False, mailer.MailError("auth").advice)
    assert "SMTP_PASSWORD" in text and "логин" in text
    assert "wrong-pass" not in text and USER not in text


def test_the_log_line_of_a_mail_error_stays_english():
    error = mailer.MailError("connect", "refused")
    assert str(error) == ("Email: cannot reach the SMTP server (refused) — "
                          "check SMTP_HOST, SMTP_PORT and SMTP_SECURITY")
    assert error.advice == ("Email: SMTP-сервер недоступен (refused) — "
                            "проверьте SMTP_HOST, SMTP_PORT и SMTP_SECURITY")


# 0.0.0.0 reaches this machine's servers on Linux, and is not a local name: as a remote host would.
@pytest.mark.parametrize("host, security, user, warned", [
    ("0.0.0.0", "none", USER, True), ("0.0.0.0", "none", "", False),
    ("127.0.0.1", "none", USER, False), ("localhost", "none", USER, False),
    ("0.0.0.0", "starttls", USER, False)])
def test_check_warns_when_a_password_would_cross_the_network_unencrypted(
        servers, host, security, user, warned):
    server = servers(auth=(USER, PASSWORD))
    cfg = make_cfg(server.port, smtp_host=host, smtp_security=security, smtp_user=user,
                   smtp_password=PASSWORD if user else "")
    lines = mailer.check(cfg)
    warnings = [text for ok, text in lines if ok is False and "без шифрования" in text]
    assert len(warnings) == warned and len(lines) == 1 + warned
    assert all("SMTP_SECURITY=starttls" in text and PASSWORD not in text for text in warnings)
    assert server.messages == []


# The card and the subject


def test_card_shows_every_field_in_russian():
    assert mailer.card(LEAD).splitlines() == [
        "Новая заявка",
        "Имя: Ольга",
        "Контакт: +7 912 345-67-89, info@primer-studio.ru",
        "Запрос: сайт для пекарни",
        "Ответы:",
        "  Задача: Сайт для пекарни",
        "  Сроки: В течение месяца",
        "  Бюджет: 50–200 тыс. ₽",
        "Рекомендация: Рекомендуем «Лендинг под ключ»: быстрый старт. / Срок — две недели.",
        "Заметки: Нужна оплата картой",
        "Источник: Telegram",
        "Статус: новая",
        "Чат: 4242",
        "Время: 24.11.2026 18:03 (UTC+03:00)",
    ]


def test_labels_follow_the_csv_columns():
    assert list(mailer.LABELS) == store.COLUMNS + ["offer", "answers"]


def test_a_refusal_from_the_console_without_offer_or_answers():
    lead = {key: LEAD[key] for key in store.COLUMNS} | {"status": "rejected", "source": "console",
                                                        "timestamp": "2026-01-05T07:30:00-05:30"}
    lines = mailer.card(lead).splitlines()
    assert lines[0] == "Отказ"
    assert "Статус: отказ" in lines and "Источник: консоль" in lines
    assert "Время: 05.01.2026 07:30 (UTC-05:30)" in lines
    assert not any(line.startswith(("Ответы", "Рекомендация")) for line in lines)


@pytest.mark.parametrize("timestamp, shown", [("2026-11-24T12:00:00+00:00", "24.11.2026 12:00 (UTC+00:00)"),
                                              ("2026-11-24T12:00:00", "24.11.2026 12:00"),
                                              ("вчера", "вчера"), ("", "—")])
def test_time_is_shown_readable(timestamp, shown):
    assert f"Время: {shown}" in mailer.card({**LEAD, "timestamp": timestamp}).splitlines()


def test_a_long_recommendation_is_shortened_at_a_word_boundary():
    offer = "Рекомендуем услугу «Лендинг под ключ» для вашей пекарни. " * 30
    [line] = [line for line in mailer.card({**LEAD, "offer": offer}).splitlines() if line.startswith("Рекомендация")]
    shown = line.removeprefix("Рекомендация: ")
    assert 600 <= len(shown) <= 701 and shown.endswith("…")
    assert offer.startswith(shown[:-1]) and offer[len(shown) - 1] == " "


@pytest.mark.parametrize("key", ["client_name", "contact", "intent", "notes", "offer", "source", "status",
                                 "timestamp", "chat_id", "answer", "question"])
def test_no_client_value_can_forge_a_line_of_the_card(key):
    lead = {**LEAD, "answers": [list(pair) for pair in LEAD["answers"]]}
    if key in ("answer", "question"):
        lead["answers"][1][key == "answer"] = hostile("Сроки")
    else:
        lead[key] = hostile(str(lead[key]))
    card = mailer.card(lead)
    assert forged_lines(card) == []
    assert len(card.splitlines()) == len(mailer.card(LEAD).splitlines())
    assert all(field in card for field in FORGED)  # shown, on the line of the value they belong to


def test_a_hostile_lead_arrives_as_one_message_to_the_manager_only(server):
    lead = {key: hostile(str(value)) if isinstance(value, str) else value for key, value in LEAD.items()}
    mailer.send_lead(server.cfg, lead, "lead-1")
    [message] = server.messages
    assert message.rcpt_tos == [MANAGER] and message["Bcc"] is None
    assert forged_lines(message.get_content()) == []
    assert len(message["Subject"].splitlines()) == 1


@pytest.mark.parametrize("lead, expected", [
    (LEAD, "Новая заявка: сайт для пекарни — Ольга"),
    ({**LEAD, "client_name": ""}, "Новая заявка: сайт для пекарни"),
    ({**LEAD, "status": "rejected"}, "Отказ: сайт для пекарни — Ольга"),
    ({**LEAD, "intent": "сайт\r\nBcc: evil@example.com", "client_name": "Оль\u2028га"},
     "Новая заявка: сайт / Bcc: evil@example.com — Оль / га"),
])
def test_subject_says_what_and_who(lead, expected):
    assert mailer.subject(lead) == expected


def test_subject_is_one_short_line_whatever_the_client_wrote():
    lead = {**LEAD, "intent": hostile("Нужен большой интернет-магазин с доставкой по всей России " * 5),
            "client_name": hostile("Ольга " * 50)}
    text = mailer.subject(lead)
    assert len(text.splitlines()) == 1 and "\r" not in text and "\n" not in text
    assert len(text) <= 120 and text.startswith("Новая заявка: Нужен большой интернет-магазин")
    assert "…" in text.split(" — ")[0] and text.endswith("…")

"""Order of the durable steps of a lead, checked in-process where a subprocess cannot see it."""
import logging
import os
import socket
import types

import pytest
from aiosmtpd.controller import Controller

import leadbot
import mailer
import store

LEAD = {"timestamp": "2026-11-24T12:00:00+00:00", "chat_id": 4242, "client_name": "Анна",
        "contact": "+7 900 123-45-67", "intent": "Сайт", "notes": "Лендинг", "source": "telegram",
        "status": "new"}


class Nobody:
    """A way out that swallows every message."""

    def send(self, *args, **kwargs):
        pass


def test_lead_saved_is_logged_only_after_the_row_is_fsynced(tmp_path, monkeypatch, caplog):
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        events.append("fsync")

    class Recorder(logging.Handler):
        def emit(self, record):
            events.append(record.getMessage())

    cfg = leadbot.read_config({"DATA_DIR": str(tmp_path / "data")}, telegram=False)
    leadbot.prepare_data_dir(cfg)
    app = leadbot.App(cfg, Nobody(), leadbot.MemoryJournal())
    monkeypatch.setattr(store.os, "fsync", fsync)
    caplog.set_level(logging.INFO, logger="leadbot")
    handler = Recorder()
    leadbot.log.addHandler(handler)
    try:
        assert app.commit_lead("4242-1", LEAD)
    finally:
        leadbot.log.removeHandler(handler)
    saved = next(i for i, event in enumerate(events) if event.startswith("lead saved"))
    assert "fsync" in events[:saved]
    assert store.read_leads(cfg.leads_path)[0]["chat_id"] == "4242"


def test_start_up_tries_a_broken_mail_server_once_and_keeps_every_lead_owed(tmp_path, monkeypatch):
    attempts = []

    def unreachable(cfg, lead, lead_id, accepted):
        attempts.append(lead_id)
        raise mailer.MailError("connect", "TimeoutError")

    monkeypatch.setattr(mailer, "send_lead", unreachable)
    cfg = leadbot.Config(data_dir=tmp_path, smtp_host="127.0.0.1", mail_from="bot@example.com",
                         manager_email="manager@example.com")
    app = leadbot.App(cfg, Nobody(), leadbot.MemoryJournal())
    for n in range(3):
        app.commit_lead(f"4242-{n}", {**LEAD, "timestamp": f"2026-11-24T12:00:0{n}+00:00"})
    app.recover()
    assert len(attempts) == 1  # not one timeout per owed lead before the bot starts answering
    assert len(leadbot.App(cfg, Nobody(), leadbot.MemoryJournal()).outbox) == 3


def test_a_lead_forgotten_while_its_email_failed_is_not_retried_and_breaks_nothing(tmp_path, monkeypatch):
    cfg = leadbot.Config(data_dir=tmp_path, smtp_host="127.0.0.1", mail_from="bot@example.com",
                         manager_email="manager@example.com")
    app = leadbot.App(cfg, Nobody(), leadbot.MemoryJournal())

    def forgotten_then_failed(cfg, lead, lead_id, accepted):
        app.outbox.drop_chat(lead["chat_id"])  # the client sent /forget meanwhile
        raise mailer.MailError("connect", "TimeoutError")

    monkeypatch.setattr(mailer, "send_lead", forgotten_then_failed)
    app.commit_lead("4242-1", LEAD)
    app.deliver_owed()
    app.deliver_owed("4242-1")
    assert len(app.outbox) == 0


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


def test_delivered_email_leaves_the_outbox_before_quit(serve, tmp_path, monkeypatch):
    server = Server()
    cfg = leadbot.Config(data_dir=tmp_path, **vars(serve(server)))
    app = leadbot.App(cfg, Nobody(), leadbot.MemoryJournal())
    app.commit_lead("4242-1", LEAD)
    [item] = app.outbox.due(float("inf"))

    original_quit = mailer.smtplib.SMTP.quit

    def quit_noting_the_outbox(smtp):
        server.events.append(f"outbox holds {len(app.outbox)} at QUIT")
        return original_quit(smtp)

    monkeypatch.setattr(mailer.smtplib.SMTP, "quit", quit_noting_the_outbox)
    app.deliver(item)
    assert server.events == ["accepted", "outbox holds 0 at QUIT", "quit"]
    assert not list((tmp_path / "outbox").glob("*.json"))

"""Fake Telegram, LLM and SMTP servers and a leadbot.py launcher for end-to-end tests.

Every fake listens on 127.0.0.1 only, records what the bot sent and lets a test inject
the faults real services produce: error answers, resets, stalls, refused connections.
"""

import asyncio
import atexit
import contextlib
import copy
import csv
import email
import email.policy
import itertools
import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from requests.structures import CaseInsensitiveDict

REPO = Path(__file__).resolve().parent.parent
BOT_SCRIPT = REPO / "leadbot.py"

sys.path.insert(0, str(REPO))
import leadbot  # noqa: E402

# What the client reads, as prompt.txt has it: tests expect the owner's texts, not copies of them.
PROMPT = leadbot.read_prompt(REPO / "prompt.txt")
QUESTIONS = [(q.label, q.text, q.buttons) for q in PROMPT.questions]
TEXTS = PROMPT.texts
SUMMARY_PROMPT = PROMPT.notes


def wait_until(predicate, timeout=10, interval=0.005, message=""):
    """Poll predicate until it returns something truthy and return that value.

    On timeout raise AssertionError with message; message may be a callable, so it can
    describe the state at the moment of failure.
    """
    deadline = time.monotonic() + timeout
    pause = min(interval, 0.001)  # most waits end within milliseconds: look often at first, then every interval
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(text or f"condition not met within {timeout} s")
        time.sleep(pause)
        pause = min(pause * 1.2, interval)


# --- HTTP plumbing shared by FakeTelegram and FakeLLM --------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self):
        self.server.fake._handle(self)

    do_GET = do_POST

    def log_message(self, format, *args):
        """Keep pytest output free of access logs."""


class _HTTPServer(ThreadingHTTPServer):
    # server_close() must not wait for handlers: one may be in the middle of a long poll.
    block_on_close = False
    request_queue_size = 128  # a real server's backlog: a burst of new connections is not dropped

    def __init__(self, address, fake):
        super().__init__(address, _Handler)
        self.fake = fake
        self.closed = threading.Event()
        self._connections = set()
        self._lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # Broken and reset connections are what the fault tests are made of.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def close(self, wait=True):
        """Stop listening and cut every open connection, like a server that went away.

        Without wait the serving loop ends on its own, within its poll interval: until then the port is
        still taken (its poll holds the socket), which only a server stopped for good can afford.
        """
        self.closed.set()
        if wait:
            self.shutdown()
        else:
            threading.Thread(target=self.shutdown, daemon=True).start()
        self.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _HTTPFake:
    """Serves self._handle(handler) on a 127.0.0.1 port that stays the same across down()/up()."""

    def __init__(self):
        self.port = 0
        self._httpd = None
        self.up()

    def up(self):
        """Accept connections again (on the same port)."""
        if self._httpd is None:
            self._httpd = _HTTPServer(("127.0.0.1", self.port), self)
            self.port = self._httpd.server_address[1]
            threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True).start()

    def down(self):
        """Refuse connections and cut the open ones until up()."""
        if self._httpd is not None:
            self._httpd.close()
            self._httpd = None

    def stop(self):
        """For good, at the end of a test: the serving loop is not waited for."""
        if self._httpd is not None:
            self._httpd.close(wait=False)
            self._httpd = None


def _read_body(handler):
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _send(handler, status, body, content_type="application/json"):
    if isinstance(body, str):
        body = body.encode()
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _send_json(handler, status, payload):
    _send(handler, status, json.dumps(payload, ensure_ascii=False))


def _drop(handler):
    """Close the connection with a TCP reset instead of an answer."""
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.rfile.close()  # the socket really closes only when its file objects are gone
    handler.connection.close()
    handler.close_connection = True


# --- Telegram --------------------------------------------------------------------------------


class _ApiError(Exception):
    """An error answer of the Bot API."""

    def __init__(self, code, description, parameters=None):
        super().__init__(description)
        self.code = code
        self.payload = _api_error(code, description, parameters)


def _api_error(code, description, parameters=None):
    payload = {"ok": False, "error_code": code, "description": description}
    if parameters:
        payload["parameters"] = parameters
    return payload


# Query-string and form values are strings; Telegram decodes the JSON-serialized ones.
_STRING_PARAMS = {"text", "caption"}


def _form_params(pairs):
    params = {}
    for key, value in pairs:
        try:
            params[key] = value if key in _STRING_PARAMS else json.loads(value)
        except ValueError:
            params[key] = value
    return params


def _parse_params(handler, body):
    """Parameters from the query string and a JSON or form-encoded body, as Telegram accepts them."""
    params = _form_params(parse_qsl(urlsplit(handler.path).query))
    content_type = handler.headers.get("Content-Type", "")
    if body and content_type.startswith("application/json"):
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            raise _ApiError(400, "Bad Request: can't parse JSON encoded parameters")
        params.update(decoded)
    elif body and content_type.startswith("application/x-www-form-urlencoded"):
        params.update(_form_params(parse_qsl(body.decode())))
    return params


_COMMAND = re.compile(r"[a-z0-9_]{1,32}")

_MEDIA = {
    "photo": {"photo": [
        {"file_id": "photo-small", "file_unique_id": "ph-s", "width": 90, "height": 90, "file_size": 1200},
        {"file_id": "photo-large", "file_unique_id": "ph-l", "width": 800, "height": 800, "file_size": 64000},
    ]},
    "sticker": {"sticker": {
        "file_id": "sticker-id", "file_unique_id": "st", "type": "regular", "width": 512, "height": 512,
        "is_animated": False, "is_video": False, "emoji": "👍",
    }},
    "voice": {"voice": {"file_id": "voice-id", "file_unique_id": "vo", "duration": 3, "mime_type": "audio/ogg"}},
    "video": {"video": {
        "file_id": "video-id", "file_unique_id": "vi", "width": 640, "height": 360, "duration": 5,
        "mime_type": "video/mp4",
    }},
    "document": {"document": {
        "file_id": "document-id", "file_unique_id": "do", "file_name": "brief.pdf",
        "mime_type": "application/pdf", "file_size": 20480,
    }},
    "location": {"location": {"latitude": 55.7558, "longitude": 37.6173}},
    "poll": {"poll": {
        "id": "5000000000000000001", "question": "Какой сайт нужен?",
        "options": [{"text": "Лендинг", "voter_count": 0}, {"text": "Магазин", "voter_count": 0}],
        "total_voter_count": 0, "is_closed": False, "is_anonymous": True, "type": "regular",
        "allows_multiple_answers": False,
    }},
}


def _text_fields(text):
    """text, and the bot_command entity Telegram adds when it starts with "/"."""
    fields = {"text": text}
    if text.startswith("/"):
        fields["entities"] = [{"offset": 0, "length": len(text.split()[0]), "type": "bot_command"}]
    return fields


def _check_buttons(markup):
    """Telegram refuses an inline button whose callback_data is not 1 to 64 bytes."""
    rows = markup.get("inline_keyboard") if isinstance(markup, dict) else None
    for button in (b for row in rows or [] for b in row if isinstance(b, dict)):
        if "callback_data" in button and not 1 <= len(str(button["callback_data"]).encode()) <= 64:
            raise _ApiError(400, "Bad Request: BUTTON_DATA_INVALID")


def _quoted(message):
    """A message as reply_to_message holds it: Telegram does not nest replies deeper."""
    return {key: value for key, value in message.items() if key != "reply_to_message"}


def _topic_name(name):
    """Like Telegram (TDLib's clean_name), an over-long topic name is cut to 128 characters."""
    name = str(name or "")[:128].strip()
    if not name:
        raise _ApiError(400, "Bad Request: title must be non-empty")
    return name


_ADMIN_RIGHTS = {
    "can_be_edited": False, "is_anonymous": False, "can_manage_chat": True,
    "can_delete_messages": True, "can_manage_video_chats": False, "can_restrict_members": False,
    "can_promote_members": False, "can_change_info": False, "can_invite_users": True,
    "can_post_stories": False, "can_edit_stories": False, "can_delete_stories": False,
    "can_pin_messages": True,
}


def _stored_file(unique_id, data, file_path, file_size=None):
    return {"file_unique_id": unique_id, "data": data, "file_path": file_path,
            "file_size": len(data) if file_size is None else file_size}


_MARKDOWN_V2_SPECIAL = set("_*[]()~`>#+-=|{}.!")


def _check_parse_mode(params, text):
    """Telegram refuses text whose markup does not parse: unescaped MarkdownV2 characters, stray HTML."""
    mode = params.get("parse_mode")
    if mode is None:
        return
    if mode == "MarkdownV2":
        escaped = False
        for char in text:
            if char in _MARKDOWN_V2_SPECIAL and not escaped:
                raise _ApiError(400, f"Bad Request: can't parse entities: character '{char}' is reserved")
            escaped = char == "\\" and not escaped
    elif mode == "HTML":
        if re.search(r"<(?!/?(b|i|u|s|a|code|pre)\b)|&(?!(lt|gt|amp|quot);)", text):
            raise _ApiError(400, "Bad Request: can't parse entities: unsupported start tag")
    else:
        raise _ApiError(400, "Bad Request: unsupported parse_mode")


class FakeTelegram(_HTTPFake):
    """The Bot API with long polling, simulated users and fault injection.

    TELEGRAM_API_URL is .url; the bot's token is .token. getUpdates' allowed_updates is kept
    (.allowed_updates) and honoured as Telegram does: an update of another kind pushed later is
    never queued (see push_update). Groups the bot is in (add_group) may be forums with topics;
    every message has a message_id, so that members can reply to the bot's messages (and edit
    their own), press its inline buttons, and send voice messages whose files can be fetched
    with getFile and GET {url}/file/bot{token}/{file_path}. Faults are per method, per chat
    (fail_chat, stall_chat) or for every method ("*"); file downloads are the method "download".
    """

    BOT_USER = {
        "id": 777, "is_bot": True, "first_name": "Lead Bot", "username": "test_lead_bot",
        "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False,
    }

    def __init__(self, token="123456:TEST-token-abcdef"):
        self.token = token
        self.webhook_url = ""
        self._cond = threading.Condition()
        self._updates = []  # pushed and not yet confirmed by an offset
        self._calls = []  # (method, params), failed calls included
        self._timeline = []  # (time.monotonic(), "in" or "out", method, chat_id): each call arriving, answered
        self._sent = []  # params of every message that was sent
        self._drafts = []  # params of every draft that was accepted
        self.draft_error = None  # (code, description): refuse every sendMessageDraft, like an older Bot API
        self._faults = defaultdict(deque)
        self._in_flight, self.peak = defaultdict(int), defaultdict(int)  # peak: the most calls of a method at once
        self._blocked = set()
        self._offset = 0
        self._downs = 0
        self._update_ids = itertools.count(100001)
        self._message_ids = itertools.count(1)
        self.allowed_updates = None  # the last list getUpdates was given; None: never given
        self.discarded = []  # updates pushed while allowed_updates excluded their kind
        self._groups = {}  # str(chat_id) -> what add_group said, its topics and members
        self._known = {}  # (str(chat_id), message_id) -> the Message, as updates have it
        self._limits = {}  # str(chat_id) -> [per_minute, window, times of the messages accepted]
        self._files = {"voice-id": _stored_file("AgADvo", b"OggS" + bytes(60), "voice/file_0.oga")}
        self._file_numbers = itertools.count(1)
        self._queries = {}  # callback_query id -> answered
        self._query_ids = itertools.count(4000000000000000001)
        self._methods = {
            "getMe": self._get_me,
            "getUpdates": self._get_updates,
            "sendMessage": self._send_message,
            "sendChatAction": self._send_chat_action,
            "sendMessageDraft": self._send_message_draft,
            "setMyCommands": self._set_my_commands,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "getChat": self._get_chat,
            "getChatMember": self._get_chat_member,
            "createForumTopic": self._create_forum_topic,
            "closeForumTopic": self._close_forum_topic,
            "reopenForumTopic": self._reopen_forum_topic,
            "editForumTopic": self._edit_forum_topic,
            "answerCallbackQuery": self._answer_callback_query,
            "getFile": self._get_file,
        }
        super().__init__()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def down(self):
        super().down()
        self._end_long_polls()

    def stop(self):
        super().stop()
        self._end_long_polls()

    def _end_long_polls(self):
        with self._cond:
            self._downs += 1
            self._cond.notify_all()

    # Request handling

    def _handle(self, handler):
        body = _read_body(handler)  # always, or the next request on this connection is garbled
        path = urlsplit(handler.path).path
        download = f"/file/bot{self.token}/"
        if path.startswith(download):  # where getFile's file_path is fetched, as from Telegram
            params = {"file_path": path[len(download):]}
            return self._serve(handler, "download", params, self._download)
        prefix = f"/bot{self.token}/"
        if not path.startswith(prefix):
            code, description = (401, "Unauthorized") if path.startswith("/bot") else (404, "Not Found")
            return _send_json(handler, code, _api_error(code, description))
        # Method names are case-insensitive in the real API.
        method = next((m for m in self._methods if m.lower() == path[len(prefix):].lower()), None)
        if method is None:
            return _send_json(handler, 404, _api_error(404, "Not Found"))
        try:
            params = _parse_params(handler, body)
        except _ApiError as error:
            return _send_json(handler, error.code, error.payload)
        self._serve(handler, method, params, self._answer_call)

    def _serve(self, handler, method, params, respond):
        """Record the call, carry out an injected fault or respond(handler, method, params)."""
        with self._cond:
            self._calls.append((method, params))
            self._timeline.append((time.monotonic(), "in", method, str(params.get("chat_id"))))
            fault = self._take_fault(method, params)
            self._in_flight[method] += 1
            self.peak[method] = max(self.peak[method], self._in_flight[method])
        try:
            if fault and self._apply_fault(fault, handler):
                return
            respond(handler, method, params)
        finally:
            with self._cond:
                self._in_flight[method] -= 1
                self._timeline.append((time.monotonic(), "out", method, str(params.get("chat_id"))))

    def _take_fault(self, method, params):
        """The next fault for this chat's calls of method, else for method, else for any method."""
        for key in ((method, str(params.get("chat_id"))), method, "*"):
            queue = self._faults.get(key)
            if queue:
                return queue.popleft()
        return None

    def _answer_call(self, handler, method, params):
        try:
            status, payload = 200, {"ok": True, "result": self._methods[method](params)}
        except _ApiError as error:
            status, payload = error.code, error.payload
        except (TypeError, ValueError):
            status, payload = 400, _api_error(400, "Bad Request: invalid parameter type")
        _send_json(handler, status, payload)

    def _apply_fault(self, fault, handler):
        """Carry out an injected fault; return True when the request needs no normal answer."""
        kind, arg = fault
        if kind == "stall":
            return handler.server.closed.wait(arg)
        if kind == "disconnect":
            _drop(handler)
        elif kind == "json":
            _send_json(handler, *arg)
        else:
            _send(handler, *arg)
        return True

    def _get_me(self, params):
        return dict(self.BOT_USER)

    def _get_updates(self, params):
        offset = int(params.get("offset") or 0)
        limit = min(max(int(params.get("limit") or 100), 1), 100)
        timeout = float(params.get("timeout") or 0)
        with self._cond:
            if isinstance(params.get("allowed_updates"), list):
                self.allowed_updates = list(params["allowed_updates"])
            if self.webhook_url:
                raise _ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                     "use deleteWebhook to delete the webhook first")
            self._confirm(offset)
            downs = self._downs
            self._cond.wait_for(lambda: self._updates or self._downs != downs, timeout)
            return self._updates[:limit]

    def _confirm(self, offset):
        """Forget updates the offset confirms; a negative offset keeps only the last -offset ones.

        Like the Bot API server, an offset in the future (past the last id given out, as after
        Telegram restarted the ids at a lower value) confirms nothing.
        """
        if offset < 0:
            self._updates = self._updates[offset:]
        elif offset and offset <= getattr(self, "_last_id", 0) + 1:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        self._offset = max(self._offset, offset)

    def _check_chat(self, params):
        chat_id = params.get("chat_id")
        if chat_id in (None, ""):
            raise _ApiError(400, "Bad Request: chat_id is empty")
        if str(chat_id) in self._blocked:
            raise _ApiError(403, "Forbidden: bot was blocked by the user")
        group = self._groups.get(str(chat_id))
        if group and group["bot_status"] in ("left", "kicked"):
            kind = "supergroup chat" if group["chat"]["type"] == "supergroup" else "group chat"
            left = group["bot_status"] == "left"
            raise _ApiError(403, f"Forbidden: bot is not a member of the {kind}" if left
                            else f"Forbidden: bot was kicked from the {kind}")
        return chat_id

    def _send_message(self, params):
        text = str(params.get("text") or "")
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        _check_parse_mode(params, text)
        if isinstance(params.get("reply_markup"), str):
            try:
                params["reply_markup"] = json.loads(params["reply_markup"])
            except ValueError:
                raise _ApiError(400, "Bad Request: can't parse reply keyboard markup JSON object") from None
        _check_buttons(params.get("reply_markup"))
        with self._cond:
            chat_id = self._check_chat(params)
            reply = self._replied(chat_id, params)
            thread = self._thread_of(chat_id, params.get("message_thread_id"), reply)
            self._count_against_limit(chat_id)
            message_id = next(self._message_ids)
            self._sent.append({"reply_markup": None, "parse_mode": None, "message_thread_id": None,
                               **params, "message_id": message_id})
            message = {"message_id": message_id, "from": dict(self.BOT_USER),
                       "date": int(time.time()), "chat": self._chat_of(chat_id), "text": text}
            message.update(self._placement(chat_id, thread, reply))
            markup = params.get("reply_markup")
            if isinstance(markup, dict) and "inline_keyboard" in markup:
                message["reply_markup"] = markup  # Telegram shows only inline keyboards back
            self._known[(str(chat_id), message_id)] = message
        return copy.deepcopy(message)

    def _send_message_draft(self, params):
        """Validated like Telegram: a private chat, a non-zero draft_id, at most 4,096 characters."""
        if self.draft_error:
            raise _ApiError(*self.draft_error)
        text = str(params.get("text") or "")
        if not isinstance(params.get("draft_id"), int) or params["draft_id"] == 0:
            raise _ApiError(400, "Bad Request: draft_id must be non-zero")
        if not isinstance(params.get("chat_id"), int) or params["chat_id"] <= 0:
            raise _ApiError(400, "Bad Request: drafts can be sent only to private chats")
        if len(text) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        _check_parse_mode(params, text)
        with self._cond:
            self._check_chat(params)
            self._drafts.append(dict(params))
        return True

    def drafts(self, chat_id=None):
        """Parameters of the drafts accepted, in order, optionally for one chat only."""
        with self._cond:
            return [dict(d) for d in self._drafts if chat_id is None or str(d["chat_id"]) == str(chat_id)]

    def _send_chat_action(self, params):
        with self._cond:
            self._check_chat(params)
        if not params.get("action"):
            raise _ApiError(400, "Bad Request: action is empty")
        return True

    def _set_my_commands(self, params):
        commands = params.get("commands")
        if not isinstance(commands, list) or not all(
            isinstance(c, dict) and _COMMAND.fullmatch(str(c.get("command")))
            and 1 <= len(str(c.get("description") or "")) <= 256
            for c in commands
        ):
            raise _ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
        return True

    def _delete_webhook(self, params):
        with self._cond:
            self.webhook_url = ""
            if params.get("drop_pending_updates"):
                self._updates = []
        return True

    def _get_webhook_info(self, params):
        with self._cond:
            return {"url": self.webhook_url, "has_custom_certificate": False,
                    "pending_update_count": len(self._updates)}

    # Groups and forum topics

    def add_group(self, chat_id, *, forum=False, bot_status="administrator",
                  bot_can_manage_topics=True, title="Менеджеры", chat_type="supergroup"):
        """The bot is in this group (bot_status "administrator", "member", "left" or "kicked");
        forum=True turns topics on. Called again, it changes the settings and keeps the topics.
        Returns the Chat as updates carry it."""
        assert chat_type == "supergroup" or not forum, "only supergroups can be forums"
        chat = {"id": chat_id, "title": title, "type": chat_type}
        if forum:
            chat["is_forum"] = True
        with self._cond:
            group = self._groups.setdefault(str(chat_id), {"topics": {}, "members": {}})
            group.update(chat=chat, forum=forum, bot_status=bot_status,
                         can_manage_topics=bot_can_manage_topics)
        return dict(chat)

    def add_topic(self, chat_id, name, *, user_id=1):
        """A member (not the bot) creates a topic in a forum; returns its message_thread_id."""
        with self._cond:
            group = self._groups[str(chat_id)]
            assert group["forum"], "topics need add_group(..., forum=True)"
            return self._new_topic(group, name, 7322096, {"id": user_id, "is_bot": False,
                                                          "first_name": "Мария"})

    def topics(self, chat_id):
        """message_thread_id -> {"name", "icon_color", "closed", ...} of a forum's topics."""
        with self._cond:
            return copy.deepcopy(self._groups[str(chat_id)]["topics"])

    def _new_topic(self, group, name, icon_color, creator):
        thread = next(self._message_ids)
        group["topics"][thread] = {"name": name, "icon_color": icon_color, "closed": False,
                                   "creator": creator["id"]}
        # A topic is the thread of its creation service message: they share the id.
        self._known[(str(group["chat"]["id"]), thread)] = {
            "message_id": thread, "from": dict(creator), "date": int(time.time()),
            "chat": dict(group["chat"]), "message_thread_id": thread, "is_topic_message": True,
            "forum_topic_created": {"name": name, "icon_color": icon_color}}
        return thread

    def _chat_of(self, chat_id):
        group = self._groups.get(str(chat_id))
        return dict(group["chat"]) if group else {"id": chat_id, "type": "private"}

    def _can_manage(self, group):
        return group["bot_status"] == "administrator" and group["can_manage_topics"]

    def _replied(self, chat_id, params):
        """The message sendMessage replies to (reply_parameters or reply_to_message_id), quoted."""
        reply = params.get("reply_parameters")
        if not isinstance(reply, dict):
            reply = {"message_id": params.get("reply_to_message_id"),
                     "allow_sending_without_reply": params.get("allow_sending_without_reply")}
        if reply.get("message_id") is None:
            return None
        known = self._known.get((str(chat_id), int(reply["message_id"])))
        if known is None and not reply.get("allow_sending_without_reply"):
            raise _ApiError(400, "Bad Request: message to be replied not found")
        return _quoted(known) if known else None

    def _thread_of(self, chat_id, thread, reply):
        """The topic a message goes to: the one named, else that of the message it replies to.

        A closed topic takes messages only from admins who can manage topics (TOPIC_CLOSED).
        """
        if thread is None:
            return reply["message_thread_id"] if reply and reply.get("is_topic_message") else None
        group = self._groups.get(str(chat_id))
        topic = group["topics"].get(int(thread)) if group and group["forum"] else None
        if topic is None:
            raise _ApiError(400, "Bad Request: message thread not found")
        if topic["closed"] and not self._can_manage(group):
            raise _ApiError(400, "Bad Request: TOPIC_CLOSED")
        return int(thread)

    def _placement(self, chat_id, thread, reply):
        """message_thread_id, is_topic_message and reply_to_message, as Telegram fills them in.

        In a topic every message is a reply: to the message it answers, else to the topic's
        creation service message. In any supergroup a reply carries the id of its thread's root
        message as message_thread_id, topics or not.
        """
        group = self._groups.get(str(chat_id))
        if thread is not None and group and group["forum"]:
            root = self._known.get((str(chat_id), thread))
            return {"message_thread_id": thread, "is_topic_message": True,
                    "reply_to_message": reply or _quoted(root or {"message_id": thread})}
        if reply is None:
            return {}
        if group and group["chat"]["type"] == "supergroup":
            return {"message_thread_id": reply.get("message_thread_id", reply["message_id"]),
                    "reply_to_message": reply}
        return {"reply_to_message": reply}

    def _forum(self, params):
        group = self._groups.get(str(params.get("chat_id")))
        if group is None:
            raise _ApiError(400, "Bad Request: chat not found")
        self._check_chat(params)
        if not group["forum"]:
            raise _ApiError(400, "Bad Request: the chat is not a forum")
        return group

    def _topic(self, params):
        """The forum and topic a topic method names; the bot must be able to manage it."""
        group = self._forum(params)
        topic = group["topics"].get(int(params.get("message_thread_id") or 0))
        if topic is None:
            raise _ApiError(400, "Bad Request: message thread not found")
        if not self._can_manage(group) and topic["creator"] != self.BOT_USER["id"]:
            raise _ApiError(400, "Bad Request: CHAT_ADMIN_REQUIRED")
        return topic

    def _create_forum_topic(self, params):
        with self._cond:
            group = self._forum(params)
            if not self._can_manage(group):
                raise _ApiError(400, "Bad Request: not enough rights to create a topic")
            name = _topic_name(params.get("name"))
            icon_color = int(params.get("icon_color") or 7322096)
            thread = self._new_topic(group, name, icon_color, self.BOT_USER)
            answer = {"message_thread_id": thread, "name": name, "icon_color": icon_color}
            if params.get("icon_custom_emoji_id"):
                answer["icon_custom_emoji_id"] = str(params["icon_custom_emoji_id"])
                group["topics"][thread]["icon_custom_emoji_id"] = answer["icon_custom_emoji_id"]
            return answer

    def _set_closed(self, params, closed):
        with self._cond:
            topic = self._topic(params)
            if topic["closed"] == closed:
                raise _ApiError(400, "Bad Request: TOPIC_NOT_MODIFIED")
            topic["closed"] = closed
        return True

    def _close_forum_topic(self, params):
        return self._set_closed(params, True)

    def _reopen_forum_topic(self, params):
        return self._set_closed(params, False)

    def _edit_forum_topic(self, params):
        with self._cond:
            topic = self._topic(params)
            changes = {}
            if params.get("name") is not None:
                changes["name"] = _topic_name(params["name"])
            if params.get("icon_custom_emoji_id") is not None:
                changes["icon_custom_emoji_id"] = str(params["icon_custom_emoji_id"])
            if all(topic.get(key) == value for key, value in changes.items()):
                raise _ApiError(400, "Bad Request: TOPIC_NOT_MODIFIED")
            topic.update(changes)
        return True

    def _get_chat(self, params):
        chat_id = params.get("chat_id")
        if isinstance(chat_id, str) and chat_id.lstrip("-").isdigit():
            chat_id = int(chat_id)  # Telegram takes a chat id as a number or as its digits
        with self._cond:
            group = self._groups.get(str(chat_id))
            if group is None and not (isinstance(chat_id, int) and chat_id > 0):
                raise _ApiError(400, "Bad Request: chat not found")
            chat = dict(group["chat"]) if group else {"id": chat_id, "type": "private",
                                                      "first_name": "Иван"}
        return {**chat, "accent_color_id": 0, "max_reaction_count": 11}

    def _get_chat_member(self, params):
        """The bot's own membership as add_group set it; a member who wrote; "left" otherwise."""
        user_id = int(params.get("user_id"))
        with self._cond:
            group = self._groups.get(str(params.get("chat_id")))
            if group is None:
                raise _ApiError(400, "Bad Request: chat not found")
            if user_id == self.BOT_USER["id"]:
                return self._bot_member(group)
            user = group["members"].get(user_id)
        if user is None:
            return {"status": "left", "user": {"id": user_id, "is_bot": False, "first_name": ""}}
        return {"status": "member", "user": dict(user)}

    def _bot_member(self, group):
        member = {"status": group["bot_status"], "user": dict(self.BOT_USER)}
        if group["bot_status"] == "kicked":
            member["until_date"] = 0
        if group["bot_status"] == "administrator":
            member.update(_ADMIN_RIGHTS)
            if group["chat"]["type"] == "supergroup":
                member["can_manage_topics"] = bool(group["can_manage_topics"])
        return member

    # Simulated users

    def build_message(self, chat_id, *, first_name="Иван", username=None, chat_type="private",
                      is_bot=False, user_id=None, **fields):
        """A Message from a simulated user, with fields (text=..., contact=...) merged in."""
        sender = {"id": abs(chat_id) if user_id is None else user_id, "is_bot": is_bot, "first_name": first_name}
        chat = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
        else:
            chat["title"] = "Test group"
        if username:
            sender["username"] = chat["username"] = username
        sender["language_code"] = "ru"
        with self._cond:
            message_id = next(self._message_ids)
        return {"message_id": message_id, "from": sender, "chat": chat, "date": int(time.time()), **fields}

    def push_update(self, update):
        """Queue a raw update for getUpdates (its update_id filled in if missing); return the id.

        As Telegram does, an update of a kind the last allowed_updates leaves out is never queued
        (it goes to .discarded): the setting applies to updates made after it.
        """
        with self._cond:
            update = {"update_id": next(self._update_ids), **update}
            kind = next((key for key in update if key != "update_id"), None)
            if kind is not None and not self._wanted(kind):
                self.discarded.append(update)
                return update["update_id"]
            self._remember(update.get("message") or update.get("edited_message"))
            self._last_id = update["update_id"]
            self._updates.append(update)
            self._cond.notify_all()
        return update["update_id"]

    # Without allowed_updates (or with an empty list) Telegram sends every kind but these.
    NOT_BY_DEFAULT = ("chat_member", "message_reaction", "message_reaction_count")

    def _wanted(self, kind):
        if not self.allowed_updates:
            return kind not in self.NOT_BY_DEFAULT
        return kind in self.allowed_updates

    def _remember(self, message):
        """Keep a user's message, so that replies, edits and buttons can refer to it."""
        if isinstance(message, dict) and isinstance(message.get("chat"), dict):
            self._known[(str(message["chat"].get("id")), message.get("message_id"))] = message

    def send_text(self, chat_id, text, *, first_name="Иван", username=None, chat_type="private",
                  is_bot=False, user_id=None):
        """A user writes text to the bot; return the update_id."""
        fields = _text_fields(text)
        message = self.build_message(chat_id, first_name=first_name, username=username, chat_type=chat_type,
                                     is_bot=is_bot, user_id=user_id, **fields)
        return self.push_update({"message": message})

    def send_contact(self, chat_id, phone, *, user_id=None, first_name="Иван"):
        """A user shares a contact (their own unless user_id says otherwise); return the update_id."""
        contact = {"phone_number": phone, "first_name": first_name,
                   "user_id": chat_id if user_id is None else user_id}
        return self.push_update({"message": self.build_message(chat_id, first_name=first_name, contact=contact)})

    def send_media(self, chat_id, kind, *, caption=None):
        """A user sends photo, sticker, voice, video, document, location or poll; return the update_id."""
        fields = copy.deepcopy(_MEDIA[kind])
        if caption is not None:
            fields["caption"] = caption
        return self.push_update({"message": self.build_message(chat_id, **fields)})

    def send_group_text(self, chat_id, text, *, user_id, first_name="Мария", username=None,
                        thread_id=None, reply_to=None, is_topic_message=None):
        """A member writes in a group (added with add_group, else taken as a plain supergroup):
        in topic thread_id, as a reply to message reply_to (a message_id in that chat) or both.
        is_topic_message None fills it in as Telegram does; True or False forces it. Returns
        the update_id."""
        return self._push_group_message(chat_id, _text_fields(text), user_id, first_name, username,
                                        thread_id, reply_to, is_topic_message)

    def send_group_media(self, chat_id, kind, *, user_id, caption=None, first_name="Мария",
                         username=None, thread_id=None, reply_to=None, is_topic_message=None):
        """send_group_text with a photo, sticker, voice, ... (as send_media) instead of text."""
        fields = copy.deepcopy(_MEDIA[kind])
        if caption is not None:
            fields["caption"] = caption
        return self._push_group_message(chat_id, fields, user_id, first_name, username,
                                        thread_id, reply_to, is_topic_message)

    def _push_group_message(self, chat_id, fields, user_id, first_name, username, thread_id,
                            reply_to, is_topic_message):
        if str(chat_id) not in self._groups:
            self.add_group(chat_id, bot_status="member", title="Test group")
        with self._cond:
            group = self._groups[str(chat_id)]
            reply = self._known.get((str(chat_id), reply_to)) if reply_to is not None else None
            if reply_to is not None and reply is None:
                raise KeyError(f"no message {reply_to} in chat {chat_id} to reply to")
            reply = reply and _quoted(reply)
            if thread_id is None and reply and reply.get("is_topic_message"):
                thread_id = reply["message_thread_id"]  # a reply stays in the replied one's topic
            place = self._placement(chat_id, thread_id, reply)
        if is_topic_message is not None:
            place["is_topic_message"] = is_topic_message
            place = {k: v for k, v in place.items() if v is not False}
        message = self.build_message(chat_id, first_name=first_name, user_id=user_id,
                                     chat_type=group["chat"]["type"], **place, **fields)
        message["chat"] = dict(group["chat"])
        if username:
            message["from"]["username"] = username
        with self._cond:
            group["members"][user_id] = message["from"]
        return self.push_update({"message": message})

    def edit_text(self, chat_id, message_id, new_text):
        """The user edits a message they sent (private or group): an edited_message update."""
        with self._cond:
            original = self._known.get((str(chat_id), message_id))
        if original is None or original["from"]["id"] == self.BOT_USER["id"]:
            raise KeyError(f"no message {message_id} of a user in chat {chat_id}")
        edited = {key: value for key, value in original.items() if key not in ("text", "entities")}
        edited.update(_text_fields(new_text), edit_date=int(time.time()))
        return self.push_update({"edited_message": edited})

    def press_button(self, chat_id, message_id, data, *, user_id=None, first_name="Иван"):
        """A user taps an inline button with callback_data data under message message_id (the
        bot's message; one the fake never saw arrives as an inaccessible message, date 0).
        Returns the update_id; the callback_query id is for answerCallbackQuery."""
        user = {"id": abs(chat_id) if user_id is None else user_id, "is_bot": False,
                "first_name": first_name, "language_code": "ru"}
        with self._cond:
            message = self._known.get((str(chat_id), message_id))
            message = copy.deepcopy(message) if message else {
                "chat": self._chat_of(chat_id), "message_id": message_id, "date": 0}
            query_id = str(next(self._query_ids))
            self._queries[query_id] = False
        return self.push_update({"callback_query": {
            "id": query_id, "from": user, "message": message, "chat_instance": f"ci{chat_id}",
            "data": data}})

    def _answer_callback_query(self, params):
        query_id = str(params.get("callback_query_id") or "")
        if len(str(params.get("text") or "")) > 200:
            raise _ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        with self._cond:
            if self._queries.get(query_id) is not False:  # unknown, or answered already
                raise _ApiError(400, "Bad Request: query is too old and response timeout expired "
                                     "or query ID is invalid")
            self._queries[query_id] = True
        return True

    def send_voice(self, chat_id, duration=3, file_size=None, data=b"OggS\x00\x02" + bytes(58), *,
                   mime_type="audio/ogg", **sender):
        """A user sends a voice message whose file (data) getFile and the download serve;
        file_size, when given, is what Telegram claims (data stays small). sender as for
        build_message. Returns the update_id."""
        with self._cond:
            number = next(self._file_numbers)
            file_id = f"AwACAgIAAxkBAAIB{number:04d}voice"
            stored = _stored_file(f"AgAD{number:04d}", data, f"voice/file_{number}.oga", file_size)
            self._files[file_id] = stored
        voice = {"file_id": file_id, "file_unique_id": stored["file_unique_id"],
                 "duration": duration, "mime_type": mime_type, "file_size": stored["file_size"]}
        return self.push_update({"message": self.build_message(chat_id, voice=voice, **sender)})

    # Bots may download files of up to 20 MB (getFile answers "file is too big" above that).
    MAX_DOWNLOAD = 20 * 1024 * 1024

    def _get_file(self, params):
        file_id = str(params.get("file_id") or "")
        with self._cond:
            stored = self._files.get(file_id)
        if stored is None:
            raise _ApiError(400, "Bad Request: invalid file_id")
        if stored["file_size"] > self.MAX_DOWNLOAD:
            raise _ApiError(400, "Bad Request: file is too big")
        return {"file_id": file_id, "file_unique_id": stored["file_unique_id"],
                "file_size": stored["file_size"], "file_path": stored["file_path"]}

    def _download(self, handler, method, params):
        with self._cond:
            data = next((f["data"] for f in self._files.values()
                         if f["file_path"] == params["file_path"]), None)
        if data is None:
            return _send_json(handler, 404, _api_error(404, "Not Found"))
        _send(handler, 200, data, "application/octet-stream")

    # Inspection

    def messages(self, chat_id=None):
        """Parameters of the messages sent, in order, optionally for one chat only."""
        with self._cond:
            return [dict(m) for m in self._sent if chat_id is None or str(m["chat_id"]) == str(chat_id)]

    def texts(self, chat_id):
        return [m["text"] for m in self.messages(chat_id)]

    def calls(self, method):
        """Parameters of every call of method, failed ones included."""
        with self._cond:
            return [dict(params) for name, params in self._calls if name == method]

    def timeline(self, chat_id):
        """(time.monotonic(), "in" or "out", method) for each call about chat_id arriving and being answered."""
        with self._cond:
            return [(at, what, method) for at, what, method, chat in self._timeline if chat == str(chat_id)]

    @property
    def confirmed_offset(self):
        """The highest getUpdates offset the bot has sent."""
        with self._cond:
            return self._offset

    def wait_for(self, predicate, timeout=10, message=""):
        """wait_until whose failure message shows what the fake has seen."""
        def failure():
            return f"{message or 'condition'} not met within {timeout} s\n{self._summary()}"

        return wait_until(predicate, timeout, message=failure)

    def wait_messages(self, chat_id, n, timeout=10):
        """Wait until at least n messages were sent to chat_id; return all their texts."""
        self.wait_for(lambda: len(self.texts(chat_id)) >= n, timeout, f"{n} message(s) to chat {chat_id}")
        return self.texts(chat_id)

    def wait_reply(self, chat_id, after, timeout=10):
        """Wait for a message to chat_id beyond the first `after` ones; return its text."""
        return self.wait_messages(chat_id, after + 1, timeout)[after]

    def _summary(self):
        with self._cond:
            counts = {}
            for name, _ in self._calls:
                counts[name] = counts.get(name, 0) + 1
            lines = [f"calls: {counts}",
                     f"pending updates: {len(self._updates)}, confirmed offset: {self._offset}",
                     f"allowed_updates: {self.allowed_updates}, discarded: {len(self.discarded)}"]
            lines += [f"sent to {m['chat_id']}: {str(m['text'])[:100]!r}" for m in self._sent]
        return "\n".join(lines)

    # Fault injection

    def _add_fault(self, method, fault, times):
        with self._cond:
            self._faults[method].extend([fault] * times)

    def fail(self, method, error_code, description, parameters=None, times=1):
        """The next `times` calls of method get this Bot API error."""
        self._add_fault(method, ("json", (error_code, _api_error(error_code, description, parameters))), times)

    def disconnect(self, method, times=1):
        """The next `times` calls of method get their connection reset without an answer."""
        self._add_fault(method, ("disconnect", None), times)

    def stall(self, method, seconds, times=1):
        """The next `times` calls of method are answered normally, but only after `seconds`."""
        self._add_fault(method, ("stall", seconds), times)

    def http_error(self, method, status, body_text, times=1):
        """The next `times` calls of method get a non-JSON error page, like a proxy's 502."""
        self._add_fault(method, ("page", (status, body_text, "text/html; charset=utf-8")), times)

    def block(self, chat_id):
        """From now on, the user of chat_id has blocked the bot."""
        with self._cond:
            self._blocked.add(str(chat_id))

    def unblock(self, chat_id):
        """The user of chat_id accepts messages from the bot again."""
        with self._cond:
            self._blocked.discard(str(chat_id))

    def fail_chat(self, chat_id, method, error_code, description, parameters=None, times=1):
        """fail() for calls of method about chat_id only: the other chats' calls go through."""
        fault = ("json", (error_code, _api_error(error_code, description, parameters)))
        self._add_fault((method, str(chat_id)), fault, times)

    def stall_chat(self, chat_id, method, seconds, times=1):
        """stall() for calls of method about chat_id only."""
        self._add_fault((method, str(chat_id)), ("stall", seconds), times)

    def html_error(self, method, status, times=1):
        """The next `times` calls of method ("*": of any method, "download": of file downloads)
        get a proxy's HTML error page with this status instead of JSON."""
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        page = (f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
                f"<center><h1>{status} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
                "</body>\r\n</html>\r\n")
        self.http_error(method, status, page, times)

    def group_rate_limit(self, chat_id, per_minute=20, window=60.0):
        """Telegram's flood limit for groups: over per_minute messages to chat_id within window
        seconds get 429 with retry_after (until the oldest leaves the window). per_minute=0
        lifts it."""
        with self._cond:
            if per_minute:
                self._limits[str(chat_id)] = [per_minute, window, deque()]
            else:
                self._limits.pop(str(chat_id), None)

    def _count_against_limit(self, chat_id):
        limit = self._limits.get(str(chat_id))
        if limit is None:
            return
        per_minute, window, accepted = limit
        now = time.monotonic()
        while accepted and accepted[0] <= now - window:
            accepted.popleft()
        if len(accepted) >= per_minute:
            retry_after = max(1, math.ceil(accepted[0] + window - now))
            raise _ApiError(429, f"Too Many Requests: retry after {retry_after}",
                            {"retry_after": retry_after})
        accepted.append(now)


# --- LLM -------------------------------------------------------------------------------------


class FakeLLM(_HTTPFake):
    """An OpenAI-compatible /chat/completions endpoint; LLM_BASE_URL is .url.

    Answers .reply, or .reply_fn(request_json) when set. Faults: .status (an error status for
    every request), .delay (seconds before each answer), .raw (a 200 body sent as is),
    fail_times(n, status). With .models (a set of names) another model gets 404 model_not_found,
    as OpenAI and Ollama answer.

    A request with "stream": true gets text/event-stream, one server-sent event per HTTP chunk:
    a role chunk, then .reasoning (if set) as delta[.reasoning_field], then the content — .think
    (if set) inside <think>…</think>, then the reply — then a finish_reason chunk (.finish_reason,
    "stop"; "length" says the answer was cut at max_tokens) and "data: [DONE]".
    .chunks splits the texts: None for three words a chunk, an int for that many characters, or a
    list of strings sent as the content instead. .chunk_delay seconds pass between events;
    .comments adds ": OPENROUTER PROCESSING" lines; .break_after = n closes the connection after n
    events, without [DONE]; .no_stream answers stream requests with plain JSON. With .trickle
    every body (streamed or not) goes out one byte every .trickle seconds. .chunks = "word" sends
    one word an event (with .chunk_delay: a model streaming steadily, at its own pace).
    Stream variants a gateway produces: .stream_content_type (e.g. "application/json",
    "text/plain", "application/octet-stream") labels the stream; .multiline_data spreads each
    event's JSON over several "data:" lines (which SSE joins with newlines); .usage_chunk adds a
    usage-only chunk (no choices) after the finish_reason one; .hold_after_finish = seconds keeps
    the connection open that long after it, before "data: [DONE]".

    POST /audio/transcriptions (multipart, as OpenAI's) is recorded in .transcriptions
    ({"model", "filename", "data", "fields", "headers"}) and answered with the next text of
    .transcripts (a deque), else .transcript; response_format "text" gets it as plain text,
    "verbose_json" with language and duration. Its faults: .stt_status, .stt_delay, .stt_raw,
    stt_fail_times(n, status); with .stt_models another model gets 404 model_not_found.
    """

    def __init__(self):
        self.reply = "Рекомендуем услугу «Лендинг под ключ»: это быстрый старт для вашей задачи."
        self.reply_fn = None
        self.status = None
        self.delay = 0
        self.raw = None
        self.models = None
        self.chunks = None
        self.chunk_delay = 0
        self.reasoning = None
        self.reasoning_field = "reasoning_content"
        self.think = None
        self.comments = False
        self.break_after = None
        self.no_stream = False
        self.trickle = 0
        self.finish_reason = "stop"
        self.stream_content_type = "text/event-stream"
        self.multiline_data = False
        self.usage_chunk = False
        self.hold_after_finish = 0
        self.transcript = "Здравствуйте, нужен сайт для пекарни"
        self.transcripts = deque()
        self.transcriptions = []
        self.stt_status = self.stt_raw = self.stt_models = None
        self.stt_delay = 0
        self._stt_failures = deque()
        self.requests = []  # {"json": body, "headers": case-insensitive headers}
        self._failures = deque()
        self._lock = threading.Lock()
        super().__init__()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self):
        return len(self.requests)

    def fail_times(self, n, status=500):
        """The next n requests get an error with this status."""
        with self._lock:
            self._failures.extend([status] * n)

    def stt_fail_times(self, n, status=500):
        """The next n transcription requests get an error with this status."""
        with self._lock:
            self._stt_failures.extend([status] * n)

    def _handle(self, handler):
        body = _read_body(handler)
        if urlsplit(handler.path).path == "/v1/audio/transcriptions":
            return self._transcribe(handler, body)
        if urlsplit(handler.path).path != "/v1/chat/completions":
            return _send_json(handler, 404, _llm_error("Not found", "invalid_request_error"))
        try:
            request_json = json.loads(body)
        except ValueError:
            request_json = None
        with self._lock:
            self.requests.append({"json": request_json, "headers": CaseInsensitiveDict(handler.headers.items())})
            status = self._failures.popleft() if self._failures else self.status
        if self.delay and handler.server.closed.wait(self.delay):
            return
        if not (isinstance(request_json, dict) and request_json.get("model")
                and isinstance(request_json.get("messages"), list)):
            _send_json(handler, 400, _llm_error("model and messages are required", "invalid_request_error"))
        elif self.models is not None and request_json["model"] not in self.models:
            _send_json(handler, 404, _llm_error(f"model {request_json['model']!r} not found", "model_not_found"))
        elif status and status != 200:
            _send_json(handler, status, _llm_error("boom", "server_error"))
        elif self.raw is not None:
            self._answer(handler, "application/json", [self.raw])
        elif request_json.get("stream") is True and not self.no_stream:
            self._answer(handler, self.stream_content_type, self._events(request_json), stream=True)
        else:
            self._answer(handler, "application/json", [json.dumps(self._completion(request_json), ensure_ascii=False)])

    def _answer(self, handler, content_type, pieces, stream=False):
        """Sends pieces as HTTP chunks (bytes one by one with .trickle), stopping early as
        .break_after says.

        A piece _HOLD is no data: the answer pauses .hold_after_finish seconds there.
        """
        if not self.trickle and not stream:
            return _send(handler, 200, pieces[0], content_type)
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for number, piece in enumerate(pieces):
            if piece is _HOLD:
                if handler.server.closed.wait(self.hold_after_finish):
                    return
                continue
            if number == self.break_after:
                handler.close_connection = True  # no last chunk: the client sees the body end half-way
                return
            if number and self.chunk_delay and handler.server.closed.wait(self.chunk_delay):
                return
            data = piece.encode() if isinstance(piece, str) else piece
            for part in [data[i:i + 1] for i in range(len(data))] if self.trickle else [data]:
                if self.trickle and handler.server.closed.wait(self.trickle):
                    return
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")

    def _split(self, text):
        if self.chunks == "word":
            return re.findall(r"\S+\s*|\s+", text)
        if isinstance(self.chunks, int):
            return [text[i:i + self.chunks] for i in range(0, len(text), self.chunks)]
        words = re.findall(r"\S+\s*|\s+", text)
        return ["".join(words[i:i + 3]) for i in range(0, len(words), 3)]

    def _events(self, request_json):
        """The server-sent events (comment lines included) of a streamed answer."""
        text = self.reply_fn(request_json) if self.reply_fn else self.reply
        content = (f"<think>{self.think}</think>" if self.think is not None else "") + text
        deltas = [{"role": "assistant", "content": ""}]
        deltas += [{self.reasoning_field: piece} for piece in self._split(self.reasoning or "")]
        deltas += [{"content": piece} for piece in
                   (self.chunks if isinstance(self.chunks, list) else self._split(content))]
        # Made one by one as they are sent: a client that stops reading (a megabyte answer) costs no more.
        for delta in deltas:
            yield self._event(self._chunk(request_json, delta, None))
        yield self._event(self._chunk(request_json, {}, self.finish_reason))
        if self.usage_chunk:
            usage = {**json.loads(self._chunk(request_json, {}, None)), "choices": [],
                     "usage": _usage(request_json, text)}
            yield self._event(json.dumps(usage, ensure_ascii=False))
        if self.hold_after_finish:
            yield _HOLD
        yield self._event("[DONE]")

    def _event(self, data):
        """One server-sent event, its JSON over several data: lines with .multiline_data."""
        comment = ": OPENROUTER PROCESSING\n\n" if self.comments else ""
        if self.multiline_data and data != "[DONE]":
            data = json.dumps(json.loads(data), indent=1, ensure_ascii=False)
        return comment + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n"

    @staticmethod
    def _chunk(request_json, delta, finish_reason):
        return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": request_json["model"],
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]},
                          ensure_ascii=False)

    def _completion(self, request_json):
        content = self.reply_fn(request_json) if self.reply_fn else self.reply
        return {
            "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
            "model": request_json["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": self.finish_reason}],
            "usage": _usage(request_json, content),
        }

    def _transcribe(self, handler, body):
        parts = _multipart(handler.headers.get("Content-Type", ""), body)
        model = parts.get("model", (None, b""))[1].decode("utf-8", "replace")
        filename, data = parts.get("file", (None, None))
        fields = {name: value.decode("utf-8", "replace") for name, (file, value) in parts.items()
                  if file is None}
        with self._lock:
            self.transcriptions.append({"model": model, "filename": filename, "data": data,
                                        "fields": fields,
                                        "headers": CaseInsensitiveDict(handler.headers.items())})
            status = self._stt_failures.popleft() if self._stt_failures else self.stt_status
            text = self.transcripts.popleft() if self.transcripts else self.transcript
        if self.stt_delay and handler.server.closed.wait(self.stt_delay):
            return
        if data is None or not model:
            error = _llm_error("file and model are required", "invalid_request_error")
            _send_json(handler, 400, error)
        elif self.stt_models is not None and model not in self.stt_models:
            _send_json(handler, 404, _llm_error(f"model {model!r} not found", "model_not_found"))
        elif status and status != 200:
            _send_json(handler, status, _llm_error("boom", "server_error"))
        elif self.stt_raw is not None:
            _send(handler, 200, self.stt_raw)
        else:
            self._transcript(handler, fields.get("response_format", "json"), text)

    @staticmethod
    def _transcript(handler, response_format, text):
        if response_format == "text":
            return _send(handler, 200, text, "text/plain; charset=utf-8")
        answer = {"text": text}
        if response_format == "verbose_json":
            answer.update(task="transcribe", language="russian", duration=3.0, segments=[])
        _send_json(handler, 200, answer)


_HOLD = object()  # in a FakeLLM answer: wait .hold_after_finish seconds here


def _usage(request_json, content):
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request_json["messages"])
    completion_tokens = len(content.split())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _multipart(content_type, body):
    """name -> (filename or None, bytes) of a multipart/form-data body; {} for another body."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or not boundary:
        return {}
    parts = {}
    for part in body.split(b"--" + boundary.group(1).encode())[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        head = head.decode("utf-8", "replace")
        name = re.search(r'\bname="([^"]*)"', head)
        filename = re.search(r'\bfilename="([^"]*)"', head)
        if name:
            parts[name.group(1)] = (filename and filename.group(1), data.removesuffix(b"\r\n"))
    return parts


def _llm_error(message, kind):
    return {"error": {"message": message, "type": kind}}


# --- SMTP ------------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Self-signed test certificates, valid until 2126: "selfsigned" for localhost and 127.0.0.1,
# "otherhost" for other.example only. tests/<name>.pem is the certificate, tests/<name>.key its key.
CERTIFICATES = Path(__file__).resolve().parent


def tls_context(certificate="selfsigned"):
    """A server-side TLS context presenting one of the test certificates."""
    import ssl  # imported here: only this fake needs it

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(CERTIFICATES / f"{certificate}.pem", CERTIFICATES / f"{certificate}.key")
    return context


class FakeSMTP:
    """An SMTP server that keeps what it receives in .messages.

    Each message is an email.message.EmailMessage with the envelope added as .mail_from,
    .rcpt_tos and .mail_options, and the bytes as received as .raw. With auth=(user, password)
    it requires AUTH (plain-text allowed) and rejects other credentials; .logins lists the user
    of every AUTH attempt, right or wrong. With tls="starttls" it offers STARTTLS, with
    tls="ssl" it speaks TLS from the start, presenting the test certificate named by
    certificate. RCPT TO an address in .refused gets "550". A message is kept as soon as it
    arrives, and its "250" comes .data_delay seconds later (a server scanning it first). .quits
    counts QUIT commands; after accepting a message the server can answer QUIT late
    (.quit_delay seconds) or with an error (.quit_reply, e.g. "421 ..."). .ehlos counts EHLO
    commands, each answered .ehlo_delay seconds late (a slow login).
    """

    def __init__(self, auth=None, tls=None, certificate="selfsigned"):
        self.auth = auth
        self.tls = tls
        self.certificate = certificate
        self.port = _free_port()
        self.messages = []
        self.logins = []
        self.refused = set()
        self.quits = 0
        self.quit_delay = self.data_delay = self.ehlo_delay = self.ehlos = 0
        self.quit_reply = None
        self._controller = None
        self.start()

    def start(self):
        """Accept connections (again, on the same port)."""
        if self._controller is not None:
            return
        options = {}
        if self.auth:
            options = {"auth_required": True, "auth_require_tls": False, "authenticator": self._authenticate}
        if self.tls:
            options["tls_context" if self.tls == "starttls" else "ssl_context"] = tls_context(self.certificate)
        # A fixed server_hostname spares a reverse DNS lookup on every connection.
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port,
                                      server_hostname="fake-smtp.test", **options)
        self._controller.start()

    def stop(self):
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for_messages(self, n, timeout=10):
        """Wait until at least n messages arrived; return them all."""
        wait_until(lambda: len(self.messages) >= n, timeout,
                   message=lambda: f"expected {n} mail(s) within {timeout} s, got {len(self.messages)}")
        return list(self.messages)

    def _authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append(auth_data.login.decode() if isinstance(auth_data, LoginPassword) else mechanism)
        valid = isinstance(auth_data, LoginPassword) and (
            auth_data.login.decode(), auth_data.password.decode()) == tuple(self.auth)
        return AuthResult(success=valid, handled=False)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refused:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        message.mail_from = envelope.mail_from
        message.rcpt_tos = list(envelope.rcpt_tos)
        message.mail_options = list(envelope.mail_options)
        message.raw = envelope.original_content
        self.messages.append(message)
        await asyncio.sleep(self.data_delay)
        return "250 Message accepted for delivery"

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlos += 1
        await asyncio.sleep(self.ehlo_delay)
        session.host_name = hostname  # what aiosmtpd's own EHLO does besides answering
        return responses

    async def handle_QUIT(self, server, session, envelope):
        self.quits += 1
        await asyncio.sleep(self.quit_delay)
        return self.quit_reply or "221 Bye"


# --- leadbot.py as a subprocess ---------------------------------------------------------------

# The developer's own bot settings must never leak into a test run.
_BOT_SETTINGS = (
    "TELEGRAM_", "LLM_", "SMTP_", "MAIL_", "MANAGER_", "DATA_", "LOG_", "CSV_", "WORKERS", "SESSION_",
    "PRIVACY_", "DELETE_WEBHOOK", "POLL_", "RETRY_", "OUTBOX_",
)


def _bot_environment(env):
    """os.environ without bot settings and proxies, then env (a None value leaves a variable unset)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(_BOT_SETTINGS) and not k.lower().endswith("_proxy")}
    base.update({k: str(v) for k, v in env.items() if v is not None})
    base.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    return base


def _bot_command(args, script=None):
    return [sys.executable, "-u", str(script or BOT_SCRIPT), *args]


# Fast start (see bot_launcher.py): a server that has imported the libraries forks each bot, which becomes
# this process's child. Only once start_fork_server() was called, and not with TESTS_COLD_START=1: then every
# bot starts as `python -u leadbot.py`.

LAUNCHER = Path(__file__).resolve().parent / "bot_launcher.py"
COLD_START = os.environ.get("TESTS_COLD_START", "") not in ("", "0") or not sys.platform.startswith("linux")


def _startup_environment(environment):
    """What an interpreter's start-up may depend on: the environment less the bot's settings (only leadbot
    reads them, after start-up) and pytest's note of the running test."""
    return {k: v for k, v in environment.items() if not k.startswith(_BOT_SETTINGS) and k != "PYTEST_CURRENT_TEST"}


class _Child:
    """The part of subprocess.Popen the tests use, for a bot the fork server started."""

    def __init__(self, pid, args):
        self.pid, self.args, self.returncode = pid, args, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
        return self.returncode

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


class _ForkServer:
    """bot_launcher.py running; start() hands it one bot."""

    def __init__(self, environment):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER: orphaned bots become our children
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
        self.startup = _startup_environment(environment)
        self._socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-u", str(LAUNCHER), str(theirs.fileno())],
                                         cwd=LAUNCHER.parent, env=environment, stdin=subprocess.DEVNULL,
                                         pass_fds=(theirs.fileno(),))

    def fits(self, environment):
        return self.proc.poll() is None and self.startup == _startup_environment(environment)

    def start(self, command, script, args, cwd, environment, files):
        """Runs script with args and files as its stdin, stdout and stderr; returns a _Child."""
        order = {"script": str(script), "args": [str(a) for a in args], "cwd": str(cwd), "env": environment}
        socket.send_fds(self._socket, [json.dumps(order).encode()], [f.fileno() for f in files])
        pid = self._socket.recv(64)
        if not pid:
            raise RuntimeError("bot_launcher.py stopped (its error is on pytest's stderr)")
        return _Child(int(pid), command)

    def stop(self):
        self._socket.close()  # the server exits
        self.proc.wait()


_fork_server = []


def start_fork_server():
    """From now on start_bot and run_bot start bots through the fork server (conftest.py calls this as pytest
    starts, so that the server has imported its libraries by the first test; tests/benchmark.py does not)."""
    if not COLD_START and not _fork_server:
        try:
            _fork_server.append(_ForkServer(_bot_environment({})))
        except OSError as error:  # no child subreaper here: every bot is started the plain way
            print(f"fakes.py: bots start the plain way ({error})", file=sys.stderr)


def _fast_start(command, script, args, cwd, environment, files):
    """The bot started through the fork server, or None when only a plain start is faithful here."""
    if not _fork_server or not _fork_server[0].fits(environment):
        return None  # no server, or the environment differs at start-up: start it the plain way
    return _fork_server[0].start(command, script, args, cwd, environment, files)


@atexit.register
def _stop_fork_server():
    while _fork_server:
        _fork_server.pop().stop()


def _communicate(child, stdin, stdout, stderr, input, timeout):
    """subprocess.run(input=..., capture_output=True, timeout=...) for a _Child: the output as bytes."""
    output = {}

    def read(name, pipe):
        with pipe:
            output[name] = pipe.read()

    def write():
        with stdin:
            with contextlib.suppress(BrokenPipeError):
                stdin.write(input or b"")

    threads = [threading.Thread(target=read, args=("stdout", stdout), daemon=True),
               threading.Thread(target=read, args=("stderr", stderr), daemon=True)]
    if stdin is not None:
        threads.append(threading.Thread(target=write, daemon=True))
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    try:
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        child.wait(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise subprocess.TimeoutExpired(child.args, timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise
    return output["stdout"], output["stderr"]


APP_FILES = ("leadbot.py", "llm.py", "store.py", "mailer.py", "prompt.txt")


def copy_app(folder):
    """A copy of the program in folder (prompt.txt and .env beside it, as an owner has them); returns
    the path of its leadbot.py."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        (folder / name).write_bytes((REPO / name).read_bytes())
    return folder / "leadbot.py"


class BotProcess:
    """leadbot.py running in the background, its stdout and stderr going to files in cwd."""

    _numbers = itertools.count(1)
    started = []  # every bot a test started, so that none outlives its test (see conftest.py)

    def __init__(self, env, args, cwd, script=None):
        number = next(self._numbers)
        BotProcess.started.append(self)
        self.stdout_path = Path(cwd) / f"bot-{number}.out"
        self.stderr_path = Path(cwd) / f"bot-{number}.err"
        command, environment = _bot_command(args, script), _bot_environment(env)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err, \
                open(os.devnull, "rb") as devnull:
            self.proc = _fast_start(command, script or BOT_SCRIPT, args, cwd, environment, (devnull, out, err)) \
                or subprocess.Popen(command, cwd=cwd, env=environment, stdin=devnull, stdout=out, stderr=err)

    def output(self):
        """Everything the bot wrote so far, stdout then stderr."""
        return "".join(path.read_text(encoding="utf-8", errors="replace")
                       for path in (self.stdout_path, self.stderr_path))

    def wait_log(self, substring, timeout=10):
        """Wait until substring appears in the output and return the output; fail early if the bot exits."""
        def logged():
            exited = not self.alive()
            text = self.output()
            if substring in text:
                return text
            if exited:
                raise AssertionError(f"bot exited ({self.proc.returncode}) without logging {substring!r}:\n{text}")
            return None

        return wait_until(logged, timeout,
                          message=lambda: f"{substring!r} not logged within {timeout} s:\n{self.output()[-4000:]}")

    def terminate(self):
        """SIGTERM (TerminateProcess on Windows)."""
        self.proc.terminate()

    def interrupt(self):
        """SIGINT, as Ctrl+C does (POSIX only)."""
        self.proc.send_signal(signal.SIGINT)

    def kill(self):
        self.proc.kill()

    def wait(self, timeout=10):
        """Wait for the bot to exit; return its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"bot still running after {timeout} s:\n{self.output()[-4000:]}") from None

    def alive(self):
        return self.proc.poll() is None


def running(fake):
    """For a fixture: hands a started fake server to a test and stops it afterwards."""
    yield fake
    fake.stop()


def start_bot(env, *args, cwd, script=None):
    """Start leadbot.py (or the copy at script) with args in the background."""
    return BotProcess(env, args, cwd, script)


def run_bot(env, *args, cwd, input=None, timeout=30, script=None):
    """Run leadbot.py to completion (--console, --check, start-up failures); return a CompletedProcess."""
    command, environment = _bot_command(args, script), _bot_environment(env)
    forked = _run_forked(command, script or BOT_SCRIPT, args, cwd, environment, input, timeout)
    if forked is not None:
        return forked
    stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=timeout, **stdin)


def _run_forked(command, script, args, cwd, environment, input, timeout):
    """run_bot through the fork server, with pipes for stdin (or /dev/null), stdout and stderr; None when the
    bot is to be started the plain way."""
    if not _fork_server or not _fork_server[0].fits(environment):
        return None
    stdin, stdout, stderr = os.pipe() if input is not None else (os.open(os.devnull, os.O_RDONLY), None), \
        os.pipe(), os.pipe()
    with open(stdin[0], "rb") as child_in, open(stdout[1], "wb") as child_out, open(stderr[1], "wb") as child_err:
        child = _fast_start(command, script, args, cwd, environment, (child_in, child_out, child_err))
    ours = (open(stdin[1], "wb") if stdin[1] is not None else None, open(stdout[0], "rb"), open(stderr[0], "rb"))
    if child is None:  # the server went away meanwhile
        for pipe in ours:
            if pipe is not None:
                pipe.close()
        return None
    out, err = _communicate(child, *ours, input.encode("utf-8") if input is not None else None, timeout)
    decoded = [data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
               for data in (out, err)]  # as text=True gives it
    return subprocess.CompletedProcess(command, child.returncode, *decoded)


# A client going through the dialog, step by step, waiting for each expected reply.

ANSWERS = ["Нужен сайт для пекарни с онлайн-заказом", "В течение месяца", "50–200 тыс. ₽"]
CONTACT_REQUEST = "контакт для связи"


def say(telegram, chat_id, text, expect, timeout=10, **sender):
    """Sends text (or a shared contact when text is a dict) and waits for a reply containing expect."""
    before = len(telegram.texts(chat_id))
    if isinstance(text, dict):
        telegram.send_contact(chat_id, **text)
    else:
        telegram.send_text(chat_id, text, **sender)
    return telegram.wait_for(
        lambda: next((t for t in telegram.texts(chat_id)[before:] if expect in t), None),
        timeout, f"a reply containing {expect!r} to {text!r} in chat {chat_id}")


def reach_contact_step(telegram, chat_id, answers=ANSWERS, **sender):
    """/start and every qualifying answer; returns once the bot asks for a contact."""
    say(telegram, chat_id, "/start", "задача", **sender)
    for answer in answers[:-1]:
        before = len(telegram.texts(chat_id))
        telegram.send_text(chat_id, answer, **sender)
        telegram.wait_for(lambda: len(telegram.texts(chat_id)) > before, 10, "the next question")
    say(telegram, chat_id, answers[-1], CONTACT_REQUEST, **sender)


def full_dialog(telegram, chat_id, contact="+7 999 123-45-67", **sender):
    """A whole dialog up to the thank-you; returns the thank-you text."""
    reach_contact_step(telegram, chat_id, **sender)
    return say(telegram, chat_id, contact, "Спасибо", **sender)


def owed(env):
    """The channels whose cursor ({DATA_DIR}/{name}.cursor) is behind the ledger's last record:
    deliveries still owed."""
    data = Path(env["DATA_DIR"])
    try:
        last = max((json.loads(line)["seq"] for line in
                    (data / "ledger.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()),
                   default=0)
        cursors = {p.stem: json.loads(p.read_text(encoding="utf-8"))["seq"] for p in data.glob("*.cursor")}
    except (OSError, ValueError, KeyError):
        return []
    return sorted(name for name, seq in cursors.items() if seq < last)


def read_rows(env, delimiter=None, wait=5):
    """The rows of {DATA_DIR}/leads.csv as dicts, read as a spreadsheet would (the delimiter taken from
    the header unless given); none while it is missing. Waits up to `wait` seconds for the csv
    channel to take what the ledger holds (a stopped bot or a held file: read as it is)."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: "csv" not in owed(env), timeout=wait)
    try:
        with open(Path(env["DATA_DIR"]) / "leads.csv", encoding="utf-8-sig", newline="") as f:
            header = f.readline()
            f.seek(0)
            return list(csv.DictReader(f, delimiter=delimiter or (";" if ";" in header else ",")))
    except (FileNotFoundError, IsADirectoryError):
        return []


def saved_dialogs(data_dir):
    """chat_id -> dialog as the bot's state journal ({data_dir}/state.jsonl) holds it now."""
    path = Path(data_dir) / "state.jsonl"
    dialogs = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line the bot is writing right now
        dialogs[entry["chat"]] = entry["dialog"]
    return {chat: dialog for chat, dialog in dialogs.items() if dialog is not None}

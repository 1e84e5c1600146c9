"""What the lead's code calls from the owner's side: next_open, when_text, startup_summary, read_config."""
import os
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from fakes import PROMPT, REPO
import leadbot

MOSCOW, BERLIN = ZoneInfo("Europe/Moscow"), ZoneInfo("Europe/Berlin")


def config(**settings):
    return leadbot.read_config(settings, telegram=False)


def at(zone, *fields):
    return datetime(*fields, tzinfo=zone)


def test_working_hours_are_parsed_at_read_config_time():
    cfg = config(WORKING_HOURS="Mon-Fri 09:00-18:00, Сб 10:00-14:00, Sun-Mon 20:00-24:00")
    assert cfg.working_hours == (
        (frozenset(range(5)), 540, 1080), (frozenset({5}), 600, 840), (frozenset({6, 0}), 1200, 1440))
    assert config().working_hours == () and config().timezone is None
    assert config(TIMEZONE="Europe/Moscow").timezone == MOSCOW


def test_next_open_is_none_while_open_or_without_hours():
    cfg = config(WORKING_HOURS="Mon-Fri 09:00-18:00", TIMEZONE="Europe/Moscow")
    assert leadbot.next_open(cfg, at(MOSCOW, 2026, 11, 24, 9, 0)) is None  # a Tuesday, 09:00 sharp
    assert leadbot.next_open(config(), at(MOSCOW, 2026, 11, 24, 3, 0)) is None


@pytest.mark.parametrize("when, opens", [
    ((2026, 11, 24, 18, 0), (2026, 11, 25, 9, 0)),   # Tuesday at closing time: Wednesday morning
    ((2026, 11, 24, 7, 30), (2026, 11, 24, 9, 0)),   # before opening: the same day
    ((2026, 11, 27, 19, 0), (2026, 11, 28, 10, 0)),  # Friday evening: Saturday's short day
    ((2026, 11, 28, 15, 0), (2026, 11, 30, 9, 0)),   # Saturday after it: Monday
])
def test_next_open_finds_the_next_range(when, opens):
    cfg = config(WORKING_HOURS="Mon-Fri 09:00-18:00, Sat 10:00-14:00", TIMEZONE="Europe/Moscow")
    assert leadbot.next_open(cfg, at(MOSCOW, *when)) == at(MOSCOW, *opens)


def test_next_open_is_in_timezone_whatever_the_zone_of_when():
    cfg = config(WORKING_HOURS="Mon-Fri 09:00-18:00", TIMEZONE="Europe/Moscow")
    opens = leadbot.next_open(cfg, datetime(2026, 11, 24, 16, 0, tzinfo=timezone.utc))  # 19:00 in Moscow
    assert opens == at(MOSCOW, 2026, 11, 25, 9, 0) and opens.utcoffset().total_seconds() == 3 * 3600


def test_next_open_keeps_the_wall_clock_across_a_change_to_summer_time():
    cfg = config(WORKING_HOURS="Mon-Fri 09:00-18:00", TIMEZONE="Europe/Berlin")
    opens = leadbot.next_open(cfg, at(BERLIN, 2026, 3, 27, 19, 0))  # Friday; clocks go forward on Sunday
    assert (opens.hour, opens.minute, opens.day) == (9, 0, 30)
    assert opens.utcoffset().total_seconds() == 2 * 3600  # summer time on Monday
    assert opens.astimezone(timezone.utc).hour == 7


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
def test_next_open_uses_the_machines_zone_when_timezone_is_empty(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        cfg = config(WORKING_HOURS="Mon-Fri 09:00-18:00")
        opens = leadbot.next_open(cfg, datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc))  # 21:00 in Tokyo
        assert (opens.day, opens.hour) == (25, 9) and opens.utcoffset().total_seconds() == 9 * 3600
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_when_text_reads_naturally():
    now = at(MOSCOW, 2026, 11, 24, 20, 0)  # a Tuesday
    assert leadbot.when_text(at(MOSCOW, 2026, 11, 25, 9, 0), now) == "завтра в 09:00"
    assert leadbot.when_text(at(MOSCOW, 2026, 11, 24, 21, 30), now) == "сегодня в 21:30"
    assert leadbot.when_text(at(MOSCOW, 2026, 11, 27, 9, 0), now) == "в пятницу в 09:00"
    assert leadbot.when_text(at(MOSCOW, 2026, 12, 8, 9, 0), now) == "08.12 в 09:00"


def test_startup_summary_names_the_folder_the_questions_the_channels_and_how_to_stop(tmp_path):
    cfg = config(DATA_DIR=str(tmp_path / "data"), LLM_BASE_URL="http://localhost:1/v1", LLM_MODEL="m")
    lines = leadbot.startup_summary(cfg, PROMPT, ["email"])
    text = "\n".join(lines)
    assert str(tmp_path / "data" / "leads.csv") in text
    assert "3 вопроса — Задача, Сроки, Бюджет" in text
    assert "почта менеджеру — вкл." in text and "чат менеджеров в Telegram — выкл." in text
    assert "Нейросеть: вкл." in text and "круглосуточно" in text and "Ctrl+C" in lines[-1]
    hours = config(WORKING_HOURS="Mon-Fri 09:00-18:00", TIMEZONE="Europe/Moscow")
    assert "рабочие часы: заданы (Europe/Moscow)" in "\n".join(leadbot.startup_summary(hours, PROMPT, []))


def test_new_settings_have_their_defaults():
    cfg = config(LLM_BASE_URL="http://llm/v1", LLM_MODEL="m", LLM_API_KEY="k")
    assert (cfg.stt_model, cfg.stt_base_url, cfg.stt_api_key) == ("", "http://llm/v1", "k")
    assert (cfg.voice_max_seconds, cfg.llm_reasoning_untagged, cfg.follow_up_hours) == (120, False, 0)
    assert cfg.pickup_alert_minutes is None and config(PICKUP_ALERT_MINUTES="2.5").pickup_alert_minutes == 2.5
    assert config(FOLLOW_UP_HOURS="0.5").follow_up_hours == 0.5


def test_every_text_key_is_in_the_shipped_prompt_and_placeholders_where_they_are_replaced():
    assert set(PROMPT.texts) == set(leadbot.TEXT_KEYS)
    for key, name in leadbot.PLACEHOLDERS.items():
        assert "{" + name + "}" in PROMPT.texts[key], key
    assert "свяжется с вами" not in PROMPT.texts["no_llm"]
    assert "недоступен" not in PROMPT.texts["llm_failed"]


def test_the_python_command_is_relative_when_the_venv_is_here(monkeypatch, tmp_path):
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(leadbot.sys, "executable", str(venv / "python"))
    assert leadbot.python_command() == os.path.join(".venv", "bin", "python")
    monkeypatch.chdir(REPO)
    assert leadbot.bot_command() == f"{tmp_path / '.venv' / 'bin' / 'python'} leadbot.py"

"""The owner's bot without touching Python: prompt.txt, settings with typos, paths, Excel, logs, the funnel."""
import json
import os
import stat
from pathlib import Path

import pytest

from fakes import (ANSWERS, CONTACT_REQUEST, PROMPT, copy_app, full_dialog, reach_contact_step,
                   read_rows, run_bot, say, start_bot, wait_until)

THANKS = "Спасибо"


@pytest.fixture
def app(tmp_path):
    """A copy of the program whose prompt.txt and .env a test may edit, as the owner does."""
    return copy_app(tmp_path / "app")


def edit_prompt(script, old, new):
    path = script.parent / "prompt.txt"
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


FOURTH = "\n[question Город]\nВ каком вы городе?\n* Москва\n* Другой\n\n[greeting]"


def test_a_fourth_question_and_a_new_greeting_need_only_prompt_txt(app, bot_env, telegram, smtp, tmp_path):
    edit_prompt(app, "\n[greeting]", FOURTH)
    edit_prompt(app, "Здравствуйте{name}!", "Добрый день{name}!")
    process = start_bot(bot_env, cwd=tmp_path, script=app)
    assert say(telegram, 1101, "/start", "Добрый день, Иван!")
    for answer in ANSWERS:
        say(telegram, 1101, answer, "")
    say(telegram, 1101, "2", CONTACT_REQUEST)  # a button's number counts as that button
    say(telegram, 1101, "+7 999 123-45-67", THANKS)
    mail = smtp.wait_for_messages(1)[0].get_content()
    assert "Город" in mail and "Другой" in mail
    process.terminate()


def test_buttons_typed_with_a_tab_or_no_space_are_buttons_and_an_indented_comment_is_not_sent(
        app, bot_env, telegram, tmp_path):
    edit_prompt(app, "\n[greeting]", "\n[question Город]\nВ каком вы городе?\n  # TODO: спросить район\n"
                                       "*\tМосква\n*Другой\n\n[greeting]")
    start_bot(bot_env, cwd=tmp_path, script=app)
    say(telegram, 1102, "/start", "Здравствуйте")
    for answer in ANSWERS[:-1]:
        say(telegram, 1102, answer, "")
    say(telegram, 1102, ANSWERS[-1], "В каком вы городе?")
    question = telegram.messages(1102)[-1]
    assert question["text"] == "В каком вы городе?"
    assert [row[0]["text"] for row in question["reply_markup"]["keyboard"]] == ["Москва", "Другой"]


@pytest.mark.parametrize("old, new, line_hint", [
    ("\n[refused]\n", "\n[refused_typo]\n", "может быть, [refused]?"),
    ("\n[greeting]", "\n[question Город]\nГде вы?\n[question Район]\nКакой?\n[greeting]", "пятый вопрос"),
    ("\n[greeting]", "\n[question Пусто]\n\n[greeting]", "пуст"),
    ("[help]\n", "[help]\n", None),
    ("[question Бюджет]", "[question Бюджет", "[question Бюджет]"),  # its text would go to the clients
])
def test_each_kind_of_prompt_txt_mistake_stops_start_up_with_its_line(app, bot_env, tmp_path, old, new, line_hint):
    if line_hint is None:  # a stray line before the first section
        path = app.parent / "prompt.txt"
        path.write_text("Ошибочная строка\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
        line_hint = "строка 1:"
    else:
        edit_prompt(app, old, new)
    result = run_bot(bot_env, cwd=tmp_path, script=app, timeout=10)
    assert result.returncode == 2
    assert "prompt.txt, строка" in result.stderr and line_hint in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_missing_text_stops_start_up_and_check_shows_the_counts(app, bot_env, tmp_path):
    check = run_bot(bot_env, "--check", cwd=tmp_path, script=app)
    assert "✓ prompt.txt: 3 вопроса" in check.stdout
    edit_prompt(app, "[thanks_saved]\n", "")
    result = run_bot(bot_env, cwd=tmp_path, script=app, timeout=10)
    assert result.returncode == 2 and "строка" in result.stderr and "[thanks_saved]" in result.stderr


def test_typos_in_env_are_caught_by_check_and_at_start_up(app, bot_env, tmp_path, telegram):
    (app.parent / ".env").write_text("CSV_DELIMETER=,\nPRIVACY_ULR=https://example.ru\n", encoding="utf-8")
    check = run_bot(bot_env, "--check", cwd=tmp_path, script=app)
    assert "✗ Настройки: CSV_DELIMETER: такой настройки нет — может быть, CSV_DELIMITER?" in check.stdout
    assert "PRIVACY_URL?" in check.stdout and check.returncode == 1
    process = start_bot(bot_env, cwd=tmp_path, script=app)
    process.wait_log("может быть, CSV_DELIMITER?")


@pytest.mark.parametrize("name, value, words", [
    ("TELEGRAM_BOT_TOKEN", "my token", "это не токен бота"),
    ("MANAGER_EMAIL", "manager.example.com", "это не адрес почты"),
    ("MAIL_FROM", "bot at example", "это не адрес почты"),
])
def test_a_value_that_cannot_be_right_is_one_clear_line(bot_env, tmp_path, name, value, words):
    result = run_bot({**bot_env, name: value}, cwd=tmp_path, timeout=10)
    assert result.returncode == 2 and name in result.stderr and words in result.stderr


def test_started_from_another_folder_it_keeps_one_leads_csv_next_to_itself(app, bot_env, telegram, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**bot_env, "DATA_DIR": "data"}
    process = start_bot(env, cwd=elsewhere, script=app)
    full_dialog(telegram, 1102)
    wait_until(lambda: (app.parent / "data" / "leads.csv").exists())
    assert not (elsewhere / "data").exists()
    check = run_bot(env, "--check", cwd=elsewhere, script=app)
    assert str(app.parent / "data") in check.stdout
    process.terminate()


def test_the_default_delimiter_is_excels_russian_one(bot, bot_env, telegram):
    bot(CSV_DELIMITER=None)
    full_dialog(telegram, 1103)
    path = Path(bot_env["DATA_DIR"]) / "leads.csv"
    wait_until(path.exists)
    assert path.read_bytes().startswith("\ufefftimestamp;chat_id;client_name".encode())


def test_a_comma_file_keeps_its_commas_when_the_setting_says_semicolon(bot, bot_env, telegram):
    path = Path(bot_env["DATA_DIR"]) / "leads.csv"
    path.parent.mkdir(parents=True)
    path.write_bytes("\ufefftimestamp,chat_id,client_name,contact,intent,notes,source,status\r\n"
                     "2026-11-01T10:00:00+03:00,11,Ольга,+7 912,сайт,заметки,telegram,new\r\n".encode())
    process = bot(CSV_DELIMITER=";")
    full_dialog(telegram, 1104)
    wait_until(lambda: len(read_rows(bot_env, ",")) == 2)
    assert "','" in process.output() or "," in process.output()


def test_a_message_after_a_finished_dialog_is_kept_and_the_button_starts_a_new_one(bot, telegram):
    bot()
    full_dialog(telegram, 1105)
    # Issue 20: kept for the manager, no junk request started.
    say(telegram, 1105, "А ещё нужен интернет-магазин", PROMPT.texts["after_lead"][:20])
    say(telegram, 1105, PROMPT.texts["new_request_button"], "задача")
    reply = say(telegram, 1105, "Интернет-магазин", "Когда")
    assert "С возвращением" not in "\n".join(telegram.texts(1105))
    assert reply


def test_json_logs_parse_and_carry_the_event_fields(bot, telegram, tmp_path):
    process = bot(LOG_FORMAT="json", LOG_FILE=str(tmp_path / "bot.log"))
    full_dialog(telegram, 1106, first_name="Секретина")
    process.terminate()
    process.wait()
    lines = [json.loads(line) for line in (tmp_path / "bot.log").read_text(encoding="utf-8").splitlines()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(line.get("chat_id") == 1106 and line.get("stage") for line in lines)
    text = (tmp_path / "bot.log").read_text(encoding="utf-8")
    for secret in ("Секретина", "999 123-45-67", ANSWERS[0]):
        assert secret not in text


def test_stats_count_a_lead_a_refusal_and_a_drop_off_without_personal_data(bot, bot_env, telegram, smtp, tmp_path):
    bot()
    full_dialog(telegram, 731900107)
    reach_contact_step(telegram, 731900108)
    say(telegram, 731900108, "нет", "без контакта")
    say(telegram, 731900109, "/start", "задача")
    say(telegram, 731900109, "Сайт для кафе", "Когда")
    wait_until(lambda: len(read_rows(bot_env)) == 2)
    result = run_bot(bot_env, "--stats", "--json", cwd=tmp_path)
    figures = json.loads(result.stdout)
    for period in ("7d", "30d", "all"):
        p = figures[period]
        assert (p["started"], p["contacts"], p["refused"], p["open"]) == (3, 1, 1, 1)
        assert sum(p["dropped"].values()) == 0  # the third dialog is still going on, not dropped off
    def after_ttl():  # silent past a SESSION_TTL_HOURS of 0.36 s: dropped off at the questions
        return json.loads(run_bot({**bot_env, "SESSION_TTL_HOURS": "0.0001"}, "--stats", "--json",
                                  cwd=tmp_path).stdout)["all"]
    assert wait_until(lambda: (p := after_ttl())["dropped"]["qualifying"] == 1 and p["open"] == 0, timeout=5)
    funnel = (Path(bot_env["DATA_DIR"]) / "funnel.jsonl").read_text(encoding="utf-8")
    for secret in ("731900107", "731900108", "731900109", "Иван", "999 123-45-67", "Сайт для кафе", ANSWERS[0]):
        assert secret not in funnel
    text = run_bot(bot_env, "--stats", cwd=tmp_path).stdout
    assert "За 7 дней: 3 диалога" in text and "оставили контакт" in text and "ещё идут: 1" in text
    mail = smtp.wait_for_messages(1)[0].get_content()
    assert "Лендинг" in mail and ANSWERS[0] in mail  # the manager sees the offer and the answers


def test_stats_on_a_missing_data_folder_print_zeros(bot_env, tmp_path):
    result = run_bot({**bot_env, "DATA_DIR": str(tmp_path / "nothing")}, "--stats", "--json", cwd=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout)["all"]["started"] == 0


def test_forget_leaves_no_trace_in_the_funnel(bot, bot_env, telegram):
    bot()
    full_dialog(telegram, 731900110)
    say(telegram, 731900110, "/forget", "удалены")
    data = Path(bot_env["DATA_DIR"])
    for path in data.rglob("*"):
        if path.is_file() and path.suffix != ".lock":
            assert "731900110" not in path.read_text(encoding="utf-8", errors="replace"), path


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_client_data_is_private_to_the_bots_user_whatever_the_umask(bot, bot_env, telegram):
    data = Path(bot_env["DATA_DIR"])
    data.mkdir(parents=True)
    data.chmod(0o755)
    old = data / "leads.csv"
    old.write_text("")  # made earlier by someone with the usual umask 022
    old.chmod(0o644)
    previous = os.umask(0o022)
    try:
        process = bot()
        full_dialog(telegram, 1501)
        wait_until(lambda: len(read_rows(bot_env)) == 1)
    finally:
        os.umask(previous)
    process.terminate()
    process.wait()
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [data, *data.rglob("*")]}
    assert modes[data.name] == 0o700
    assert all(mode & 0o077 == 0 for mode in modes.values()), modes
    assert {"leads.csv", "state.jsonl", "funnel.jsonl"} <= set(modes)


def test_start_up_prints_one_summary_for_the_owner_in_russian(bot, bot_env, telegram):
    process = bot()
    process.wait_log("Папка данных: ")
    output = process.output()
    assert bot_env["DATA_DIR"] in output and "prompt.txt: 3 вопроса" in output
    assert telegram.token not in output

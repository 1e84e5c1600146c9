"""The owner's side as the owner meets it: start-up, --check and --console as subprocesses on a copy of
the program with its own prompt.txt and .env; every mistake named with its line, in Russian."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakes import _bot_environment, copy_app, full_dialog, run_bot, say, start_bot

CONFLICT = "<<<<<<< Updated upstream\n{old}\n=======\n{new}\n>>>>>>> Stashed changes\n"


@pytest.fixture
def app(tmp_path):
    return copy_app(tmp_path / "app")


def prompt_of(app):
    return app.parent / "prompt.txt"


def edit_prompt(app, old, new):
    text = prompt_of(app).read_text(encoding="utf-8")
    assert old in text, old
    prompt_of(app).write_text(text.replace(old, new, 1), encoding="utf-8")


def line_of(app, text):
    """The number of the first line of prompt.txt that starts with text."""
    lines = prompt_of(app).read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(text))


def start_up(app, env, tmp_path, *args):
    """Start-up that must fail: exit 2, Russian `leadbot: …` lines only, no traceback."""
    result = run_bot(env, *args, cwd=tmp_path, script=app, timeout=15)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(line.startswith("leadbot: ") for line in lines), result.stderr
    return lines


def check(app, env, tmp_path):
    """--check's exit code and lines."""
    result = run_bot(env, "--check", cwd=tmp_path, script=app, timeout=30)
    assert "Traceback" not in result.stdout + result.stderr
    return result.returncode, result.stdout.splitlines()


def test_git_conflict_marks_in_prompt_txt_stop_start_up_check_and_console_with_the_lines(
        app, bot_env, tmp_path):
    greeting = "Здравствуйте{name}! Я помощник студии «Пример»."
    edit_prompt(app, greeting + " Задам", CONFLICT.format(old=greeting, new="Добрый день{name}!") + "Задам")
    first = line_of(app, "<<<<<<<")
    for args in ((), ("--console",)):
        [problem] = start_up(app, bot_env, tmp_path, *args)
        assert f"строки {first}, {first + 2}, {first + 4}" in problem and "конфликта git" in problem
    code, lines = check(app, bot_env, tmp_path)
    assert code == 1 and any(line.startswith("✗ prompt.txt") and str(first) in line for line in lines)


def test_git_conflict_marks_in_env_stop_start_up_and_check_with_the_lines(app, bot_env, tmp_path):
    (app.parent / ".env").write_text("LOG_LEVEL=INFO\n" + CONFLICT.format(old="LLM_MODEL=a", new="LLM_MODEL=b"),
                                     encoding="utf-8")
    [problem] = start_up(app, bot_env, tmp_path)
    assert ".env, строки 2, 4, 6" in problem
    code, lines = check(app, bot_env, tmp_path)
    assert code == 1 and ".env, строки 2, 4, 6" in lines[0]


def test_readmes_block_pasted_on_top_of_env_example_is_named_not_silently_undone(app, bot_env, tmp_path):
    example = (Path(__file__).parent.parent / ".env.example").read_text(encoding="utf-8")
    (app.parent / ".env").write_text("TELEGRAM_BOT_TOKEN=123456:ABCdef\nLLM_MODEL=qwen2.5:7b\n" + example,
                                     encoding="utf-8")
    token_line = 3 + example.splitlines().index("TELEGRAM_BOT_TOKEN=")
    env = {**bot_env, "TELEGRAM_BOT_TOKEN": None, "LLM_MODEL": None}
    problems = start_up(app, env, tmp_path)
    assert any(f"TELEGRAM_BOT_TOKEN задан 2 раза (строки 1, {token_line})" in line for line in problems)
    assert any("LLM_MODEL задан 2 раза" in line for line in problems)
    code, lines = check(app, env, tmp_path)
    assert code == 1 and any(f"(строки 1, {token_line})" in line for line in lines)


def test_a_env_in_the_folder_the_bot_is_started_from_is_not_read(app, bot_env, tmp_path):
    (tmp_path / ".env").write_text("LOG_LEVEL=LOUD\n", encoding="utf-8")
    code, lines = check(app, bot_env, tmp_path)
    assert not [line for line in lines if "LOG_LEVEL" in line]


SAMPLE_GREETING = "[greeting]\nЗдравствуйте{name}!"


@pytest.mark.parametrize("old, new, bad_line, words", [
    ("[question Сроки]\n", "[question Сроки] (новый)\n", "[question Сроки]", "[question Сроки]"),
    ("[question Сроки]\n", "[question Сроки]]\n", "[question Сроки]", "[question Сроки]"),
    ("* В течение месяца\n", "- В течение месяца\n", "- В течение", "«* В течение месяца»"),
    ("Здравствуйте{name}!", "Здравствуйте{nmae}!", "Здравствуйте", "{nmae}"),
    ("Здравствуйте{name}!", "Здравствуйте{Name}!", "Здравствуйте", "{Name}"),
    ("Здравствуйте{name}!", "Здравствуйте{имя}!", "Здравствуйте", "{имя}"),
    ("[thanks_saved]\nСпасибо!", "[thanks_saved]\nСпасибо{name}!", "Спасибо{name}", "[greeting]"),
    ("[question Сроки]", "[question Время]", "[question Время]", "«Время»"),
])
def test_each_prompt_txt_mistake_is_named_with_its_own_line(app, bot_env, tmp_path, old, new, bad_line, words):
    edit_prompt(app, old, new)
    number = line_of(app, bad_line)
    problems = start_up(app, bot_env, tmp_path)
    assert any(f"строка {number}:" in line and words in line for line in problems), problems
    code, lines = check(app, bot_env, tmp_path)
    assert code == 1 and any(f"строка {number}:" in line and words in line for line in lines)


def test_a_deleted_question_header_is_named_where_the_next_question_begins(app, bot_env, tmp_path):
    edit_prompt(app, "[question Сроки]\n", "")
    [problem] = start_up(app, bot_env, tmp_path)
    assert f"строка {line_of(app, 'Когда нужен результат?')}:" in problem and "[question Метка]" in problem


def test_a_deleted_header_after_buttons_is_named_where_its_text_is(app, bot_env, tmp_path):
    edit_prompt(app, "\n[greeting]\n", "\n")
    problems = start_up(app, bot_env, tmp_path)
    number = line_of(app, "Здравствуйте")
    assert any(f"строка {number}:" in line and "после кнопок" in line for line in problems)


def test_a_lost_text_header_is_named_where_its_text_is_not_at_the_end(app, bot_env, tmp_path):
    edit_prompt(app, "\n[forgotten_manager]\n", "\n")
    [problem] = start_up(app, bot_env, tmp_path)
    assert f"строка {line_of(app, 'Готово: ваши данные удалены из бота')}:" in problem
    assert "[forgotten_manager]" in problem and "[forgotten]" in problem


def test_check_names_every_section_a_new_version_needs_and_where_to_add_it(app, bot_env, tmp_path):
    for section in ("after_lead", "pick_button"):
        text = prompt_of(app).read_text(encoding="utf-8")
        start = text.index(f"\n[{section}]\n")
        end = text.index("\n[", start + 2)
        prompt_of(app).write_text(text[:start] + text[end:], encoding="utf-8")
    code, lines = check(app, bot_env, tmp_path)
    assert code == 1
    [after_lead] = [line for line in lines if "нет раздела [after_lead]" in line]
    assert f"после раздела [thanks_after_hours] (строка {line_of(app, '[thanks_after_hours]')})" in after_lead
    assert "git show HEAD:prompt.txt" in after_lead
    assert any("нет раздела [pick_button]" in line for line in lines)


def test_an_unknown_section_points_to_the_list_at_the_top_of_prompt_txt(app, bot_env, tmp_path):
    edit_prompt(app, "\n[returning]\n", "\n[zzzzzz]\n")
    problems = start_up(app, bot_env, tmp_path)
    assert any("список разделов — в начале prompt.txt" in line for line in problems)
    top = prompt_of(app).read_text(encoding="utf-8").split("\n[system]\n")[0]
    import leadbot
    for key in leadbot.TEXT_KEYS:  # the list exists and is complete
        assert f"[{key}]" in top, key


def test_privacy_is_needed_only_with_a_privacy_url(app, bot_env, tmp_path, telegram):
    edit_prompt(app, "[privacy]\nКак мы обращаемся с данными: {url}\n", "")
    code, lines = check(app, bot_env, tmp_path)
    assert any(line.startswith("✓ prompt.txt") for line in lines)
    code, lines = check(app, {**bot_env, "PRIVACY_URL": "https://example.ru/privacy"}, tmp_path)
    assert code == 1 and any("нет раздела [privacy]" in line for line in lines)


def test_check_names_the_interpreter_it_runs_under(app, bot_env, tmp_path, telegram):
    code, lines = check(app, bot_env, app.parent)
    assert lines[-1] == f"Все проверки пройдены. Запуск бота: {sys.executable} leadbot.py"
    code, lines = check(app, {**bot_env, "CSV_DELIMITER": "|"}, tmp_path)
    assert lines[-1].endswith(f"{sys.executable} {os.path.join('app', 'leadbot.py')} --check")  # as typed here
    assert not [line for line in lines if "python leadbot.py" in line]


def test_check_never_contradicts_itself(app, bot_env, tmp_path, telegram):
    (app.parent / ".env").write_text("CSV_DELIMETER=,\n", encoding="utf-8")
    code, lines = check(app, {**bot_env, "MANAGER_EMAIL": "manager.example.com"}, tmp_path)
    assert not [line for line in lines if line.startswith("✓ Настройки")]
    assert len([line for line in lines if "MANAGER_EMAIL" in line]) == 1
    code, lines = check(app, {**bot_env, "LLM_MODEL": ""}, tmp_path)
    assert code == 1 and any(line.startswith("✗ Настройки: LLM_MODEL не задан") for line in lines)


SECRET = "8123456789:AAHsecretSECRETsecret"


@pytest.mark.parametrize("name", ["SMTP_PORT", "CSV_DELIMITER", "LLM_TIMEOUT", "SMTP_SECURITY",
                                  "LOG_LEVEL", "MANAGER_CHAT_ID", "WORKING_HOURS", "TIMEZONE",
                                  "LLM_BASE_URL", "MAIL_FROM", "TELEGRAM_BOT_TOKEN"])
def test_a_value_typed_into_the_wrong_line_is_never_echoed(app, bot_env, tmp_path, name):
    env = {**bot_env, name: SECRET + "x y"}
    problems = start_up(app, env, tmp_path)
    code, lines = check(app, env, tmp_path)
    output = "\n".join(problems + lines)
    assert name in output and "AAHsecret" not in output and "8123456789" not in output


@pytest.mark.parametrize("name, value, words", [
    ("CSV_DELIMITER", "|", "значение должно быть «;» или «,»"),
    ("SESSION_TTL_HOURS", "0", "значение должно быть числом больше 0"),
    ("WORKING_HOURS", "Mon-Fri 9-18", "Mon-Fri 09:00-18:00"),
    ("WORKING_HOURS", "Mon-Fri 18:00-09:00", "Mon-Fri 09:00-18:00"),
    ("TIMEZONE", "Europe/Moskow", "неизвестный часовой пояс"),
    ("FOLLOW_UP_HOURS", "-1", "не меньше 0"),
    ("PICKUP_ALERT_MINUTES", "0", "больше 0"),
    ("VOICE_MAX_SECONDS", "0.5", "целым числом не меньше 1"),
    ("LLM_REASONING_UNTAGGED", "maybe", "1 (да) или 0 (нет)"),
])
def test_a_wrong_value_is_one_readable_russian_line(app, bot_env, tmp_path, name, value, words):
    [problem] = start_up(app, {**bot_env, name: value}, tmp_path)
    assert problem == f"leadbot: {name}: {words}" or (name in problem and words in problem), problem


def test_stt_model_without_any_address_is_named(app, bot_env, tmp_path):
    [problem] = start_up(app, {**bot_env, "STT_MODEL": "whisper-1", "LLM_BASE_URL": ""}, tmp_path)
    assert "STT_BASE_URL не задан" in problem


@pytest.mark.parametrize("key", ["BOT_TOKEN", "TELEGRAM_TOKEN", "token"])
def test_other_names_for_the_token_are_flagged(app, bot_env, tmp_path, key):
    (app.parent / ".env").write_text(f"{key}=123456:ABCdef\n", encoding="utf-8")
    problems = start_up(app, {**bot_env, "TELEGRAM_BOT_TOKEN": None}, tmp_path)
    assert f"leadbot: {key}: такой настройки нет — может быть, TELEGRAM_BOT_TOKEN?" in problems


def test_the_console_says_where_the_lead_goes_and_what_ctrl_c_does(tmp_path):
    app = copy_app(tmp_path / "app")
    result = run_bot({"DATA_DIR": str(tmp_path / "data")}, "--console", cwd=tmp_path, script=app, input="",
                     timeout=20)
    assert result.returncode == 0
    assert "Ctrl+C" in result.stdout and "leads.csv" in result.stdout


def funnel(tmp_path, dialogs):
    """A funnel.jsonl with `dialogs` (id, [events]) started a day ago."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    start = int(time.time()) - 86400
    lines = [{"t": start, "d": d, "e": "started", "s": "telegram"} for d, _ in dialogs]
    lines += [{"t": start + 1, "d": d, "e": e, "s": "telegram", "seconds": 60} for d, events in dialogs
              for e in events]
    (data / "funnel.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return {"DATA_DIR": str(data)}


@pytest.mark.parametrize("count, words", [(1, "1 диалог"), (2, "2 диалога"), (5, "5 диалогов"),
                                          (11, "11 диалогов"), (21, "21 диалог")])
def test_stats_speak_russian_with_its_plural_forms(tmp_path, count, words):
    env = funnel(tmp_path, [(f"d{i}", ["contact"]) for i in range(count)])
    result = run_bot(env, "--stats", cwd=tmp_path)
    assert result.returncode == 0
    assert f"За 7 дней: {words}\n" in result.stdout and "оставили контакт" in result.stdout


def test_stats_do_not_count_a_forgotten_lead_as_a_lead(tmp_path):
    env = funnel(tmp_path, [("kept", ["contact"]), ("erased", ["contact", "forgotten"])])
    figures = json.loads(run_bot(env, "--stats", "--json", cwd=tmp_path).stdout)["7d"]
    assert (figures["contacts"], figures["forgotten"]) == (1, 1)
    assert "удалили данные (/forget): 1" in run_bot(env, "--stats", cwd=tmp_path).stdout


def write_env(app, text):
    (app.parent / ".env").write_text(text, encoding="utf-8")


@pytest.mark.parametrize("text, number, words", [
    ("LOG_LEVEL=INFO\nSMTP_HOST smtp.mail.ru\n", 2, "SMTP_HOST без знака «=»"),
    ("SMTP_HOST\n", 1, "SMTP_HOST без знака «=»"),
    ("# почта\nпочта менеджера anna@clinic.ru\n", 2, "нет знака «=»"),
])
def test_a_env_line_without_equals_is_named_with_its_number_not_silently_dropped(
        app, bot_env, tmp_path, text, number, words):
    write_env(app, text)
    [problem] = start_up(app, bot_env, tmp_path)
    assert f".env, строка {number}: {words}" in problem and "anna@" not in problem
    code, lines = check(app, bot_env, tmp_path)
    assert code == 1 and f"✗ .env, строка {number}: {words}" in lines[0]


def test_manager_email_without_smtp_host_is_flagged(app, bot_env, tmp_path, telegram):
    code, lines = check(app, {**bot_env, "SMTP_HOST": ""}, tmp_path)
    assert code == 1 and any(line.startswith("✗ Настройки: MANAGER_EMAIL задан, а SMTP_HOST пуст")
                             for line in lines), lines


def test_a_setting_name_typed_with_cyrillic_letters_is_named_with_the_letters(app, bot_env, tmp_path, telegram):
    write_env(app, "\u0421MTP_HOST=smtp.mail.ru\n")  # a Cyrillic С
    hint = ("\u0421MTP_HOST: такой настройки нет — в имени русские буквы (С) вместо латинских: "
            "наберите SMTP_HOST латиницей")
    code, lines = check(app, {**bot_env, "SMTP_HOST": None, "MANAGER_EMAIL": None}, tmp_path)
    assert code == 1 and f"✗ Настройки: {hint}" in lines, lines
    start_bot({**bot_env, "SMTP_HOST": None}, cwd=tmp_path, script=app).wait_log(hint)


REAL_LOOKING = "8123456789:AAHsecretSECRETsecretSECRETsecret12"  # as @BotFather gives it


@pytest.mark.parametrize("name, token", [("LLM_API_KEY", None), ("LLM_MODEL", None), ("SMTP_USER", None),
                                         ("DATA_DIR", REAL_LOOKING), ("LLM_API_KEY", REAL_LOOKING)])
def test_the_bot_token_pasted_into_another_setting_is_flagged_never_echoed(
        app, bot_env, tmp_path, telegram, name, token):
    token = token or bot_env["TELEGRAM_BOT_TOKEN"]  # None: the very token of TELEGRAM_BOT_TOKEN
    code, lines = check(app, {**bot_env, name: token}, tmp_path)
    output = "\n".join(lines)
    assert code == 1 and f"✗ Настройки: {name}: похоже, это токен Telegram-бота" in output, lines
    assert token not in output and token.partition(":")[2] not in output


def test_two_manager_emails_both_get_the_lead(app, bot_env, telegram, smtp, tmp_path):
    env = {**bot_env, "MANAGER_EMAIL": "anna@example.com, oleg@example.com", "MAIL_FROM": ""}
    code, lines = check(app, env, tmp_path)
    assert not [line for line in lines if "MANAGER_EMAIL" in line]
    process = start_bot(env, cwd=tmp_path, script=app)
    full_dialog(telegram, 2201)
    [mail] = smtp.wait_for_messages(1)
    assert sorted(mail.rcpt_tos) == ["anna@example.com", "oleg@example.com"]
    assert mail.mail_from == "anna@example.com"
    process.terminate()
    process.wait()
    [problem] = start_up(app, {**env, "MANAGER_EMAIL": "anna@example.com oleg@example.com"}, tmp_path)
    assert "несколько адресов пишите через запятую" in problem


@pytest.mark.parametrize("value", ["9:00-18:00", "Пн-Пт 9:00-18:00", "Пн-Пт: 9:00 - 18:00"])
def test_working_hours_with_one_digit_hours_are_taken(app, bot_env, tmp_path, telegram, value):
    code, lines = check(app, {**bot_env, "WORKING_HOURS": value}, tmp_path)
    assert not [line for line in lines if "WORKING_HOURS" in line]


def test_working_hours_without_an_end_say_what_is_missing(app, bot_env, tmp_path):
    [problem] = start_up(app, {**bot_env, "WORKING_HOURS": "9:00"}, tmp_path)
    assert "начало и конец через дефис" in problem and "9:00-18:00" in problem


def test_a_missing_prompt_txt_is_one_russian_line_with_the_fix(app, bot_env, tmp_path, telegram):
    prompt_of(app).unlink()
    [problem] = start_up(app, bot_env, tmp_path)
    assert "prompt.txt не найден" in problem and "git checkout -- prompt.txt" in problem
    assert "Error" not in problem
    code, lines = check(app, bot_env, tmp_path)
    assert code == 1 and any(line.startswith("✗ prompt.txt не найден") for line in lines)


@pytest.mark.parametrize("text", ["", "\n\n", "# только комментарий\n"])
def test_an_empty_prompt_txt_is_one_line_not_one_per_section(app, bot_env, tmp_path, text):
    prompt_of(app).write_text(text, encoding="utf-8")
    [problem] = start_up(app, bot_env, tmp_path)
    assert problem.startswith("leadbot: prompt.txt пуст") and "git checkout -- prompt.txt" in problem


def test_a_placeholder_in_system_says_the_llm_reads_it_not_the_client(app, bot_env, tmp_path):
    edit_prompt(app, "отвечаешь клиентам в чате Telegram.", "отвечаешь клиентам {x} в чате Telegram.")
    [problem] = start_up(app, bot_env, tmp_path)
    assert f"строка {line_of(app, 'Ты — консультант')}: {{x}}" in problem
    assert "нейросеть получит «{x}» как есть" in problem and "клиент" not in problem, problem


def test_two_questions_with_one_label_are_named_with_both_lines(app, bot_env, tmp_path):
    edit_prompt(app, "[question Бюджет]", "[question Сроки]")
    first, second = (number for number, line in enumerate(
        prompt_of(app).read_text(encoding="utf-8").splitlines(), 1) if line == "[question Сроки]")
    [problem] = start_up(app, bot_env, tmp_path)
    assert f"строка {second}: [question Сроки] — метка «Сроки» уже есть у вопроса в строке {first}" \
        in problem, problem


def test_stats_write_minutes_with_a_decimal_comma(tmp_path):
    env = funnel(tmp_path, [("d1", ["contact"])])  # 60 seconds to the contact
    assert "медиана времени до контакта: 1,0 мин" in run_bot(env, "--stats", cwd=tmp_path).stdout


@pytest.mark.parametrize("args", ["--check", "--stats"])
def test_output_cut_short_by_head_ends_quietly(app, bot_env, tmp_path, args):
    environment = {**_bot_environment(bot_env), "PYTHONUNBUFFERED": ""}  # buffered, as the owner has it
    for reader in ("head -1", "true"):  # true: gone before the first line
        result = subprocess.run(f'"{sys.executable}" "{app}" {args} | {reader}', shell=True, cwd=tmp_path,
                                env=environment, capture_output=True, text=True, timeout=30)
        assert result.stderr == "" and len(result.stdout.splitlines()) <= 1, result.stderr


def test_start_up_names_a_manager_chat_the_bot_cannot_reach_and_keeps_working(bot_env, telegram, tmp_path):
    process = start_bot({**bot_env, "MANAGER_CHAT_ID": "-1001234567890"}, cwd=tmp_path)
    output = process.wait_log("MANAGER_CHAT_ID недоступен боту")
    assert "Внимание: чат MANAGER_CHAT_ID недоступен боту (HTTP 400) — добавьте бота" in output
    assert say(telegram, 2301, "/start", "Здравствуйте")  # the clients are still answered
    process.terminate()
    process.wait()  # its lock on DATA_DIR goes with it
    process = start_bot({**bot_env, "MANAGER_CHAT_ID": "5550001"}, cwd=tmp_path)
    assert "недоступен" not in process.wait_log("Остановить бота")


def test_the_russian_guide_explains_every_column_of_the_real_leads_csv(tmp_path):
    env = {"DATA_DIR": str(tmp_path / "data")}
    answers = "\n".join(["Болит зуб", "На этой неделе", "до 10 тыс. ₽", "+7 999 123-45-67", ""])
    assert run_bot(env, "--console", cwd=tmp_path, input=answers, timeout=20).returncode == 0
    header, row = (tmp_path / "data" / "leads.csv").read_text(encoding="utf-8-sig").splitlines()[:2]
    assert row.split(";")[header.split(";").index("contact")].startswith("'+7")  # Excel's formula guard
    guide = (Path(__file__).resolve().parent.parent / "doc" / "README.ru.md").read_text(encoding="utf-8")
    table = guide[guide.index("### Таблица заявок"):]
    for column in header.split(";"):
        assert f"| `{column}` |" in table, column
    for words in ("апостроф", "`new`", "`rejected`", "`telegram`", "`console`"):
        assert words in table, words


def test_env_example_has_every_setting_explained_in_russian():
    import leadbot
    lines = (Path(__file__).parent.parent / ".env.example").read_text(encoding="utf-8").splitlines()
    assert sorted(line.partition("=")[0] for line in lines if line and not line.startswith("#")) == sorted(
        leadbot.SETTINGS)
    english = [line for line in lines if line.startswith("# ") and not line.startswith("# ---")
               and re.search("[A-Za-z]{4}", line)
               and not re.search("[а-яё]", line, re.IGNORECASE)]
    assert english == []

"""python leadbot.py --check against fake servers: one ✓/✗ line per check, a fix for every ✗, no secrets."""
from pathlib import Path

import pytest

from fakes import FakeSMTP, run_bot, running

SMTP_USER, SMTP_PASSWORD = "bot@example.com", "smtp-pass-SECRET"


@pytest.fixture
def smtp_login():
    """An SMTP server that wants SMTP_USER / SMTP_PASSWORD."""
    yield from running(FakeSMTP(auth=(SMTP_USER, SMTP_PASSWORD)))


@pytest.fixture
def check(bot_env, smtp_login, tmp_path):
    """check(**overrides) runs --check with every part configured; returns (exit code, output lines).

    Whatever the outcome, the token, the LLM key and the SMTP password must not appear in the output.
    """
    def run(**overrides):
        env = {**bot_env, "SMTP_PORT": str(smtp_login.port), "SMTP_USER": SMTP_USER,
               "SMTP_PASSWORD": SMTP_PASSWORD, **overrides}
        result = run_bot(env, "--check", cwd=tmp_path, timeout=30)
        output = result.stdout + result.stderr
        assert "Traceback" not in output
        for name in ("TELEGRAM_BOT_TOKEN", "LLM_API_KEY", "SMTP_PASSWORD"):
            secret = env.get(name) or ""
            for piece in {secret, secret.partition(":")[2]} - {""}:
                assert piece not in output, f"{name} was printed"
        return result.returncode, result.stdout.splitlines()

    return run


def line(lines, start):
    """The one output line that starts with start (e.g. '✗ LLM')."""
    [found] = [text for text in lines if text.startswith(start)]
    return found


def test_everything_configured_and_working_passes(check, telegram, llm, smtp_login, bot_env):
    code, lines = check()
    assert code == 0
    assert "@test_lead_bot" in line(lines, "✓ Telegram: токен работает")
    assert line(lines, "✓ Telegram: вебхука нет")
    assert line(lines, "✓ Настройки: все заданы верно")
    assert "test-model" in line(lines, "✓ LLM")
    assert "логин" in line(lines, "✓ Email")
    assert bot_env["DATA_DIR"] in line(lines, "✓ DATA_DIR")
    assert not [text for text in lines if text.startswith("✗")]
    assert llm.requests[0]["json"]["model"] == "test-model"  # the model really was asked
    assert smtp_login.messages == []  # logged in, sent nothing


def test_parts_left_unconfigured_are_mentioned_and_do_not_fail(check, telegram):
    code, lines = check(LLM_BASE_URL=None, SMTP_HOST=None, MANAGER_EMAIL=None)
    assert code == 0
    assert "LLM_BASE_URL" in line(lines, "- LLM")
    assert "SMTP_HOST" in line(lines, "- Email")


def test_a_rejected_token_fails_and_says_where_to_get_a_new_one(check, telegram):
    code, lines = check(TELEGRAM_BOT_TOKEN="123456:WRONG-token-xyz")
    assert code == 1
    assert "@BotFather" in line(lines, "✗ Telegram")
    assert line(lines, "✓ LLM")  # the other parts are still checked


def test_a_webhook_fails_the_check_and_names_the_fix(check, telegram):
    telegram.webhook_url = "https://example.com/hook"
    code, lines = check()
    assert code == 1
    assert "DELETE_WEBHOOK=1" in line(lines, "✗ Telegram: у бота задан вебхук")
    assert telegram.webhook_url and telegram.calls("deleteWebhook") == []  # --check only looks

    code, lines = check(DELETE_WEBHOOK="1")
    assert code == 0 and "DELETE_WEBHOOK=1" in line(lines, "✓ Telegram: задан вебхук")


def test_a_bot_api_server_without_webhook_info_does_not_fail_a_working_token(check, telegram):
    telegram.fail("getWebhookInfo", 404, "Not Found")  # e.g. a minimal self-hosted or proxy server
    code, lines = check()
    assert code == 0
    assert line(lines, "✓ Telegram: токен работает")
    assert "вебхук" in line(lines, "- Telegram")


def test_telegram_out_of_reach_fails(check, telegram):
    telegram.down()
    code, lines = check()
    assert code == 1 and "TELEGRAM_API_URL" in line(lines, "✗ Telegram")


@pytest.mark.parametrize("fault, fix", [
    ("down", "LLM_BASE_URL"),
    ("500", "повторите позже"),
    ("401", "LLM_API_KEY"),
    ("wrong model", "LLM_MODEL"),
])
def test_an_llm_that_gives_no_answer_fails_with_the_fix(check, telegram, llm, fault, fix):
    overrides = {}
    if fault == "down":
        llm.down()
    elif fault == "wrong model":
        llm.models = {"test-model"}
        overrides["LLM_MODEL"] = "no-such-model"
    else:
        llm.status = int(fault)
    code, lines = check(**overrides)
    assert code == 1
    assert fix in line(lines, "✗ LLM")


def test_a_wrong_smtp_password_fails_and_nothing_is_sent(check, telegram, smtp_login):
    code, lines = check(SMTP_PASSWORD="wrong-pass-SECRET")
    assert code == 1
    assert "SMTP_PASSWORD" in line(lines, "✗ Email")
    assert smtp_login.messages == []


def test_an_smtp_server_out_of_reach_fails(check, telegram, smtp_login):
    smtp_login.stop()
    code, lines = check()
    assert code == 1 and "SMTP_HOST" in line(lines, "✗ Email")


def test_a_data_dir_that_cannot_be_created_fails(check, telegram, tmp_path):
    (tmp_path / "leads-file").write_text("a file, not a folder", encoding="utf-8")
    code, lines = check(DATA_DIR=str(tmp_path / "leads-file" / "data"))
    assert code == 1
    assert "DATA_DIR" in line(lines, "✗ DATA_DIR")


def test_a_missing_token_fails_but_the_other_parts_are_checked(check, telegram):
    code, lines = check(TELEGRAM_BOT_TOKEN=None)
    assert code == 1
    assert "TELEGRAM_BOT_TOKEN" in line(lines, "✗ Настройки")
    assert not [text for text in lines if text.startswith("✓ Настройки")]
    assert line(lines, "✓ LLM") and line(lines, "✓ Email") and line(lines, "✓ DATA_DIR")


def test_malformed_settings_are_each_named(check, telegram):
    code, lines = check(SMTP_SECURITY="tls", LLM_TIMEOUT="soon", MANAGER_EMAIL=None)
    assert code == 1
    problems = [text for text in lines if text.startswith("✗ Настройки")]
    for name in ("SMTP_SECURITY", "LLM_TIMEOUT", "MANAGER_EMAIL"):
        assert any(name in text for text in problems), name


def test_speech_recognition_is_probed_when_stt_model_is_set(check, telegram, llm):
    code, lines = check()
    assert "STT_MODEL" in line(lines, "- STT") and llm.transcriptions == []
    code, lines = check(STT_MODEL="whisper-1")
    assert code == 0 and "whisper-1" in line(lines, "✓ STT")
    [probe] = llm.transcriptions
    assert (probe["model"], probe["filename"]) == ("whisper-1", "voice.ogg")
    assert probe["data"].startswith(b"OggS")
    llm.stt_models = ["another-model"]
    code, lines = check(STT_MODEL="whisper-1")
    assert code == 1 and "STT_MODEL" in line(lines, "✗ STT")


def test_a_manager_chat_the_bot_cannot_reach_fails_the_check(check, telegram):
    code, lines = check(MANAGER_CHAT_ID="-1001234567890")  # a group the bot was never added to
    assert code == 1 and "MANAGER_CHAT_ID" in line(lines, "✗ Telegram: чат MANAGER_CHAT_ID недоступен")
    code, lines = check(MANAGER_CHAT_ID="5550001")  # a manager who wrote /start to the bot
    assert line(lines, "✓ Telegram: чат менеджеров доступен"), lines


def readme_block(after):
    """The lines of the first ``` block of README.md after the text `after`."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return text[text.index(after):].split("```\n", 2)[1].splitlines()


def test_readmes_sample_output_is_the_real_output(check, telegram, llm, smtp_login, bot_env):
    """README's run 'with Ollama and email' is this run, with the fakes' names put back."""
    code, lines = check()
    names = {"@test_lead_bot": "@acme_sales_bot", "test-model": "qwen2.5:7b",
             f"127.0.0.1:{smtp_login.port}": "smtp.example.ru:465", bot_env["DATA_DIR"]: "/home/olga/leadbot/data"}
    for fake, sample in names.items():
        lines = [text.replace(fake, sample) for text in lines]
    lines[-1] = lines[-1].partition("Запуск бота: ")[0] + "Запуск бота: .venv/bin/python leadbot.py"
    assert readme_block("Here is a real run") == lines
    code, lines = check(LLM_BASE_URL=None)
    assert line(lines, "- LLM") in readme_block("Lines you may also see")

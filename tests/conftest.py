"""Fixtures for end-to-end tests: fake Telegram, LLM and SMTP servers and a leadbot.py launcher."""

import pytest

from fakes import BotProcess, FakeLLM, FakeSMTP, FakeTelegram, running, start_bot, start_fork_server


@pytest.fixture(autouse=True)
def no_bot_outlives_its_test():
    """A bot started with fakes.start_bot directly is killed at the end of its test too."""
    yield
    while BotProcess.started:
        process = BotProcess.started.pop()
        if process.alive():
            process.kill()
            process.wait()


def pytest_configure(config):
    start_fork_server()  # bots start in milliseconds instead of a quarter of a second (see tests/bot_launcher.py)
    # FakeSMTP(auth=...) takes AUTH over plain text on purpose: tests have no certificates.
    config.addinivalue_line("filterwarnings", "ignore:Requiring AUTH while not requiring TLS:UserWarning")


@pytest.fixture
def telegram():
    yield from running(FakeTelegram())


@pytest.fixture
def llm():
    yield from running(FakeLLM())


@pytest.fixture
def smtp():
    yield from running(FakeSMTP())


@pytest.fixture
def bot_env(tmp_path, telegram, llm, smtp):
    """A complete bot configuration pointing at the fakes, with short timeouts and retries."""
    return {
        "TELEGRAM_BOT_TOKEN": telegram.token,
        "TELEGRAM_API_URL": telegram.url,
        "LLM_BASE_URL": llm.url,
        "LLM_API_KEY": "test-llm-key-SECRET",
        "LLM_MODEL": "test-model",
        "LLM_TIMEOUT": "5",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp.port),
        "SMTP_SECURITY": "none",
        "SMTP_USER": "",
        "SMTP_PASSWORD": "",
        "MAIL_FROM": "bot@example.com",
        "MANAGER_EMAIL": "manager@example.com",
        "DATA_DIR": str(tmp_path / "data"),
        "LOG_LEVEL": "INFO",
        "POLL_TIMEOUT": "2",
        "RETRY_BASE_SECONDS": "0.02",
        "RETRY_MAX_SECONDS": "0.2",
        "OUTBOX_RETRY_SECONDS": "0.05",
        "OUTBOX_RETRY_MAX_SECONDS": "0.3",
    }


@pytest.fixture
def bot(bot_env, tmp_path):
    """start(*args, **overrides) runs leadbot.py against the fakes; an override of None unsets a variable.

    Every bot started is killed at teardown, and its output is printed (pytest shows it on failure).
    """
    started = []

    def start(*args, **overrides):
        process = start_bot({**bot_env, **overrides}, *args, cwd=tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.alive():
            process.kill()
        process.wait()
        print(f"--- leadbot output (exit code {process.proc.returncode}) ---\n{process.output()}")

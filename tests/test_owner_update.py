"""doc/deploy.md's update recipe, run for real: an owner's clone with reworded texts and a .env, an
upstream that changed the same line of prompt.txt; the owner's texts and settings survive, twice."""
import re
import shutil
import subprocess
import sys

import pytest

from fakes import APP_FILES, REPO, _bot_environment

GREETING = "Здравствуйте{name}! Я помощник студии «Пример»."


def recipe():
    """The recipe's command lines, as doc/deploy.md shows them."""
    text = (REPO / "doc" / "deploy.md").read_text(encoding="utf-8")
    block = text.split("<!-- update recipe")[1].split("```")[1]
    return [line.split("  #")[0].strip() for line in block.splitlines()[1:] if line.strip()]


def git(folder, *args):
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True,
                          text=True, env={**_bot_environment({}), "GIT_AUTHOR_NAME": "t",
                                          "GIT_AUTHOR_EMAIL": "t@example.com",
                                          "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}).stdout


def edit(path, old, new):
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def run_recipe(app, saved, bot_env):
    """The recipe's lines in app, with sudo, pip and systemd left out (this test has no service)."""
    lines = [line.replace("/opt/leadbot-saved", str(saved)).replace("/opt/leadbot", str(app))
             .replace("sudo -u leadbot ", "").replace("sudo ", "").replace(".venv/bin/python", sys.executable)
             for line in recipe() if "systemctl" not in line and "pip install" not in line]
    script = "set -e\n" + "\n".join(lines) + "\n"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, encoding="utf-8",
                          env=_bot_environment({**bot_env, "TELEGRAM_BOT_TOKEN": None}), timeout=60)


@pytest.mark.skipif(not shutil.which("git") or not shutil.which("bash"), reason="needs git and bash")
def test_the_update_recipe_keeps_the_owners_texts_and_env_when_upstream_changed_the_same_line(
        tmp_path, bot_env):
    upstream, app, saved = tmp_path / "upstream", tmp_path / "leadbot", tmp_path / "saved"
    upstream.mkdir()
    for name in (*APP_FILES, ".gitignore", "requirements.txt"):
        shutil.copy(REPO / name, upstream / name)
    git(upstream, "init", "-q", "-b", "main")
    git(upstream, "add", "-A")
    git(upstream, "commit", "-qm", "v1")
    git(tmp_path, "clone", "-q", str(upstream), str(app))
    edit(app / "prompt.txt", GREETING, "Добрый день{name}! Я помощник клиники «Улыбка».")  # every owner does
    (app / ".env").write_text("LLM_MODEL=owner-model\n", encoding="utf-8")

    for version in ("v2", "v3"):  # the second update starts from the state the first one left
        prompt = upstream / "prompt.txt"  # the project rewords the very line the owner reworded
        prompt.write_text(re.sub(r"(?m)^Здравствуйте\{name\}! Я помощник студии «Пример[^»]*»",
                                 f"Здравствуйте{{name}}! Я помощник студии «Пример {version}»",
                                 prompt.read_text(encoding="utf-8")), encoding="utf-8")
        (upstream / "leadbot.py").write_text((upstream / "leadbot.py").read_text(encoding="utf-8")
                                             + f"# {version}\n", encoding="utf-8")
        git(upstream, "commit", "-qam", version)
        result = run_recipe(app, saved, bot_env)
        assert result.returncode in (0, 1), result.stderr  # --check's own status is the last one
        assert "Добрый день{name}! Я помощник клиники «Улыбка»." in (app / "prompt.txt").read_text(encoding="utf-8")
        assert (app / "leadbot.py").read_text(encoding="utf-8").endswith(f"# {version}\n")  # the update came
        assert (app / ".env").read_text(encoding="utf-8") == "LLM_MODEL=owner-model\n"
        assert "✓ prompt.txt" in result.stdout and "<<<<<<<" not in (app / "prompt.txt").read_text(encoding="utf-8")
        assert git(app, "status", "--porcelain").split() == ["M", "prompt.txt"]  # nothing else touched


def test_the_recipe_restarts_the_service_after_checking():
    lines = recipe()
    assert any("--check" in line for line in lines)
    assert "systemctl restart leadbot" in lines[-1]
    assert [i for i, line in enumerate(lines) if "cp" in line.split()[:2] and ".env" in line] < \
        [i for i, line in enumerate(lines) if "git pull" in line]  # .env and prompt.txt aside first
    assert re.search(r"git checkout -- prompt\.txt", "\n".join(lines))

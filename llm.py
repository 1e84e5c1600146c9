"""Chat completions from any OpenAI-compatible server (Ollama, LM Studio, llama.cpp, OpenRouter, OpenAI)."""

import logging

import requests

log = logging.getLogger(__name__)

FALLBACK = "Сервис временно недоступен, давайте обменяемся контактами"  # shown when there is no answer


class LLMError(Exception):
    """No usable answer: the text is a short reason without URL or key, .status the HTTP status or None."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


def complete(cfg, system: str, user: str, session: requests.Session | None = None) -> str | None:
    """The model's answer to one system + user message pair, or None if there is no usable answer."""
    try:
        return ask(cfg, system, user, session)
    except LLMError as problem:
        log.warning("LLM %s", problem)
        return None


def ask(cfg, system: str, user: str, session: requests.Session | None = None) -> str:
    """The model's answer to one system + user message pair; raises LLMError when there is none."""
    url = cfg.llm_base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {cfg.llm_api_key}"} if cfg.llm_api_key else {}
    payload = {
        "model": cfg.llm_model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    try:
        response = (session or requests).post(url, json=payload, headers=headers, timeout=cfg.llm_timeout)
    except requests.RequestException as error:
        # str(error) contains the URL, so only the class name is kept.
        raise LLMError(f"request failed: {type(error).__name__}") from None
    if response.status_code // 100 != 2:
        raise LLMError(f"request failed: HTTP {response.status_code}", response.status_code)
    try:
        return _answer(response)
    except ValueError as problem:
        raise LLMError(f"answer malformed: {problem}") from None


def _answer(response: requests.Response) -> str:
    """The stripped choices[0].message.content; ValueError with a short reason if the shape is wrong."""
    try:
        data = response.json()
    except ValueError:
        raise ValueError("not JSON") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ValueError("no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise ValueError("no message")
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ValueError("empty content")
    return content.strip()

"""Chat completions from any OpenAI-compatible server (Ollama, LM Studio, llama.cpp, OpenRouter, OpenAI)."""

import logging

import requests

log = logging.getLogger(__name__)

FALLBACK = "Сервис временно недоступен, давайте обменяемся контактами"


def complete(cfg, system: str, user: str, session: requests.Session | None = None) -> str | None:
    """The model's answer to one system + user message pair, or None if there is no usable answer."""
    url = cfg.llm_base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {cfg.llm_api_key}"} if cfg.llm_api_key else {}
    payload = {
        "model": cfg.llm_model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    try:
        response = (session or requests).post(url, json=payload, headers=headers, timeout=cfg.llm_timeout)
    except requests.RequestException as error:
        # str(error) contains the URL, so only the class name is logged.
        log.warning("LLM request failed: %s", type(error).__name__)
        return None
    if response.status_code // 100 != 2:
        log.warning("LLM request failed: HTTP %s", response.status_code)
        return None
    try:
        return _answer(response)
    except ValueError as problem:
        log.warning("LLM answer malformed: %s", problem)
        return None


def recommend(cfg, system: str, user: str, session: requests.Session | None = None) -> str:
    """The model's answer, or FALLBACK when there is none."""
    return complete(cfg, system, user, session) or FALLBACK


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

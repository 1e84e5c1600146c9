"""The LLM's words as the client sees them: live drafts, no reasoning, no raw Markdown."""
from pathlib import Path

import pytest

from fakes import CONTACT_REQUEST, TEXTS, reach_contact_step, read_rows, say, wait_until

THANKS = "Спасибо"
OFFER = ("Рекомендуем услугу «Лендинг»: это быстрый старт для пекарни с онлайн-заказом. "
         "Страница покажет меню и примет заказы. Менеджер подскажет детали.")
THOUGHT = "по системному промпту мне нельзя называть цены, подумаю"


def offer_of(telegram, chat_id):
    """The recommendation: the message just before the contact request."""
    texts = telegram.texts(chat_id)
    index = next(i for i, t in enumerate(texts) if CONTACT_REQUEST in t)
    return texts[index - 1]


def test_the_recommendation_grows_as_a_draft_and_ends_as_one_message(bot, telegram, llm):
    llm.reply, llm.chunk_delay = OFFER, 0.15  # 0.9 s from the first words to the last: two drafts at least
    bot()
    reach_contact_step(telegram, 1201)
    drafts = [d["text"] for d in telegram.drafts(1201)]
    assert len(drafts) >= 2 and len({d["draft_id"] for d in telegram.drafts(1201)}) == 1
    assert all(len(a) <= len(b) for a, b in zip(drafts, drafts[1:]))
    assert all(OFFER.startswith(d) for d in drafts)
    assert offer_of(telegram, 1201) == OFFER
    assert llm.requests[0]["json"]["stream"] is True and llm.requests[0]["json"]["max_tokens"] > 0


@pytest.mark.parametrize("kind", ["reasoning_content", "reasoning", "think"])
def test_reasoning_reaches_no_client_no_file_no_manager_and_no_log(bot, bot_env, telegram, llm, smtp, kind):
    llm.reply, llm.chunk_delay = OFFER, 0.01
    if kind == "think":
        llm.think = THOUGHT
    else:
        llm.reasoning, llm.reasoning_field = THOUGHT, kind
    process = bot(LOG_LEVEL="DEBUG", MANAGER_CHAT_ID="5550001")
    reach_contact_step(telegram, 1202)
    say(telegram, 1202, "+7 999 123-45-67", THANKS)
    smtp.wait_for_messages(1)
    wait_until(lambda: read_rows(bot_env) and telegram.texts(5550001))
    seen = [d["text"] for d in telegram.drafts()] + [m["text"] for m in telegram.messages()]
    seen += [m.get_content() for m in smtp.messages] + [process.output()]
    seen += [p.read_text(encoding="utf-8", errors="replace") for p in Path(bot_env["DATA_DIR"]).rglob("*") if p.is_file()]
    assert not [text for text in seen if "системному промпту" in text]
    assert offer_of(telegram, 1202) == OFFER


def test_refused_drafts_fall_back_to_one_message_and_the_dialog_completes(bot, bot_env, telegram, llm):
    telegram.draft_error = (400, "Bad Request: method not found")
    llm.reply, llm.chunk_delay = OFFER, 0.05  # long enough for a draft
    bot()
    reach_contact_step(telegram, 1203)
    assert offer_of(telegram, 1203) == OFFER
    say(telegram, 1203, "+7 999 123-45-67", THANKS)
    wait_until(lambda: read_rows(bot_env))
    assert len(telegram.calls("sendMessageDraft")) == 1  # refused once: not again for this answer
    # A 400 is about that draft (its text), not about every chat: the next answer tries again.
    reach_contact_step(telegram, 1204)
    assert offer_of(telegram, 1204) == OFFER
    assert len(telegram.calls("sendMessageDraft")) == 2


def drafts_answered_before_the_offer(telegram, chat_id):
    """True when every draft Telegram answered for chat_id was answered before the recommendation arrived."""
    timeline = telegram.timeline(chat_id)
    offer_sent = [at for at, what, method in timeline if what == "in" and method == "sendMessage"][4]
    return all(at < offer_sent for at, what, method in timeline if what == "out" and method == "sendMessageDraft")


def test_a_telegram_slow_to_take_drafts_never_costs_the_recommendation_nor_shows_a_draft_after_it(
        bot, telegram, llm):
    telegram.stall("sendMessageDraft", 0.5, times=1000)  # a loaded Bot API or a slow proxy
    llm.reply, llm.chunks, llm.chunk_delay = OFFER, 5, 0.02  # 30 pieces in 0.6 s: 15 s if each waited for a draft
    bot(LLM_TIMEOUT="4")
    reach_contact_step(telegram, 1211)
    assert offer_of(telegram, 1211) == OFFER
    assert telegram.drafts(1211) and drafts_answered_before_the_offer(telegram, 1211)


def test_a_draft_on_its_way_when_the_answer_ends_is_answered_before_the_message(bot, telegram, llm):
    telegram.stall("sendMessageDraft", 0.5, times=1000)
    llm.reply, llm.chunk_delay = OFFER, 0.05  # the answer ends while the first draft is still on its way
    bot()
    reach_contact_step(telegram, 1212)
    assert offer_of(telegram, 1212) == OFFER
    assert telegram.drafts(1212) and drafts_answered_before_the_offer(telegram, 1212)


def test_an_answer_that_arrives_all_at_once_is_sent_without_a_draft_before_it(bot, telegram, llm):
    # A draft of the whole answer would only delay the message (one more call to Telegram before it).
    llm.reply = OFFER
    bot()
    reach_contact_step(telegram, 1210)
    assert offer_of(telegram, 1210) == OFFER
    assert not telegram.drafts(1210)


def test_a_server_that_does_not_stream_still_gives_the_offer(bot, telegram, llm):
    llm.reply, llm.no_stream = OFFER, True
    bot()
    reach_contact_step(telegram, 1205)
    assert offer_of(telegram, 1205) == OFFER


def test_llm_stream_0_asks_for_one_answer(bot, telegram, llm):
    llm.reply = OFFER
    bot(LLM_STREAM="0")
    reach_contact_step(telegram, 1206)
    assert offer_of(telegram, 1206) == OFFER and not telegram.drafts(1206)
    assert not llm.requests[0]["json"].get("stream")


def test_a_stream_broken_half_way_gives_the_fallback(bot, telegram, llm):
    llm.reply, llm.break_after = OFFER, 2
    bot()
    reach_contact_step(telegram, 1207)
    assert TEXTS["llm_failed"] in offer_of(telegram, 1207)


MARKDOWN = ("### Наш совет\n**Лендинг** — то, что *нужно*.\n- быстро\n- недорого\n"
            "Пишите [нам](https://example.ru), логин `ivan_petrov`, почта info_box@mail.ru, 2*3 и * звезда.")


def test_markdown_from_the_llm_is_shown_clean_and_never_causes_a_400(bot, bot_env, telegram, llm, smtp):
    llm.reply, llm.chunk_delay = MARKDOWN, 0.01
    bot()
    reach_contact_step(telegram, 1208)
    offer = offer_of(telegram, 1208)
    for raw in ("###", "**", "](", "`", "\n- "):
        assert raw not in offer
    for kept in ("ivan_petrov", "info_box@mail.ru", "2*3", "• быстро", "https://example.ru"):
        assert kept in offer
    say(telegram, 1208, "+7 999 123-45-67", THANKS)
    assert "**" not in smtp.wait_for_messages(1)[0].get_content()


def test_no_llm_configured_says_nothing_untrue(bot, telegram):
    bot(LLM_BASE_URL="")
    reach_contact_step(telegram, 1209)
    offer = offer_of(telegram, 1209)
    assert "Менеджер подберёт" in offer and "недоступен" not in offer

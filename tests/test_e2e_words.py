"""Contacts as people write them, captions, edits and voice messages, against the real bot process."""
import json

from fakes import ANSWERS, CONTACT_REQUEST, QUESTIONS, TEXTS, reach_contact_step, read_rows, say

THANKS = "Спасибо"

# (as the client writes it, the contact the manager gets)
WRITTEN = [
    ("+7 495 123-45-67 доб. 123", "+7 495 123-45-67 доб. 123"),
    ("звоните +7 495 123-45-67, ext. 12", "+7 495 123-45-67, ext. 12"),
    ("8 495 123 45 67 #123", "8 495 123 45 67 #123"),
    ("o'brien@mail.ru", "o'brien@mail.ru"),
    ("ivan@xn--e1afmkfd.xn--p1ai", "ivan@xn--e1afmkfd.xn--p1ai"),
    ("ivan@mail.ruпишите туда", "ivan@mail.ru"),
    ("８ ９１２ ３４５ ６７ ８９", "8 912 345 67 89"),
    ("＋７ ９１２ ３４５－６７－８９", "+7 912 345-67-89"),
    ("٨٩١٢٣٤٥٦٧٨٩", "89123456789"),
    ("telegram.me/ivan_petrov", "@ivan_petrov"),
    ("999 123 45 67", "999 123 45 67"),
    ("мой номер +7 912\n345-67-89", "+7 912 345-67-89"),
]


def contact_of(env, chat_id):
    [row] = [row for row in read_rows(env) if row["chat_id"] == str(chat_id)]
    return row["contact"].lstrip("'")  # a leading + is quoted against spreadsheet formulas


def test_contacts_as_people_write_them_make_the_lead(bot, bot_env, telegram):
    bot()
    for chat_id, (written, contact) in enumerate(WRITTEN, start=3101):
        reach_contact_step(telegram, chat_id)
        say(telegram, chat_id, written, THANKS)
        assert contact_of(bot_env, chat_id) == contact, written


def test_contacts_as_people_write_them_never_reach_the_llm(bot, llm, telegram):
    bot()
    for chat_id, (written, contact) in enumerate(WRITTEN, start=3201):
        calls = llm.calls
        answers = [f"Нужен сайт, {written}", *ANSWERS[1:]]
        say(telegram, chat_id, "/start", "задача")
        for answer in answers:
            before = len(telegram.texts(chat_id))
            telegram.send_text(chat_id, answer)
            telegram.wait_for(lambda: len(telegram.texts(chat_id)) > before, 10, "the bot's answer")
        telegram.wait_for(lambda: llm.calls > calls, 10, "the LLM asked for the offer")
        sent = "\n".join(json.dumps(r["json"], ensure_ascii=False) for r in llm.requests[calls:])
        assert "[контакт]" in sent, written
        for piece in (contact, written, contact.replace(" ", "")[-7:]):
            assert piece not in sent, written


def test_a_pathological_message_is_answered(bot, bot_env, telegram):
    bot()
    reach_contact_step(telegram, 3301)
    hostile = ("1 " * 150 + "a." * 150 + "x@" + "a-" * 150 + "доб. " * 100 + "+7 " * 100)[:2000]
    say(telegram, 3301, hostile, "")  # any answer: the search ended
    say(telegram, 3301, "8 999 123-45-67", THANKS)
    assert contact_of(bot_env, 3301) == "8 999 123-45-67"


def test_a_contact_in_a_caption_is_taken_as_the_text(bot, bot_env, telegram):
    bot()
    reach_contact_step(telegram, 3401)
    before = len(telegram.texts(3401))
    telegram.send_media(3401, "photo", caption="Мой номер +7 999 123-45-67")
    telegram.wait_for(lambda: any(THANKS in t for t in telegram.texts(3401)[before:]), 10, "thanks")
    assert contact_of(bot_env, 3401) == "+7 999 123-45-67"
    reach_contact_step(telegram, 3402)
    before = len(telegram.texts(3402))
    telegram.send_media(3402, "document", caption="пишите на anna@example.ru")
    telegram.wait_for(lambda: any(THANKS in t for t in telegram.texts(3402)[before:]), 10, "thanks")
    assert contact_of(bot_env, 3402) == "anna@example.ru"
    assert not [t for t in telegram.texts(3401) + telegram.texts(3402) if t == TEXTS["text_only"]]


def confirmed(telegram, update_id):
    telegram.wait_for(lambda: telegram.confirmed_offset > update_id, 10, f"update {update_id} confirmed")


def send_kept(telegram, chat_id, text):
    """Sends text as a message the client can edit later; returns its message_id."""
    message = telegram.build_message(chat_id, text=text)
    telegram.push_update({"message": message})
    return message["message_id"]


def test_an_edit_that_adds_the_phone_at_the_contact_step_gives_the_lead(bot, bot_env, telegram):
    bot()
    telegram.wait_for(lambda: telegram.allowed_updates, 10, "getUpdates called")
    assert {"message", "edited_message"} <= set(telegram.allowed_updates)
    reach_contact_step(telegram, 3501)
    before = len(telegram.texts(3501))
    message_id = send_kept(telegram, 3501, "мой телефон 8 999 123-45")  # a digit short
    telegram.wait_for(lambda: TEXTS["contact_format"] in telegram.texts(3501)[before:], 10, "asked again")
    before = len(telegram.texts(3501))
    telegram.edit_text(3501, message_id, "мой телефон 8 999 123-45-67")
    telegram.wait_for(lambda: any(THANKS in t for t in telegram.texts(3501)[before:]), 10, "thanks")
    assert contact_of(bot_env, 3501) == "8 999 123-45-67"


def test_an_edit_without_a_contact_or_before_the_contact_step_is_ignored(bot, bot_env, telegram):
    bot()
    say(telegram, 3601, "/start", "задача")
    first = send_kept(telegram, 3601, ANSWERS[0])
    telegram.wait_for(lambda: len(telegram.texts(3601)) == 3, 10, "the second question")
    confirmed(telegram, telegram.edit_text(3601, first, "Нужен сайт, звоните 8 999 123-45-67"))
    for answer in ANSWERS[1:-1]:
        say(telegram, 3601, answer, "")
    say(telegram, 3601, ANSWERS[-1], CONTACT_REQUEST)
    count = len(telegram.texts(3601))
    confirmed(telegram, telegram.edit_text(3601, first, "Нужен сайт для кондитерской"))
    say(telegram, 3601, "+7 999 123-45-67", THANKS)
    assert len(telegram.texts(3601)) == count + 1  # the edits got no answer of their own
    assert read_rows(bot_env)[0]["contact"].lstrip("'") == "+7 999 123-45-67"


# --- Voice messages -----------------------------------------------------------------------------

VOICE = b"OggS\x00\x02" + bytes(58) + b"voice of chat"
STT = {"STT_MODEL": "whisper-1"}


def test_a_voice_answer_is_transcribed_and_taken_as_the_text(bot, bot_env, telegram, llm):
    process = bot(**STT)
    llm.transcripts.extend(["Нужен сайт для кондитерской", "Запишите номер +7 999 123-45-67"])
    say(telegram, 3701, "/start", "задача")
    before = len(telegram.texts(3701))
    telegram.send_voice(3701, duration=7, data=VOICE)
    telegram.wait_for(lambda: len(telegram.texts(3701)) > before, 10, "the next question")
    assert telegram.texts(3701)[before] == QUESTIONS[1][1]
    [heard] = llm.transcriptions
    assert (heard["model"], heard["filename"], heard["data"]) == ("whisper-1", "voice.ogg", VOICE)
    for answer in ANSWERS[1:-1]:
        say(telegram, 3701, answer, "")
    say(telegram, 3701, ANSWERS[-1], CONTACT_REQUEST)
    before = len(telegram.texts(3701))
    telegram.send_voice(3701, duration=4)
    telegram.wait_for(lambda: any(THANKS in t for t in telegram.texts(3701)[before:]), 10, "thanks")
    [row] = read_rows(bot_env)
    assert row["contact"].lstrip("'") == "+7 999 123-45-67"
    assert "кондитерской" in row["notes"]  # the spoken answer is the answer
    output = process.output()
    for secret in ("кондитерской", "999 123", telegram.token.partition(":")[2]):
        assert secret not in output  # no content and no token in the log


def voice_reply(telegram, chat_id, **voice):
    """Sends a voice message, returns the bot's reply."""
    before = len(telegram.texts(chat_id))
    telegram.send_voice(chat_id, **voice)
    return telegram.wait_reply(chat_id, before)


def test_a_voice_message_not_transcribed_is_answered_honestly(bot, telegram, llm):
    process = bot(**STT, VOICE_MAX_SECONDS="60", LLM_TIMEOUT="1", TELEGRAM_TIMEOUT="1")
    assert voice_reply(telegram, 3801, duration=61) == TEXTS["voice_failed"]  # too long
    too_big = 21 * 1024 * 1024
    assert voice_reply(telegram, 3801, file_size=too_big) == TEXTS["voice_failed"]
    assert llm.transcriptions == [] and telegram.calls("getFile") == []
    llm.stt_fail_times(1)
    assert voice_reply(telegram, 3801) == TEXTS["voice_failed"]  # the STT server failed
    telegram.fail("getFile", 400, "Bad Request: invalid file_id")
    assert voice_reply(telegram, 3801) == TEXTS["voice_failed"]
    telegram.fail("download", 500, "Internal Server Error")
    assert voice_reply(telegram, 3801) == TEXTS["voice_failed"]
    telegram.disconnect("download")  # requests' error names the URL, and the URL the token
    assert voice_reply(telegram, 3801) == TEXTS["voice_failed"]
    llm.stt_delay = 30  # past LLM_TIMEOUT: the deadline answers
    assert voice_reply(telegram, 3801) == TEXTS["voice_failed"]
    output = process.output()
    assert "Traceback" not in output and telegram.token not in output and "/file/" not in output


def test_a_transcription_never_holds_up_other_chats(bot, telegram, llm):
    bot(**STT)
    llm.stt_delay = 3
    telegram.send_voice(3901)
    telegram.wait_for(lambda: llm.transcriptions, 10, "the transcription asked")
    say(telegram, 3902, "/start", "задача")
    assert telegram.texts(3901) == []  # still transcribing while the other chat got its answer
    telegram.wait_for(lambda: telegram.texts(3901), 10, "the voice message answered")
    assert "Здравствуйте" in telegram.texts(3901)[0]  # the transcript began the dialog


def test_a_voice_message_sent_while_the_llm_writes_waits_its_turn(bot, bot_env, telegram, llm):
    bot(**STT)
    llm.transcript = "Запишите номер +7 999 765-43-21"
    llm.delay = 1.5
    say(telegram, 4001, "/start", "задача")
    for answer in ANSWERS[:-1]:
        say(telegram, 4001, answer, "")
    telegram.send_text(4001, ANSWERS[-1])
    telegram.wait_for(lambda: llm.calls, 10, "the LLM writing")
    telegram.send_voice(4001)
    telegram.wait_for(lambda: any(THANKS in t for t in telegram.texts(4001)), 10, "thanks")
    texts = telegram.texts(4001)
    assert texts.index(llm.reply) < len(texts) - 1  # the offer first, then the voice's answer
    assert contact_of(bot_env, 4001) == "+7 999 765-43-21"

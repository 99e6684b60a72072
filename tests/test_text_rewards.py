"""Text rewards for the interaction-RL stage: language, persona, instruction following,
number rendering. Each test checks that a good sample ranks above a bad one."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from posttrain.errors import RewardError
from posttrain.registry import call_reward
from rewards.instruction_following import (
    CONSTRAINT_TYPES,
    check_constraint,
    count_sentences,
    count_words,
    describe_constraint,
    instruction_following,
)
from rewards.language import identify_segments, language, normalize_language_code
from rewards.number_rendering import extract_numbers, number_rendering
from rewards.persona import parse_persona, persona, persona_from_system


def conv(*turns):
    """A TRL conversational prompt from (role, content) pairs."""
    return [{"role": role, "content": content} for role, content in turns]


def reply(text):
    return [{"role": "assistant", "content": text}]


# --------------------------------------------------------------------------- language

GERMAN = "Mir geht es gut, danke der Nachfrage. Heute arbeite ich den ganzen Tag im Garten."
ENGLISH = "I am doing well, thanks for asking. Today I am working in the garden all day."
FRENCH = "Je vais bien, merci. Aujourd'hui je travaille dans le jardin toute la journée."
CHINESE = "我很好，谢谢关心。今天我一整天都在花园里干活。"


def test_language_required_column_ranks_right_language_first():
    scores = language(["Wie geht's?"] * 3, [GERMAN, ENGLISH, CHINESE], language=["de", "de", "de"])
    assert scores[0] == 1.0
    assert scores[1] == 0.0 and scores[2] == 0.0
    zh = language(["?"] * 2, [CHINESE, ENGLISH], language=["zh", "zh"])
    assert zh == [1.0, 0.0]


def test_language_score_is_fraction_of_reply_words():
    half = GERMAN + " " + ENGLISH
    (score,) = language(["?"], [half], language=["de"])
    assert 0.3 < score < 0.7
    assert language(["?"], [GERMAN], language=["de"])[0] > score


def test_language_follows_last_user_turn_in_conversation():
    prompt = conv(
        ("system", "You are a helpful assistant."),
        ("user", "Hello, can you help me with my garden?"),
        ("assistant", "Of course, what do you need?"),
        ("user", "Pouvez-vous me dire quand planter les tomates ?"),
    )
    scores = language(
        [prompt, prompt], [reply(FRENCH), reply(ENGLISH)], follow_user_language=[True, True]
    )
    assert scores[0] == 1.0 and scores[1] == 0.0
    # with no language column at all the user's language is required too
    assert language([prompt, prompt], [reply(FRENCH), reply(ENGLISH)]) == scores


def test_language_follow_user_overrides_language_column():
    prompt = conv(("user", "Wie spät ist es in Tokio gerade?"))
    scores = language(
        [prompt, prompt],
        [GERMAN, ENGLISH],
        language=["en", "en"],
        follow_user_language=[True, "true"],
    )
    assert scores == [1.0, 0.0]


def test_language_code_switching_requires_all_listed_languages():
    mixed = "这个project非常重要，我们明天再讨论一下deadline吧。The client wants a demo by Friday."
    scores = language(["?"] * 4, [mixed, CHINESE, ENGLISH, FRENCH], languages=[["zh", "en"]] * 4)
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx(0.5) and scores[2] == pytest.approx(0.5)
    assert scores[3] == 0.0


def test_language_user_code_switching_allows_mirroring():
    prompt = conv(("user", "我今天有个meeting，很busy，你能帮我安排一下吗？"))
    mirrored = "没问题！meeting之前先把重要的事情做完。"
    scores = language([prompt] * 3, [mirrored, CHINESE, ENGLISH])
    assert scores[0] == 1.0 and scores[1] == 1.0
    assert scores[2] < 0.5


def test_language_segments_split_scripts_within_a_sentence():
    segs = identify_segments("这个project很重要")
    assert [(s.text, s.language) for s in segs] == [
        ("这个", "zh"),
        ("project", "en"),
        ("很重要", "zh"),
    ]
    assert identify_segments("今日はいい天気ですね。")[0].language == "ja"
    assert identify_segments("Привет, как у тебя дела сегодня?")[0].language == "ru"


def test_language_none_without_requirement_or_words():
    assert language(["Hallo"], ["Hallo Welt"], follow_user_language=[False]) == [None]
    assert language(["Wie alt bist du?"], ["42"], language=["de"]) == [None]
    assert language([conv(("system", "Be brief."))], ["Hallo Welt, wie geht es?"]) == [None]


def test_language_normalizes_codes_and_rejects_unknown_with_sample_index():
    assert normalize_language_code("DE-at") == "de"
    assert normalize_language_code("zh_Hans") == "zh"
    assert normalize_language_code("German") == "de"
    with pytest.raises(RewardError) as e:
        language(["?", "?"], [GERMAN, GERMAN], language=["de", "xx"])
    assert "sample 1" in str(e.value) and "'xx'" in str(e.value) and "de, " in str(e.value)


def test_language_through_registry_call():
    values = call_reward(
        "language", language, ["?", "?"], [GERMAN, ENGLISH], {"language": ["de", "de"]}
    )
    assert values == [1.0, 0.0]


# --------------------------------------------------------------------------- persona

CARD = {
    "name": "Mia Schulz",
    "facts": {"age": 34, "city": "Hamburg", "job": "nurse", "favorite food": "Labskaus"},
    "style": {"sign_off": "Cheers, Mia", "formality": "informal", "forbidden": ["honestly"]},
}
SYSTEM_CARD = (
    "Stay in character at all times.\n"
    "Name: Mia Schulz; Age: 34; City: Hamburg; Job: nurse\n"
    'Style: sign_off="Cheers, Mia", formality=informal, forbidden=honestly|literally'
)


def test_persona_consistent_reply_beats_contradicting_ones():
    good = (
        "Moin! My name is Mia, I'm 34 years old and I live in Hamburg. I work as a nurse.\n"
        "Cheers, Mia"
    )
    bad_name = "My name is Anna and I work as a nurse.\nCheers, Mia"
    bad_age = "I'm thirty-five years old, believe it or not.\nCheers, Mia"
    bad_city = "I live in Berlin these days.\nCheers, Mia"
    bad_job = "I work as a software engineer.\nCheers, Mia"
    bad_favorite = "My favourite food is pizza.\nCheers, Mia"
    replies = [good, bad_name, bad_age, bad_city, bad_job, bad_favorite]
    scores = persona([""] * len(replies), replies, persona=[CARD] * len(replies))
    assert scores[0] == 1.0
    assert all(s < scores[0] for s in scores[1:]), scores
    assert scores[1] == pytest.approx(0.5)  # name wrong, job right


def test_persona_number_words_and_other_languages():
    replies = [
        "I'm thirty-four years old.\nCheers, Mia",
        "Ich heiße Mia und wohne in Hamburg.\nCheers, Mia",
        "我叫王芳，我今年三十四岁。\nCheers, Mia",
    ]
    scores = persona([""] * 3, replies, persona=[CARD] * 3)
    assert scores[0] == 1.0 and scores[1] == 1.0
    assert scores[2] == pytest.approx(0.5)  # the name contradicts, the age agrees


def test_persona_breaking_character_scores_zero_unless_ai_persona():
    broken = "As an AI language model, I don't have a home town.\nCheers, Mia"
    fine = "Hamburg is home, love the harbour.\nCheers, Mia"
    assert persona(["", ""], [broken, fine], persona=[CARD, CARD]) == [0.0, 1.0]
    robot = {"name": "Unit 7", "facts": {"job": "AI assistant"}}
    assert persona([""], ["I'm an AI, happy to help."], persona=[robot]) == [1.0]
    assert persona([""], ["I'm out of character for a moment."], persona=[robot]) == [0.0]


def test_persona_style_markers():
    card = {
        "name": "Dr. Weber",
        "style": {
            "greeting": "Good day",
            "sign_off": "Kind regards, Dr. Weber",
            "formality": "formal",
            "required": ["patient"],
            "emoji": "never",
        },
    }
    good = "Good day. The patient should rest for two days.\nKind regards, Dr. Weber"
    casual = "Hey! Yeah, the patient's gonna be fine 😀"
    missing_some = "Good day. Rest for two days."
    scores = persona([""] * 3, [good, casual, missing_some], persona=[card] * 3)
    assert scores[0] == 1.0
    assert scores[1] == 0.2  # only the required word is there
    assert scores[2] == pytest.approx(0.6)  # no sign-off, no "patient"
    informal = {"name": "Mia", "style": {"formality": "informal"}}
    assert persona(
        ["", ""], ["Sure, see you!", "Dear Sir, yours sincerely."], persona=[informal] * 2
    ) == [1.0, 0.0]


def test_persona_card_from_system_message_text_format():
    card = persona_from_system(SYSTEM_CARD)
    assert card.name == "Mia Schulz"
    assert card.facts == {"age": "34", "city": "Hamburg", "job": "nurse"}
    assert card.sign_off == "Cheers, Mia" and card.forbidden == ["honestly", "literally"]
    prompt = conv(("system", SYSTEM_CARD), ("user", "Where do you live?"))
    scores = persona(
        [prompt, prompt],
        [
            reply("I live in Hamburg, right by the harbour.\nCheers, Mia"),
            reply("I live in Munich, literally."),
        ],
    )
    assert scores[0] == 1.0 and scores[1] == 0.0
    # a prose system prompt still names the persona
    prose = conv(("system", "You are Mia, a cheerful nurse."), ("user", "Who are you?"))
    assert persona([prose, prose], [reply("My name is Mia."), reply("My name is Claude.")]) == [
        1.0,
        0.0,
    ]


def test_persona_card_parsers_agree():
    text = 'Name: Mia; Facts: age=34, city=Hamburg; Style: sign_off="Cheers, Mia", emoji=never'
    from_text = parse_persona(text)
    from_json = parse_persona(
        json.dumps(
            {"name": "Mia", "age": 34, "city": "Hamburg", "sign_off": "Cheers, Mia", "emoji": False}
        )
    )
    assert from_text == from_json


def test_persona_facts_stated_in_earlier_turns_must_hold():
    prompt = conv(
        ("system", "Name: Mia"),
        ("user", "What's your favourite colour?"),
        ("assistant", "My favorite color is green, like the Elbe meadows."),
        ("user", "Tell me again, which colour do you like best?"),
    )
    replies = [reply("My favorite color is still green!"), reply("My favorite color is red.")]
    assert persona([prompt, prompt], replies) == [1.0, 0.0]
    assert persona([prompt, prompt], replies, track_stated_facts=False) == [1.0, 1.0]


def test_persona_none_without_card_and_errors_name_sample():
    assert persona([conv(("user", "hi"))], ["hello"]) == [None]
    assert persona(["hi"], ["hello"], persona=[None]) == [None]
    with pytest.raises(RewardError) as e:
        persona(
            ["", ""], ["a", "b"], persona=[CARD, {"name": "Mia", "style": {"formality": "posh"}}]
        )
    assert "sample 1" in str(e.value) and "formal" in str(e.value)


# --------------------------------------------------------------------------- instruction following

# (constraint, a reply that satisfies it, a reply that violates it)
CONSTRAINT_CASES = [
    (
        {"type": "max_words", "value": 5},
        "Tomatoes need sun.",
        "Tomatoes need plenty of sun and water every day.",
    ),
    ({"type": "min_words", "value": 5}, "Tomatoes need plenty of sun.", "Sun."),
    (
        {"type": "max_sentences", "value": 1},
        "Plant them in May.",
        "Plant them in May. Water daily.",
    ),
    ({"type": "min_sentences", "value": 2}, "Plant in May. Water daily!", "Plant in May."),
    (
        {"type": "required_keywords", "value": ["tomato", "May"]},
        "Plant the tomato in May.",
        "Plant it in June.",
    ),
    (
        {"type": "forbidden_keywords", "value": "basically"},
        "Plant in May.",
        "Basically, plant in May.",
    ),
    ({"type": "json_format"}, '```json\n{"month": "May"}\n```', "month: May"),
    ({"type": "bullet_list", "value": 3}, "- sun\n- water\n- soil", "* sun\n* water"),
    (
        {"type": "language", "value": "de"},
        "Pflanze die Tomaten im Mai, wenn es warm ist.",
        "Plant the tomatoes in May.",
    ),
    (
        {"type": "starts_with", "value": "Dear gardener"},
        "Dear gardener, plant in May.",
        "Hi, plant in May.",
    ),
    (
        {"type": "ends_with", "value": "Happy planting!"},
        "Plant in May. Happy planting! ",
        "Happy planting! Plant in May.",
    ),
    ({"type": "all_lowercase"}, "plant in may.", "Plant in May."),
    ({"type": "all_uppercase"}, "PLANT IN MAY!", "PLANT in May!"),
    (
        {"type": "num_paragraphs", "value": 2},
        "First, sow.\n\nThen, water.",
        "First, sow. Then, water.",
    ),
]


def test_every_constraint_type_is_tested():
    assert {c["type"] for c, _, _ in CONSTRAINT_CASES} == set(CONSTRAINT_TYPES)


@pytest.mark.parametrize(
    "constraint,good,bad", CONSTRAINT_CASES, ids=[c["type"] for c, _, _ in CONSTRAINT_CASES]
)
def test_check_constraint_true_and_false(constraint, good, bad):
    assert check_constraint(constraint, good) is True
    assert check_constraint(constraint, bad) is False
    scores = instruction_following(
        ["?", "?"], [good, bad], constraints=[[constraint], [constraint]]
    )
    assert scores == [1.0, 0.0]


def test_instruction_following_fraction_conversational_and_json_column():
    constraints = [
        {"type": "max_words", "value": 10},
        {"type": "required_keywords", "value": ["May"]},
        {"type": "all_lowercase"},
        {"type": "ends_with", "value": "good luck"},
    ]
    prompt = conv(
        ("user", "Keep it under 10 words, mention May."),
        ("assistant", "ok"),
        ("user", "When to plant?"),
    )
    scores = instruction_following(
        [prompt] * 3,
        [
            reply("plant them in May, good luck"),
            reply("plant them in june"),
            reply("Plant Them Around June Or July."),
        ],
        constraints=[constraints, json.dumps(constraints), constraints],
    )
    assert scores == [0.75, 0.5, 0.25]


def test_instruction_following_counting_rules():
    assert count_words("我喜欢 tomatoes!") == 4
    assert count_sentences("It is 3.5 km away. Really? Yes") == 3


def test_instruction_following_none_and_errors():
    assert instruction_following(["?", "?"], ["a", "b"], constraints=[None, []]) == [None, None]
    assert instruction_following(["?"], ["a"]) == [None]
    with pytest.raises(RewardError) as e:
        instruction_following(
            ["?", "?"],
            ["a", "b"],
            constraints=[[{"type": "max_words", "value": 3}], [{"type": "rhymes", "value": 2}]],
        )
    message = str(e.value)
    assert (
        "sample 1" in message
        and "'rhymes'" in message
        and "max_words" in message
        and "bullet_list" in message
    )
    with pytest.raises(RewardError, match="sample 0.*integer"):
        instruction_following(["?"], ["a"], constraints=[[{"type": "max_words", "value": "many"}]])
    with pytest.raises(RewardError, match="sample 0.*language code"):
        instruction_following(
            ["?"], ["a"], constraints=[[{"type": "language", "value": "klingon"}]]
        )


def test_describe_constraint_for_conversation_generators():
    assert describe_constraint({"type": "max_words", "value": 20}) == "Answer in at most 20 words."
    assert describe_constraint({"type": "language", "value": "de"}) == "Answer in German."
    assert (
        describe_constraint({"type": "forbidden_keywords", "value": ["very"]})
        == 'Do not use the words "very".'
    )
    for kind in CONSTRAINT_TYPES:
        value = {
            "language": "fr",
            "required_keywords": ["x"],
            "forbidden_keywords": ["x"],
            "starts_with": "Hi",
            "ends_with": "Bye",
        }.get(kind, 3)
        assert describe_constraint({"type": kind, "value": value})


# --------------------------------------------------------------------------- number rendering


def values(text):
    return [(m.value, m.style) for m in extract_numbers(text)]


def test_extract_numbers_digits_words_dates_units():
    assert values("It costs $5.50 for 1,000 people, -7 and 3 million.") == [
        ((Decimal("5.5"), "USD"), "digits+symbol"),
        (Decimal(1000), "digits"),
        (Decimal(-7), "digits"),
        (Decimal(3000000), "digits"),
    ]
    assert values("one hundred and five, forty-two, three point one four, minus seven") == [
        (Decimal(105), "words"),
        (Decimal(42), "words"),
        (Decimal("3.14"), "words"),
        (Decimal(-7), "words"),
    ]
    assert values("March 3rd, 2024 and 2024-03-03 and the third of March, twenty twenty-four") == [
        (("date", 2024, 3, 3), "digits"),
        (("date", 2024, 3, 3), "numeric"),
        (("date", 2024, 3, 3), "words"),
    ]
    assert values("5 km, five kilometres, 50% and fifty percent, the 21st and twenty-first") == [
        ((Decimal(5), "km"), "digits+symbol"),
        ((Decimal(5), "km"), "words+word"),
        ((Decimal(50), "%"), "digits+symbol"),
        ((Decimal(50), "%"), "words+word"),
        (("ordinal", 21), "digits"),
        (("ordinal", 21), "words"),
    ]
    assert values("at 10:30 pm or 22:30") == [(("time", 22, 30), "digits")] * 2
    assert values("Oh, one of them may come in a second.") == []


def test_number_rendering_right_style_beats_wrong_style_beats_wrong_value():
    reference = "I ran 5 km in 42 minutes on March 3rd, 2024."
    completions = [
        "I ran 5 km in 42 minutes on March 3rd, 2024.",
        "I ran five kilometres in forty-two minutes on the third of March, twenty twenty-four.",
        "I ran 6 km in 40 minutes on March 4th, 2024.",
    ]
    scores = number_rendering(["?"] * 3, completions, reference=[reference] * 3)
    assert scores == [1.0, 0.5, 0.0]


def test_number_rendering_words_reference_and_partial_credit():
    reference = "The tower is three hundred metres tall and was finished in eighteen eighty-nine."
    scores = number_rendering(
        ["?"] * 4,
        [
            "The tower is three hundred metres tall and was finished in eighteen eighty-nine.",
            "The tower is three hundred metres tall and was finished in 1889.",
            "The tower is 300 m tall and was finished in 1889.",
            "The tower is three hundred metres tall.",
        ],
        reference=[reference] * 4,
        style_credit=0.25,
    )
    assert scores == [1.0, 0.625, 0.25, 0.5]


def test_number_rendering_text_column_count_extra_and_conversational():
    prompt = conv(("user", "Read this aloud."))
    scores = number_rendering(
        [prompt, prompt],
        [reply("Meet at 7 on May 5th."), reply("Meet at 7 or 8 on May 5th.")],
        text=["Meet at 7 on May 5th.", "Meet at 7 on May 5th."],
        count_extra=True,
    )
    assert scores == [1.0, pytest.approx(2 / 3)]


def test_number_rendering_none_without_reference_numbers():
    assert number_rendering(["?", "?"], ["42", "42"], reference=[None, "no numbers here"]) == [
        None,
        None,
    ]
    assert number_rendering(["?"], ["42"]) == [None]

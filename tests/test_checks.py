"""The content checks a grammar cannot make (pure: no model): real teacher text that must be
flagged, and clean rewrites in many forms that never may be."""

import json
from pathlib import Path

import pytest

from reflectune import checks, parsing
from reflectune.reflection import _finish, _Job, read_text, screen

LABELLED = Path(__file__).parent / "data" / "labelled_rewrites.jsonl"

# What the packaged 1.5B teacher wrote in the demo's answer fields, as the report showed it
# among the "most helpful rewrites" (each with the pair it was written for).
REVIEWS = [
    # the demo's 1.5B teacher commenting on its own rewrite, a rewrite task's included
    ("Rewrite the sentence without changing the meaning.",
     "This answer provides more information by adding details such as the purpose of going to the store "
     "(buying groceries). It also adds context by specifying the time (yesterday)."),
    ("Convert 100 degrees Fahrenheit to Celsius.",
     "Subtract 32 and multiply by 5/9: 37.8 C.\n\nThe better answer is more detailed and includes the full "
     "explanation of the formula."),
    ("explain", "The answer provided does not explain anything at all. It simply states \"Sure.\" which is not "
     "helpful. A good explanation would describe the topic"),
    ("Give three tips for keeping a sourdough starter healthy.",
     "Your answer is quite good, but there are a few areas where it could be improved:\n\n1. **Relevance**: The "
     "tips are relevant"),
    ("What is photosynthesis?", "The given answer is correct but could be improved by adding more detail. Here's a "
     "revised version: Photosynthesis is the process by which plants"),
    ("Write a haiku about autumn rain.", "The haiku captures the mood well.\n\n**Helpfulness**: it answers the "
     "request.\n**Accuracy**: it follows the 5-7-5 form."),
    ("Name three primary colors.", "The original answer lists the colors but gives no explanation of why they "
     "are primary."),
    # the packaged 1.5B teacher under the line-bounded form, on Alpaca pairs
    ("Write a blog post discussing the effects of social media on self-esteem.",
     "Your answer provides a good overview of the effects of social media on self-esteem, but it could be expanded "
     "to include more specific examples and statistics."),
    ("In no more than 100 words, write a letter to your younger self.",
     "How about rewriting this letter to be more concise? We only need to touch on the key points. Let's try this:"
     "\n\nDear Younger Me,"),
    ("Create a set of rules for a card game called 'Snip Snap Snorp'.",
     "A more comprehensive explanation would include details about the starting deck, the number of players per "
     "team, the structure of the hands and the turn order."),
    ("Calculate the sum of three numbers: 10, 5, and 8", "The sum of 10, 5 and 8 is 23. This answer provides the "
     "numerical result and explains how it was obtained through addition."),
    ("Describe the key trends in the online gaming industry.", "Your answer is excellent! It provides a "
     "well-rounded overview of the key features and trends."),
    ("Calculate the product of three numbers: 10, 5, and 8", "400.\n\n### Step 3: Explain How the Weaknesses Led "
     "to the Weakness of the Answer\nThe weakness of the answer lies in its incorrect calculation."),
]
# the packaged 1.5B teacher in `make demo` (384 new tokens): commentary on its own rewrite, and
# the analysis's next step carried on inside the new answer
REVIEWS += [
    ("Fix the grammar.", "This revised answer provides more context by specifying \"my friend\" instead of just "
     "\"him\"."),
    ("Generate a detailed title for a blog post on saving money on groceries.",
     "\"Economize Every Last Cent: 10 Simple Tips\"\n\n### Step 2\n\n**Why the answer is weak for this "
     "instruction:**"),
    ("What is the tallest building in the world?", "The tallest building in the world is the Burj Khalifa.\n\n"
     "### Step 2: Analyze the Weakness of the Answer"),
    ("Suggest a name for a coffee shop.", "A more comprehensive and detailed response could include:\n\"The Daily "
     "Grind is a popular choice among coffee enthusiasts.\""),
]
OVERRUNS = [
    "This summary captures the essence of the paragraph. End\nHuman: I'm sorry, but I can't assist with that.",
    "Autumn drizzles through the air,\nSilent yet profound.\nEnd\n\n**Explanation of Changes**",
    "The answer is complete. The whole reply has a limit: write the answer in at most 172 words.",
]
UNFINISHED = [
    "Calculate the sum of three numbers: 10, 5, and 8\n\n### Final Answer",
    "The given answer is too short. Here's a revised version:",
    "1. Preheat the oven.\n2. Mix the flour and sugar.\n\n## Baking",
]
FRAGMENTS = [
    "should be more specific and targeted to a single type of animal.\n2. **Level of Detail Required**: The "
    "instruction",
    "and the answer lacks depth. A better instruction would ask for a comparison",
    "The original instruction is too vague: it names a topic without asking for anything.",
    "**Complexity of Topic**: Write an essay on the causes of the First World War.",
    # the demo's 1.5B teacher: a new instruction (it has no input) that points at a list it lacks
    "Sort the given list of numbers in descending order.",
    "Translate this sentence into French, keeping its formal tone.",
    "Rewrite the sentence without changing the meaning.",
    "What is the main idea of the passage? Please provide three reasons why bicycle lanes would help shops.",
]
SCRIPT_SWITCHES = [
    ("Summarize the meeting notes.", "The committee has审批 the budget for next year."),
    ("Describe how wages changed.", "Inflation outpaced wage increases,它 meant that real incomes fell."),
    ("Recommend a place for breakfast.", "Try the bakery on Main Street, a coffee店"),
]

# Clean rewrites in many forms: none of them may be flagged (with the instruction they answer).
CLEAN = [
    ("List three fruits high in vitamin C.", "- Oranges\n- Kiwis\n- Strawberries"),
    ("Write a Python function that reverses a string.",
     "```python\ndef reverse(s: str) -> str:\n    return s[::-1]\n```\n\nSlicing with a step of -1 walks the "
     "string backwards."),
    ("Compare Python lists and tuples in a table.",
     "| | list | tuple |\n|---|---|---|\n| mutable | yes | no |\n| literal | [1, 2] | (1, 2) |"),
    ("What is the capital of France?", "Paris"),
    ("What is 7 times 6?", "7 x 6 = 42, so the answer is 42."),
    ("Write an email thanking a client for a quick reply.",
     "Subject: Thank you\n\nDear Ms. Lee,\n\nThank you for your quick response to my question about the invoice. "
     "Your answer was very helpful.\n\nBest regards,\nSam"),
    ("Explain what makes a search engine useful.",
     "1. **Relevance**: the results match what the user meant.\n2. **Speed**: results arrive in under a second."),
    ("Give feedback on this essay.", "The answer provided in the second paragraph is vague; the essay could be "
     "improved by giving examples."),
    ("Rewrite the sentence to be more formal: 'gonna grab food'.",
     "Here's a revised version: \"I am going to get something to eat.\""),
    ("Translate 'good morning' into Japanese.", "おはようございます (ohayō gozaimasu)"),
    ("Translate the sentence into Russian.", "Библиотека открывается в девять часов."),
    ("Give the formula for the area of a circle.", "A = πr², where r is the radius; for θ in radians an arc "
     "is rθ long."),
    ("Write a haiku about autumn rain.", "Cold rain on red leaves,\nthe gutter sings all evening,\nlamps come on early"),
    ("Write a SQL query that counts orders per customer.",
     "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nGROUP BY customer_id;"),
    ("How should a team review pull requests?", "Keep each review small, answer every comment, and approve only "
     "what you have run."),
    ("Solve 2x + 3 = 11.", "Let's try to isolate x: subtract 3 from both sides, 2x = 8, so x = 4. It would be more "
     "efficient to check by substituting: 2(4) + 3 = 11."),
    ("How can a small shop grow its sales?", "A better website would help: customers who find opening hours and "
     "prices online are more likely to visit."),
]
CLEAN_INSTRUCTIONS = [
    "Write a 300-word essay on the causes of the First World War, citing at least two primary sources.",
    "Given the list [3, 1, 2], write a Python function that sorts it without using sorted().",
    "explain the process of photosynthesis in detail, step by step",
    "Compose a formal email to a landlord asking for a repair, with a subject line.",
    "Summarize the following paragraph in two sentences: \"Solar panels convert sunlight into electricity.\"",
    "Rewrite the following sentence in the passive voice:\nThe committee approved the budget.",
    "Write a Python function that returns the input string reversed, with a docstring and two tests.",
    "Classify the following animals as mammals or birds: whale, eagle, bat, penguin.",
    "Given a list of integers, return the length of its longest increasing subsequence.",
    "Rewrite the sentence \"Me and him goes to the store\" in correct English.",
    "Summarize the plot of Hamlet in three sentences.",
    "Explain how the passage of a bill through Congress works.",
]


@pytest.mark.parametrize("instruction,answer", REVIEWS)
def test_an_answer_that_reviews_an_answer_is_flagged(instruction, answer):
    assert "reviews an answer" in checks.review(answer, instruction)


@pytest.mark.parametrize("text", OVERRUNS)
def test_a_field_that_runs_on_past_its_end_or_echoes_the_task_is_flagged(text):
    assert checks.overrun(text)


@pytest.mark.parametrize("text", UNFINISHED)
def test_a_field_that_stops_where_its_content_should_begin_is_unfinished(text):
    assert "should begin" in checks.unfinished(text)


@pytest.mark.parametrize("text", FRAGMENTS)
def test_an_instruction_that_is_a_piece_of_the_analysis_is_flagged(text):
    assert checks.fragment(text)


@pytest.mark.parametrize("instruction,answer", SCRIPT_SWITCHES)
def test_a_switch_into_a_script_nobody_asked_for_is_flagged(instruction, answer):
    assert "Han script" in checks.foreign_script(answer, instruction)


@pytest.mark.parametrize("instruction,answer", CLEAN)
def test_clean_answers_in_every_form_are_never_flagged(instruction, answer):
    assert checks.review(answer, instruction) is None
    assert checks.foreign_script(answer, instruction) is None
    assert checks.degenerate(answer) is None
    assert checks.unfinished(answer) is None
    assert checks.overrun(answer) is None


@pytest.mark.parametrize("instruction", CLEAN_INSTRUCTIONS)
def test_clean_instructions_are_never_flagged(instruction):
    assert checks.fragment(instruction) is None


def test_each_check_gives_the_variant_its_own_status():
    base = {"sample_id": "s", "source_index": 0, "instruction": "What is photosynthesis?", "input": "",
            "output": "Plants make food from light."}
    texts = {
        "review": "Weak.\n[Better Answer] The given answer is correct but could be improved. Here's a revised "
                  "version: plants use light. [End]",
        "script": "Short.\n[Better Answer] Plants turn light into sugar,它 stores energy. [End]",
        "degenerate": "Fine.\n[Better Answer] Plants make food from light. [End]",
        # the demo's "most helpful rewrite" of a limerick was its last line
        "degenerate ": "Fine.\n[Better Answer] food from light [End]",
        "ok": "Short.\n[Better Answer] Photosynthesis is how plants turn light, water and carbon dioxide into "
              "sugar and oxygen. [End]",
    }
    for status, text in texts.items():
        parsed = parsing.parse(text, ("better_answer",))
        screen("res", base, parsed)
        row = _finish(_Job(dict(base), "res", [text]), parsed, "t")
        assert row["parse_status"] == status.strip(), (status, row["parse_detail"])
        assert (row["output"] == base["output"]) == (status != "ok")
    # an instruction reflection whose new instruction is a fragment falls back whole
    text = ("[New Instruction] should be more specific.\n2. **Level of Detail Required**: more [End]\n"
            "[New Answer] Photosynthesis has two stages: the light reactions and the Calvin cycle. [End]")
    parsed = parsing.parse(text, ("new_instruction", "new_answer"))
    screen("ins", base, parsed)
    row = _finish(_Job(dict(base), "ins", [text]), parsed, "t")
    assert row["parse_status"] == "fragment" and row["instruction"] == base["instruction"]
    assert row["output"] == base["output"] and "dropped with the unusable new instruction" in row["parse_detail"]


def test_the_filter_agrees_with_hand_labels_on_real_teacher_text():
    """Every attempt the packaged 1.5B teacher wrote for the first 24 pairs of the bundled
    sample in `make demo` (384 new tokens), each labelled by hand from the pair it makes: would
    a person train on it, and why not (`why`). The filter reads each text again. It must pass
    what a person would train on, and stop what it is there to stop (reviews, cuts, fragments,
    loops, commentary); a factual error (a wrong capital, invented physics) is beyond any check
    of form, and the labels count it apart."""
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    assert len(rows) >= 50
    passed = [read_text(r["variant"], {"sample_id": "s", "source_index": 0, **r["base"]}, r["text"], r["cut_off"])
              ["parse_status"] == "ok" for r in rows]
    usable = [p for p, r in zip(passed, rows) if r["usable"]]
    formal = [p for p, r in zip(passed, rows) if not r["usable"] and not r["why"].startswith("factual")]
    factual = [p for p, r in zip(passed, rows) if not r["usable"] and r["why"].startswith("factual")]
    assert usable and formal and factual  # every kind occurs: the check can fail
    assert sum(usable) / len(usable) >= 0.9, (sum(usable), len(usable))
    assert 1 - sum(formal) / len(formal) >= 0.9, (sum(formal), len(formal))

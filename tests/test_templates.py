"""The `chat` template says a pair the same way where the student meets it: scored, trained
and evaluated with the instruction and the input joined by a blank line."""

from types import SimpleNamespace

import polars as pl

from reflectune import evaluation, templates, training
from reflectune.reflection import Sampling

PAIR = {"instruction": "Translate the sentence into French.", "input": "The library opens at nine.",
        "output": "La bibliothèque ouvre à neuf heures."}
JOINED = "Translate the sentence into French.\n\nThe library opens at nine."


class RecordingChatEngine:
    """Keeps the conversations it is asked to continue."""

    def __init__(self):
        self.chats = []

    def generate(self, chats, sampling):
        self.chats += chats
        return [SimpleNamespace(text="Bonjour.", error=None) for _ in chats]


def test_chat_joins_instruction_and_input_the_same_way_in_scoring_training_and_evaluation(tokenizer):
    assert templates.user_turn(PAIR["instruction"], PAIR["input"]) == JOINED
    assert templates.user_turn(PAIR["instruction"]) == PAIR["instruction"]
    # scoring: the prompt P(x) the student's chat template renders around the user turn
    scored = templates.render("chat", PAIR["instruction"], PAIR["input"], tokenizer)
    assert scored == tokenizer.apply_chat_template([{"role": "user", "content": JOINED}], add_generation_prompt=True,
                                                   tokenize=False)
    # training: the user turn of the example
    [example] = training.examples(pl.DataFrame([PAIR]), "chat")
    assert example["prompt"] == [{"role": "user", "content": JOINED}]
    # evaluation: the conversation the trained student is asked to continue
    engine = RecordingChatEngine()
    assert evaluation.answer(engine, [PAIR], "chat", Sampling(max_new_tokens=8)) == ["Bonjour."]
    assert engine.chats == [[{"role": "user", "content": JOINED}]]

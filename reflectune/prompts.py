"""Teacher prompts: instruction reflection and response reflection (docs/method.md).

Each prompt is a system + user chat: the system message holds the whole task (criteria and
output format) and is the same for every pair, the user message holds the pair. A constant
prefix lets a serving engine with prefix caching (vLLM) compute the task text once for a
whole shard. The version id is recorded with every output, so a change of wording never
mixes with earlier results (and is part of every cache key).
"""

from __future__ import annotations

INSTRUCTION_VERSION = "instruction-reflection/v3"
RESPONSE_VERSION = "response-reflection/v3"
VERIFY_VERSION = "verify/v1"

Messages = list[dict[str, str]]

_INSTRUCTION_SYSTEM = (
    "You are a meticulous reviewer of training data for AI assistants. You judge instructions "
    "critically and you write demanding, self-contained instructions with excellent answers."
)

_INSTRUCTION_TASK = """You will be shown an instruction and the answer it received. Review them, then improve them.

1. Explain why the instruction is weak as training data. Judge its complexity of topic, the level of detail it asks for, the knowledge it requires, how ambiguous it is, and the logical reasoning or problem solving it involves.
2. Explain why the answer is weak for this instruction. Judge its helpfulness, relevance, accuracy and level of detail.
3. Explain how the weaknesses of the instruction led to the weaknesses of the answer.
4. Write a new instruction that is complete, more complex and harder to answer directly. It must be related to the original instruction but independent of it: someone who never saw the original can answer it, so include any text or data it needs.
5. Answer the new instruction accurately and as detailed as possible.

Keep the review of steps 1-3 short, a few sentences: the new instruction and its answer are what matter.{room} Finish with the new instruction and its answer in exactly this format:
[New Instruction] your instruction [End]
[New Answer] your answer [End]"""

_RESPONSE_SYSTEM = (
    "You are a meticulous reviewer of training data for AI assistants. You judge answers "
    "critically and you write complete, accurate and detailed answers."
)

_RESPONSE_TASK = """You will be shown an instruction, sometimes with an input that gives it context, and the answer it received. Review the answer for the instruction and its input.

1. Explain why the answer is not good enough. Judge its helpfulness, relevance, accuracy and level of detail.
2. Based on that review, write a better answer: new, complete, accurate and as detailed as possible.

Keep the review of step 1 short, a few sentences: the better answer is what matters.{room} Finish with the better answer in exactly this format:
[Better Answer] your answer [End]"""


def _pair_block(instruction: str, input: str, output: str) -> str:
    parts = [f"[Instruction]\n{instruction}\n"]
    if input:
        parts.append(f"[The Start of Input]\n{input}\n[The End of Input]\n")
    parts.append(f"[The Start of Answer]\n{output}\n[The End of Answer]\n")
    return "\n".join(parts)


# Words of English prose per token, for telling the teacher its room in words.
WORDS_PER_TOKEN = 0.75
# The share of a request's tokens the answer may count on: the analysis (and a new
# instruction) take the rest (reflectune.formats bounds the analysis at 30-35%).
ANSWER_SHARE = 0.6


def room(max_new_tokens: int | None) -> str:
    """The sentence that tells the teacher how long its answer may be: a teacher that does not
    know its token limit writes an answer "as detailed as possible" that the limit cuts, and a
    cut answer is unusable. Empty where there is no limit to tell."""
    if not max_new_tokens:
        return ""
    words = int(max_new_tokens * WORDS_PER_TOKEN * ANSWER_SHARE)
    return f" The whole reply has a limit: write the answer in at most {words} words, so that it ends complete."


def instruction_reflection(instruction: str, input: str, output: str, max_new_tokens: int | None = None) -> Messages:
    """Messages asking the teacher for a harder, self-contained instruction and its answer;
    `max_new_tokens`, the request's limit, is told to the teacher in words (`room`)."""
    return [
        {"role": "system", "content": _INSTRUCTION_SYSTEM + "\n\n" + _INSTRUCTION_TASK.format(room=room(max_new_tokens))},
        {"role": "user", "content": _pair_block(instruction, input, output) + "\nReview and improve this pair as instructed."},
    ]


def response_reflection(instruction: str, input: str, output: str, max_new_tokens: int | None = None) -> Messages:
    """Messages asking the teacher for a better answer to the same instruction (and input);
    `max_new_tokens` as in `instruction_reflection`."""
    closing = "Review this answer and write a better one as instructed."
    return [
        {"role": "system", "content": _RESPONSE_SYSTEM + "\n\n" + _RESPONSE_TASK.format(room=room(max_new_tokens))},
        {"role": "user", "content": _pair_block(instruction, input, output) + "\n" + closing},
    ]


_VERIFY_TASK = """Below is an instruction and a reply written for it.

{pair}
Is the reply a complete answer to the instruction, with no commentary about another answer? It is not when it reviews, grades or describes some other answer instead of answering, stops in the middle, or is not in the language the instruction asks for. Answer with one word: Yes or No."""


def verification(instruction: str, input: str, output: str) -> Messages:
    """Messages asking the teacher (teacher.verify) whether a rewrite is usable as it stands:
    one word, Yes or No."""
    pair = f"[Instruction]\n{instruction}\n" + (f"\n[Input]\n{input}\n" if input else "") + f"\n[Reply]\n{output}\n"
    return [{"role": "user", "content": _VERIFY_TASK.format(pair=pair)}]

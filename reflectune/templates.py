"""Training prompt templates P(x) that the student is scored (and trained) with.

The response follows the template with no separator, as in the reference code.
"""

from __future__ import annotations

from typing import Any

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# name -> (without input, with input)
TEXT_TEMPLATES = {
    "vicuna": (
        VICUNA_SYSTEM + " USER: {instruction} ASSISTANT:",
        VICUNA_SYSTEM + " USER: {instruction}\nInput:\n{input} ASSISTANT:",
    ),
    "alpaca": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
    ),
    "wizardlm": (
        "{instruction}\n\n### Response:",
        "{instruction}\n{input}\n\n### Response:",
    ),
}
TEMPLATES = (*TEXT_TEMPLATES, "chat")
DEFAULT_TEMPLATE = "vicuna"

# R(y): the reverse prompt of r-IFD, wrapped in P(.) as an instruction without input.
REVERSE_PROMPT = (
    "Below is the response to an instruction, please guess the corresponding instruction for the "
    "given response.\n{response}\nGenerate the instruction for the above response."
)


def check_template(name: str) -> None:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template '{name}': choose one of {', '.join(TEMPLATES)}")


def user_turn(instruction: str, input: str = "") -> str:
    """The user's message of the `chat` template: the instruction, and the input after a blank
    line. Scoring, training and evaluation all say it this way."""
    return f"{instruction}\n\n{input}" if input else instruction


def render(name: str, instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """P(x): the prompt text that precedes the response."""
    if name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a student whose tokenizer has a chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_turn(instruction, input)}], add_generation_prompt=True, tokenize=False
        )
    check_template(name)
    plain, with_input = TEXT_TEMPLATES[name]
    if input:
        return with_input.format_map({"instruction": instruction, "input": input})
    return plain.format_map({"instruction": instruction})


# How the r-IFD side joins instruction and input: the reference concatenates them as they are.
JOINS = {"none": "", "newline": "\n"}
DEFAULT_JOIN = "none"


def question(instruction: str, input: str = "", join: str = DEFAULT_JOIN) -> str:
    """x as the r-IFD side sees it: the instruction, followed by the input when there is one."""
    if join not in JOINS:
        raise ValueError(f"unknown input join '{join}': choose one of {', '.join(JOINS)}")
    return f"{instruction}{JOINS[join]}{input}" if input else instruction


def reverse(name: str, response: str, tokenizer: Any = None) -> str:
    """P(R(y)): the templated reverse prompt that precedes the instruction."""
    return render(name, REVERSE_PROMPT.format_map({"response": response}), "", tokenizer)

"""The paper's released method, re-derived in the plain way, sharing no code with reflectune:
its own prompt templates, one pair at a time, four separate forward passes in float32 with
batch 1, label spans found in the text as the released scoring script does (tokenize the
whole text, locate the target with rfind, label from the token count of the text before it),
the released selection rule, and the released post-processing of teacher text.

Agreement between reflectune and this module checks reflectune against the method, not
against itself: the parity tests compare with it, and the benchmarks time it as the
per-sample baseline. torch is imported inside `score_pair`, as in the engines.
"""

from __future__ import annotations

import math
import re

_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
           "detailed, and polite answers to the user's questions. USER: {instruction}")
TEMPLATES = {  # name -> (without input, with input)
    "vicuna": (_VICUNA + " ASSISTANT:", _VICUNA + "\nInput:\n{input} ASSISTANT:"),
    "alpaca": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\n{instruction}\n\n### Response:",
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
        "\n\n### Response:",
    ),
    "wizardlm": ("{instruction}\n\n### Response:", "{instruction}\n{input}\n\n### Response:"),
}
_GUESS = ("Below is the response to an instruction, please guess the corresponding instruction for the given "
          "response.\n{response}\nGenerate the instruction for the above response.")


def _prompt(template: str, instruction: str, input: str, tokenizer) -> str:
    if template == "chat":  # not in the reference: the student's own chat format
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    plain, with_input = TEMPLATES[template]
    return with_input.format(instruction=instruction, input=input) if input else plain.format(instruction=instruction)


def _encode(tokenizer, text: str, specials: bool, max_length: int | None = None):
    if max_length is None:
        return tokenizer.encode(text, add_special_tokens=specials)
    return tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length,
                            add_special_tokens=specials)


def _loss_whole(model, tokenizer, text: str, max_length: int) -> float:
    ids = _encode(tokenizer, text, True, max_length)
    if ids.shape[1] < 2:
        return math.nan
    return model(ids, labels=ids).loss.item()


def _loss_part(model, tokenizer, text: str, target: str, max_length: int, specials: bool) -> float:
    ids = _encode(tokenizer, text, specials, max_length)
    start_token = len(_encode(tokenizer, text[: text.rfind(target)], specials))
    if start_token >= ids.shape[1]:
        return math.nan
    labels = ids.clone()
    labels[0, :start_token] = -100
    return model(ids, labels=labels).loss.item()


def score_pair(model, tokenizer, instruction: str, input: str, output: str, template: str = "vicuna",
               max_length: int = 2048) -> dict[str, float]:
    """The four losses and their ratios for one pair, as the released scoring script."""
    import torch

    specials = template != "chat"
    prompt = _prompt(template, instruction, input, tokenizer)
    reverse = _prompt(template, _GUESS.format(response=output), "", tokenizer)
    prompt_len = _encode(tokenizer, prompt, specials, max_length).shape[1]
    reverse_len = _encode(tokenizer, reverse, specials, max_length).shape[1]
    with torch.inference_mode():
        loss = {
            # the instruction and its input, concatenated as they are
            "q_direct": _loss_whole(model, tokenizer, instruction + input, max_length - reverse_len + 1),
            "a_direct": _loss_whole(model, tokenizer, output, max_length - prompt_len + 1),
            "q_condition": _loss_part(model, tokenizer, reverse + instruction + input, instruction, max_length,
                                      specials),
            "a_condition": _loss_part(model, tokenizer, prompt + output, output, max_length, specials),
        }
    ppl = {k: math.exp(v) for k, v in loss.items()}
    return {
        **{f"loss_{k}": v for k, v in loss.items()},
        **{f"ppl_{k}": v for k, v in ppl.items()},
        "ifd_ppl": ppl["a_condition"] / ppl["a_direct"],
        "rifd_ppl": ppl["q_condition"] / ppl["q_direct"],
        "ifd_loss": loss["a_condition"] / loss["a_direct"],
        "rifd_loss": loss["q_condition"] / loss["q_direct"],
    }


def select_released(ori: dict, q: dict, a: dict, qa: dict) -> str | None:
    """The released selection script's choice for one sample from the scores of the original
    and its three variants: "ins_res", "res" or None (its other two branches only count)."""
    if q["ifd_ppl"] > ori["ifd_ppl"]:
        if qa["rifd_ppl"] < q["rifd_ppl"]:
            return "ins_res" if qa["rifd_ppl"] < 1 and qa["ifd_ppl"] < 1 else None
        return None
    if a["rifd_ppl"] < ori["rifd_ppl"]:
        return "res" if a["rifd_ppl"] < 1 and a["ifd_ppl"] < 1 else None
    return None


# -- teacher text, as the released post-processing reads it -----------------------------------

def _first(pattern: str, text: str) -> str:
    found = re.findall(pattern, text, re.DOTALL)
    return found[0][1].strip() if found else ""


def instruction_fields(text: str, instruction: str, input: str, output: str) -> tuple[str, str, str]:
    """(instruction, input, output) of an instruction reflection. A field missing or left as
    the template's placeholder keeps the original's; with nothing usable the variant is the
    original pair. Unlike the released script, the original pair keeps its input there, and
    an unusable new answer drops the new instruction with it: both make a fallback identical
    to its original, the rule reflectune follows."""
    new_instruction = _first(r"(\[New Instruction\])(.*?)(\[End\]|\[New Answer\])", text)
    new_answer = _first(r"(\[New Answer\])(.*?)(\[End\]|$)", text)
    if not new_instruction or "your instruction" in new_instruction:
        new_instruction = ""
    if not new_answer or "N/A" in new_answer or "your answer" in new_answer:
        return instruction, input, output
    return (new_instruction, "", new_answer) if new_instruction else (instruction, input, new_answer)


def response_field(text: str, output: str) -> str:
    """The better answer of a response reflection, or the original's when there is none."""
    found = re.findall(r"\[(Better Answer)\](.*?)(\[End\]|End|$)", text, re.DOTALL)
    return found[0][1].strip() if len(found) == 1 and found[0][1].strip() else output

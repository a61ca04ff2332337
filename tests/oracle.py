"""The definition of the student scores, computed the plain way: one pair at a time, four
separate forward passes, fp32, batch 1, label spans found in the text as the reference code
does (tokenize the whole text, locate the target with rfind, mask the tokens before it).

It shares no tokenization or batching code with reflectune.scoring, so agreement between the
two checks the fast scorer against the definition, not against itself.
"""

from __future__ import annotations

import math

import torch

from reflectune import templates


def _loss_whole(model, tokenizer, text: str, max_length: int, specials: bool = True) -> float:
    ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length, add_special_tokens=specials)
    if ids.shape[1] < 2:
        return math.nan
    return model(ids, labels=ids).loss.item()


def _loss_part(model, tokenizer, text: str, target: str, max_length: int, specials: bool) -> float:
    ids = tokenizer.encode(text, return_tensors="pt", truncation=True, max_length=max_length, add_special_tokens=specials)
    start_char = text.rfind(target)
    start_token = len(tokenizer.encode(text[:start_char], add_special_tokens=specials))
    if start_token >= ids.shape[1]:
        return math.nan
    labels = ids.clone()
    labels[0, :start_token] = -100
    return model(ids, labels=labels).loss.item()


@torch.inference_mode()
def score_pair(model, tokenizer, instruction: str, input: str, output: str, template: str = "vicuna", max_length: int = 2048) -> dict[str, float]:
    specials = template != "chat"
    prompt = templates.render(template, instruction, input, tokenizer)
    reverse = templates.reverse(template, output, tokenizer)
    question = templates.question(instruction, input)
    prompt_len = len(tokenizer.encode(prompt, truncation=True, max_length=max_length, add_special_tokens=specials))
    reverse_len = len(tokenizer.encode(reverse, truncation=True, max_length=max_length, add_special_tokens=specials))
    loss = {
        "q_direct": _loss_whole(model, tokenizer, question, max_length - reverse_len + 1),
        "a_direct": _loss_whole(model, tokenizer, output, max_length - prompt_len + 1),
        "q_condition": _loss_part(model, tokenizer, reverse + question, question, max_length, specials),
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
        "tokens": sum(
            len(tokenizer.encode(t, add_special_tokens=specials))
            for t in (question, output, reverse + question, prompt + output)
        ),
    }

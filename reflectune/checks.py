"""What a parsed field must be to be usable as training data: the checks a grammar cannot make.

A constraint guarantees the form (analysis, then the marked fields), not the content. A small
teacher that is still reviewing when the form opens the answer field goes on reviewing inside
it; a field the token limit closed ends mid-word; a model pushed off its language drifts into
another script mid-sentence; a new instruction can be a piece of the analysis.
Each check takes the field's text and the pair it was written for and returns why the field
is unusable, or None. The reasons name the evidence, so a reader of `parse_detail` can see it.

The checks are deliberately narrow: a clean rewrite in any form (lists, code, tables, short
answers, letters) passes, and the pair's own request wins over a signal (an instruction that
asks for feedback on an answer may be answered with feedback).
"""

from __future__ import annotations

import re
import unicodedata

# -- repetition -----------------------------------------------------------------------------


def degenerate(text: str) -> str | None:
    """Why a field is mostly repetition, or None. Word 4-grams for prose (a loop repeats
    them), character 8-grams for text without spaces."""
    words = text.split()
    if len(words) >= 12:
        grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        ratio = len(set(grams)) / len(grams)
        if ratio < 0.5:
            return f"mostly repetition: {ratio:.0%} of its word 4-grams are distinct"
    elif len(text) >= 48:
        grams = [text[i : i + 8] for i in range(len(text) - 7)]
        ratio = len(set(grams)) / len(grams)
        if ratio < 0.3:
            return f"mostly repetition: {ratio:.0%} of its 8-character runs are distinct"
    return None


# -- an answer that reviews an answer --------------------------------------------------------

_ANSWER = r"(?:answer|response|reply|solution)"
# talk about another answer: "the answer provided", "the original answer", "the answer is
# correct but"; not "your answer was very helpful", which a letter may say
_VERDICT = (r"(?:correct|incorrect|accurate|inaccurate|quite|too|very|not|mostly|partially|generally|somewhat|"
            r"concise|brief|short|incomplete|vague|good|well|helpful|unhelpful|relevant|irrelevant|missing|lacking|"
            r"overly|rather|fairly|technically|excellent|great|solid|thorough|comprehensive|informative|a\s+good|"
            r"a\s+great|a\s+decent|on\s+the\s+right)")
_ABOUT_ANSWER = re.compile(
    rf"\b(?:the|this|that|your|my)\s+(?:original|given|provided|previous|initial|current|existing|above|old|first)"
    rf"\s+{_ANSWER}\b"
    rf"|\b(?:the|this)\s+{_ANSWER}\s+(?:provided|given|above|you\s+gave|you\s+provided)\b"
    rf"|\b(?:the|this)\s+{_ANSWER}\s+(?:is|was)\s+{_VERDICT}\b"
    # a review grades the answer at hand ("your answer is excellent"); a letter thanks for a
    # past one ("your answer was very helpful")
    rf"|\byour\s+{_ANSWER}\s+is\s+{_VERDICT}\b"
    rf"|\bweakness(?:es)?\s+(?:of|in)\s+the\s+(?:original\s+|given\s+)?(?:{_ANSWER}|instruction)\b"
    rf"|\bwhy\s+the\s+(?:original\s+|given\s+)?(?:{_ANSWER}|instruction)\s+is\s+(?:weak|not\s+good)"
    # the teacher's comment on its own rewrite: "This revised answer provides more context"
    rf"|\bthis\s+(?:revised\s+|new\s+|improved\s+|better\s+|updated\s+)?(?:{_ANSWER}|version|summary|explanation|"
    rf"instruction)\s+(?:is\s+(?:now|more|complete|correct|accurate)|provides|captures|meets|includes|adds|introduces|"
    rf"accurately|correctly|addresses|focuses|ensures|maintains)\b"
    rf"|\b(?:write|writing)\s+(?:a|the)\s+new\s+instruction\b"
    rf"|\bexplanation\s+of\s+(?:the\s+)?(?:changes|improvements|better\s+answer)\b"
    # declining, or asking the user back, in place of an answer
    rf"|\b(?:I'm|I\s+am)\s+sorry,?\s+but\s+I\s+(?:can't|cannot|need|am\s+unable)\b"
    rf"|\b(?:the|this|your)\s+{_ANSWER}\s+(?:does\s+not|doesn't|did\s+not|didn't|lacks|fails|misses|could\s+be|"
    rf"should\s+be|should\s+have|only|simply|merely|correctly|accurately|addresses|mentions|states|provides|"
    rf"includes|explains|shows|covers|gives|offers|touches|focuses|highlights|captures)\b"
    # advice on what an answer should hold, in place of holding it
    rf"|\b(?:a|an)\s+(?:more\s+|better\s+|good\s+|improved\s+)(?:\w+\s+){{0,3}}(?:{_ANSWER}|explanation|version)\s+"
    rf"(?:would|should|could|might|must)\b",
    re.IGNORECASE)
# a verdict on another text and the promise of a rewrite
_REVISION = re.compile(
    r"\b(?:here\s+is|here's|below\s+is|following\s+is)\s+(?:a|an|the|my)\s+(?:revised|improved|better|corrected|"
    r"updated|enhanced|rewritten|more\s+\w+)\s+(?:version|answer|response)\b"
    r"|\b(?:but|though|although|however),?\s+(?:it\s+|there\s+are\s+\w+\s+\w+\s+where\s+it\s+)?(?:could|can|should|might)"
    r"\s+be\s+improved\b"
    r"|\b" + _ANSWER + r"\s+(?:could|can|should|might)\s+be\s+improved\b"
    r"|\bareas?\s+(?:for|of|where\s+it\s+could|that\s+could|that\s+need)\s+(?:improvement|be\s+improved|improve)\b"
    r"|\bto\s+improve\s+(?:the|this|your)\s+" + _ANSWER + r"\b"
    r"|\b(?:revised|improved|better|corrected)\s+" + _ANSWER + r"\s*:"
    r"|\b(?:how\s+about|let's|let\s+us|let\s+me)\s+(?:rewrit|revis|improv|rephras)\w*"
    r"|\bit\s+(?:could|can|should|would)\s+be\s+(?:expanded|improved)\b",
    re.IGNORECASE)
# the review's criteria as headings: "**Relevance**:", "2. Level of Detail:", "### Accuracy"
_CRITERIA = r"(?:helpfulness|relevance|accuracy|level\s+of\s+detail(?:\s+required)?|complexity\s+of\s+(?:the\s+)?topic|" \
            r"knowledge\s+required|ambiguity|logical\s+reasoning(?:\s+or\s+problem\s+solving)?)"
_HEADING = re.compile(
    rf"(?:^|\n)[ \t]*(?:\d+[.)]\s*|[-*]\s+|#+\s*)?(?:\*\*|__)?\s*{_CRITERIA}\s*(?:\*\*|__)?\s*:"
    rf"|\*\*\s*{_CRITERIA}\s*\*\*",
    re.IGNORECASE)
# what a pair asks for when a review is the right answer to it
_ASKS_REVIEW = re.compile(r"\b(?:feedback|review\w*|critique|critici[sz]e|evaluat\w*|assess\w*|grade|grading|judge|"
                          r"proofread|improv\w*|revis\w*|rewrit\w*|edit|editing|rephras\w*|paraphras\w*)\b"
                          r"|\b(?:the|this|my|following|given|student'?s?)\s+(?:answer|response)\b", re.IGNORECASE)


# the last line of a text that stops where its content should begin: a heading, or a line
# that announces what follows ("Here's a revised version:")
_OPENING_END = re.compile(r"(?:^|\n)[ \t]*(?:#{1,6}[ \t]+[^\n]*|[^\n]*:)[ \t]*$")
# a last line that stops inside an expression: on an operator, a comma or an open bracket
_OPEN_END = re.compile(r"[=+\-*/,(\[{]\s*$")


def unfinished(text: str) -> str | None:
    """Why a field stops where its content should begin (it ends on a heading, on a line
    that announces what follows, or inside an expression or an inline code span), or None."""
    text = text.rstrip()
    m = _OPENING_END.search(text)
    if m:
        return f"ends where its content should begin ({_quote(m.group(0))})"
    if _OPEN_END.search(text) and not text.endswith("--"):
        return f"ends inside an expression ({_quote(text[-30:])})"
    if (text.count("`") - 6 * text.count("```")) % 2:
        return f"ends inside a code span ({_quote(text[-30:])})"
    return None


# the teacher's comment on its own rewrite, which no instruction asks for, a rewrite task's
# included: "This answer provides more information ...", "The better answer is more detailed"
_SELF_COMMENT = re.compile(
    rf"\bthis\s+(?:revised\s+|new\s+|improved\s+|better\s+|updated\s+)?{_ANSWER}\s+(?:provides|adds|includes|"
    rf"meets|is\s+more)\b"
    rf"|\bthe\s+(?:better|revised|improved|new)\s+{_ANSWER}\s+(?:is\s+more|provides|includes|adds|meets)\b",
    re.IGNORECASE)


def review(answer: str, instruction: str, input: str = "") -> str | None:
    """Why an answer field is a review of an answer rather than an answer, or None. An
    instruction that itself asks for feedback, a revision or talk about an answer is answered
    in kind, so the signals are not held against its answer, except the teacher's comment on
    its own rewrite, which no instruction asks for."""
    why = "reviews an answer instead of answering"
    own = _first(answer, (_SELF_COMMENT, why + " (comments on its own rewrite)"))
    if own:
        return own
    if _ASKS_REVIEW.search(f"{instruction}\n{input}"):
        return None
    found = _first(answer, (_ABOUT_ANSWER, why), (_REVISION, why))
    if found:
        return found
    # two of the review's criteria as headings: one alone may be an answer's own topic
    headings = sorted({re.sub(r"\W+", " ", m.group(0)).strip().lower() for m in _HEADING.finditer(answer)})
    if len(headings) >= 2:
        return f"reviews an answer instead of answering (the review's criteria as headings: {', '.join(headings)})"
    return None


# -- a field that runs on past its own end -----------------------------------------------------

# the task's own words, which an answer has no reason to repeat
_TASK_ECHO = re.compile(r"\bin\s+exactly\s+this\s+format\b|\bthe\s+whole\s+reply\s+has\s+a\s+limit\b|"
                        r"\b(?:the\s+better\s+answer|the\s+new\s+instruction\s+and\s+its\s+answer)\s+(?:is|are)\s+"
                        r"what\s+matters?\b", re.IGNORECASE)
# the form's end marker written without its bracket (a field cannot hold "["), or another
# turn of a conversation, with more text after it
_OVERRUN = re.compile(r"(?:(?:^|\n|[.!?][ \t]+)[ \t]*End\]?\.?[^\n]*\n\s*\S"
                      r"|(?:^|\n)[ \t]*(?:Human|User|Assistant)[ \t]*:)")


def overrun(text: str) -> str | None:
    """Why a field runs on past its own end (its end marker or another conversation turn,
    then more text) or repeats the task's wording, or None."""
    return _first(text, (_OVERRUN, "runs on past its end"), (_TASK_ECHO, "repeats the task's wording"))


# -- an instruction that is a piece of the analysis ------------------------------------------

# words a sentence continues with but an instruction does not start with
_CONTINUATION = re.compile(
    r"^(?:and|or|but|so|because|since|which|that|who|whose|whereas|while|then|also|thus|therefore|hence|however|"
    r"should|could|would|might|must|is|are|was|were|be|been|being|has|have|had|does|do|did|it|its|they|their|"
    r"this|these|those|of|to|for|with|by|as|in|on|at|from|than)\b")
_ABOUT_INSTRUCTION = re.compile(
    r"\b(?:the|this|that|your|original|given|new)\s+(?:original\s+|given\s+|new\s+)?(?:instruction|question|prompt|task)"
    r"\s+(?:is|was|should|could|would|lacks|fails|does\s+not|doesn't|asks|only|simply|requires|needs|can\s+be)\b",
    re.IGNORECASE)


# an instruction that points at material: "the given list", "the following text", "this sentence"
_POINTS_AT = re.compile(
    r"\b(?:the|this|these|that)\s+(?:given|following|provided|above|below|attached)\b|"
    r"\b(?:this|these)\s+(?:sentences?|text|paragraphs?|passage|list|numbers|code|snippet|article|poem|e-?mail|"
    r"data|table|words?|story|essay|function|equation)\b", re.IGNORECASE)
# a task done to material named with "the" ("Rewrite the sentence", "the main idea of the passage")
_ACTS_ON = re.compile(
    r"\b(?:rewrite|rephrase|reword|paraphrase|summari[sz]e|translate|edit|correct|fix|proofread|shorten|simplify|"
    r"classify|sort|condense)\s+the\s+(?:sentences?|passages?|paragraphs?|text|list|numbers|words|article|essay|"
    r"e-?mail|code|poem|story|statement|phrase)\b"
    r"|\b(?:of|in|from)\s+the\s+(?:passage|paragraph|excerpt|text\s+above|text\s+below)\b", re.IGNORECASE)
# the material itself, after the pointer: a colon, a new line or a quotation, then text
_MATERIAL = re.compile(r"[:\n\"\u201c'`]\s*\S")


def fragment(instruction: str) -> str | None:
    """Why a new instruction is not an instruction one can answer, or None: it starts
    mid-sentence, carries the review's headings or judges an instruction (a piece of the
    teacher's analysis), or points at material it does not hold ("Sort the given list" with
    no list: a new instruction has no input, so it must carry what it asks about)."""
    text = instruction.lstrip()
    if not text:
        return None
    first = text[0]
    if first in ",;:)]}.!?" or (first.islower() and _CONTINUATION.match(text)):
        return f"starts mid-sentence ({_quote(text[:40])})"
    pointer = _POINTS_AT.search(text) or _ACTS_ON.search(text)
    if pointer and not _MATERIAL.search(text, pointer.end()):
        return f"points at material it does not hold ({_quote(pointer.group(0))})"
    return _first(text, (_HEADING, "carries the review's headings"),
                  (_ABOUT_INSTRUCTION, "judges an instruction instead of giving one"))


# -- text in a script the pair does not ask for ----------------------------------------------

# Scripts named by languages an instruction may ask for. Latin is every pair's (English,
# names, code); Greek letters are mathematics' as much as Greek's; the rest must be asked for
# or already be in the pair.
_LANGUAGES = {
    "HAN": r"chinese|mandarin|cantonese|japanese|kanji|hanzi",
    "HIRAGANA": r"japanese|hiragana",
    "KATAKANA": r"japanese|katakana",
    "HANGUL": r"korean|hangul",
    "CYRILLIC": r"russian|ukrainian|bulgarian|serbian|belarusian|macedonian|kazakh|mongolian|cyrillic",
    "ARABIC": r"arabic|persian|farsi|urdu|pashto",
    "HEBREW": r"hebrew|yiddish",
    "DEVANAGARI": r"hindi|marathi|nepali|sanskrit|devanagari",
    "THAI": r"thai",
    "ARMENIAN": r"armenian",
    "GEORGIAN": r"georgian",
    "BENGALI": r"bengali|bangla",
    "TAMIL": r"tamil",
}
_ALWAYS = {"LATIN", "GREEK"}


def _script(ch: str) -> str | None:
    if not ch.isalpha() or ch.isascii():
        return "LATIN" if ch.isascii() and ch.isalpha() else None
    name = unicodedata.name(ch, "")
    if name.startswith("CJK") or "IDEOGRAPH" in name:
        return "HAN"
    return name.split(" ")[0] if name else None


def scripts(text: str) -> set[str]:
    """The scripts of the letters in `text` (Unicode character names' first word; CJK
    ideographs as HAN)."""
    return {s for s in map(_script, text) if s}


def foreign_script(field: str, *context: str) -> str | None:
    """Why a field holds letters of a script that neither its context (the original pair and
    the instruction the field answers) has nor asks for, or None."""
    joined = "\n".join(context)
    allowed = _ALWAYS | scripts(joined)
    asked = {s for s, names in _LANGUAGES.items() if re.search(rf"\b(?:{names})\b", joined, re.IGNORECASE)}
    extra = scripts(field) - allowed - asked
    if not extra:
        return None
    script = sorted(extra)[0]
    at = next(i for i, ch in enumerate(field) if _script(ch) == script)
    return f"switches into {script.title()} script ({_quote(field[max(0, at - 24) : at + 8])})"


def _first(text: str, *rules: tuple[re.Pattern, str]) -> str | None:
    """The reason of the first rule whose pattern occurs in `text`, with what it matched."""
    for rx, why in rules:
        m = rx.search(text)
        if m:
            return f"{why} ({_quote(m.group(0)[:40])})"
    return None


def _quote(text: str) -> str:
    return repr(" ".join(text.split()))

"""What a variant is, declared once (docs/method.md, "Variants"): the reflection that writes
it, the pair it reflects on, the phase it is asked in, the fields the teacher writes for it
and the prompt version it is recorded with. Prompts, parsing, reflection, selection and the
records derive from this table."""

from __future__ import annotations

from dataclasses import dataclass

from reflectune import prompts

# the two kinds of teacher request and the marked fields each writes, in order
REFLECTIONS: dict[str, tuple[str, ...]] = {"ins": ("new_instruction", "new_answer"), "res": ("better_answer",)}
PROMPT_VERSIONS = {"ins": prompts.INSTRUCTION_VERSION, "res": prompts.RESPONSE_VERSION}


@dataclass(frozen=True)
class Variant:
    name: str
    reflection: str | None  # the request that writes it: ins (instruction) or res (response); none for orig
    base: str | None  # the variant it reflects on
    phase: int  # 0: the dataset's; 1: asked of the originals; 2: asked of phase 1's output

    @property
    def fields(self) -> tuple[str, ...]:
        return REFLECTIONS[self.reflection] if self.reflection else ()

    @property
    def prompt_version(self) -> str | None:
        return PROMPT_VERSIONS[self.reflection] if self.reflection else None


ALL = (
    Variant("orig", None, None, 0),
    Variant("ins", "ins", "orig", 1),
    Variant("res", "res", "orig", 1),
    Variant("ins_res", "res", "ins", 2),
)
BY_NAME = {v.name: v for v in ALL}
NAMES = tuple(v.name for v in ALL)

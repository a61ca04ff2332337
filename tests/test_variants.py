"""The variants' declaration is the one the rest reads: records, formats, parsing and the
prompts' versions agree with reflectune.variants."""

from reflectune import formats, parsing, prompts, records, variants


def test_every_module_reads_the_one_declaration():
    assert records.VARIANTS == variants.NAMES == ("orig", "ins", "res", "ins_res")
    every_field = {f for fields in variants.REFLECTIONS.values() for f in fields}
    # the form asked of the teacher and the parser read the same fields, by the same markers
    assert formats.FIELDS == variants.REFLECTIONS and set(formats.MARKERS) == every_field
    assert set(parsing._NAMES) == every_field
    by = variants.BY_NAME
    assert by["ins"].fields == ("new_instruction", "new_answer") and by["ins_res"].fields == ("better_answer",)
    assert (by["ins"].prompt_version, by["res"].prompt_version, by["ins_res"].prompt_version, by["orig"].prompt_version) \
        == (prompts.INSTRUCTION_VERSION, prompts.RESPONSE_VERSION, prompts.RESPONSE_VERSION, None)
    # each variant reflects on one asked in an earlier phase
    for v in variants.ALL[1:]:
        assert by[v.base].phase < v.phase

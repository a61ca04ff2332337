"""docs/configuration.md is the config models' reference as `make docs` writes it: a setting
added, renamed or redescribed without it fails here."""

from reflectune import config_reference
from reflectune.config import RecycleParams

from .conftest import ROOT


def test_the_configuration_reference_is_up_to_date():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == config_reference.markdown(), "docs/configuration.md is out of date: run `make docs`"


def test_every_setting_is_in_the_reference_with_its_default():
    text = config_reference.markdown()
    for name, field in RecycleParams.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and hasattr(kind, "model_fields"):
            for sub in kind.model_fields:
                assert f"| `{name}.{sub}` |" in text, f"{name}.{sub}"
        else:
            assert f"| `{name}` |" in text, name
    assert "| `shard_size` | int | `512` |" in text and "| `selection.budget` | float \\| None | empty |" in text
    assert "| `teacher.engine` | one of `transformers`, `vllm`, `openai`, `openai-batch`, `anthropic-batch` |" in text

"""Every setting is described once, in code; the operators' table is generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llooma.settings import Settings, environment_variable, settings_table

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- settings table: generated -->\n"
END = "<!-- end of settings table -->"


def test_every_setting_has_a_description() -> None:
    undescribed = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undescribed == []


def test_the_documented_table_is_the_generated_one() -> None:
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    documented = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert documented == settings_table(), "run `python -m llooma.settings` into docs/OPERATIONS.md"


@pytest.mark.parametrize("name", ["nats_url", "database_url", "race_width"])
def test_each_row_names_the_variable_that_sets_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = environment_variable(name)
    assert f"| `{variable}` |" in settings_table()
    value = "3" if name == "race_width" else "nats://x:1" if name == "nats_url" else "postgres://x"
    monkeypatch.setenv(variable, value)
    assert str(getattr(Settings(), name)) == value

"""The README's API table is the field tables themselves, written out: a field added,
supported or refused without the README saying so fails here."""

from __future__ import annotations

from pathlib import Path

from routerd.api import fields

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- api-table:start -->\n", "\n<!-- api-table:end -->"


def test_the_readme_table_is_the_field_tables() -> None:
    text = README.read_text()
    table = text[text.index(START) + len(START) : text.index(END)]
    assert table == fields.api_table(), (
        "regenerate it: python -c 'from routerd.api.fields import api_table; print(api_table())'"
    )


def test_every_field_of_every_endpoint_has_a_row_with_its_status() -> None:
    rows = fields.api_table().splitlines()
    for endpoint, table in fields.ENDPOINTS.items():
        for name, field in table.items():
            status = "refused with 400" if field.refused else "supported"
            assert any(
                row.startswith(f"| `POST {endpoint}` | `{name}` | {status} |") for row in rows
            ), (endpoint, name)


def test_a_refused_field_says_which_values_are_accepted() -> None:
    row = next(r for r in fields.api_table().splitlines() if "`use_beam_search`" in r)
    assert "Accepted unset or as `null`, `false`" in row

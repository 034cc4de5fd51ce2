"""Put a benchmark's Markdown table into README.md between its markers."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def update_readme(name: str, table: str, readme: Path = README) -> bool:
    """Replace the text between `<!-- results:NAME -->` and `<!-- /results:NAME -->`; False if absent."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table.strip()}\n{end}{tail}")
    return True

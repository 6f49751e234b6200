"""Read the tables of ``dlogctl top --once`` back into rows, as a script would grep them."""

from __future__ import annotations

TITLE_TOP = "┏"
HEADER = "┃"
ROW = "│"
BOTTOM = "└"


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """``{title: [{column: cell}, ...]}`` for every titled rich table in ``text``."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and lines[i + 1].lstrip().startswith(TITLE_TOP):
            title = lines[i].strip()
            header = lines[i + 2].strip()
            assert header.startswith(HEADER), header
            columns = [c.strip() for c in header.strip(HEADER).split(HEADER)]
            rows = []
            i += 4  # title, top border, header, header rule
            while i < len(lines) and not lines[i].lstrip().startswith(BOTTOM):
                cells = [c.strip() for c in lines[i].strip().strip(ROW).split(ROW)]
                rows.append(dict(zip(columns, cells, strict=True)))
                i += 1
            tables[title] = rows
        i += 1
    return tables


def members(cell: str) -> set[int]:
    """``"1,2,3"`` -> ``{1, 2, 3}``."""
    return {int(x) for x in cell.split(",") if x.strip()}

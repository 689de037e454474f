"""The README and docs/ stay true to the tree: every relative link resolves, every `tandem` command shown parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import tandem.cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _links(text: str) -> list[str]:
    # Links inside code (fenced or inline) are examples, not links.
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return MD_LINK.findall(text) + IMG_SRC.findall(text)


def _code_lines(text: str) -> list[str]:
    """The lines of fenced code blocks, with `\\` continuations joined."""
    lines, block, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if fenced:
                lines.extend(_join_continuations(block))
                block = []
            fenced = not fenced
        elif fenced:
            block.append(line)
    return lines


def _join_continuations(block: list[str]) -> list[str]:
    out, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    if pending:
        out.append(pending)
    return out


def _commands(text: str) -> list[str]:
    """Every `tandem ...` command in the fenced code: lines that start with `tandem`, `$ tandem` or
    `.venv/bin/tandem`, each piece of a `&&` / `;` / `|` chain, and `-m tandem ...` (torchrun, python -m)."""
    found = []
    for line in _code_lines(text):
        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:].lstrip()
        stripped = stripped.removeprefix(".venv/bin/")
        starts = stripped.startswith("tandem ") or stripped == "tandem"
        if not starts and "-m tandem " not in stripped:
            continue
        try:
            tokens = shlex.split(stripped, comments=True)
        except ValueError as err:  # an unbalanced quote is a broken command too
            found.append(f"{stripped}  <<unparseable: {err}>>")
            continue
        piece: list[str] = []
        for token in [*tokens, ";"]:
            if token in SHELL_OPERATORS:
                found.extend(_tandem_part(piece))
                piece = []
            else:
                piece.append(token)
    return found


def _tandem_part(tokens: list[str]) -> list[str]:
    tokens = [t.removeprefix(".venv/bin/") for t in tokens]
    if tokens[:1] == ["tandem"]:
        return [shlex.join(tokens)]
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "tandem":
            return [shlex.join(tokens[i + 1:])]
    return []


def _parse(argv: list[str]) -> None:
    """Parse as `tandem.cli.main` does (parse_known_args; loose images after `explain`'s options are images)."""
    parser = tandem.cli.build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not (getattr(args, "command", None) == "explain" and not any(e.startswith("-") for e in extra)):
        raise SystemExit(f"unrecognized arguments: {' '.join(extra)}")


def _all_commands() -> list[tuple[str, str]]:
    return [(_rel(page), cmd) for page in PAGES for cmd in _commands(page.read_text(encoding="utf-8"))]


def test_pages_exist():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "docs/*.md is empty"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in _links(page.read_text(encoding="utf-8")):
        if re.match(r"^(https?:|mailto:)", target, re.IGNORECASE) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{_rel(page)}: links to missing files: {broken}"


def test_commands_are_found():
    # The extraction itself works: the README shows commands, and so does every topic page with a code block.
    assert any(page == "README.md" for page, _ in _all_commands())
    assert len(_all_commands()) >= 50


@pytest.mark.parametrize("page,command", _all_commands(), ids=lambda v: v if v.endswith(".md") else v[:60])
def test_commands_parse(page, command, capsys):
    try:
        _parse(shlex.split(command)[1:])
    except SystemExit as err:
        if err.code not in (None, 0):  # --help, --version exit 0
            pytest.fail(f"{page}: `{command}` does not parse: {capsys.readouterr().err.strip() or err}")


def test_the_training_page_lists_every_key_a_resume_may_change():
    from tandem.train.runs import SAFE_ON_RESUME

    page = (ROOT / "docs" / "training.md").read_text()
    assert all(f"`{key}`" in page for key in SAFE_ON_RESUME)

"""The README and docs/ stay true: every relative link (and #anchor) leads somewhere, and every train.py and
evaluate.py command in their code blocks parses with today's options."""
import re
import shlex
from pathlib import Path

import pytest

import minbert.training.evaluate as evaluate
from minbert.training.config import TrainConfig, build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, spaces to -, punctuation dropped)."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_leads_somewhere(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target} does not exist"
        assert not anchor or anchor in anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"


def commands(page: Path) -> list[list[str]]:
    """The train.py / evaluate.py commands of a page's code blocks, as argument lists ([optional] parts kept)."""
    found, language = [], None  # the language of the code block a line is in, None outside
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            language = None if language is not None else line[3:].strip() or "text"
        elif language in ("bash", "text"):
            for part in line.split("#")[0].split("&&"):
                words = shlex.split(part.replace("[", "").replace("]", ""))
                if words[:2] in (["python", "train.py"], ["python", "evaluate.py"]) and "..." not in words:
                    found.append(words[1:])
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    inline = re.findall(r"`python ((?:train|evaluate)\.py [^`]*)`", prose)
    return found + [shlex.split(c) for c in inline if "..." not in c and "--help" not in c]


def test_the_docs_hold_commands():
    assert len([c for page in PAGES for c in commands(page)]) >= 5


@pytest.mark.parametrize("command", [c for page in PAGES for c in commands(page)], ids=" ".join)
def test_every_command_in_the_docs_parses(command):
    script, *argv = command
    if script == "evaluate.py":
        evaluate.parse_args(argv)
        return
    options = vars(build_parser().parse_args(argv))
    options.pop("config")  # a file the command names; parsing it needs the file
    TrainConfig.from_flags(**options)

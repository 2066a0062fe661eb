"""Documentation hygiene: links resolve inside the repository, and no tracked file points outside it.

Users clone the repository and nothing else, so

* every relative Markdown link of ``README.md`` and ``docs/*.md`` must name a file or directory of the
  repository (inside it, present in the working tree, not git-ignored);
* no tracked source, config or documentation file may name a path outside the repository: neither a
  sibling folder of the checkout reached with ``..`` nor the absolute path of some machine's checkout.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent

# Markdown files whose relative links are checked.
LINKED_DOCS = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]

# Tracked files searched for paths outside the repository: by suffix, and by exact file name.
SCANNED_SUFFIXES = {".py", ".md", ".smk", ".yaml", ".yml", ".toml"}
SCANNED_NAMES = {"Makefile", "Snakefile"}

# The forbidden spellings are assembled from pieces so that this file does not match itself.
SIBLING_SHARED = ".." + "/shared"
# An absolute path starting at the top-level folder "work": the "/" must not continue a path or a
# placeholder ("results/runs/<run>/work/resume" and "{run}/work/" are relative paths and fine).
ABSOLUTE_WORK = re.compile(r"(?<![\w.~}>)\]*$/-])" + "/" + "work" + "/")

URL_SCHEMES_IGNORED = ("http://", "https://", "mailto:")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)")
# [text](target) and ![alt](target); the text may hold one level of brackets; optional "title".
INLINE_LINK = re.compile(
    r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^<>\n]*>|[^()\s]+(?:\([^()\s]*\)[^()\s]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
# [label]: target (reference definitions)
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^<>\n]*>|\S+)")


def _git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=check)


def _require_git_checkout() -> None:
    try:
        _git("rev-parse", "--is-inside-work-tree")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(line number, raw target) of every inline link and reference definition outside code."""
    links: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        # blank out code spans, keeping the length, so `[a](b)` inside code is not a link
        visible = CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(visible)]
        definition = REFERENCE_DEF.match(visible)
        if definition:
            targets.append(definition.group(1))
        links.extend((number, target.strip("<>")) for target in targets)
    return links


def broken_link(doc: Path, target: str) -> str | None:
    """Why a link target of ``doc`` does not resolve in the repository, or None (also for ignored links)."""
    if target.startswith(URL_SCHEMES_IGNORED) or target.startswith("#"):
        return None
    path = unquote(target.split("#", 1)[0])
    if not path:
        return None
    # GitHub resolves a leading "/" against the repository root.
    resolved = (REPO / path.lstrip("/")) if path.startswith("/") else (doc.parent / path)
    resolved = resolved.resolve()
    try:
        inside = resolved.relative_to(REPO)
    except ValueError:
        return "points outside the repository"
    if not resolved.exists():
        return "does not exist"
    if inside.parts and _git("check-ignore", "-q", inside.as_posix(), check=False).returncode == 0:
        return "is git-ignored (a clone does not have it)"
    return None


@pytest.mark.parametrize("doc", LINKED_DOCS)
def test_relative_links_resolve_in_the_repository(doc: str) -> None:
    path = REPO / doc
    if not path.exists():
        pytest.fail(f"{doc} does not exist")
    _require_git_checkout()
    problems = []
    for number, target in markdown_links(path.read_text(encoding="utf-8")):
        why = broken_link(path, target)
        if why is not None:
            problems.append(f"{doc}:{number}: ({target}) {why}")
    if problems:
        pytest.fail(
            "links that do not resolve to a file or directory of the repository:\n" + "\n".join(problems),
            pytrace=False,
        )


def scanned_files() -> list[str]:
    out = _git("ls-files", "-z").stdout.decode("utf-8", errors="replace")
    return sorted(
        name
        for name in out.split("\0")
        if name and (Path(name).suffix in SCANNED_SUFFIXES or Path(name).name in SCANNED_NAMES)
    )


def outside_references(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line naming a path outside the repository."""
    return [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if SIBLING_SHARED in line or ABSOLUTE_WORK.search(line)
    ]


def test_reference_patterns() -> None:
    assert outside_references("see " + SIBLING_SHARED + "/METHOD.md")
    assert outside_references("(``" + "/work" + "/shared/METHOD.md``)")
    assert outside_references("/work" + "/main/.venv/bin/python")
    assert not outside_references("into `results/runs/<run>/work/resume/`")
    assert not outside_references('f"results/runs/{wildcards.run}/work/x"')
    assert not outside_references("results/runs/run-1/work/resume and <work-dir>/resume")
    links = markdown_links("[a](x.md) `[b](code.md)` ![c](img.png#f)\n```\n[d](fenced.md)\n```\n[e]: ref.md\n")
    assert [t for _, t in links] == ["x.md", "img.png#f", "ref.md"]


def test_no_tracked_file_names_a_path_outside_the_repository() -> None:
    _require_git_checkout()
    problems = []
    for name in scanned_files():
        path = REPO / name
        if not path.is_file():  # deleted in the working tree, not yet in the index
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        problems += [f"{name}:{number}: {line.strip()[:160]}" for number, line in outside_references(text)]
    if problems:
        pytest.fail(
            f"tracked files name paths outside the repository ({SIBLING_SHARED!r} or an absolute "
            f"'/{'work'}/' path); a clone has only the repository, so point inside it instead:\n"
            + "\n".join(problems),
            pytrace=False,
        )

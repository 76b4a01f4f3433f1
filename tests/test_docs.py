"""Every example in README.md and docs/*.md runs as written.

Per page, in a fresh temporary working directory that holds a copy of the checkout's
`fixtures/` (the bundled example package and recipes), the page's blocks run in order:

- ```python blocks in one namespace (a page's blocks may build on each other);
- ```sh and ```console blocks: every `milsparse ...` command (in a console block, the lines
  after `$ `) through `milsparse.cli.main`, expecting exit 0 unless the command's comment says
  `# exit N`; in a console block, the output lines shown under a command must appear in what
  it printed, in order (`...` skips lines);
- a block after `<!-- file: NAME -->` is written to NAME first (a recipe the next commands read);
- a block after `<!-- not run: reason -->` is skipped and counted, so such blocks stay few.

Other commands of a shell line (`pip install`, `pytest`) are not run here; `.ci/run` runs them.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_NOT_RUN = 4

_FENCE = re.compile(r"^([ \t]*)```([a-z]*)\n(.*?)^\1```[ \t]*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*(not run|file):\s*(.*?)\s*-->\s*\Z", re.S)
_EXIT = re.compile(r"#.*\bexit\s+(\d+)")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    text: str
    marker: tuple[str, str] | None


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()]
        marker = _MARKER.search(before[-300:])
        code = textwrap.dedent(m.group(3)) if m.group(1) else m.group(3)
        out.append(
            Block(page, before.count("\n") + 1, m.group(2), code,
                  (marker.group(1), marker.group(2)) if marker else None)
        )  # fmt: skip
    return out


def _shell_lines(text: str) -> list[str]:
    """Lines of a shell block with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _milsparse_commands(line: str) -> list[list[str]]:
    """The `milsparse ...` commands of one shell line (`a && b`, the first stage of `a | b`)."""
    commands = []
    for part in re.split(r"\s&&\s", line.split(" #")[0] if " #" in line else line):
        stage = part.split(" | ")[0].strip()
        if stage.startswith("milsparse "):
            commands.append(shlex.split(stage)[1:])
    return commands


def _run_cli(argv: list[str]) -> tuple[int, str]:
    from milsparse.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, out.getvalue()


def _expected_exit(line: str) -> int:
    m = _EXIT.search(line)
    return int(m.group(1)) if m else 0


def _norm(line: str) -> str:
    return " ".join(line.split())


_DECIMAL = re.compile(r"(-?\d+\.\d+)")


def _same_line(want: str, got: str) -> bool:
    """`got` reads as `want`: the same words and integers, and each decimal number shown with
    as many digits and the same up to one unit of its last digit or 0.1% (float results differ
    a little between BLAS builds and CPUs: SparseGPT's Cholesky factors, a value on a rounding
    edge)."""
    if want == got:
        return True
    wants, gots = _DECIMAL.split(want), _DECIMAL.split(got)
    if len(wants) != len(gots) or wants[::2] != gots[::2]:
        return False
    for w, g in zip(wants[1::2], gots[1::2], strict=True):
        digits = len(w.split(".")[1])
        close = max(1.01 * 10.0**-digits, 1e-3 * abs(float(w)))
        if len(g.split(".")[1]) != digits or abs(float(w) - float(g)) > close:
            return False
    return True


def _check_shown(shown: list[str], printed: str, where: str) -> None:
    actual = [_norm(x) for x in printed.splitlines()]
    i = 0
    for want in (_norm(x) for x in shown):
        if not want or want == "...":
            continue
        while i < len(actual) and not _same_line(want, actual[i]):
            i += 1
        assert i < len(actual), f"{where}: the output shown has {want!r}; it printed:\n{printed}"
        i += 1


def _run_shell(block: Block, console: bool) -> int:
    ran = 0
    lines = _shell_lines(block.text)
    where = f"{block.page.name}:{block.line}"
    for k, line in enumerate(lines):
        if console:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        for argv in _milsparse_commands(line):
            code, printed = _run_cli(argv)
            assert code == _expected_exit(line), (
                f"{where}: `milsparse {shlex.join(argv)}` exited {code}:\n{printed}"
            )
            ran += 1
            if console:
                shown = []
                for nxt in lines[k + 1 :]:
                    if nxt.startswith("$ "):
                        break
                    shown.append(nxt)
                _check_shown(shown, printed, where)
    return ran


def _registered_passes() -> tuple[set, set]:
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from milsparse.passes import registry

    return set(PASS_REGISTRY.passes), set(registry.MILSPARSE_PASSES)


def _unregister_new(before: tuple[set, set]) -> None:
    """A page that registers a pass of its own must not leave it for other tests."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from milsparse.passes import registry

    for name in set(PASS_REGISTRY.passes) - before[0]:
        PASS_REGISTRY.passes.pop(name, None)
    for name in set(registry.MILSPARSE_PASSES) - before[1]:
        registry.MILSPARSE_PASSES.pop(name, None)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_of_the_page_runs(page, tmp_path, monkeypatch):
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    before = _registered_passes()
    try:
        for block in blocks(page):
            where = f"{page.name}:{block.line}"
            if block.marker and block.marker[0] == "not run":
                continue
            if block.marker and block.marker[0] == "file":
                (tmp_path / block.marker[1]).write_text(block.text)
            if block.lang == "python":
                exec(compile(block.text, where, "exec"), namespace)
            elif block.lang in ("sh", "console"):
                _run_shell(block, console=block.lang == "console")
    finally:
        _unregister_new(before)


def test_every_fence_is_closed():
    """An unclosed fence would silently turn the rest of a page into prose or code."""
    for page in PAGES:
        fences = [x.strip() for x in page.read_text().splitlines() if x.lstrip().startswith("```")]
        assert len(fences) % 2 == 0, f"{page.relative_to(ROOT)}: an unclosed code fence"
        assert all(x.strip("`") for x in fences[::2]), f"{page.name}: a fence without a language"


def test_few_examples_are_not_run():
    skipped = [
        f"{b.page.name}:{b.line} ({b.marker[1]})"
        for page in PAGES
        for b in blocks(page)
        if b.marker and b.marker[0] == "not run"
    ]
    assert len(skipped) <= MAX_NOT_RUN, skipped
    for page in PAGES:
        for b in blocks(page):
            if b.marker and b.marker[0] == "not run":
                assert b.marker[1], f"{page.name}:{b.line}: say why the block is not run"


def test_every_shell_block_has_a_milsparse_command():
    """A ```sh block runs only its `milsparse` commands: one without any is not a test."""
    for page in PAGES:
        for b in blocks(page):
            if b.lang in ("sh", "console") and not (b.marker and b.marker[0] == "not run"):
                lines = _shell_lines(b.text)
                if b.lang == "console":
                    lines = [x[2:] for x in lines if x.startswith("$ ")]
                commands = [c for x in lines for c in _milsparse_commands(x)]
                assert commands or any(x.startswith(("pip ", "python ")) for x in lines), (
                    f"{page.name}:{b.line}: no milsparse command"
                )


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+ (.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves():
    link = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")
    for page in PAGES:
        for m in link.finditer(page.read_text()):
            path, anchor = m.group(1), m.group(2)
            if path.startswith(("http://", "https://")):
                continue
            target = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)} links to {m.group(0)}"
            assert target.exists(), f"{where}: no such file"
            if anchor and target.suffix == ".md":
                assert anchor in _anchors(target), f"{where}: no such heading"


def test_the_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    index = (ROOT / "docs" / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "README.md":
            assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
            assert f"({page.name}" in index, f"docs/README.md does not link {page.name}"


def test_printed_decimals_may_differ_by_a_unit_of_their_last_digit_or_a_tenth_of_a_percent():
    assert _same_line("cosine 0.935009 < 0.98 (4 samples)", "cosine 0.935008 < 0.98 (4 samples)")
    assert _same_line("cosine 0.958222", "cosine 0.958099")  # 0.013% apart
    assert not _same_line("cosine 0.935009", "cosine 0.937009")
    assert not _same_line("cosine 0.935009", "cosine 0.93501")  # digits shown differ
    assert not _same_line("6 of 6 weights", "5 of 6 weights")  # integers are exact
    assert not _same_line("SNR 9.0 dB < 15", "SNR 9.0 dB > 15")

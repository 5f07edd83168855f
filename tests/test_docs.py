"""Every fenced code block of README.md and docs/ is run here, so a snippet cannot drift from the code.

Each block is preceded by a directive, `<!-- run: MODE[; replace "OLD" "NEW"]... -->`:
- `shell`: each command line runs in order, in a scratch folder per page (blocks of a page share it) where
  `examples/` and `benchmarks/` are the repository's and `$GLUE_DIR` holds GLUE data;
- `python`: the block runs as a script there;
- `file NAME`: the block is written to NAME there, for a later block to read;
- `pip`: install lines, checked against pyproject.toml (they download, so they are not run here);
- `quickstart`: README's three lines, which `.ci/run` runs as written; here the set-up line is checked as a
  pip line, the training line runs (with its replacements) and the test line is the one `.ci/run` calls.
Replacements shrink a run to seconds (`--max-steps 300` to 3) and put a tiny local model where a block names
a Hub model (`{tiny_deberta}`, `{tiny_llama}`); the text shown to readers stays as written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*run:\s*(.*?)\s*-->\s*$")
REPLACE = re.compile(r'^replace\s+"([^"]*)"\s+"([^"]*)"$')
MODES = ("shell", "python", "file", "pip", "quickstart")
REAL_GLUE = ROOT.parent / "shared" / "data" / "glue"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's own index of CPU-only wheels


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, from 1
    text: str
    mode: str | None  # None: no directive
    argument: str = ""  # the file name of `file NAME`
    replacements: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def runnable_text(self, placeholders: dict[str, str]) -> str:
        text = self.text
        for old, new in self.replacements:
            if old not in text:
                raise AssertionError(f"{self.where}: replace {old!r}: not in the block")
            text = text.replace(old, new)
        for key, value in placeholders.items():
            text = text.replace("{" + key + "}", value)
        return text


def parse_directive(text: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    first, *rest = [part.strip() for part in text.split(";")]
    mode, _, argument = first.partition(" ")
    replacements = []
    for part in rest:
        match = REPLACE.match(part)
        if not match:
            raise ValueError(f"not a replacement: {part!r}")
        replacements.append((match.group(1), match.group(2)))
    return mode, argument.strip(), tuple(replacements)


def page_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, each with the directive on the line before its fence."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, start = match.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line.lstrip()
                         for line in lines[start + 1:end])
        directive = DIRECTIVE.match(lines[start - 1]) if start > 0 else None
        if directive:
            mode, argument, replacements = parse_directive(directive.group(1))
            blocks.append(Block(page, start + 1, body, mode, argument, replacements))
        else:
            blocks.append(Block(page, start + 1, body, None))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def test_every_code_block_is_run_by_a_test():
    """The count of blocks run here equals the count in README and docs: none is left without a directive."""
    unmarked = [b.where for b in ALL_BLOCKS if b.mode not in MODES]
    assert not unmarked, f"code blocks with no run directive (or an unknown mode): {unmarked}"
    assert len(ALL_BLOCKS) >= 20  # README and the guides: the walk found them
    assert {b.page.name for b in ALL_BLOCKS} >= {"README.md"}


def test_the_walk_finds_indented_blocks_and_blocks_without_a_directive(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('Text\n\n<!-- run: shell; replace "300" "3" -->\n```bash\necho 300\n```\n\n- item\n\n'
                    '  <!-- run: file a.yaml -->\n  ```yaml\n  key: 1\n  ```\n\n```\nbare\n```\n')
    shell, config, bare = page_blocks(page)
    assert (shell.mode, shell.replacements, shell.runnable_text({})) == ("shell", (("300", "3"),), "echo 3")
    assert (config.mode, config.argument, config.text) == ("file", "a.yaml", "key: 1")
    assert (bare.mode, bare.text) == (None, "bare")
    with pytest.raises(ValueError, match="not a replacement"):
        parse_directive('shell; swap "a" "b"')


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


# ----------------------------------------------------------------------------- running the blocks


@pytest.fixture(scope="session")
def placeholders(tmp_path_factory, tiny_deberta) -> dict[str, str]:
    llama = tmp_path_factory.mktemp("docs-models") / "tiny-llama"
    subprocess.run([sys.executable, str(ROOT / "examples" / "tiny_lm.py"), str(llama)], check=True,
                   capture_output=True, text=True, timeout=300)
    return {"tiny_deberta": str(tiny_deberta), "tiny_llama": str(llama)}


def environment(glue: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GLUE_DIR": str(glue),
           "MPLBACKEND": "Agg"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's bayes-adalora
    return env


def run_command(command: str, block: Block, cwd: Path, env: dict) -> None:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (f"{block.where}: `{command}` exited {done.returncode}\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def commands(text: str) -> list[str]:
    """A shell block's command lines (backslash continuations joined; comments and blank lines left out)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def check_pip_line(line: str, block: Block) -> None:
    """An install line: pip install of torch at the pinned version, from PyTorch's CPU index where it says so,
    and of this package with extras it declares."""
    words = shlex.split(line)
    assert words[:2] in (["pip", "install"], ["python", "-m"]), f"{block.where}: not a pip line: {line}"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floor = next(d for d in project["dependencies"] if d.startswith("torch"))
    for word in words:
        if word.startswith("torch=="):
            assert floor == f"torch>={word.removeprefix('torch==').rsplit('.', 1)[0]}", (
                f"{block.where}: {word} is not pyproject's torch floor {floor}")
        if word.startswith(".[") or word.startswith('".['):
            extras = set(word.strip('".').strip("[]").split(","))
            assert extras <= set(project["optional-dependencies"]), f"{block.where}: unknown extras {extras}"
    if "--index-url" in words:
        assert words[words.index("--index-url") + 1] == CPU_INDEX, f"{block.where}: not PyTorch's CPU index"
        assert "torch==2.13.0" in words and "-e" not in words, f"{block.where}: the CPU index serves torch only"


def run_page(page: Path, scratch: Path, placeholders: dict[str, str]) -> int:
    for name in ("examples", "benchmarks"):
        (scratch / name).symlink_to(ROOT / name)
    glue = REAL_GLUE if (REAL_GLUE / "SST-2").is_dir() else None
    if glue is None:
        pytest.skip("the GLUE files are not on this machine")
    env = environment(glue)
    ran = 0
    for block in page_blocks(page):
        text = block.runnable_text(placeholders)
        if block.mode == "file":
            (scratch / block.argument).write_text(text + "\n", encoding="utf-8")
        elif block.mode == "pip":
            for line in commands(text):
                check_pip_line(line, block)
        elif block.mode == "python":
            script = scratch / f"block_{block.line}.py"
            script.write_text(text + "\n", encoding="utf-8")
            run_command(f"{shlex.quote(sys.executable)} {script.name}", block, scratch, env)
        elif block.mode == "quickstart":
            setup, main, test_line = commands(text)
            check_pip_line(setup, block)
            run_command(main, block, scratch, env)
            ci = (ROOT / ".ci" / "run").read_text()
            assert f'[ "${{quick[2]}}" = "{test_line}" ]' in ci, ".ci/run no longer calls the README's test line"
        elif block.mode == "shell":
            for command in commands(text):
                run_command(command, block, scratch, env)
        else:
            raise AssertionError(f"{block.where}: no run directive")
        ran += 1
    return ran


@pytest.mark.parametrize("page", [p for p in PAGES if page_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_pages_code_blocks_run(page, tmp_path, placeholders):
    assert run_page(page, tmp_path, placeholders) == len(page_blocks(page))


def test_the_docs_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--ivon-hess-init" in cli and "--with-posterior" in cli  # generated from the parser, not copied

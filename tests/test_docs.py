"""The docs a user follows stay true: links resolve, shown commands exist, the recipe reference is current.

A reader copies commands out of README.md, docs/*.md, benchmarks/*.md and the comments of the shipped
recipes. Each `steermoe ...` command there is checked against the CLI's real click command tree
(subcommands, options, argument counts), each `python benchmarks/*.py` / `python tools/*.py` command
against that script's own argparse parser, each `make X` against the Makefile, and every relative link
(and its #anchor) against the files and headings it points at. docs/recipes.md is regenerated from
config.py and compared, so a recipe field added without regenerating it fails here.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")])
RECIPES = sorted((ROOT / "steermoe_core" / "recipes").glob("*.toml"))
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>>", "&>"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------- markdown


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` fenced block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```", text, re.S | re.M)]


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code, where links live."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    heading = re.sub(r"[^\w\- ]", "", heading)
    return heading.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            problems.append(f"{_rel(page)}: link {target} -> no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{_rel(page)}: link {target} -> no heading #{anchor} in {_rel(dest)}")
    return problems


# ---------------------------------------------------------------------------------------------- commands


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands in a shell snippet: continuations joined, comments dropped, split at ; && | and
    redirections, leading VAR=value assignments dropped, [optional] brackets and ... placeholders removed."""
    script = re.sub(r"\\\n", " ", script)
    commands = []
    for line in script.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote: not a command line
            continue
        current: list[str] = []
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok in SEPARATORS:
                commands.append(current)
                current = []
            elif tok in REDIRECTS:
                i += 1  # and its file
            elif tok.isdigit() and i + 1 < len(tokens) and tokens[i + 1] in REDIRECTS:
                pass  # the 2 of 2>
            else:
                current.append(tok)
            i += 1
        commands.append(current)
    cleaned = []
    for cmd in commands:
        while cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]):
            cmd = cmd[1:]
        cmd = [t.strip("[]") for t in cmd if t not in ("[", "]")]
        if cmd:
            cleaned.append([t for t in cmd if t])
    return cleaned


def cli_tree():
    import typer.main

    from steermoe_cli.main import app

    return typer.main.get_command(app)


def check_steermoe(tokens: list[str], root) -> str | None:
    """None when ``steermoe ...`` names a real subcommand with real options, else why not."""
    cmd, path, rest = root, ["steermoe"], list(tokens[1:])
    while hasattr(cmd, "commands"):
        if not rest or rest[0] in ("--help", "-h"):
            return None
        name = rest.pop(0)
        if name.startswith("-"):  # an option of the group itself (steermoe --verbose demo)
            flags = {o for p in cmd.params if p.param_type_name == "option" and p.is_flag for o in (*p.opts, *p.secondary_opts)}
            if name not in flags:
                return f"{' '.join(path)}: no option {name} (known: {', '.join(sorted(flags))})"
            continue
        if name not in cmd.commands:
            return f"{' '.join(path)}: no subcommand {name!r} (known: {', '.join(sorted(cmd.commands))})"
        cmd, path = cmd.commands[name], [*path, name]
    options, arguments = {"--help": (False, 0)}, []
    for p in cmd.params:
        if p.param_type_name == "option":
            takes = 0 if (p.is_flag or getattr(p, "count", False)) else max(p.nargs, 1)
            for o in (*p.opts, *p.secondary_opts):
                options[o] = (True, takes)
        else:
            arguments.append(p)
    positionals = 0
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("-") and len(tok) > 1 and not re.match(r"^-\d", tok):
            name, eq, _ = tok.partition("=")
            if name not in options:
                return f"{' '.join(path)}: no option {name} (known: {', '.join(sorted(options))})"
            if name == "--help":
                return None
            takes = options[name][1]
            if eq and not takes:
                return f"{' '.join(path)}: {name} is a flag and takes no value"
            i += 1 if eq else 1 + takes
            continue
        positionals += 1
        i += 1
    if "..." in rest:  # "and more": the counts are not shown
        return None
    variadic = any(a.nargs == -1 for a in arguments)
    allowed = sum(max(a.nargs, 0) for a in arguments)
    if not variadic and positionals > allowed:
        return f"{' '.join(path)}: {positionals} arguments given, it takes {allowed}"
    required = sum(max(a.nargs, 1) for a in arguments if a.required)
    if positionals < required:
        return f"{' '.join(path)}: {positionals} arguments given, it needs {required}"
    return None


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


_PARSERS: dict[Path, argparse.ArgumentParser] = {}


def script_parser(script: Path) -> argparse.ArgumentParser:
    """The argparse parser a script builds in main(), captured at its parse_args call (nothing runs)."""
    if script not in _PARSERS:
        original = argparse.ArgumentParser.parse_args

        def capture(self, *args, **kwargs):
            raise _Captured(self)

        argparse.ArgumentParser.parse_args = capture
        saved_path = list(sys.path)
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Captured as c:
            _PARSERS[script] = c.parser
        finally:
            argparse.ArgumentParser.parse_args = original
            sys.path[:] = saved_path
        if script not in _PARSERS:
            raise AssertionError(f"{_rel(script)}: never called parse_args()")
    return _PARSERS[script]


def check_script(tokens: list[str]) -> str | None:
    script = ROOT / tokens[1]
    if not script.is_file():
        return f"{tokens[1]}: no such script"
    parser = script_parser(script)
    if "--help" in tokens[2:] or "-h" in tokens[2:]:
        return None
    def fail(message: str):
        raise ValueError(message)

    parser.error = fail  # argparse would print the usage and exit; we want the reason
    try:
        parser.parse_args(tokens[2:])
    except ValueError as e:
        return f"{' '.join(tokens[:2])}: {e}"
    return None


def check_python_c(code: str) -> str | None:
    """`python -c CODE`: it parses, and every `from X import a, b` names something that exists."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return f"python -c: {e}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("steermoe"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            if missing:
                return f"python -c: {node.module} has no {', '.join(missing)}"
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*):", text, re.M)}


def check_command(tokens: list[str], root) -> str | None:
    """Why a shown command is wrong, or None; commands of other programs are not checked."""
    prog = tokens[0].rsplit("/", 1)[-1]
    if prog == "steermoe":
        return check_steermoe(tokens, root)
    if prog in ("python", "python3") and len(tokens) > 1:
        if tokens[1] == "-c" and len(tokens) > 2:
            return check_python_c(tokens[2])
        if re.match(r"^(benchmarks|tools)/[\w-]+\.py$", tokens[1]):
            return check_script(tokens)
    if prog == "make" and len(tokens) > 1 and not tokens[1].startswith("-") and "=" not in tokens[1]:
        if tokens[1] not in make_targets():
            return f"make {tokens[1]}: no such target in the Makefile"
    return None


def page_commands(page: Path) -> list[list[str]]:
    return [
        cmd
        for lang, body in fenced_blocks(page.read_text(encoding="utf-8"))
        if lang in SHELL_LANGS
        for cmd in shell_commands(body)
    ]


def recipe_commands(recipe: Path) -> list[list[str]]:
    """Commands in a recipe's comments: whole comment lines (with \\ continuations) and `backticked` ones."""
    comments = [line.split("#", 1)[1] for line in recipe.read_text(encoding="utf-8").splitlines() if "#" in line]
    text = "\n".join(c.strip() for c in comments)
    text = re.sub(r"\\\n", " ", text)
    found = []
    for line in text.splitlines():
        for span in re.findall(r"`([^`]+)`", line):
            # a backticked mention names a command and maybe some options, not a whole invocation
            found += [[*cmd, "..."] for cmd in shell_commands(span)]
        bare = re.sub(r"`[^`]*`", "", line).strip()
        if re.match(r"^(steermoe|python3?|make)\s", bare):
            found += shell_commands(bare)
    return found


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_shown_commands_exist(page):
    root = cli_tree()
    problems = [f"{' '.join(cmd)}\n    -> {why}" for cmd in page_commands(page) if (why := check_command(cmd, root))]
    assert problems == [], f"{_rel(page)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_comment_commands_exist(recipe):
    root = cli_tree()
    problems = [f"{' '.join(cmd)}\n    -> {why}" for cmd in recipe_commands(recipe) if (why := check_command(cmd, root))]
    assert problems == [], f"{recipe.name}:\n" + "\n".join(problems)


def test_the_checker_catches_stale_commands():
    """The checks above would catch the mistakes a stale doc makes."""
    root = cli_tree()
    assert check_steermoe(["steermoe", "train", "r.toml", "--gpus", "4", "--set", "a=b"], root) is None
    assert check_steermoe(["steermoe", "prep", "synth", "t.txt", "--out", "d", "--voice", "flite:slt"], root) is None
    assert "no option --no-such-flag" in check_steermoe(["steermoe", "train", "r.toml", "--no-such-flag"], root)
    assert "no subcommand 'fly'" in check_steermoe(["steermoe", "fly"], root)
    assert check_steermoe(["steermoe", "--verbose", "demo", "--minutes", "3"], root) is None
    assert "no option --loud" in check_steermoe(["steermoe", "--loud", "demo"], root)
    assert "arguments given" in check_steermoe(["steermoe", "train", "a.toml", "b.toml"], root)
    assert "needs 1" in check_steermoe(["steermoe", "eval", "--data", "d"], root)
    stale = shell_commands("python benchmarks/train_step.py --write-tiny tiny-backbones  # old")
    assert "--write-tiny" in check_command(stale[0], root)
    assert check_command(["python", "benchmarks/nope.py"], root) == "benchmarks/nope.py: no such script"
    assert "no such target" in check_command(["make", "deploy"], root)
    assert shell_commands("A=1 steermoe infer x \\\n  --gpus 2 --format jsonl > out.txt 2>/dev/null && make test") == [
        ["steermoe", "infer", "x", "--gpus", "2", "--format", "jsonl"], ["make", "test"]]


def test_no_page_cites_an_internal_issue_number():
    offenders = [
        f"{_rel(p)}:{n}: {line.strip()}"
        for p in PAGES
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bissues? #?\d+\b", line, re.I)
    ]
    assert offenders == []


# Words that belong to how the project was worked on, not to what a user reads: run names of
# experiments, the tracker, the working session, the design notes outside the repository.
BOOKKEEPING = [
    (r"\b[Rr]uns? [A-C][0-9]?\b(?![-.])", "an experiment's run name"),
    (r"\b[A-C][0-9]\b(?![-.])", "an experiment's run name"),
    (r"(?i)\bthe issue\b", "the tracker's issue"),
    (r"(?i)\b(this|the|a) session\b", "the working session"),
    (r"DESIGN" r"\.md|\.\./shared\b", "notes outside the repository"),  # (split: this file cites no such note)
    (r"(?i)\bno --init-from yet\b", "a note about the product's future"),
]
USER_PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "RESULTS.md"])


def bookkeeping(text: str) -> list[str]:
    """Bookkeeping words in ``text``, outside code (a command or a config key may spell anything)."""
    found = []
    for n, line in enumerate(prose(text).splitlines(), 1):
        for pattern, why in BOOKKEEPING:
            if m := re.search(pattern, line):
                found.append(f"line {n}: {m.group(0)!r} ({why})")
    return found


@pytest.mark.parametrize("page", USER_PAGES, ids=_rel)
def test_no_internal_bookkeeping_words(page):
    assert bookkeeping(page.read_text(encoding="utf-8")) == []


def test_the_bookkeeping_check_catches_them():
    assert bookkeeping("Run A2 at a quarter of the lr; B2 adds LoRA.")
    assert bookkeeping("What the issue suspected, checked in this session.")
    assert bookkeeping("the contract in ../shared/" + "DESIGN" + ".md")
    assert bookkeeping("`--set train.seed=2` and a 2-core AVX2 CPU, H200, run `steermoe eval`") == []


FIGURE = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(%|x\b)")


def figures(text: str) -> list[str]:
    """Percentages and "N.Nx" ratios in prose: 47.8%, **12.8x**, 1.05x (as number + unit)."""
    return [num + unit for num, unit in FIGURE.findall(prose(text).replace("**", ""))]


def readme_blocks(text: str) -> list[str]:
    """README's units of meaning: each table row, list item and paragraph (code left out)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    blocks, current = [], []
    for line in text.splitlines():
        starts = line.startswith("|") or re.match(r"^\s*[-*] ", line) or not line.strip() or line.startswith("#")
        if starts and current:
            blocks.append("\n".join(current))
            current = []
        if line.strip() and not line.startswith("#"):
            current.append(line)
            if line.startswith("|"):
                blocks.append(line)
                current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def unlinked_figures(readme: Path) -> list[str]:
    """Each figure in a README row, item or paragraph must appear in a page that block links to."""
    problems = []
    for block in readme_blocks(readme.read_text(encoding="utf-8")):
        found = figures(block)
        if not found:
            continue
        links = re.findall(r"\]\(([^)\s#]+\.md)(?:#[^)]*)?\)", block)
        texts = [(readme.parent / link).read_text(encoding="utf-8").replace("**", "") for link in links
                 if (readme.parent / link).is_file()]
        if not texts:
            problems.append(f"{found} in a block that links to no page: {block[:80]!r}")
            continue
        for fig in found:
            num, unit = fig[:-1], fig[-1]
            pattern = rf"(?<![\w.]){re.escape(num)}" + (r"%" if unit == "%" else r"(?![\d])")
            if not any(re.search(pattern, t) for t in texts):
                problems.append(f"{fig} is in none of {links}: {block[:80]!r}")
    return problems


def test_readme_figures_are_in_the_pages_it_links():
    """A figure in the README is a summary of a page it links to, where the figure lives with its command."""
    assert unlinked_figures(ROOT / "README.md") == []


def test_the_figure_check_catches_a_stale_figure(tmp_path):
    (tmp_path / "page.md").write_text("WER 47.8% and 12.8x real time\n")
    (tmp_path / "README.md").write_text("| WER **47.8%**, 12.8x | [page](page.md) |\n\nNow 49.9% ([page](page.md)).\n\nAlone: 3.1x.\n")
    problems = unlinked_figures(tmp_path / "README.md")
    assert len(problems) == 2 and "49.9%" in problems[0] and "links to no page" in problems[1]


def test_readme_stays_short():
    """The README is the first screen and the way into docs/; the details live in the docs pages."""
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 260


# ---------------------------------------------------------------------------------------------- recipes.md


def _generator():
    spec = importlib.util.spec_from_file_location("gen_recipe_docs", ROOT / "tools" / "gen_recipe_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipes_md_is_generated_from_config():
    current = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert current == _generator().render(), "docs/recipes.md is out of date: run python tools/gen_recipe_docs.py"


def test_recipes_md_documents_every_field():
    """Every leaf field of the recipe has a row under its section's heading, with its documentation."""
    from steermoe_core.config import iter_fields

    text = _generator().render()
    sections = dict(re.findall(r"^## `\[([\w.]+)\]`\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    for key, _default, doc in iter_fields():
        section, name = key.rsplit(".", 1)
        assert section in sections, f"no section [{section}] in docs/recipes.md"
        row = re.search(rf"^\| `{name}` \|.*$", sections[section], re.M)
        assert row, f"{key}: no row in docs/recipes.md"
        assert doc and " ".join(doc.split())[:40].replace("|", "\\|") in row.group(0), f"{key}: its documentation is missing"


def test_the_version_is_one_in_pyproject_the_package_and_the_changelog():
    """meta.json records steermoe_core.__version__: it is pyproject's version, the newest CHANGELOG entry."""
    import re
    import tomllib

    import steermoe_core

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    newest = re.search(r"^## (\S+) - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert steermoe_core.__version__ == version == newest.group(1)

"""The docs (README.md and docs/*.md) against the code: the generated spec reference is current; every repository
path, link and anchor they name exists; their tables of stages, layers, data defects and environment variables are
the code's; and every code example runs. Python blocks run in a subprocess and curl lines against a real server on
a tiny random family; YAML blocks are valid specs; JSON blocks are valid records; `ruyi` lines parse against the
real command line, `make` targets exist. A block that cannot run here is preceded by `<!-- not run: why -->`."""
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = ("python", "yaml", "bash", "json", "text")  # text: pictures and program output, not code
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - {"runs", "out", "ruyi_flow.egg-info"}
MADE_BY_COMMANDS = ("runs/", ".ruyi/", ".venv/")  # paths the examples create
SERVER_URL = "http://127.0.0.1:8000"
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->")
PLUMBING = {".", "source", "set", "export", "cd"}


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    info: str
    text: str
    not_run: str | None

    def __str__(self):
        return f"{self.doc}:{self.line} ({self.lang})"


def blocks(path: Path) -> list[Block]:
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = re.match(r"```(\S*)\s*(.*)$", lines[i])
        if not m:
            i += 1
            continue
        start, prev = i, next((x for x in reversed(lines[:i]) if x.strip()), "")
        i += 1
        while not lines[i].startswith("```"):
            i += 1
        marker = NOT_RUN.search(prev)
        out.append(Block(path.name, start + 1, m.group(1), m.group(2), "\n".join(lines[start + 1:i]) + "\n",
                         marker.group(1) if marker else None))
        i += 1
    return out


ALL = [b for d in DOCS for b in blocks(d)]


def runnable(lang: str) -> list[Block]:
    return [b for b in ALL if b.lang == lang and b.not_run is None]


def prose(path: Path) -> str:
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def table(path: Path, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with `header`, as stripped cells."""
    rows, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(header):
            inside = True
        elif inside and line.startswith("|"):
            if not line.startswith("| ---"):
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif inside:
            break
    assert rows, f"{path.name}: no table headed {header!r}"
    return rows


def code(cell: str) -> str:
    return cell.strip().strip("`")


# -- the spec reference ---------------------------------------------------------------------------------------------

def test_spec_reference_is_current():
    from ruyi_core.spec.reference import COMMAND, reference

    assert (ROOT / "docs" / "spec.md").read_text(encoding="utf-8") == reference(), \
        f"docs/spec.md is stale: run `{COMMAND}` and commit it"


# -- paths, links and anchors ---------------------------------------------------------------------------------------

def slugs(path: Path) -> set[str]:
    from ruyi_core.spec.reference import slug

    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", prose(path), flags=re.M)}


def repo_path(token: str) -> str | None:
    """The repository path a backticked token names, or None when it is no repository path."""
    if re.search(r"[\s<>*{}$|…]|\.\.\.|://", token) or token.startswith(MADE_BY_COMMANDS + ("/", "~", "-")):
        return None
    if re.fullmatch(r"ruyi_core(\.\w+)+", token):  # a module, or a name in one
        parts = token.split(".")
        found = any((ROOT / Path(*parts[:n])).with_suffix(".py").is_file() or (ROOT / Path(*parts[:n])).is_dir()
                    for n in (len(parts), len(parts) - 1))
        return None if found else token.replace(".", "/")
    first = token.split("/")[0]
    if first in TOP and ("/" in token or first == token):
        return token
    return token if token.endswith(".py") else None  # a bare module file must be named by its full path


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_named_path_link_and_anchor_exists(doc):
    text, missing = prose(doc), []
    for token in re.findall(r"`([^`\n]+)`", text):
        path = repo_path(token)
        if path is not None and not (ROOT / path).exists():
            missing.append(f"`{token}`")
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", text)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            missing.append(f"link {target}")
        elif anchor and anchor not in slugs(dest):
            missing.append(f"anchor {target}")
    for b in ALL:  # paths in the examples' commands
        for token in re.findall(r"(?<![\w./-])((?:%s)/[\w./-]+)" % "|".join(sorted(TOP)), b.text):
            if b.doc == doc.name and b.lang == "bash" and not (ROOT / token.rstrip(".,")).exists():
                missing.append(f"{b}: {token}")
    assert not missing, f"{doc.name} names what does not exist: {', '.join(missing)}"


# -- tables that restate the code ----------------------------------------------------------------------------------

def test_the_stage_table_is_the_code_s():
    from ruyi_core.stages.table import STEPS

    rows = table(ROOT / "docs" / "architecture.md", "| step |")
    got = [(code(r[0]), code(r[1]), () if r[2] == "always" else tuple(code(f) for f in r[2].split(",")),
            () if r[3] == "—" else tuple(code(f) for f in r[3].split(",")), r[4] == "yes") for r in rows]
    want = [(s.name, s.component, s.when, s.stage.fields if s.stage else (), s.weights) for s in STEPS]
    assert got == want


def test_the_layers_are_test_layering_s():
    from test_layering import LAYERS

    rows = table(ROOT / "docs" / "architecture.md", "| layer |")
    assert [[code(m) for m in r[1].split(",")] for r in rows] == LAYERS


def test_the_defects_are_the_gate_s():
    from ruyi_core.data.schema import DEFECTS

    assert {code(r[0]): r[1] for r in table(ROOT / "docs" / "data.md", "| defect |")} == DEFECTS


def environment_variables() -> set[str]:
    """Every environment variable the code reads (or names for a child process), by the ways it is written."""
    patterns = [r"environ(?:\.get|\.setdefault)?\(\s*[\"']([A-Z][A-Z0-9_]+)", r"environ\[\s*[\"']([A-Z][A-Z0-9_]+)",
                r"getenv\(\s*[\"']([A-Z][A-Z0-9_]+)", r"envvar=[\"']([A-Z][A-Z0-9_]+)",
                r"\benv\.get\(\s*[\"']([A-Z][A-Z0-9_]+)", r"[\"']([A-Z][A-Z0-9_]+)[\"']\s+(?:not\s+)?in\s+os\.environ",
                r"[\"'](RUYI_[A-Z0-9_]+)[\"']"]
    files = [*ROOT.glob("ruyi_core/**/*.py"), *ROOT.glob("pipelines/*.py"), *ROOT.glob("components/*.py")]
    names = {n for f in files for p in patterns for n in re.findall(p, f.read_text(encoding="utf-8"))}
    make = (ROOT / "Makefile").read_text()
    names |= set(re.findall(r"^export (\w+)", make, re.M) + re.findall(r"\$\$([A-Z][A-Z0-9_]+)", make))
    return names | set(re.findall(r"^(\w+)\s*\?=", make, re.M))


def test_every_environment_variable_is_documented():
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", (ROOT / "docs" / "environment.md").read_text()))
    missing = environment_variables() - documented
    assert not missing, f"add {sorted(missing)} to docs/environment.md"


def test_the_readme_is_short_and_its_picture_has_every_step():
    from ruyi_core.stages.table import STEPS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    picture, at = next(b.text for b in ALL if b.doc == "README.md" and b.lang == "text"), 0
    for s in STEPS:  # in run order
        found = [picture.find(n, at) for n in {s.name, s.component} if picture.find(n, at) >= 0]
        assert found, f"the README's picture lacks step {s.name} (after position {at})"
        at = min(found)


# -- every code block declares a language; data examples are valid ------------------------------------------------

def test_every_block_says_what_it_is():
    bad = [str(b) for b in ALL if b.lang not in LANGS]
    assert not bad, f"use one of {LANGS} (text for pictures and output): {bad}"
    assert all(b.lang == "bash" for b in ALL if b.not_run), "only shell blocks may be marked not run"


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.mark.parametrize("block", runnable("yaml"), ids=str)
def test_yaml_examples_are_valid_specs(block):
    """A whole spec (it names family.base) is parsed as it is; a fragment over specs/tiny.yaml."""
    from ruyi_core.spec import parse_spec

    raw = yaml.safe_load(block.text)
    if "base" not in raw.get("family", {}):
        raw = merged(yaml.safe_load((ROOT / "specs" / "tiny.yaml").read_text()), raw)
    parse_spec(raw, str(block))


class _ChatTemplate:
    def apply_chat_template(self, messages, **kw):
        return messages[-1]["content"]


@pytest.mark.parametrize("block", runnable("json"), ids=str)
def test_json_examples_are_valid_records(block):
    """`json KIND` blocks hold one record a line: a corpus kind's, or `benchmark:FORMAT`'s."""
    from ruyi_core.data.schema import FIELDS, ROLE_ORDER_REGEX, normalize, roles_string
    from ruyi_core.eval.tasks import normalize as benchmark_record

    kind = block.info.strip()
    assert kind in FIELDS or kind.startswith("benchmark:"), f"{block}: say what the records are: json KIND"
    for n, line in enumerate(block.text.splitlines()):
        obj, where = json.loads(line), f"{block} record {n + 1}"
        if kind.startswith("benchmark:"):
            benchmark_record(kind.partition(":")[2], obj, _ChatTemplate(), where)
            continue
        rec, err = normalize(obj, kind)
        assert err is None and all(rec[f] is not None for f in FIELDS[kind]), (where, err, rec)
        texts = [m["content"] for m in rec["messages"]] if kind == "sft" else [rec[f] for f in FIELDS[kind]]
        assert all(t.strip() for t in texts), where
        assert kind != "sft" or re.match(ROLE_ORDER_REGEX, roles_string(rec["messages"])), where


# -- shell examples -------------------------------------------------------------------------------------------------

def commands(text: str) -> list[list[str]]:
    """Every simple command of a shell block, as words (comments, operators and leading VAR=value dropped)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split, lex.commenters = True, "#"
        words: list[str] = []
        for w in [*lex, ";"]:
            if w and set(w) <= set(";&|"):
                while words and re.fullmatch(r"\w+=.*", words[0]):
                    words.pop(0)
                out += [words] if words else []
                words = []
            else:
                words.append(w)
    return out


def ruyi_problem(args: list[str]) -> str | None:
    """Why `ruyi ARGS` would not parse against the real command line (options, their values, required ones)."""
    import typer

    from pipelines.cli import app

    cmd, path = typer.main.get_command(app), ["ruyi"]
    while getattr(cmd, "commands", None):
        if not args or args[0] not in cmd.commands:
            return f"`{' '.join(path)}` has no command {args[:1]}"
        path.append(args[0])
        cmd, args = cmd.commands[args[0]], args[1:]
    try:
        cmd.make_context(" ".join(path), list(args))
    except Exception as e:  # typer's own click raises its UsageError family
        return f"`{' '.join(path)}`: {e}"
    return None


def command_problem(words: list[str], marked: bool) -> str | None:
    name, args = words[0], words[1:]
    if name == "ruyi":
        return ruyi_problem(args)
    if name == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
        return next((f"no make target {t}" for t in args if "=" not in t and t not in targets), None)
    if name == "python" and args[:1] == ["-m"]:
        import importlib.util

        return None if importlib.util.find_spec(args[1]) else f"no module {args[1]}"
    if name == "python":
        script = (ROOT / args[0]).read_text() if (ROOT / args[0]).is_file() else None
        unknown = [a for a in args[1:] if a.startswith("--") and script and f'"{a.split("=")[0]}"' not in script]
        return f"no script {args[0]}" if script is None else (f"{args[0]} has no {unknown}" if unknown else None)
    if name in PLUMBING or name == "curl" or marked:
        return None
    return f"`{name}` cannot run here: mark the block <!-- not run: why -->"


def test_commands_named_in_the_text_exist():
    """`ruyi a b` in the text: every word is a real (sub)command, up to the command's options and arguments."""
    import typer

    from pipelines.cli import app

    wrong = []
    for doc in DOCS:
        for span in re.findall(r"`(ruyi [^`\n]+)`", prose(doc)):
            cmd, words = typer.main.get_command(app), span.split()[1:]
            while getattr(cmd, "commands", None) and words and words[0] != "...":  # `ruyi models ...`: a group
                if words[0] not in cmd.commands:
                    wrong.append(f"{doc.name}: `{span}`")
                    break
                cmd, words = cmd.commands[words[0]], words[1:]
            opts = {o for p in getattr(cmd, "params", []) for o in getattr(p, "opts", [])}
            wrong += [f"{doc.name}: `{span}`: {w}" for w in words if w.startswith("--") and w not in opts]
    assert not wrong, wrong


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "bash"], ids=str)
def test_shell_examples_name_real_commands(block):
    problems = [p for words in commands(block.text) if (p := command_problem(words, block.not_run is not None))]
    assert not problems, f"{block}: {problems}"


# -- the server examples, run -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def family_folder(tmp_path_factory, micro_base):
    from conftest import randomize_

    from ruyi_core.family.convert import family_from_base
    from ruyi_core.family.io import save_family

    base, tok = micro_base
    d = tmp_path_factory.mktemp("docs") / "ruyi-tiny"
    save_family(randomize_(family_from_base(base, [0, 2, 3]), seed=5).eval(), tok, d)
    return d


@pytest.fixture(scope="module")
def servers(family_folder):
    """The family as `ruyi-tiny` behind two servers: an open one, and one that needs an API key."""
    import torch
    from test_serve import serving

    from ruyi_core.runtime import Runtime
    from ruyi_core.serve.api import create_app
    from ruyi_core.serve.tiers import from_family

    served = from_family(family_folder, Runtime(torch.device("cpu"), torch.float32), name="ruyi-tiny")
    with serving(create_app(served, max_batch=4)) as open_url, \
            serving(create_app(served, max_batch=4, api_key="sk-docs-test")) as key_url:
        yield open_url.removesuffix("/v1"), key_url.removesuffix("/v1"), "sk-docs-test"


def curl_lines() -> list[tuple[Block, str]]:
    out = []
    for b in runnable("bash"):
        for line in b.text.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("curl "):
                out.append((b, line.strip()))
    return out


def test_curl_examples_run_against_a_server(servers):
    open_url, key_url, key = servers
    ran = curl_lines()
    assert ran, "no curl examples found"
    for block, line in ran:
        url = key_url if "Authorization" in line else open_url
        cmd = line.replace(SERVER_URL, url).replace("curl ", "curl --fail-with-body --max-time 120 ", 1)
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=180,
                           env={**os.environ, "RUYI_API_KEY": key})
        assert r.returncode == 0 and r.stdout.strip(), f"{block}: {line}\n{r.stdout}\n{r.stderr}"


@pytest.mark.parametrize("block", runnable("python"), ids=str)
def test_python_examples_run(block, servers, family_folder, tmp_path):
    """Each in its own interpreter, in a folder where `runs/family` is a family, against the server."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "family").symlink_to(family_folder)
    script = tmp_path / "example.py"
    script.write_text(block.text.replace(SERVER_URL, servers[0]))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, f"{block}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"

"""The package's shape holds: no import circles, and module docstrings that name only files, modules and functions
that exist (a stale docstring is how a newcomer gets lost)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tunelab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """The tunelab modules `name` imports, at module level or inside functions (a circle closed by an import inside
    a function still ties the modules into one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from tunelab import outputs` imports the module tunelab.outputs
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {target for target in found if target in MODULES and target != name}


def import_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in edges:
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles():
    edges = {name: imported_modules(name, path) for name, path in MODULES.items()}
    assert sum(len(targets) for targets in edges.values()) > 100, "the import walk found almost nothing"
    assert import_circles(edges) == []


def test_the_circle_finder_finds_a_circle():
    # The test above can only pass for the right reason if a circle would be found.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circles(edges) == [["a", "b", "c"]]


# A file named in a docstring: `tasks/llm.py`, `outputs.py`. A function, class or constant named through its
# module: `tasks/llm.plan`, `outputs.RunFolder.close_for`, `tunelab.tasks.dry_run.RunPlan`.
FILE = re.compile(r"(?<![\w/.])((?:[a-z_]+/)*[a-z_]+\.py)\b")
ATTRIBUTE = re.compile(r"(?<![\w/.])((?:tunelab\.)?(?:[a-z_]+[/.])*[a-z_]+)\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")


# Files of other projects that docstrings name on purpose, and file types that look like `module.attribute`.
OTHER_PROJECTS_FILES = {"convert_hf_to_gguf.py"}  # llama.cpp's converter, which inference/export.py mirrors
FILE_TYPES = {"db", "json", "jsonl", "md", "yaml", "yml", "csv", "tsv", "png", "html", "gguf", "txt", "bin", "zip"}


def named_file_exists(named: str, module_path: Path) -> bool:
    if named in OTHER_PROJECTS_FILES:
        return True
    return any((folder / named).is_file() for folder in (module_path.parent, PACKAGE, ROOT))


def resolve_module(head: str, package: str) -> str | None:
    """The tunelab module a docstring's `config/llm`, `outputs` or `tunelab.tasks.dry_run` means, if any (looked
    up from the package root and from the docstring's own package)."""
    dotted = head.replace("/", ".")
    if dotted == "tunelab" or dotted.startswith("tunelab."):
        candidates = [dotted]
    else:
        candidates = [f"tunelab.{dotted}", f"{package}.{dotted}"]
    for candidate in candidates:
        candidate = candidate.removesuffix(".__init__")
        if candidate in MODULES:
            return candidate
    return None


def docstring_problems(name: str, path: Path) -> list[str]:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    problems = [f"{named} does not exist" for named in FILE.findall(doc) if not named_file_exists(named, path)]
    for head, attributes in ATTRIBUTE.findall(doc):
        if head.endswith(".py") or attributes.split(".")[0] in {"py", *FILE_TYPES}:
            continue
        target = resolve_module(head, package)
        if target is None:
            continue  # not a tunelab module (torch.compile, e.g.)
        value = importlib.import_module(target)
        for attribute in attributes.split("."):
            if not hasattr(value, attribute):
                if isinstance(value, type(importlib)) and f"{value.__name__}.{attribute}" in MODULES:
                    value = importlib.import_module(f"{value.__name__}.{attribute}")
                    continue
                problems.append(f"{head}.{attributes}: {target} has no {attribute!r}")
                break
            value = getattr(value, attribute)
    return problems


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_docstring_names_what_exists(name):
    path = MODULES[name]
    if path.name != "__main__.py":
        assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{name} has no module docstring"
    assert docstring_problems(name, path) == []


def test_the_docstring_check_finds_a_stale_name(tmp_path):
    stale = PACKAGE / "cli.py"
    fake = tmp_path / "module.py"
    fake.write_text('"""Calls run.py and tasks/llm.prepare_everything, and dry_run.plan."""\n', encoding="utf-8")
    problems = docstring_problems("tunelab.fake", fake)
    assert problems == [
        "run.py does not exist",
        "tasks/llm.prepare_everything: tunelab.tasks.llm has no 'prepare_everything'",
    ]
    assert docstring_problems("tunelab.cli", stale) == []


def test_every_task_names_a_spine_that_prepares_plans_and_runs():
    from tunelab import tasks
    from tunelab.config import LLMParams, TextClassificationParams

    for params in (LLMParams(), TextClassificationParams()):
        spine = tasks.spine(params)
        assert spine.__name__ == f"tunelab.tasks.{params.task}"
        assert all(callable(getattr(spine, step, None)) for step in ("prepare", "plan", "run"))


def test_the_registry_is_the_one_list_of_methods(monkeypatch):
    """A method's line in methods.REGISTRY is all the config checks read: a new pair method gets the length rules
    of preference data without being named anywhere else."""
    from tunelab.config import LLMParams
    from tunelab.errors import ConfigError
    from tunelab.methods import METHODS, REGISTRY, Entry

    for name, entry in REGISTRY.items():
        assert entry.data in ("examples", "pairs", "labeled", "prompts")
        assert METHODS[name].name == name and METHODS[name].data == entry.data
    LLMParams(trainer="sft", max_prompt_length=2000, block_size=1024)  # examples: no prompt length rule
    monkeypatch.setitem(REGISTRY, "new_pairs", Entry("dpo", "pairs", "a pair method added in one line"))
    with pytest.raises(ConfigError, match="max_prompt_length .* is larger than block_size"):
        LLMParams(trainer="new_pairs", max_prompt_length=2000, block_size=1024)

"""The user's own Python (reward functions, tools), named in one of three ways:

    FILE.py:function      the file imported as a module, once while it is unchanged
    package.module.func   a module Python can import (TRL's CLI form), the current folder searched first
    a function object     handed to the Python API: kept for this process under one of the names above when it has
                          one (a module's top-level function), else as `<python>:name`, which only this process knows

Errors (a file that does not import, a missing function) are said in one line naming the file and the line.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, TunelabError

# What a function handed to the Python API is called when no file or module names it (a lambda, a function made
# inside another, a notebook's, a callable object): it can be called in this process only.
IN_PROCESS = "<python>:"
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def user_function(spec: str, kind: str, error: type[TunelabError] = TunelabError) -> Callable[..., Any]:
    """The function a spec names (a reward, a tool: `kind` names it in the errors): a function handed to the Python
    API, FILE.py:function (the file imported as a module) or package.module.function; `error` in one line where it
    does not import or has no such function."""
    if spec in _GIVEN:
        return _GIVEN[spec]
    if spec.startswith(IN_PROCESS):
        raise error(
            f"{kind} {spec.removeprefix(IN_PROCESS)}: a function handed to the Python API in another process (a "
            "lambda, a function made inside another or in a notebook): hand it again, or put it in a .py file and "
            "name it file.py:function"
        )
    if ":" not in spec and is_dotted(spec):
        return _module_function(spec, kind, error)
    file, _, function = spec.rpartition(":")
    path = Path(file).expanduser()
    if not path.is_file():
        raise error(f"{kind} {spec}: {path} does not exist")
    module = _user_module(spec, kind, path, error)
    found = getattr(module, function, None)
    if not callable(found):
        available = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise error(f"{kind} {spec}: {path} has no function {function!r} (it has {', '.join(available)})")
    return found


def is_dotted(spec: str) -> bool:
    """Whether a spec reads as package.module.function (TRL's form), not a file's name."""
    return bool(_DOTTED.fullmatch(spec)) and not spec.endswith(".py")


def _module_function(spec: str, kind: str, error: type[TunelabError]) -> Callable[..., Any]:
    module_name, _, function = spec.rpartition(".")
    if os.getcwd() not in sys.path:  # (as TRL's CLI: a module beside the command is found)
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as failure:
        raise error(f"{kind} {spec}: no module named {failure.name!r} (nor a file.py:function)") from None
    except Exception as failure:  # noqa: BLE001 - any error of the user's module, as one line
        where = getattr(sys.modules.get(module_name), "__file__", None) or module_name
        line = user_line(failure, Path(where)) if where != module_name else ""
        raise error(f"{kind} {spec}: {where}{line} does not import: {type(failure).__name__}: {failure}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise error(f"{kind} {spec}: module {module_name} has no function {function!r}")
    return found


# ---- functions handed to the Python API ----------------------------------------------------------------------------

# spec -> the very object the user handed over: this process calls it (its module's state is the user's), while
# launched processes and a later resume import it again by the spec.
_GIVEN: dict[str, Callable[..., Any]] = {}


def function_spec(function: Any, kind: str, field: str) -> str:
    """The spec a function handed to the Python API for parameter `field` runs under (a `kind`: "reward", "tool"):
    FILE.py:function for a top-level function of a file (the script's own too), package.module.function for one of
    a package's modules, `<python>:name` for the rest; this process calls the object itself. ConfigError for what
    cannot be a reward or a tool."""
    if kind == "reward" and hasattr(function, "forward") and hasattr(function, "config"):
        raise ConfigError(f"{field}: a model object: save it (save_pretrained) and give its folder, or its hub id")
    if not callable(function):
        raise ConfigError(f"{field}: expected names or functions, got {type(function).__name__} {function!r:.60}")
    name = getattr(function, "__name__", None)
    if kind == "tool" and not inspect.isfunction(function):
        # (the model calls a tool by its name; transformers describes it from its signature and docstring)
        raise ConfigError(f"{field}: expected functions, got {type(function).__name__}")
    spec = _named_spec(function) or f"{IN_PROCESS}{name or type(function).__name__}"
    if spec.startswith(IN_PROCESS):  # two different lambdas are two rewards: <python>:<lambda>, <python>:<lambda>#2
        base, count = spec, 1
        while _GIVEN.get(spec, function) is not function:
            count += 1
            spec = f"{base}#{count}"
    _GIVEN[spec] = function
    return spec


def _named_spec(function: Any) -> str | None:
    """FILE.py:function or package.module.function for a module's top-level function, else None."""
    if not inspect.isfunction(function) or function.__name__ != function.__qualname__:
        return None  # a lambda, a method, a function made inside another, a callable object
    module = sys.modules.get(function.__module__)
    if module is None or getattr(module, function.__name__, None) is not function:
        return None
    import_name = function.__module__
    if import_name == "__main__":  # the script (its module name when run with python -m)
        import_name = getattr(getattr(module, "__spec__", None), "name", None) or "__main__"
    if "." in import_name:
        return f"{import_name}.{function.__name__}"
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py") or not Path(file).is_file():
        return None  # a notebook's, an interactive session's
    path = Path(file).resolve()
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    return f"{shown}:{function.__name__}"


def launch_problem(spec: str) -> str | None:
    """Why a launched process could not call what this spec names (None when it can): a function only this process
    knows, or one of the running script, which each launched process imports, without a __main__ guard."""
    function = _GIVEN.get(spec)
    if function is None:
        return None
    if spec.startswith(IN_PROCESS):
        return (
            f"{spec.removeprefix(IN_PROCESS)} (a lambda, a function made inside another or in a notebook) cannot "
            "reach the launched processes: put it in a .py file (a module's top-level function travels)"
        )
    module = sys.modules.get(function.__module__)
    if function.__module__ == "__main__" and not _guarded(Path(module.__file__)):
        return (
            f"{spec}: each launched process imports {Path(module.__file__).name} for it, and would run the training "
            'again: put the script\'s training under `if __name__ == "__main__":` (as multiprocessing asks), or the '
            "function in a file of its own"
        )
    return None


def import_roots(specs: list[str]) -> list[str]:
    """The folders a launched process must search to import the package.module.function specs handed here (the
    script's own folder, say, which is not the launched processes')."""
    roots = []
    for spec in specs:
        function = _GIVEN.get(spec)
        if function is None or ":" in spec:
            continue
        module = sys.modules.get(function.__module__)
        file = getattr(module, "__file__", None)
        if file:  # (package.module.function: the package's folder is 2 up from module.py, 3 from __init__.py)
            up = spec.count(".") - 1 + (Path(file).name == "__init__.py")
            roots.append(str(Path(file).resolve().parents[up]))
    return list(dict.fromkeys(roots))


def _guarded(script: Path) -> bool:
    """Whether a script holds a top-level `if __name__ == "__main__":`."""
    try:
        tree = ast.parse(script.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return False
    for node in tree.body:
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "__name__" in test and "__main__" in test:
                return True
    return False


# Each user file imported once while it is unchanged: the rewards and tools of one file share its module (a tool's
# state, a reward's cache), and a run's later loads reuse it. An edited file (other bytes) is imported anew, in place
# of its old module. (A helper module the file imports is Python's own: imported once.)
_MODULES: dict[str, tuple[str, Any]] = {}


def _user_module(spec: str, kind: str, path: Path, error: type[TunelabError]) -> Any:
    where = str(path.resolve())
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as failure:
        raise error(f"{kind} {spec}: {path} cannot be read ({failure.strerror})") from None
    if where in _MODULES and _MODULES[where][0] == digest:
        return _MODULES[where][1]
    # (a name of the path alone, the same in every process: what pickles objects of the module refers to)
    module_name = f"tunelab_user_{hashlib.sha256(where.encode()).hexdigest()[:16]}"
    earlier = sys.modules.get(module_name)
    loader = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader)
    # As `import` does: the module is in sys.modules while it runs (dataclasses and pickling look it up there),
    # and the files beside it can be imported from it (a helper module of the user's).
    sys.modules[module_name] = module
    if str(path.resolve().parent) not in sys.path:
        sys.path.insert(0, str(path.resolve().parent))
    try:
        loader.loader.exec_module(module)
    except Exception as failure:  # noqa: BLE001 - any error of the user's file, as one line
        if earlier is None:  # (an edit that does not import leaves the version in use as it was)
            del sys.modules[module_name]
        else:
            sys.modules[module_name] = earlier
        line = user_line(failure, path)
        raise error(f"{kind} {spec}: {path}{line} does not import: {type(failure).__name__}: {failure}") from None
    _MODULES[where] = (digest, module)
    return module


def user_line(error: BaseException, path: Path) -> str:
    """`:LINE` of the user's file where the error happened, when the traceback passes through it."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f":{error.lineno}"
    tb, line = error.__traceback__, ""
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path.resolve() or tb.tb_frame.f_code.co_filename == str(path):
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


_LOOP: asyncio.AbstractEventLoop | None = None


def awaited(value: Any) -> Any:
    """What a call of the user's returned; an `async def` function's result awaited to its end on one event loop
    kept for the whole process (TRL's way), so that what a call makes for the next (an HTTP client, a semaphore for
    a judge's rate limit) keeps working."""
    if not inspect.isawaitable(value):
        return value
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, name="tunelab-user-async", daemon=True).start()

    async def result() -> Any:
        return await value

    return asyncio.run_coroutine_threadsafe(result(), _LOOP).result()

"""The user's own Python (reward functions, tools), named in one of three ways:

    FILE.py:function      the file imported as a module, once while it is unchanged
    package.module.func   a module Python can import (TRL's CLI form), the current folder searched first
    a function object     handed to the Python API, named for the parameters by what imports it again (its module's
                          module.function, the running script's /ABSOLUTE/script.py:function), else `<python>:name`,
                          which only this process knows; this process calls the object itself

Errors (a file that does not import, a missing function) are said in one line naming the file and the line.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
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
        with _importing():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as failure:
        if failure.name and (module_name == failure.name or module_name.startswith(failure.name + ".")):
            raise error(
                f"{kind} {spec}: no module named {failure.name!r} (nor a file.py:function, a folder)"
            ) from None
        raise error(f"{kind} {spec}: module {module_name} does not import: {failure}") from None
    except Exception as failure:  # noqa: BLE001 - any error of the user's module, as one line
        where = getattr(sys.modules.get(module_name), "__file__", None) or module_name
        line = user_line(failure, Path(where)) if where != module_name else ""
        raise error(f"{kind} {spec}: {where}{line} does not import: {type(failure).__name__}: {failure}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise error(f"{kind} {spec}: module {module_name} has no function {function!r}")
    return found


# While a user's file or module is imported for its functions: a `tunelab.train` it calls then is refused (a
# script's training outside its `if __name__ == "__main__":`, run again by each process that imports the script).
_IMPORTING = threading.local()


@contextlib.contextmanager
def _importing() -> Iterator[None]:
    depth = getattr(_IMPORTING, "depth", 0)
    _IMPORTING.depth = depth + 1
    try:
        yield
    finally:
        _IMPORTING.depth = depth


def importing_user_code() -> bool:
    """Whether a user's file or module is being imported for its functions (tasks.train refuses to run then)."""
    return getattr(_IMPORTING, "depth", 0) > 0


# ---- functions handed to the Python API ----------------------------------------------------------------------------

# spec -> the very object the user handed over, where importing the spec again would make another one (a script's
# function, FILE.py:function; a lambda's or a closure's, <python>:name): this process calls the object itself, while
# launched processes and a later resume import it by the spec. A function of an importable module needs no entry:
# importing its module.function finds the very object (but a script run with python -m does: importing it by its
# module name runs it again). A name handed over again (a notebook cell run twice) now means the newer object; so
# does it for a parameter object made earlier that still names it (keep a lambda's name to one at a time).
_GIVEN: dict[str, Callable[..., Any]] = {}


def function_specs(value: Any, kind: str, field: str) -> Any:
    """A parameter's value with the functions handed to the Python API (a function, or a list of functions and
    names) replaced by the specs they run under, comma-separated; anything else as it is. Two functions of one name
    without a module are told apart within the list (<python>:<lambda>, <python>:<lambda>#2)."""
    if not isinstance(value, (list, tuple)) and (isinstance(value, str) or not callable(value)):
        return value  # (text, or unset: the parameter's own checks read it)
    items = value if isinstance(value, (list, tuple)) else [value]
    specs: list[str] = []
    for item in items:
        if isinstance(item, str):
            specs.append(item)
            continue
        spec = function_spec(item, kind, field)
        if spec.startswith(IN_PROCESS):
            base, count = spec, 1
            while spec in specs:
                count += 1
                spec = f"{base}#{count}"
            _GIVEN[spec] = item
        specs.append(spec)
    return ",".join(specs)


def function_spec(function: Any, kind: str, field: str) -> str:
    """The spec a function handed to the Python API for parameter `field` runs under (a `kind`: "reward", "tool"):
    package.module.function for a top-level function of an importable module, /ABSOLUTE/script.py:function for one
    of the running script, `<python>:name` for the rest. ConfigError for what cannot be a reward or a tool."""
    if kind == "reward" and hasattr(function, "forward") and hasattr(function, "config"):
        raise ConfigError(f"{field}: a model object: save it (save_pretrained) and give its folder, or its hub id")
    if not callable(function):
        raise ConfigError(f"{field}: expected names or functions, got {type(function).__name__} {function!r:.60}")
    if kind == "tool" and not inspect.isfunction(function):
        # (the model calls a tool by its name; transformers describes it from its signature and docstring)
        raise ConfigError(f"{field}: expected functions, got {type(function).__name__}")
    spec = _named_spec(function)
    if spec is None:
        inner = function.func if isinstance(function, functools.partial) else function  # (TRL's name for a partial)
        return f"{IN_PROCESS}{getattr(inner, '__name__', None) or type(inner).__name__}"
    if "," in spec:
        raise ConfigError(
            f"{field}: {spec}: the file's path holds a comma, which separates the names: move or rename it"
        )
    if ":" in spec or function.__module__ == "__main__":  # (importing the running script again makes a second copy)
        _GIVEN[spec] = function
    return spec


def _named_spec(function: Any) -> str | None:
    """package.module.function or /ABSOLUTE/script.py:function for a module's top-level function, else None."""
    if not inspect.isfunction(function) or function.__name__ != function.__qualname__:
        return None  # a lambda, a method, a function made inside another, a callable object, a partial
    module = sys.modules.get(function.__module__)
    if module is None or getattr(module, function.__name__, None) is not function:
        return None
    import_name = function.__module__
    if import_name == "__main__":  # the script: by its module name when run with python -m, else by its file
        import_name = getattr(getattr(module, "__spec__", None), "name", None) or "__main__"
    file = getattr(module, "__file__", None)
    if import_name != "__main__" and file and Path(file).stem in (import_name.rpartition(".")[2], "__init__"):
        return f"{import_name}.{function.__name__}"
    if not file or not file.endswith(".py") or not Path(file).is_file():
        return None  # a notebook's, an interactive session's
    # (the script; or a module loaded from a file under a name no import finds: by its file, too)
    return f"{Path(file).resolve()}:{function.__name__}"


def launch_problem(spec: str) -> str | None:
    """Why a launched process could not call what this spec names (None when it can): something only this process
    knows, or a function of the running script, which each launched process imports, without a __main__ guard."""
    function = _GIVEN.get(spec)
    if function is None:
        return None
    if spec.startswith(IN_PROCESS):
        return (
            f"{spec.removeprefix(IN_PROCESS)} ({_what(function)}) exists in this process only, and the launched "
            "processes cannot import it: make it a top-level function of a .py file"
        )
    module = sys.modules.get(function.__module__)
    if function.__module__ == "__main__" and not _guarded(Path(module.__file__)):
        return (
            f"{spec}: each launched process imports {Path(module.__file__).name} for it, and would run the training "
            'again: put the script\'s training under `if __name__ == "__main__":` (as multiprocessing asks), or the '
            "function in a file of its own"
        )
    return None


def _what(function: Any) -> str:
    if inspect.isfunction(function):
        if function.__name__ == "<lambda>":
            return "a lambda"
        return "a function made inside another" if "<locals>" in function.__qualname__ else "a notebook's function"
    if isinstance(function, functools.partial):
        return "a functools.partial"
    return "a method" if inspect.ismethod(function) else f"a callable {type(function).__name__}"


def import_roots(specs: list[str]) -> list[str]:
    """The folders a launched process must search to import the package.module.function specs (the script's own
    folder, say, where its processes start elsewhere); none for installed packages."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    folders = [
        *site.getsitepackages(),
        site.getusersitepackages(),
        paths["purelib"],
        paths["platlib"],
        paths["stdlib"],
    ]
    installed = [Path(p).resolve() for p in folders]
    roots = []
    for spec in specs:
        if ":" in spec or not is_dotted(spec):
            continue
        top = spec.split(".")[0]
        module = sys.modules.get(top)
        found = getattr(module, "__spec__", None) if module is not None else None
        if found is None:
            with contextlib.suppress(ImportError, ValueError):
                found = importlib.util.find_spec(top)
        where = getattr(found, "origin", None)
        if not where or not Path(where).is_file():
            continue  # a built-in module, a namespace package: nothing to point at
        path = Path(where).resolve()
        root = path.parent.parent if path.name == "__init__.py" else path.parent
        if not any(root.is_relative_to(folder) for folder in installed):
            roots.append(str(root))
    return list(dict.fromkeys(roots))


def _guarded(script: Path) -> bool:
    """Whether a script holds a top-level `if __name__ == "__main__":`."""
    try:
        tree = ast.parse(script.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return False
    for node in tree.body:
        test = node.test if isinstance(node, ast.If) else None
        tests = test.values if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And) else [test]
        for part in tests:  # (`if __name__ == "__main__" and ...:` guards too)
            if isinstance(part, ast.Compare) and len(part.ops) == 1 and isinstance(part.ops[0], ast.Eq):
                sides = {ast.unparse(part.left), ast.unparse(part.comparators[0])}
                if sides in ({"__name__", "'__main__'"}, {"__name__", '"__main__"'}):
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
        with _importing():
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

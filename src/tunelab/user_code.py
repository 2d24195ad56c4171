"""The user's own Python, named FILE.py:function (reward functions, tools): each file imported as a module, once while
it is unchanged, its errors said in one line naming the file and the line."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


def user_function(spec: str, kind: str, error: type[TunelabError] = TunelabError) -> Callable[..., Any]:
    """The function a file.py:function names (a reward, a tool: `kind` names it in the errors), its file imported as
    a module; `error` in one line where it does not import or has no such function."""
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

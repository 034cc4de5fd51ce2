"""User programs named on the command line: `path/to/script.py:NAME` or `package.module:NAME`.

A spec names an object in a script (imported from where it is) or in an importable module. A
class, or a factory function (`make_*`, `build_*`, `create_*`, or marked with `@factory`), is
called to build the program; anything else (a model function, a built `nn.Module`) is the program.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from pyrovae.errors import PyrovaeError

__all__ = ["FACTORY_PREFIXES", "build_program", "describe", "factory", "is_spec", "load_object"]

FACTORY_PREFIXES = ("make_", "build_", "create_")

F = TypeVar("F", bound=Callable[..., Any])

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def factory(fn: F) -> F:
    """Mark `fn` as a factory: `build_program` calls it to build the program whatever its name."""
    fn.__pyrovae_factory__ = True  # type: ignore[attr-defined]
    return fn


def _split(spec: str) -> tuple[str, str]:
    where, _, name = spec.rpartition(":")
    return where, name


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def is_spec(name: str) -> bool:
    """Whether `name` names user code (`file.py:NAME`, `pkg.module:NAME`) rather than a registered name."""
    if ":" not in name:
        return False
    where, _ = _split(name)
    return _is_path(where) or _DOTTED.fullmatch(where) is not None


def describe(spec: str) -> str:
    """The canonical spec to record: absolute path for scripts, `module:NAME` otherwise.

    Names that are not specs (registered names) come back unchanged.
    """
    if not is_spec(spec):
        return spec
    where, name = _split(spec)
    if _is_path(where):
        return f"{Path(where).expanduser().resolve()}:{name}"
    return f"{where}:{name}"


def load_object(spec: str) -> object:
    """The object `NAME` (dotted attributes allowed) from the script or module that `spec` names."""
    if ":" not in spec:
        raise PyrovaeError(f"{spec!r} is not a spec: expected path/to/script.py:NAME or package.module:NAME")
    where, name = _split(spec)
    if not where:
        raise PyrovaeError(f"spec {spec!r} names no script or module before ':'")
    if not name:
        raise PyrovaeError(f"spec {spec!r} names no object after ':'")
    if _DOTTED.fullmatch(name) is None:
        raise PyrovaeError(f"spec {spec!r}: {name!r} is not a (dotted) Python name")
    if _is_path(where):
        module = _import_file(Path(where).expanduser().resolve())
        label = str(module.__file__)
    else:
        module = _import_module(where)
        label = f"module {where!r}"
    return _attribute(module, name, label)


def build_program(spec: str, data_shape: tuple[int, ...], instances: dict[str, object] | None = None, **options: Any) -> object:
    """The program that `spec` names, built if it is a class or a factory.

    A class or factory gets the keywords it accepts among `data_shape=` and `options`; others are
    dropped. A plain function or an instance is returned as is. ``FILE.py:Class.method`` (Pyro's
    examples write ``VAE.model`` and ``VAE.guide``) is that method bound to an instance of
    the class, built once per `instances` dict, so a model and a guide named this way share it.
    """
    where, name = _split(spec)
    owner, _, method = name.rpartition(".")
    if owner and isinstance(load_object(f"{where}:{owner}"), type):
        key = f"{describe(where + ':' + owner)}"
        cache = instances if instances is not None else {}
        if key not in cache:
            cache[key] = build_program(f"{where}:{owner}", data_shape, **options)
        bound = getattr(cache[key], method, None)
        if not callable(bound):
            raise PyrovaeError(f"{spec}: {owner} has no method {method!r}")
        return bound
    target = load_object(spec)
    if _is_builder(target):
        program = _call(cast(Callable[..., Any], target), spec, {"data_shape": tuple(data_shape), **options})
        if not callable(program):
            raise PyrovaeError(f"{spec} returned {type(program).__name__}, not a Pyro program (a callable)")
        return program
    if not callable(target):
        raise PyrovaeError(f"{spec} is a {type(target).__name__}, not a Pyro program (a callable)")
    return target


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    return f"pyrovae_user_{stem}_{digest}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _import_file(path: Path) -> types.ModuleType:
    if not path.exists():
        raise PyrovaeError(f"no such file: {path}")
    if path.is_dir() or path.suffix != ".py":
        raise PyrovaeError(f"not a Python file (expected a .py script): {path}")
    name = _module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise PyrovaeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # before running it, as a normal import does (dataclasses, pickling)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        loader_spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        del sys.modules[name]
        line = _line_in(error, path)
        raise PyrovaeError(f"{path}{line} raised while being imported: {_first_line(error)}") from error
    finally:
        if folder in sys.path:
            sys.path.remove(folder)  # only our entry: what the script added itself stays
    return module


def _line_in(error: BaseException, path: Path) -> str:
    """' (line N)': the last line of `path` the error passed through, if any."""
    if isinstance(error, SyntaxError) and error.filename and Path(error.filename).resolve() == path:
        return f" (line {error.lineno})" if error.lineno else ""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename).resolve() == path]
    return f" (line {lines[-1]})" if lines else ""


def _import_module(where: str) -> types.ModuleType:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (where == missing or where.startswith(missing + ".")):
            raise PyrovaeError(
                f"cannot import module {where!r}: no module named {missing!r} "
                "(install it or put it on PYTHONPATH; for a script give its path ending in .py)"
            ) from error
        raise PyrovaeError(f"module {where!r} raised while being imported: {_first_line(error)}") from error
    except (Exception, SystemExit) as error:
        raise PyrovaeError(f"module {where!r} raised while being imported: {_first_line(error)}") from error


def _public_names(obj: object) -> tuple[list[str], list[str]]:
    """(names to list, names to match): what `obj` defines itself, and everything public on it."""
    everything = sorted(n for n in dir(obj) if not n.startswith("_"))
    if isinstance(obj, types.ModuleType):
        own = [n for n in everything if not _imported(getattr(obj, n), obj.__name__)]
    elif inspect.isclass(obj):
        own = sorted(n for n in vars(obj) if not n.startswith("_"))
    else:
        own = everything
    return own or everything, everything


def _imported(value: object, module: str) -> bool:
    """Whether `value` is a module, or a class or function defined in another module."""
    if isinstance(value, types.ModuleType):
        return True
    return (inspect.isclass(value) or inspect.isroutine(value)) and getattr(value, "__module__", module) != module


def _attribute(module: types.ModuleType, name: str, label: str) -> object:
    obj: object = module
    for depth, part in enumerate(name.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = label if depth == 0 else f"{'.'.join(name.split('.')[:depth])} in {label}"
            shown, known = _public_names(obj)
            close = difflib.get_close_matches(part, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            listing = ", ".join(shown[:10]) + (", ..." if len(shown) > 10 else "")
            has = f" (it has: {listing})" if shown else " (it defines no public names)"
            raise PyrovaeError(f"{owner} has no attribute {part!r}{hint}{has}") from None
    return obj


def _is_builder(obj: object) -> bool:
    if inspect.isclass(obj):
        return True
    if getattr(obj, "__pyrovae_factory__", False) is True and callable(obj):
        return True
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        return obj.__name__.startswith(FACTORY_PREFIXES)
    return False


def _call(target: Callable[..., Any], spec: str, offered: dict[str, Any]) -> object:
    label = getattr(target, "__qualname__", None) or spec
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        kwargs = offered  # no signature to read (builtins): offer everything
    else:
        params = signature.parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            kwargs = dict(offered)
        else:
            names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            kwargs = {k: v for k, v in offered.items() if k in names}
        missing = [
            p.name for p in params
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and (p.kind is p.POSITIONAL_ONLY or p.name not in kwargs)
        ]
        if missing:
            raise PyrovaeError(
                f"cannot build {label} from {spec}: it requires {', '.join(missing)}, which pyrovae does not "
                "supply (give them defaults, or set them with --model-option/--guide-option KEY=VALUE)"
            )
    try:
        return target(**kwargs)
    except Exception as error:
        raise PyrovaeError(f"building {label} from {spec} failed: {_first_line(error)}") from error

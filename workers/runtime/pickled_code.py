"""Give functions that cloudpickle sent by value their real file name back.

cloudpickle >= 3.1 rewrites a by-value function's ``co_filename`` to ``<dynamic-code>``, so a
failing ``train_func``'s traceback would not name the user's file. The module's ``__file__``
travels in the function's globals; every code object reachable from the function (its
nested functions, helpers and methods of the same module) gets that name back.
"""
from __future__ import annotations

import functools
import types
from typing import Any

_PLACEHOLDER = "<dynamic-code>"


def restore_filenames(func: Any) -> Any:
    """Rewrite ``<dynamic-code>`` file names reachable from ``func`` in place; returns ``func``."""
    _Restorer().visit(func)
    return func


class _Restorer:
    def __init__(self) -> None:
        self._seen: set[int] = set()

    def visit(self, obj: Any) -> None:
        if id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            self._function(obj)
        elif isinstance(obj, type):
            for value in list(vars(obj).values()):
                self.visit(value)
        elif isinstance(obj, (staticmethod, classmethod)):
            self.visit(obj.__func__)
        elif isinstance(obj, property):
            for f in (obj.fget, obj.fset, obj.fdel):
                self.visit(f)
        elif isinstance(obj, types.MethodType):
            self.visit(obj.__func__)
        elif isinstance(obj, functools.partial):
            self.visit(obj.func)

    def _function(self, func: types.FunctionType) -> None:
        filename = func.__globals__.get("__file__")
        if isinstance(filename, str) and func.__code__.co_filename == _PLACEHOLDER:
            func.__code__ = _renamed(func.__code__, filename)
        for cell in func.__closure__ or ():
            try:
                self.visit(cell.cell_contents)
            except ValueError:   # an empty cell
                pass
        for name in _names(func.__code__):   # globals used by the function and the functions nested in it
            if name in func.__globals__:
                self.visit(func.__globals__[name])
        for value in (func.__defaults__ or ()):
            self.visit(value)


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names(c)
    return names


def _renamed(code: types.CodeType, filename: str) -> types.CodeType:
    consts = tuple(_renamed(c, filename) if isinstance(c, types.CodeType) and c.co_filename == _PLACEHOLDER else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)

"""The public API of qlora_edu carries type hints: every parameter and every return value."""

import importlib
import inspect
import pkgutil

import pytest

import qlora_edu

MODULES = [
    importlib.import_module(f"qlora_edu.{info.name}")
    for info in pkgutil.iter_modules(qlora_edu.__path__)
]


def public_functions(module):
    """The module's own public functions, and the public methods (and __init__) of its classes."""
    names = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
    for name in names:
        obj = getattr(module, name)
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for method_name, method in vars(obj).items():
                public = not method_name.startswith("_") or method_name == "__init__"
                if public and inspect.isfunction(method):
                    yield f"{name}.{method_name}", method


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_public_functions_have_type_hints(module):
    missing = []
    for name, function in public_functions(module):
        signature = inspect.signature(function)
        for parameter in signature.parameters.values():
            if parameter.name in ("self", "cls") or parameter.kind in (
                parameter.VAR_POSITIONAL,
                parameter.VAR_KEYWORD,
            ):
                continue
            if parameter.annotation is parameter.empty:
                missing.append(f"{name}({parameter.name})")
        if signature.return_annotation is signature.empty and not name.endswith("__init__"):
            missing.append(f"{name} -> ?")
    assert not missing, f"no type hint: {', '.join(missing)}"


def test_the_package_exports_only_what_exists():
    assert all(hasattr(qlora_edu, name) for name in qlora_edu.__all__)
    assert len(set(qlora_edu.__all__)) == len(qlora_edu.__all__)

"""The Python surface agrees with itself: the .pyi stub with the native module, sync with asyncio,
and both with the core's spellings (probes, stop outcomes, error kinds)."""

import ast
import asyncio
import inspect
import pathlib

import pytest

import anyvm
from anyvm import _native

STUB = pathlib.Path(_native.__file__).with_name("_native.pyi")


def _stub_api():
    tree = ast.parse(STUB.read_text())
    classes, functions = {}, set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = {
                n.name for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not n.name.startswith("_")
            }
        elif isinstance(node, ast.FunctionDef):
            functions.add(node.name)
    return classes, functions


def _native_api(cls):
    return {n for n in dir(cls) if not n.startswith("_")}


def test_stub_and_native_module_agree():
    classes, functions = _stub_api()
    assert STUB.exists(), "the .pyi stub is not installed next to the native module"
    for name, stub_members in classes.items():
        native = getattr(_native, name, None)
        assert native is not None, f"stub declares {name}, the native module has none"
        members = _native_api(native)
        assert stub_members - members == set(), f"{name}: in the stub only: {sorted(stub_members - members)}"
        assert members - stub_members == set(), f"{name}: undocumented in the stub: {sorted(members - stub_members)}"
    native_classes = {n for n, v in vars(_native).items() if inspect.isclass(v) and not n.startswith("_")
                      and v.__module__ == "anyvm._native"}
    assert native_classes - set(classes) == set(), f"classes missing from the stub: {native_classes - set(classes)}"
    native_funcs = {n for n, v in vars(_native).items() if callable(v) and not inspect.isclass(v)
                    and not n.startswith("_")}
    assert native_funcs - functions == set(), f"functions missing from the stub: {native_funcs - functions}"


async def _call(f, *args, **kwargs):
    # The native awaitables attach to the running loop when they are made.
    return await f(*args, **kwargs)


def test_sync_and_asyncio_agree_on_results_and_error_kinds(make_vm):
    vm = make_vm()
    assert vm.state == asyncio.run(_call(vm.state_async)) == "shut off"
    assert vm.stop() == "already_off"
    assert asyncio.run(_call(vm.stop_async)) == "already_off"
    with pytest.raises(anyvm.Error) as sync_err:
        vm.exec(["true"], timeout=5)
    with pytest.raises(anyvm.Error) as async_err:
        asyncio.run(_call(vm.aio.exec, ["true"], timeout=5))
    assert type(sync_err.value) is type(async_err.value), (sync_err.value, async_err.value)


def test_probes_use_the_core_syntax(make_vm):
    vm = make_vm()
    for bad in ["psychic", "tcp:0", "tcp:x", "command:[1, 2]", "command:"]:
        with pytest.raises(ValueError) as e:
            vm.wait_ready(timeout=1, probes=[bad])
        assert "probe" in str(e.value), str(e.value)

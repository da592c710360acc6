"""The house's shape, checked on the code: dependencies point one way, down; protocol libraries stay in their
adapters and the MQTT seam; the daemon never imports the devkit; the operations table is the one home of every
operation and of the GLM's tools."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edge_agent import ops
from edge_agent.config import ConfigError

PKG = Path(__file__).resolve().parents[1] / "edge_agent"
# lower number = lower layer; a module may import its own layer's package or any lower layer
RANK = {"records": 0, "config": 0, "metrics": 0, "logs": 0, "tls": 0, "backoff": 0, "systemd": 0, "mqttio": 0,
        "files": 0,
        "glm": 1, "store": 1, "southbound": 1, "rules": 1, "agent": 2, "ota": 2, "certs": 1, "ops": 3, "uplink": 3, "control": 3,
        "app": 4, "devkit": 5, "cli": 6, "__main__": 7, "__init__": 0}
PROTOCOLS = {"paho": ("mqttio", "southbound/mqtt.py"), "aiocoap": ("southbound/coap.py",),
             "asyncua": ("southbound/opcua.py",)}


def _room(rel: str) -> str:
    return rel.split("/")[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if node.module == "edge_agent":
                out += [f"edge_agent.{a.name}" for a in node.names]
    return out


MODULES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    rel = str(path.relative_to(PKG))
    room = _room(rel)
    assert room in RANK, f"{rel}: a new room; give it a layer in RANK"
    for mod in _imports(path):
        top = mod.split(".")[0]
        if top == "edge_agent" and "." in mod:
            target = mod.split(".")[1]
            if target == "__version__":
                continue
            assert target in RANK, f"{rel} imports {mod}: unknown room"
            assert target == room or RANK[target] < RANK[room] or (RANK[target] == RANK[room] == 0), \
                f"{rel} (layer {RANK[room]}) imports {mod} (layer {RANK[target]}): dependencies point down"
            if room not in ("devkit", "cli", "__main__"):
                assert target != "devkit", f"{rel}: the daemon never imports the devkit"
        if top in PROTOCOLS and room != "devkit":
            assert any(rel.startswith(p) for p in PROTOCOLS[top]), f"{rel} imports {top}: only its adapter may"


def test_every_operation_is_declared_once_and_its_tool_too():
    assert len(ops.TABLE) == len({op.name for op in ops.TABLE.values()})
    tools = [op.tool.name for op in ops.TABLE.values() if op.tool is not None]
    assert sorted(tools) == sorted(ops.BY_TOOL)
    # and the one tool that runs nothing: the model's way to say "no action" (ask answers with its reason)
    assert sorted(ops.TOOLSET.names) == sorted([*tools, "clarify"]) and "clarify" not in ops.TABLE
    for op in ops.TABLE.values():
        if op.tool is not None:  # the tool's arguments are the operation's fields, so a call runs as it is
            assert {a for a, _ in op.tool.args} <= set(op.fields), op.name
            assert op.answer is not None, f"{op.name}: a tool's operation answers in words"
    assert ops.allowed(ops.TABLE, ["read-only"]) == {n for n, op in ops.TABLE.items() if not op.changes}
    assert "write" not in ops.allowed(ops.TABLE, ["read-only"]) and "alerts.list" in ops.allowed(ops.TABLE, ["read-only"])
    with pytest.raises(ConfigError, match=r"commands.allow: unknown operation 'reboot'"):
        ops.allowed(ops.TABLE, ["read-only", "reboot"])


def _runtime_imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, inside a function) of every import that runs (under `if TYPE_CHECKING:` does not)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    local: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in local) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], id(node) in local))
    return out


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_at_run_time_function_local_imports_included():
    names = {_module_name(p): p for p in MODULES}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        edges = set()
        for mod, imported, _ in _runtime_imports(path):
            for target in (mod, *(f"{mod}.{n}" for n in imported)):
                if target in names and target != name and not name.startswith(target + "."):
                    edges.add(target)  # (a package's own parent is not a dependency of its submodule)
        graph[name] = edges
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_function_local_import_of_a_private_name(path):
    for mod, imported, local in _runtime_imports(path):
        if local and mod.startswith("edge_agent"):
            private = [n for n in imported if n.startswith("_")]
            assert not private, f"{path.relative_to(PKG)}: imports {', '.join(private)} from {mod} inside a function"

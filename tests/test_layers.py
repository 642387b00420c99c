"""The package's shape: no import circle, no test library in the product, one reader of the environment,
and the engine free of the web framework. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "i2v"
# Reading the environment is the settings' job. cli.py only sets the libraries' own switches (their
# documented HF/transformers/diffusers variables); settings.py also reads XDG_DATA_HOME (the XDG contract).
ENVIRONMENT_READERS = {"settings.py"}
ENVIRONMENT_WRITERS = {"cli.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, tree: ast.Module, top_only: bool = False) -> set[str]:
    """Every module this one imports, at its top or (unless `top_only`) inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body if top_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import engine`
    return found


def graph() -> dict[str, set[str]]:
    modules = sources()
    return {
        name: {m for m in imports(name, path, tree) if m in modules and m != name}
        for name, (path, tree) in modules.items()
    }


def test_the_import_graph_of_the_package_has_no_cycle() -> None:
    edges = graph()
    # A package's __init__ runs before its modules, so `i2v.x -> i2v` is how Python works, not a cycle.
    edges = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in edges.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for dep in sorted(edges[name]):
            if state.get(dep) == "open":
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert len(edges) > 30  # the whole package was read


def test_the_product_imports_no_test_library() -> None:
    for name, (path, tree) in sources().items():
        for module in imports(name, path, tree):
            assert module.split(".")[0] not in ("unittest", "pytest"), f"{path} imports {module}"


def test_only_the_settings_read_the_environment() -> None:
    for _, (path, tree) in sources().items():
        for node in ast.walk(tree):
            reads = (
                isinstance(node, ast.Attribute)
                and node.attr in ("environ", "getenv", "environb")
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            )
            if not reads:
                continue
            allowed = ENVIRONMENT_READERS | ENVIRONMENT_WRITERS
            assert path.relative_to(PACKAGE).as_posix() in allowed, f"{path}:{node.lineno} touches os.environ"
    cli = (PACKAGE / "cli.py").read_text()
    assert cli.count("os.environ") == cli.count("os.environ.setdefault(")  # it only sets defaults


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(edges.get(name, ()))
    return seen


def test_the_engine_never_imports_the_web_framework() -> None:
    modules = sources()
    edges = graph()
    engine_side = closure("i2v.engine", edges)
    assert not any(m.startswith("i2v.server") for m in engine_side), sorted(engine_side)
    for name in engine_side:
        path, tree = modules[name]
        third_party = {m.split(".")[0] for m in imports(name, path, tree)}
        assert not third_party & {"fastapi", "starlette", "uvicorn"}, f"{path} imports the web framework"


def test_the_http_layer_never_imports_torch_at_its_top() -> None:
    """Statically, beside tests/test_server_parts.py's run-time check: no server module reaches torch,
    the engine or diffusers, lazily or not, but the worker's child entry point (its function-level import)."""
    modules = sources()
    edges = graph()
    worker, (path, tree) = "i2v.server.worker", modules["i2v.server.worker"]
    edges[worker] = {m for m in imports(worker, path, tree, top_only=True) if m in modules}
    for name in modules:
        if not name.startswith("i2v.server"):
            continue
        for dep in closure(name, edges):
            path, tree = modules[dep]
            found = imports(dep, path, tree, top_only=dep == worker)
            heavy = {m.split(".")[0] for m in found} & {
                "torch",
                "diffusers",
                "transformers",
                "huggingface_hub",
            }
            assert not heavy, f"{name} reaches {dep}, which imports {heavy}"


def test_ray_is_imported_by_the_ray_runner_alone_and_only_when_it_is_chosen() -> None:
    """Ray is an optional extra: one module imports it, and no module imports that one at its top (the app
    does, in a function, when `I2V_RUNNER=ray`)."""
    ray_runner = "i2v.server.ray_runner"
    for name, (path, tree) in sources().items():
        if "ray" in {m.split(".")[0] for m in imports(name, path, tree)}:
            assert name == ray_runner, f"{path} imports ray"
        assert ray_runner not in imports(name, path, tree, top_only=True), f"{path} imports {ray_runner}"

"""No import cycles in the package, function-level imports included: each stage can be read (and tested) without the
stages that use it."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as fastdino.kernels
        parts = ["fastdino", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its file}."""
    files = {module_name(path): path for path in [*REPO.glob("fastdino/**/*.py"), *REPO.glob("kernels/*.py")]}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                imported |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {module for module in imported if module in files and module != name}
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        module, path = stack.pop()
        for target in graph[module]:
            if target == start:
                return [*path, start]
            if target not in seen:
                seen.add(target)
                stack.append((target, [*path, target]))
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "fastdino.trainer" in graph and "fastdino.kernels.dino_loss" in graph, "the graph must see the package"
    cycles = [cycle for module in sorted(graph) if (cycle := cycle_through(graph, module))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_check_sees_a_function_level_import(tmp_path):
    """The cycle the builders move removed (report -> trainer inside a function) would be found."""
    graph = import_graph()
    graph["fastdino.report"] = graph["fastdino.report"] | {"fastdino.trainer"}
    assert cycle_through(graph, "fastdino.report") is not None

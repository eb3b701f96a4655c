"""Code boundaries, read from the source with ``ast`` (every import, at the top of a file or inside a function):
common/ imports no script; the PPO math imports only torch and the standard library; the PPO trainer and the tiny
model builder know no judge (common/gold.py); common/ modules import each other without a cycle; and files and
functions stay short enough to read."""

import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("training_sft", "training_reward_model", "training_rl", "training_dpo", "merge_with_lora", "evaluate")
JUDGE = "common.gold"
MAX_FILE_LINES = 500  # a file of common/
MAX_FUNCTION_LINES = 80  # the def line to the last line of the body
LONG_FUNCTION_FILES = ("common/*.py", "*.py", "benchmarks/*.py", "data/*.py", "scripts/*.py")  # mains included


def _common_modules() -> dict[str, str]:
    """``common.name`` -> its path, for every module of common/."""
    return {f"common.{os.path.basename(p)[:-3]}": p for p in sorted(glob.glob(os.path.join(ROOT, "common", "*.py")))}


def _imports(path: str, skip_functions: tuple[str, ...] = ()) -> set[str]:
    """The modules ``path`` imports, anywhere in it except inside the module-level functions ``skip_functions``;
    ``from package import name`` counts as ``package.name`` too (it may be a module)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    skipped = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and
               n.name in skip_functions]
    skipped_nodes = {id(n) for f in skipped for n in ast.walk(f)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped_nodes:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative (none in the project today): from the file's own package
                module = ".".join([os.path.basename(os.path.dirname(path))] + ([node.module] if node.module else []))
            else:
                module = node.module
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    """Which common/ modules each common/ module imports."""
    modules = _common_modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _reachable(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each back edge of a depth-first search (empty: the graph has no cycle)."""
    state, stack, found = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_import_reader_sees_every_kind_of_import(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    path = folder / "mod.py"
    path.write_text("import a.b\nfrom c import d\nfrom . import e\n\n\ndef main():\n    import f\n\n\n"
                    "class K:\n    def g(self):\n        from h.i import j\n")
    found = _imports(str(path))
    assert {"a.b", "c", "c.d", "pkg", "pkg.e", "h.i", "h.i.j", "f"} <= found
    assert "f" not in _imports(str(path), skip_functions=("main",))
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_common_imports_no_script():
    assert all(os.path.isfile(os.path.join(ROOT, f"{script}.py")) for script in SCRIPTS)
    for name, path in _common_modules().items():
        scripts = {m for m in _imports(path) if m.split(".")[0] in SCRIPTS}
        assert not scripts, f"{name} imports the script(s) {sorted(scripts)}: shared code must not depend on a stage"


def test_the_ppo_math_imports_only_torch_and_the_standard_library():
    path = os.path.join(ROOT, "common", "ppo_math.py")
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    other = {m for m in _imports(path) if m.split(".")[0] not in allowed}
    assert not other, f"common/ppo_math.py imports {sorted(other)}: the math depends on torch only"


def test_the_ppo_trainer_knows_no_judge():
    graph = _graph()
    trainer = {m for m in graph if m.split(".")[1].startswith("ppo")}
    assert {"common.ppo", "common.ppo_math", "common.ppo_distributed"} <= trainer
    for module in sorted(trainer):
        assert JUDGE not in _reachable(graph, {module}), (
            f"{module} imports the gold judge ({JUDGE}), directly or through {sorted(graph[module])}: a held-out "
            "evaluation's judge is the caller's (PPOTrainer.evaluate(judge=...))")


def test_the_tiny_model_builder_knows_no_judge():
    path = os.path.join(ROOT, "common", "tiny_model.py")
    assert JUDGE not in _imports(path), "common/tiny_model.py imports the gold judge"
    # Its command line (`main`) may call the sample report (common/gold_report.py); the builder itself may not.
    builder = {m for m in _imports(path, skip_functions=("main",)) if m in _common_modules()}
    assert JUDGE not in _reachable(_graph(), builder), f"common/tiny_model.py reaches the gold judge through {builder}"


def test_common_modules_import_each_other_without_a_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles among common/ modules: " + "; ".join(" -> ".join(c) for c in cycles)


def test_files_and_functions_are_short():
    long_files = []
    for path in glob.glob(os.path.join(ROOT, "common", "*.py")):
        n = len(open(path, encoding="utf-8").read().splitlines())
        if n > MAX_FILE_LINES:
            long_files.append(f"{os.path.relpath(path, ROOT)}: {n} lines")
    long_functions = []
    for pattern in LONG_FUNCTION_FILES:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long_functions.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long_files and not long_functions, (f"files of common/ over {MAX_FILE_LINES} lines: {long_files}; "
                                                   f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}")

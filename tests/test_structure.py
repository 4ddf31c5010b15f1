"""The package's shape, read from its source: functions short enough to read at once, and modules that import each
other without a circle (deferred imports inside functions included: a circle there only moves the failure)."""
import ast

from conftest import ROOT

PACKAGE = ROOT / 'pgt'
MAX_LINES = 80
OPTION_TABLES = {('config.py', 'build_parser')}  # argparse's option list: one line per option, nothing to split


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob('*.py'))}


def imported_modules(tree: ast.Module, names: set[str]) -> set[str]:
    """The pgt modules a module imports anywhere in its body (relative, absolute or ``from pgt import x``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ''
            if node.level == 1 or module.startswith('pgt'):
                head = module.removeprefix('pgt').lstrip('.').split('.')[0]
                found |= {head} if head else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split('.')[1] for alias in node.names if alias.name.startswith('pgt.')}
    return found & names


def test_no_function_is_longer_than_a_screen():
    long = [f'{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)'
            for name, tree in modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES and (f'{name}.py', node.name) not in OPTION_TABLES]
    assert not long


def test_no_import_circle_between_the_packages_modules():
    trees = modules()
    graph = {name: imported_modules(tree, set(trees)) - {name} for name, tree in trees.items()}
    assert graph['train'] >= {'config', 'loaders', 'engine'}  # the reader sees imports at every depth

    def circle_from(start, path):
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = circle_from(start, path + [nxt])
                if found:
                    return found
        return None

    circles = [' -> '.join(c) for name in graph if (c := circle_from(name, [name]))]
    assert not circles

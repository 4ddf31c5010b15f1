"""Reading recipe files: YAML mappings of option names, composed with ``base:``.

A recipe is read as YAML 1.2 reads numbers (``1e-3`` is a float; PyYAML, a YAML 1.1 parser, would read it as a
string), and anything a YAML parser would let pass silently is refused with one line naming the file and the line:
a key given twice (the later one would win unseen), also as ``batch-size`` beside ``batch_size``; text that is not
UTF-8; a file over ``MAX_RECIPE_BYTES``; aliases that expand beyond ``MAX_EXPANDED_NODES`` values (a "billion
laughs" recipe is small on disk and as PyYAML's shared objects, and explodes once printed or saved); a ``paper:``
block over ``MAX_PAPER_BYTES`` (it is copied into the run's config.yaml).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .errors import UsageError

MAX_RECIPE_BYTES = 1 << 20
MAX_EXPANDED_NODES = 100_000
MAX_PAPER_BYTES = 64 << 10


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float syntax, and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = str(self.construct_object(key_node, deep=True)).replace('-', '_')
            if key in seen:
                raise UsageError(f'{self.name}:{key_node.start_mark.line + 1}: key {key!r} is given twice (first on '
                                 f'line {seen[key] + 1}); keep one')
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


RecipeLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$''', re.X),
    list('-+0123456789.'))


def expanded_size(node, limit: int, sizes: dict | None = None) -> int:
    """The number of values ``node`` stands for with every alias expanded, counted up to ``limit`` (an alias is the
    same node object as its anchor: each distinct node is sized once)."""
    sizes = {} if sizes is None else sizes
    if id(node) not in sizes:
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1
        for child in children:
            total = min(limit + 1, total + expanded_size(child, limit, sizes))
        sizes[id(node)] = total
    return sizes[id(node)]


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise UsageError(f'{path}: {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}')
    data = path.read_bytes()
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as error:
        line = data.count(b'\n', 0, error.start) + 1
        raise UsageError(f'{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the recipe as '
                         f'UTF-8') from None


def _parse(path: Path) -> dict:
    text = _read_text(path)
    try:
        loader = RecipeLoader(text)
        loader.name = str(path)
        try:
            node = loader.get_single_node()
            if node is not None and expanded_size(node, MAX_EXPANDED_NODES) > MAX_EXPANDED_NODES:
                raise UsageError(f'{path}: its aliases expand to more than {MAX_EXPANDED_NODES:,} values; a recipe '
                                 f'needs none of that size')
            data = loader.construct_document(node) if node is not None else {}
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise UsageError(f'{path}: not valid YAML: {" ".join(str(error).split())}') from None
    if not isinstance(data, dict):
        raise UsageError(f'{path}: a recipe must be a mapping of option names to values')
    data = {str(k).replace('-', '_'): v for k, v in data.items()}
    if 'paper' in data and len(yaml.safe_dump(data['paper'])) > MAX_PAPER_BYTES:
        raise UsageError(f'{path}: the paper: block is over {MAX_PAPER_BYTES // 1024} KiB; it records a row\'s '
                         f'provenance, not documents')
    return data


def load_recipe(path: str | os.PathLike, _seen: tuple = ()) -> tuple[dict, dict]:
    """Read a recipe and its ``base:`` chain. Returns (merged mapping, key -> file it came from)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'config file not found: {path}')
    if path.resolve() in _seen:
        raise UsageError(f'{path}: base recipes form a cycle: {" -> ".join(map(str, _seen + (path,)))}')
    data = _parse(path)
    merged, sources = {}, {}
    if data.get('base'):
        merged, sources = load_recipe(path.parent / str(data['base']), _seen + (path.resolve(),))
    merged.update({k: v for k, v in data.items() if k != 'base'})
    sources.update({k: str(path) for k in data if k != 'base'})
    return merged, sources

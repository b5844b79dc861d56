"""Search spaces and shape grids as data (`autotune/*.json`): loading, validation, enumeration.

A space file lists each launch parameter's candidate values and constraints, boolean expressions in
a small Python subset (numbers, names, + - * / // % **, comparisons, and/or/not, `x if c else y`,
calls of min / max / next_pow2) over the parameters and `VARIABLES`. `enumerate_configs` returns the
product of the values that satisfies every constraint, the tuner's candidate list (the `keep()` step
of Triton's tutorial 06, before anything is compiled or timed).
"""
from __future__ import annotations

import ast
import functools
import importlib.resources
import itertools
import json
import operator
from pathlib import Path

from ..spec import DTYPES, Launch, next_pow2

VARIABLES = {
    "head_dim": "head dim D of the spec (0 for select_tokens)",
    "block_d": "next_pow2(head_dim)",
    "group": "rows of one KV head handled by a program (GQA group or selected heads)",
    "window": "T, query rows per head",
    "rows": "max(16, next_pow2(group * window)): the padded query-row tile",
    "block_size": "tokens per key block",
    "elem_bytes": "bytes per element of the spec's dtype",
    "batch": "batch of the Launch passed to dispatch.config_for",
    "context": "context of the Launch passed to dispatch.config_for (see each space's doc)",
    "kv_heads": "KV heads of the Launch (0 where the op's config does not depend on them)",
    "interpret": "True in Triton's interpreter",
    "sm": "compute capability x 10 of the target (80, 90; 0 for the interpreter)",
}
FUNCTIONS = {"min": min, "max": max, "next_pow2": next_pow2}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}


class SpaceError(ValueError):
    """A search-space or grid file that does not validate."""


def data_dir() -> Path:
    """The folder of the space files (the repository's `autotune/`, shipped as `dustin_kernels.autotune.spaces`)."""
    try:
        return Path(str(importlib.resources.files("dustin_kernels.autotune.spaces")))
    except ModuleNotFoundError:  # an editable install made before the package mapping existed
        return Path(__file__).resolve().parents[2] / "autotune"


def _schema_errors(doc, schema_name: str) -> list[str]:
    try:
        import jsonschema
    except ImportError:  # the semantic checks below still run
        return []
    schema = json.loads((data_dir() / schema_name).read_text())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]


def _names(tree: ast.AST, where: str) -> set[str]:
    """Names an expression reads; raises SpaceError on any construct outside the allowed subset."""
    allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.BinOp, ast.Compare,
               ast.IfExp, ast.Call, ast.Name, ast.Load, ast.Constant, *_BINARY, *_COMPARE)
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            raise SpaceError(f"{where}: {type(node).__name__} is not allowed in a constraint")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
                                               and not node.keywords):
            raise SpaceError(f"{where}: only calls of {sorted(FUNCTIONS)} are allowed")
        if isinstance(node, ast.Name) and node.id not in FUNCTIONS:
            names.add(node.id)
    return names


def _eval(node: ast.AST, env: dict):
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, env)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body, env) if _eval(node.test, env) else _eval(node.orelse, env)
    return FUNCTIONS[node.func.id](*(_eval(a, env) for a in node.args))  # ast.Call, checked by _names


class Space:
    """A kernel's search space: `params` {name: [values]} and compiled constraints."""

    def __init__(self, doc: dict, where: str = "<space>"):
        errors = _schema_errors(doc, "space.schema.json")
        if errors:
            raise SpaceError(f"{where}: {'; '.join(errors[:3])}")
        self.kernel = doc["kernel"]
        self.params = {name: list(p["values"]) for name, p in doc["params"].items()}
        self.constraints = []
        for i, c in enumerate(doc["constraints"]):
            at = f"{where}: constraints[{i}] {c['expr']!r}"
            try:
                tree = ast.parse(c["expr"], mode="eval")
            except SyntaxError as exc:
                raise SpaceError(f"{at}: {exc.msg}") from None
            unknown = _names(tree, at) - set(self.params) - set(VARIABLES)
            if unknown:
                raise SpaceError(f"{at}: unknown names {sorted(unknown)}; known: parameters {sorted(self.params)} "
                                 f"and variables {sorted(VARIABLES)}")
            self.constraints.append((c["expr"], tree))

    @property
    def size(self) -> int:
        return functools.reduce(operator.mul, (len(v) for v in self.params.values()), 1)

    def keep(self, config: dict, variables: dict) -> bool:
        """Whether `config` (a dict of every parameter) satisfies every constraint."""
        env = {**variables, **config}
        return all(_eval(tree, env) for _, tree in self.constraints)

    def violated(self, config: dict, variables: dict) -> list[str]:
        """The constraints (their expressions) that `config` (a dict of every parameter) breaks."""
        env = {**variables, **config}
        return [expr for expr, tree in self.constraints if not _eval(tree, env)]

    def enumerate_configs(self, variables: dict) -> list[dict]:
        """Every config of the product of the values that satisfies the constraints, in product order."""
        names = list(self.params)
        configs = (dict(zip(names, values)) for values in itertools.product(*self.params.values()))
        return [c for c in configs if self.keep(c, variables)]

    def contains(self, config: dict) -> bool:
        """Whether `config` has exactly this space's parameters, each at one of its values."""
        return set(config) == set(self.params) and all(config[k] in v for k, v in self.params.items())


@functools.cache
def load_space(kernel: str) -> Space:
    path = data_dir() / f"{kernel}.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpaceError(f"{path}: {exc}") from None
    space = Space(doc, str(path))
    if space.kernel != kernel:
        raise SpaceError(f"{path}: holds the space of {space.kernel!r}, expected {kernel!r}")
    return space


def variables(launch: Launch) -> dict:
    """Constraint variables (`VARIABLES`) of a launch."""
    spec = launch.spec
    return {
        "head_dim": spec.head_dim,
        "block_d": next_pow2(spec.head_dim) if spec.head_dim else 0,
        "group": spec.group,
        "window": spec.window,
        "rows": max(16, next_pow2(spec.group * spec.window)) if spec.group and spec.window else 16,
        "block_size": spec.block_size,
        "elem_bytes": DTYPES[spec.dtype].itemsize,
        "batch": launch.batch,
        "context": launch.context,
        "kv_heads": launch.kv_heads,
        "interpret": spec.arch == "interp",
        "sm": {"sm80": 80, "sm90": 90}.get(spec.arch, 0),
    }


@functools.cache
def load_grid() -> dict:
    """`autotune/grid.json`, validated (shape names are checked against `shapes.PRESETS`)."""
    from ..shapes import PRESETS

    path = data_dir() / "grid.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpaceError(f"{path}: {exc}") from None
    errors = _schema_errors(doc, "grid.schema.json")
    grids = doc.get("grids", {}).values()
    named = {s for g in grids for s in g.get("shapes", ())}
    named |= {d for d in (doc.get("defaults", {}).get("draft"), *(g.get("overrides", {}).get("draft") for g in grids))
              if d}
    unknown = sorted(named - set(PRESETS))
    if unknown:
        errors.append(f"grids: unknown shapes {unknown}; presets are {sorted(PRESETS)}")
    if errors:
        raise SpaceError(f"{path}: {'; '.join(errors[:3])}")
    return doc

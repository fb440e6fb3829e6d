"""Small bugs planted in Python source, one at a time: the mutation operators of ``mutate.py``.

A *site* is one place in a module and one operator applied there (a comparison flipped, a
constant changed, a statement deleted, a condition negated, ``and`` swapped with ``or``, an
arithmetic operator swapped). Sites are found by walking the syntax tree in source order, so
the same source always gives the same numbered list; ``mutant_source`` re-parses the module
and applies exactly one of them.

Left alone, because a test cannot be expected to pin them: docstrings, type annotations,
``__all__``, ``if TYPE_CHECKING:`` blocks, the messages of ``raise`` statements and f-strings,
and logging calls (``logger.info(...)`` and the like).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

__all__ = ["Site", "find_sites", "mutant_source"]

# one replacement per operator, so each site gives exactly one mutant
_COMPARE = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
_BINARY = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
}
_LOGGER_NAMES = {"logger", "logging", "log", "warnings"}
_DELETABLE = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Raise, ast.Delete)


@dataclass(frozen=True)
class Site:
    """One mutant: where it is and what it changes.

    :param index: its position in the module's list of sites
    :param line: the source line
    :param column: the column on that line (two sites may share a line)
    :param operator: the kind of change (``compare``, ``constant``, ``delete``, ``negate``,
        ``boolop``, ``arith``)
    :param before: the code as written (shortened)
    :param after: the code as mutated (shortened)
    """

    index: int
    line: int
    column: int
    operator: str
    before: str
    after: str


def _short(node: ast.AST, limit: int = 70) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _changed_constant(value: object) -> bool | int | float | str | None:
    """The planted value for a constant, or None when it is not mutated."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 1.0
    if isinstance(value, str):
        return value + "_mutated" if value else "mutated"
    return None


def _is_logging_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    while isinstance(func, ast.Attribute):
        func = func.value
    return isinstance(func, ast.Name) and func.id in _LOGGER_NAMES


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def _skipped_statement(stmt: ast.stmt) -> bool:
    if _is_docstring(stmt):
        return True
    if isinstance(stmt, ast.Expr) and _is_logging_call(stmt.value):
        return True
    if isinstance(stmt, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets
    ):
        return True
    if isinstance(stmt, ast.If):
        test = stmt.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        return name == "TYPE_CHECKING"
    return False


def _negation_is_another_site(test: ast.expr) -> bool:
    """Whether negating ``test`` would repeat a mutant planted anyway: ``not x`` loses its
    ``not``, and ``a == b`` (``is``, ``in`` and their negations) is flipped by the compare
    operator into exactly its negation."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return True
    exact = (ast.Eq, ast.NotEq, ast.Is, ast.IsNot, ast.In, ast.NotIn)
    return isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], exact)


class _Mutator(ast.NodeTransformer):
    """Walks a module in source order, numbering the sites; with ``target`` set, applies
    that one site and leaves the rest alone."""

    def __init__(self, target: int | None = None) -> None:
        self.target = target
        self.sites: list[Site] = []
        self.applied: Site | None = None

    # -------------------------------------------------------------- numbering
    def _site(self, node: ast.AST, operator: str, mutated: ast.AST) -> bool:
        """Record a site; True when it is the one to apply."""
        site = Site(
            len(self.sites),
            getattr(node, "lineno", 0),
            getattr(node, "col_offset", 0) + 1,
            operator,
            _short(node),
            _short(mutated),
        )
        self.sites.append(site)
        if self.target == site.index:
            self.applied = site
            return True
        return False

    # -------------------------------------------------------------- skipping
    def generic_visit(self, node: ast.AST) -> ast.AST:
        if self.applied is not None:
            return node
        return super().generic_visit(node)

    def visit_arg(self, node: ast.arg) -> ast.AST:
        return node  # annotations only

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.args = self.visit(node.args)
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.body = self._visit_body(node.body)
        return node  # the return annotation is left alone

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.bases = [self.visit(b) for b in node.bases]
        node.keywords = [self.visit(k) for k in node.keywords]
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.body = self._visit_body(node.body)
        return node

    def visit_Module(self, node: ast.Module) -> ast.AST:
        node.body = self._visit_body(node.body)
        return node

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        return node  # its message; deleting the whole raise is a site of the body

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        return node  # an f-string is a message

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if _is_logging_call(node):
            return node
        return self.generic_visit(node)

    # -------------------------------------------------------------- statements
    def _visit_body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        for stmt in body:
            if self.applied is not None or _skipped_statement(stmt):
                out.append(stmt)
                continue
            if isinstance(stmt, _DELETABLE) and self._site(stmt, "delete", ast.Pass()):
                out.append(ast.copy_location(ast.Pass(), stmt))
                continue
            if isinstance(stmt, ast.Return) and stmt.value is not None:
                none = ast.Return(value=ast.Constant(None))
                if self._site(stmt, "return", none):
                    out.append(ast.copy_location(none, stmt))
                    continue
            out.append(self.visit(stmt))
        return out or [ast.Pass()]

    def _visit_branch(self, node: ast.If | ast.While | ast.IfExp) -> None:
        negated = ast.UnaryOp(op=ast.Not(), operand=node.test)
        if _negation_is_another_site(node.test):
            node.test = self.visit(node.test)
        elif self._site(node.test, "negate", negated):
            node.test = negated
        else:
            node.test = self.visit(node.test)

    def visit_If(self, node: ast.If) -> ast.AST:
        self._visit_branch(node)
        node.body = self._visit_body(node.body)
        node.orelse = self._visit_body(node.orelse) if node.orelse else []
        return node

    def visit_While(self, node: ast.While) -> ast.AST:
        self._visit_branch(node)
        node.body = self._visit_body(node.body)
        node.orelse = self._visit_body(node.orelse) if node.orelse else []
        return node

    def visit_For(self, node: ast.For) -> ast.AST:
        node.iter = self.visit(node.iter)
        node.body = self._visit_body(node.body)
        node.orelse = self._visit_body(node.orelse) if node.orelse else []
        return node

    def visit_With(self, node: ast.With) -> ast.AST:
        node.items = [self.visit(i) for i in node.items]
        node.body = self._visit_body(node.body)
        return node

    def visit_Try(self, node: ast.Try) -> ast.AST:
        node.body = self._visit_body(node.body)
        for handler in node.handlers:
            handler.body = self._visit_body(handler.body)
        node.orelse = self._visit_body(node.orelse) if node.orelse else []
        node.finalbody = self._visit_body(node.finalbody) if node.finalbody else []
        return node

    # -------------------------------------------------------------- expressions
    def visit_IfExp(self, node: ast.IfExp) -> ast.AST:
        self._visit_branch(node)
        node.body = self.visit(node.body)
        node.orelse = self.visit(node.orelse)
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        if isinstance(node.op, ast.Not) and self._site(node, "negate", node.operand):
            return node.operand
        return self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        if self._site(node, "boolop", ast.BoolOp(op=other, values=node.values)):
            node.op = other
            return node
        return self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        for position, op in enumerate(node.ops):
            planted = _COMPARE.get(type(op))
            if planted is None:
                continue
            ops = list(node.ops)
            ops[position] = planted()
            mutated = ast.Compare(left=node.left, ops=ops, comparators=node.comparators)
            if self._site(node, "compare", mutated):
                node.ops = ops
                return node
        return self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        planted = _BINARY.get(type(node.op))
        if planted is not None:
            mutated = ast.BinOp(left=node.left, op=planted(), right=node.right)
            if self._site(node, "arith", mutated):
                node.op = planted()
                return node
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = _changed_constant(node.value)
        if value is not None:
            mutated = ast.Constant(value)
            if self._site(node, "constant", mutated):
                return ast.copy_location(mutated, node)
        return node


def find_sites(source: str) -> list[Site]:
    """Every site of a module's source, in a fixed order."""
    walker = _Mutator()
    walker.visit(ast.parse(source))
    return walker.sites


def mutant_source(source: str, index: int) -> tuple[str, Site]:
    """The module's source with site ``index`` applied, and that site.

    :param source: the module as written
    :param index: a site's ``index`` from ``find_sites``
    :return: the mutated source (re-printed from the tree: comments dropped, same behaviour
        elsewhere) and the site
    """
    walker = _Mutator(target=index)
    tree = ast.fix_missing_locations(walker.visit(ast.parse(source)))
    if walker.applied is None:
        raise IndexError(f"site {index} not found: the module has {len(walker.sites)} sites")
    return ast.unparse(tree), walker.applied

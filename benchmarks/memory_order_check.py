"""Static check of the Triton kernels for the one GPU-only bug class that the interpreter cannot
show: a program that loads from a buffer after it stored to it, with no barrier in between.

On a GPU the threads of one Triton program are not ordered: the thread that loads element i
of `mean_ptr` is in general not the thread that stored it, and nothing makes the store visible
before the load (the Triton interpreter runs the program as one vector operation, so there the
load always sees the store). The 858ad8d statistics kernel did exactly this (`_bn_stats_tail`
stored mean / invstd, then `_coefficients` loaded them back) and gave wrong, changing results
on an H200. docs/backends.md ("Memory ordering") states the rule for kernel authors.

The check reads the sources (no triton needed): for every @triton.jit function of the files
given (default: fastrobust/ops/), it follows the program in order — into the jit helpers it
calls, their parameters mapped to the caller's arguments, across modules of the package — and
tracks which kernel pointer arguments (parameters named `*_ptr`) have been stored to.
A `tl.load` whose address derives from such a buffer is reported unless

  - a `tl.debug_barrier()` came after the store (it orders the threads of the program), or
  - the store was made in an earlier iteration of the loop the load is in, at an address
    written the same way that moves with the loop's variable (`o = s0 + tl.arange(0, BLOCK)`
    over `for s0 in range(start, end, BLOCK)`): each iteration touches its own block, so the
    read-modify-write loops of the PGD kernels pass.

The same address in the same iteration is no excuse: the 858ad8d bug stored and loaded the
same [K, C] offsets, and the threads that did it were still different ones.

Both branches of an `if` count, and a loop body is followed twice, so a store at the end of one
iteration and a load at the start of the next is seen. Kernel arguments the host passes as the
same tensor (aliases) are not known here; the launchers must not pass a buffer a kernel stores
to as another argument it loads from.

    python benchmarks/memory_order_check.py [--list] [FILE_OR_DIR ...]

prints every finding and exits 1 if there is one. tests/test_memory_order.py runs it over the
package and over small kernels that have (and do not have) the bug.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "fastrobust" / "ops"


@dataclass(frozen=True)
class Finding:
    kernel: str
    path: str          # the helper chain from the kernel to the load
    line: int
    buffer: str        # the kernel's pointer argument
    stored_at: int     # a line that stored to it

    def __str__(self) -> str:
        return (f"{self.kernel}: line {self.line} ({self.path}) loads from {self.buffer} "
                f"after a store to it (line {self.stored_at}) with no barrier between")


def _is_jit(dec: ast.expr) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    return (isinstance(target, ast.Attribute) and target.attr == "jit") or (
        isinstance(target, ast.Name) and target.id == "jit")


@dataclass
class Module:
    name: str
    file: str
    jit: dict = field(default_factory=dict)       # name -> FunctionDef
    imports: dict = field(default_factory=dict)   # local name -> (module, name)


def _module_name(path: Path) -> str:
    try:
        rel = path.resolve().relative_to(ROOT)
        return ".".join(rel.with_suffix("").parts)
    except ValueError:
        return path.stem


def _load_modules(paths) -> dict:
    files = []
    for p in paths:
        p = Path(p)
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    mods = {}
    for f in files:
        tree = ast.parse(f.read_text(), filename=str(f))
        m = Module(_module_name(f), str(f))
        pkg = m.name.rsplit(".", 1)[0] if "." in m.name else ""
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in
                                                         node.decorator_list):
                m.jit[node.name] = node
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".") if pkg else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                src = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    m.imports[alias.asname or alias.name] = (src, alias.name)
        mods[m.name] = m
    return mods


class _State:
    """What the program has stored so far: buffer -> [(line, address dump)]."""

    def __init__(self, stored=None):
        self.stored = {k: list(v) for k, v in (stored or {}).items()}

    def copy(self):
        return _State(self.stored)

    def merge(self, other):
        for k, v in other.stored.items():
            self.stored.setdefault(k, [])
            for e in v:
                if e not in self.stored[k]:
                    self.stored[k].append(e)


class _Checker:
    def __init__(self, mods: dict):
        self.mods = mods
        self.findings: list[Finding] = []

    def resolve(self, mod: Module, name: str):
        """(module, FunctionDef) of the jit function `name` as seen from `mod`, or None."""
        if name in mod.jit:
            return mod, mod.jit[name]
        if name in mod.imports:
            src, real = mod.imports[name]
            other = self.mods.get(src)
            if other is not None:
                return self.resolve(other, real)
        return None

    # -- expressions: the set of buffers a value derives from -----------------------------------

    def bufs(self, node, env) -> set:
        if node is None:
            return set()
        if isinstance(node, ast.Name):
            return set(env.get(node.id, ()))
        if isinstance(node, ast.Call):
            return self.call(node, env)
        out = set()
        for child in ast.iter_child_nodes(node):
            out |= self.bufs(child, env)
        return out

    def _where(self, node, env) -> tuple:
        """(the address as written in this function, the innermost loop it moves with, that
        loop's current iteration)."""
        loops = [t for t in self.bufs(node, env) if isinstance(t, tuple)]
        loop = max(loops, key=lambda t: t[1]) if loops else None
        return (" -> ".join(self.stack), ast.dump(node), loop,
                self.iteration.get(loop) if loop else None)

    def call(self, node: ast.Call, env) -> set:
        f = node.func
        tl_fn = f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
            and f.value.id == "tl" else None
        if tl_fn in ("load", "store"):
            ptr = node.args[0] if node.args else next(
                (k.value for k in node.keywords if k.arg == "pointer"), None)
            rest = set()
            for a in node.args[1:]:
                rest |= self.bufs(a, env)
            for k in node.keywords:
                if k.arg != "pointer":
                    rest |= self.bufs(k.value, env)
            targets = {t for t in self.bufs(ptr, env) if isinstance(t, str)}
            where = self._where(ptr, env)
            if tl_fn == "store":
                for b in targets:
                    entry = (node.lineno, where)
                    if entry not in self.state.stored.setdefault(b, []):
                        self.state.stored[b].append(entry)
                return set()
            for b in sorted(targets):
                for line, w in self.state.stored.get(b, ()):
                    earlier_block = (w[:3] == where[:3] and w[2] is not None
                                     and w[3] < where[3])
                    if not earlier_block:
                        self.findings.append(Finding(self.kernel, " -> ".join(self.stack),
                                                     node.lineno, b, line))
                        break
            return set()  # a loaded value is data, not an address into a buffer
        if tl_fn == "debug_barrier":
            self.state.stored.clear()
            return set()
        if isinstance(f, ast.Name):
            target = self.resolve(self.mod, f.id)
            if target is not None:
                return self.enter(target, node, env)
        out = set()
        for a in node.args:
            out |= self.bufs(a, env)
        for k in node.keywords:
            out |= self.bufs(k.value, env)
        if isinstance(f, ast.Attribute):  # a method of a value (x.to(...)) keeps its buffers
            out |= self.bufs(f.value, env)
        return out

    def enter(self, target, node: ast.Call, env) -> set:
        mod, fn = target
        params = [a.arg for a in fn.args.args]
        callee = {p: set() for p in params}
        for p, a in zip(params, node.args):
            callee[p] = self.bufs(a, env)
        for k in node.keywords:
            if k.arg in callee:
                callee[k.arg] = self.bufs(k.value, env)
        saved = (self.mod, self.stack)
        self.mod, self.stack = mod, self.stack + [fn.name]
        ret = self.body(fn.body, callee)
        self.mod, self.stack = saved
        return ret

    # -- statements ---------------------------------------------------------------------------

    def assign(self, target, value: set, env):
        if isinstance(target, ast.Name):
            env[target.id] = set(value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self.assign(t, value, env)

    def body(self, stmts, env) -> set:
        ret = set()
        for s in stmts:
            ret |= self.stmt(s, env)
        return ret

    def stmt(self, s, env) -> set:
        if isinstance(s, ast.Assign):
            v = self.bufs(s.value, env)
            for t in s.targets:
                self.assign(t, v, env)
        elif isinstance(s, ast.AugAssign):
            v = self.bufs(s.value, env) | self.bufs(s.target, env)
            self.assign(s.target, v, env)
        elif isinstance(s, ast.AnnAssign) and s.value is not None:
            self.assign(s.target, self.bufs(s.value, env), env)
        elif isinstance(s, ast.Expr):
            self.bufs(s.value, env)
        elif isinstance(s, ast.Return):
            return self.bufs(s.value, env)
        elif isinstance(s, ast.If):
            self.bufs(s.test, env)
            before = self.state.copy()
            env_else = {k: set(v) for k, v in env.items()}
            ret = self.body(s.body, env)
            after_then, self.state = self.state, before
            ret |= self.body(s.orelse, env_else)
            self.state.merge(after_then)
            for k, v in env_else.items():
                env[k] = env.get(k, set()) | v
            return ret
        elif isinstance(s, (ast.For, ast.While)):
            loop = ("loop", len(self.iteration) + 1, s.lineno)
            if isinstance(s, ast.For):
                self.assign(s.target, self.bufs(s.iter, env) | {loop}, env)
            else:
                self.bufs(s.test, env)
            ret = set()
            for i in range(2):  # twice: a store late in one iteration, a load in the next
                self.iteration[loop] = i
                ret |= self.body(s.body, env)
            ret |= self.body(s.orelse, env)
            return ret
        elif isinstance(s, ast.With):
            return self.body(s.body, env)
        return set()

    def check(self, mod: Module, fn: ast.FunctionDef):
        self.mod, self.kernel, self.stack = mod, f"{mod.name}.{fn.name}", [fn.name]
        self.state = _State()
        self.iteration = {}
        env = {a.arg: ({a.arg} if a.arg.endswith("_ptr") else set()) for a in fn.args.args}
        self.body(fn.body, env)


def check(paths=(DEFAULT,)) -> tuple[list[Finding], list[str]]:
    """(findings, the kernels checked) over the jit functions of `paths`. Every jit function
    that no other one calls is a kernel (a launch's entry point)."""
    mods = _load_modules(paths)
    checker = _Checker(mods)
    called = set()
    for mod in mods.values():
        for fn in mod.jit.values():
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    t = checker.resolve(mod, node.func.id)
                    if t is not None:
                        called.add((t[0].name, t[1].name))
    kernels = []
    for mod in mods.values():
        for name, fn in mod.jit.items():
            if (mod.name, name) not in called:
                kernels.append(f"{mod.name}.{name}")
                checker.check(mod, fn)
    return sorted(set(checker.findings), key=lambda f: (f.kernel, f.line)), kernels


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Static memory-order check of Triton kernels: a "
                                "load after a store to the same buffer without a barrier.")
    p.add_argument("paths", nargs="*", default=[DEFAULT],
                   help="files or folders of @triton.jit functions (default: the package's "
                        "kernels)")
    p.add_argument("--list", action="store_true", help="also print every kernel checked")
    args = p.parse_args(argv)
    findings, kernels = check(args.paths)
    if args.list:
        print("\n".join(sorted(kernels)))
    for f in findings:
        print(f)
    print(f"memory order: {len(kernels)} kernels checked, {len(findings)} loads after a store "
          "to the same buffer without a barrier")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())

"""The import graph of harness/ and impl/, checked against the intended layering and drawn into docs/imports.png.

    python scripts/import_graph.py            # draws docs/imports.png, prints the violations (exit 0)
    python scripts/import_graph.py --check    # exit 1 when there is any violation
    python scripts/import_graph.py --out x.png

Every module of harness/ and impl/ is parsed with `ast` (nothing is imported). An import between project modules
is an edge: module-level, or in-function (inside a def). An in-function import is *lazy* when its statement carries a
trailing `# lazy: <why>` comment; those are left out of the cycle check (they run after both modules are loaded).
`importlib.import_module` on a module named by a string literal (harness/cli.py's command table) is a *dynamic* edge.

The rules (tests/test_imports.py asserts each over the tree; `violations()` returns them all):
    cycles      no import cycle among project modules (lazy in-function imports excluded)
    layers      no import from a lower layer up to a higher one (LAYERS, any import); leaves import none of each other
    private     no name with a leading underscore imported from another project module
    unmarked    every in-function import (of anything) carries `# lazy: <why>`
    long_files  no .py file under harness/ or impl/ over MAX_LINES lines
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("impl", "harness")
MAX_LINES = 500

# The intended layering, lowest first: a module may import from its own layer and the layers below it, never from a
# layer above (lazily or not). A module belongs to the entry that is its longest dotted prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("impl",),  # from-scratch attention: imports nothing from harness
    ("harness.common", "harness.versions", "harness.stages"),  # leaves
    ("harness.reference",),
    ("harness.checkpoints",),
    ("harness.bugs",),
    ("harness.verify",),
    ("harness.e2e", "harness.bench", "harness.mutants"),
    ("harness.cli", "harness.__main__", "harness.pytest_plugin"),  # the entry points: command line, pytest plugin
)
# Leaves import no other project module than impl: not even each other
LEAVES = frozenset(LAYERS[1])

LAZY = re.compile(r"#\s*lazy:\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class Import:
    """One imported module (or the names taken from it) in one statement."""

    src: str  # the importing project module, dotted
    target: str  # the imported module, dotted (a project module when project is True)
    line: int
    names: tuple[str, ...] = ()  # the names taken from target by `from target import ...`
    in_function: bool = False
    lazy: str | None = None  # the why of a trailing `# lazy: <why>`, None when unmarked
    project: bool = True
    dynamic: bool = False  # importlib.import_module("literal")

    def where(self) -> str:
        return f"{self.src}:{self.line}"


@dataclass
class Graph:
    root: Path
    modules: dict[str, Path] = field(default_factory=dict)  # dotted name -> file
    lines: dict[str, int] = field(default_factory=dict)  # dotted name -> line count
    imports: list[Import] = field(default_factory=list)  # every import statement's targets, project or not

    def edges(self, *, lazy: bool = True, dynamic: bool = True) -> list[Import]:
        """The imports between project modules; lazy=False leaves out in-function imports marked `# lazy:`."""
        return [
            i
            for i in self.imports
            if i.project and i.src != i.target and (lazy or not (i.in_function and i.lazy))
            and (dynamic or not i.dynamic)
        ]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path = ROOT) -> dict[str, Path]:
    return {
        module_name(p, root): p
        for pkg in PACKAGES
        for p in sorted((root / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def _resolve_from(mod: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_package else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest dotted prefix of name that is a project module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _lazy_reason(lines: list[str], node: ast.stmt) -> str | None:
    for text in lines[node.lineno - 1 : (node.end_lineno or node.lineno)]:
        m = LAZY.search(text)
        if m:
            return m.group(1)
    return None


def _imports_of(mod: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[Import] = []
    uses_importlib = False

    def visit(node: ast.AST, in_function: bool) -> None:
        nonlocal uses_importlib
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            lazy = _lazy_reason(lines, node) if in_function else None
            common = dict(src=mod, line=node.lineno, in_function=in_function, lazy=lazy)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _project_module(alias.name, modules)
                    out.append(Import(target=target or alias.name, project=target is not None, **common))
            else:
                base = _resolve_from(mod, is_package, node)
                target = _project_module(base, modules)
                if target is None:
                    out.append(Import(target=base, names=tuple(a.name for a in node.names), project=False, **common))
                else:
                    names = []
                    for alias in node.names:
                        sub = f"{base}.{alias.name}"
                        if sub in modules:  # `from package import submodule`
                            out.append(Import(target=sub, **common))
                        else:
                            names.append(alias.name)
                    if names or not node.names:
                        out.append(Import(target=target, names=tuple(names), **common))
        elif isinstance(node, ast.Attribute) and node.attr == "import_module":
            uses_importlib = True
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    if uses_importlib:  # string literals naming a project module, in a module that imports by name
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
                if node.value != mod and node.value.count(".") >= 1:
                    out.append(Import(src=mod, target=node.value, line=node.lineno, dynamic=True))
    return out


def build(root: Path = ROOT) -> Graph:
    """Parse every module of harness/ and impl/ under root."""
    g = Graph(root=root, modules=find_modules(root))
    for mod, path in g.modules.items():
        g.lines[mod] = len(path.read_text().splitlines())
        g.imports.extend(_imports_of(mod, path, g.modules))
    return g


# ---- the layering ----


def group_of(module: str) -> str | None:
    """The LAYERS entry a module belongs to (its longest dotted prefix there), or None."""
    best = None
    for layer in LAYERS:
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
                best = prefix
    return best


def layer_of(module: str) -> int | None:
    group = group_of(module)
    return None if group is None else next(i for i, layer in enumerate(LAYERS) if group in layer)


def package_of(module: str) -> str:
    """For the picture: the group, or the top package for a module in none."""
    return group_of(module) or module.split(".")[0]


# ---- the rules ----


def cycles(g: Graph) -> list[list[str]]:
    """Each import cycle among project modules, as a path a -> b -> ... -> a (one per strongly connected
    component), lazy in-function and dynamic imports left out."""
    adj: dict[str, set[str]] = defaultdict(set)
    for e in g.edges(lazy=False, dynamic=False):
        adj[e.src].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(g.modules):
        if v not in index:
            strong(v)

    out = []
    for comp in comps:  # a shortest cycle through the component's first module
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(adj[v] & members):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path, v = [start], prev[start]
        while v != start:
            path.append(v)
            v = prev[v]
        out.append([start, *reversed(path[1:]), start])
    return sorted(out)


def layer_violations(g: Graph) -> list[str]:
    """Imports (any kind) from a lower layer up to a higher one, between leaves, or touching a module in no layer."""
    out = []
    for e in g.edges():
        ls, lt = layer_of(e.src), layer_of(e.target)
        if ls is None or lt is None:
            missing = e.src if ls is None else e.target
            out.append(f"{e.where()} imports {e.target}: {missing} is in no layer")
        elif lt > ls:
            out.append(f"{e.where()} imports {e.target}: layer {ls} ({group_of(e.src)}) up to layer {lt} "
                       f"({group_of(e.target)})")
        elif group_of(e.src) in LEAVES and group_of(e.target) in LEAVES and group_of(e.src) != group_of(e.target):
            out.append(f"{e.where()} imports {e.target}: leaves import none of each other")
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(g: Graph) -> list[str]:
    """Names with a leading underscore (or private modules) imported from another project module."""
    out = []
    for e in g.edges():
        bad = [n for n in e.names if _private(n)]
        if any(_private(part) for part in e.target.split(".")):
            bad.insert(0, e.target)
        if bad:
            out.append(f"{e.where()} imports {', '.join(bad)} from {e.target}")
    return out


def unmarked_local_imports(g: Graph) -> list[str]:
    """In-function imports (of anything) without a trailing `# lazy: <why>`."""
    return [f"{i.where()} imports {i.target} in a function" for i in g.imports
            if i.in_function and not i.dynamic and i.lazy is None]


def long_files(g: Graph, limit: int = MAX_LINES) -> list[str]:
    return [f"{m} ({g.modules[m].relative_to(g.root)}): {n} lines" for m, n in sorted(g.lines.items()) if n > limit]


def violations(g: Graph) -> dict[str, list[str]]:
    return {
        "cycles": [" -> ".join(c) for c in cycles(g)],
        "layers": layer_violations(g),
        "private": private_imports(g),
        "unmarked": unmarked_local_imports(g),
        "long_files": long_files(g),
    }


def offending_modules(lines: list[str]) -> list[str]:
    """The modules a rule's lines name first (`module:line ...`, `path: N lines`, `a -> b -> a`)."""
    mods = set()
    for text in lines:
        head = re.split(r"[: ]", text, maxsplit=1)[0]
        mods.update(text.split(" -> ") if " -> " in text else [head])
    return sorted(mods)


# ---- the picture ----

STYLE = {  # kind -> (colour, linestyle, width, alpha, label)
    "module": ("#555555", "-", 0.9, 0.45, "module-level import"),
    "lazy": ("#1f77b4", "--", 0.9, 0.6, "in-function, marked # lazy:"),
    "local": ("#ff7f0e", "--", 0.9, 0.7, "in-function, not marked # lazy:"),
    "dynamic": ("#2ca02c", ":", 1.0, 0.7, "importlib.import_module (cli's commands)"),
    "violation": ("#d62728", "-", 1.8, 0.9, "violation: up a layer, between leaves, or in a cycle"),
}


def _pair_kinds(g: Graph) -> dict[tuple[str, str], str]:
    """One arrow per (src, target): its strongest kind, red where it breaks the layering or closes a cycle."""
    rank = {"dynamic": 0, "lazy": 1, "local": 2, "module": 3}
    kinds: dict[tuple[str, str], str] = {}
    for e in g.edges():
        kind = "dynamic" if e.dynamic else ("module" if not e.in_function else ("lazy" if e.lazy else "local"))
        key = (e.src, e.target)
        if key not in kinds or rank[kind] > rank[kinds[key]]:
            kinds[key] = kind
    bad = set()
    for text in layer_violations(g):
        src, rest = text.split(":", 1)[0], text.split(" imports ", 1)[1]
        bad.add((src, rest.split(":", 1)[0]))
    for c in cycles(g):
        bad.update(zip(c, c[1:], strict=False))
    for key in bad & set(kinds):
        kinds[key] = "violation"
    return kinds


def _label(g: Graph, module: str) -> str:
    """The module's file, relative to its group's folder: run.py, sources/hub.py, __init__.py, cli.py."""
    path, folder = g.modules[module], g.root / package_of(module).replace(".", "/")
    return path.relative_to(folder).as_posix() if folder.is_dir() else path.name


def layout(g: Graph, kinds: dict[tuple[str, str], str]):
    """Positions: one row per layer (lowest at the bottom), its groups side by side, modules in a grid in each."""
    touched = {m for pair in kinds for m in pair}
    shown = [m for m in g.modules if m in touched or not g.modules[m].name == "__init__.py"]
    groups: dict[str, list[str]] = defaultdict(list)
    for m in sorted(shown):
        groups[package_of(m)].append(m)
    rows: list[list[str]] = [[p for p in layer if p in groups] for layer in LAYERS]
    extra = [p for p in groups if group_of(groups[p][0]) is None]
    if extra:
        rows.append(extra)
    row_h, pad = 0.42, 0.35
    pos: dict[str, tuple[float, float]] = {}
    boxes: list[tuple[str, float, float, float, float, int | None]] = []  # name, x, y, w, h, layer
    y = 0.0
    for li, row in enumerate(rows):
        dims = []
        for p in row:
            n = len(groups[p])
            ncol = min(n, 7) if n <= 7 else (n + 1) // 2 if n <= 14 else 7
            dims.append((p, n, ncol, -(-n // ncol)))
        height = max((r for *_, r in dims), default=1) * row_h + 2 * pad
        col_w = {p: max(1.4, 0.075 * max(len(_label(g, m)) for m in groups[p]) + 0.4) for p in row}
        widths = [max(ncol * col_w[p] + 2 * pad * 0.6, 0.14 * len(p) + 0.4) for p, _, ncol, _ in dims]
        total = sum(widths) + 0.8 * (len(widths) - 1)
        x = -total / 2
        for (p, _n, ncol, _nrow), w in zip(dims, widths, strict=True):
            boxes.append((p, x, y, w, height, li if li < len(LAYERS) else None))
            for k, m in enumerate(groups[p]):
                r, c = divmod(k, ncol)
                pos[m] = (x + pad * 0.6 + (c + 0.5) * col_w[p], y + height - pad - (r + 0.5) * row_h)
            x += w + 0.8
        y += height + 1.1
    return pos, boxes, groups


def _package_panel(ax, g: Graph, kinds: dict[tuple[str, str], str], colour_of: dict, FancyArrowPatch) -> None:
    """The same graph by package: one node per LAYERS entry, one arrow per importing pair with its count."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    worst: dict[tuple[str, str], str] = {}
    rank = {"dynamic": 0, "lazy": 1, "local": 2, "module": 3, "violation": 4}
    for (src, dst), kind in kinds.items():
        key = (package_of(src), package_of(dst))
        if key[0] == key[1]:
            continue
        counts[key] += 1
        if key not in worst or rank[kind] > rank[worst[key]]:
            worst[key] = kind
    present = {package_of(m) for m in g.modules}
    rows = [list(layer) for layer in LAYERS]
    node: dict[str, tuple[float, float]] = {}
    for li, row in enumerate(rows):
        for k, p in enumerate(row):
            # a row of one zigzags, so that arrows passing several layers miss the nodes between
            x = (k - (len(row) - 1) / 2) * 1.25 if len(row) > 1 else 0.6 * (-1) ** li
            node[p] = (x, li * 1.0)
    for (a, b), n in sorted(counts.items(), key=lambda kv: worst[kv[0]] == "violation"):
        if a not in node or b not in node:
            continue
        colour, ls, lw, alpha, _ = STYLE[worst[(a, b)]]
        (x0, y0), (x1, y1) = node[a], node[b]
        rad = 0.25 if abs(y0 - y1) > 1.5 or y0 == y1 else 0.1
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=11, lw=lw + 0.4, ls=ls,
                                     color=colour, alpha=min(1.0, alpha + 0.2), shrinkA=16, shrinkB=16,
                                     connectionstyle=f"arc3,rad={rad}", zorder=2))
        mx, my = (x0 + x1) / 2 + rad * (y1 - y0) / 2, (y0 + y1) / 2 - rad * (x1 - x0) / 2
        ax.text(mx, my, str(n), fontsize=7, ha="center", va="center", color=colour, zorder=3,
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    for p, (x, y) in node.items():
        ax.text(x, y, p.replace("harness.", "harness.\n") if "." in p else p, ha="center", va="center", fontsize=8.5,
                fontweight="bold", zorder=4, alpha=1.0 if p in present else 0.4,
                bbox=dict(boxstyle="round,pad=0.3", fc=colour_of.get(p, "white"), ec="#333333", lw=0.8,
                          alpha=1.0 if p in present else 0.4))
    ax.set_xlim(-2.2, 2.2)
    ax.set_ylim(-0.6, len(LAYERS) - 0.4)
    ax.axis("off")
    ax.set_title("By package (number: module pairs importing;\nfaded: a LAYERS entry with no module yet)", fontsize=10)


def render(g: Graph, out: Path) -> Path:
    import matplotlib  # lazy: only the picture needs it; the tests call the checks without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above
    from matplotlib.lines import Line2D  # lazy: as above
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # lazy: as above

    kinds = _pair_kinds(g)
    pos, boxes, groups = layout(g, kinds)
    xs = [b[1] for b in boxes] + [b[1] + b[3] for b in boxes]
    ys = [b[2] for b in boxes] + [b[2] + b[4] for b in boxes]
    W, H = max(xs) - min(xs) + 3.5, max(ys) - min(ys) + 2.2
    fig, (ax, side) = plt.subplots(1, 2, figsize=(W * 0.95 * 1.36, H * 0.95), gridspec_kw={"width_ratios": [3, 1.1]})
    ax.set_xlim(min(xs) - 3.0, max(xs) + 0.5)
    ax.set_ylim(min(ys) - 1.4, max(ys) + 0.8)
    ax.axis("off")
    palette = plt.get_cmap("tab20")
    colour_of = {name: palette(i % 20) for i, (name, *_rest) in enumerate(boxes)}
    for name, x, y, w, h, _layer in boxes:
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc=colour_of[name], alpha=0.18, ec="#333333", lw=1.0, zorder=0))
        ax.text(x + 0.08, y + h - 0.05, name, ha="left", va="top", fontsize=10, fontweight="bold", zorder=4)
    seen_rows = {}
    for _name, _x, y, _w, h, layer in boxes:
        seen_rows.setdefault(y, (h, layer))
    for y, (h, layer) in seen_rows.items():
        label = f"layer {layer}" if layer is not None else "in no layer"
        ax.text(min(xs) - 2.8, y + h / 2, label, ha="left", va="center", fontsize=11, color="#333333")
    _package_panel(side, g, kinds, colour_of, FancyArrowPatch)

    label_of = {m: _label(g, m) for m in pos}
    for (src, dst), kind in sorted(kinds.items(), key=lambda kv: kv[1] == "violation"):
        if src not in pos or dst not in pos:
            continue
        colour, ls, lw, alpha, _ = STYLE[kind]
        same = package_of(src) == package_of(dst)
        arrow = FancyArrowPatch(pos[src], pos[dst], arrowstyle="-|>", mutation_scale=9, lw=lw, ls=ls, color=colour,
                                alpha=alpha, shrinkA=9, shrinkB=9,
                                connectionstyle=f"arc3,rad={0.35 if same else 0.08}", zorder=2 + (kind == "violation"))
        ax.add_patch(arrow)
    for m, (x, y) in pos.items():
        over = g.lines[m] > MAX_LINES
        ax.text(x, y, label_of[m], ha="center", va="center", fontsize=8, zorder=5,
                color="#d62728" if over else "black",
                bbox=dict(boxstyle="round,pad=0.18", fc="white", ec="#d62728" if over else "#999999", lw=0.7))
    handles = [Line2D([], [], color=c, ls=ls, lw=max(lw, 1.2), label=lab) for c, ls, lw, _a, lab in STYLE.values()]
    handles.append(Line2D([], [], color="#d62728", marker="s", ls="", mfc="white", label=f"over {MAX_LINES} lines"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, -0.01), fontsize=9, ncol=3, frameon=False)
    n = sum(len(v) for v in violations(g).values())
    ax.set_title(f"Imports between the modules of harness/ and impl/ (arrow: importer -> imported; lower layers at "
                 f"the bottom); {n} violations: python scripts/import_graph.py", fontsize=12)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    from PIL import Image  # lazy: matplotlib's own dependency; a palette PNG is a third of the size

    Image.open(buf).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "imports.png", help="the picture (docs/imports.png)")
    ap.add_argument("--check", action="store_true", help="exit 1 when there is any violation")
    ap.add_argument("--no-plot", action="store_true", help="only the checks")
    args = ap.parse_args(argv)
    g = build()
    found = violations(g)
    if not args.no_plot:
        print(f"wrote {render(g, args.out)}: {len(g.modules)} modules, {len(g.edges())} imports between them")
    for rule, lines in found.items():
        print(f"{rule}: {len(lines)}" + "".join(f"\n  {line}" for line in lines))
    return 1 if args.check and any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

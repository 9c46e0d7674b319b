"""Names each module of a torch source tree defines, and the methods of torch.Tensor, read from the .py and .pyi
files with `ast` (nothing imported, so any torch build can be read: an unpacked wheel of another version too).

    pip download --no-deps torch==2.11.0 -d W && unzip -q W/torch-2.11.0-*.whl 'torch/*.py' 'torch/*.pyi' -d W
    python scripts/torch_api_names.py W/torch "$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')" \
        > tests/torch_names_after_2_11.txt

prints the dotted names NEW defines and OLD does not (OLD: torch 2.11, the GPU image's torch; NEW: this
environment's): the list tests/test_torch_api_floor.py forbids. Takes about a minute of CPU per tree. Both trees are read the same
way, so a name both define the same way cancels out; what remains are APIs added after OLD.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# torch's top level also re-exports these modules' names (torch/__init__.py: `from torch._C import *`, the
# _VariableFunctions loop, `from torch.functional import *`).
TOP_LEVEL_SOURCES = ("_C", "_C._VariableFunctions", "functional")
TENSOR_CLASSES = (("_C", "TensorBase"), ("_tensor", "Tensor"))


def defined_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
        elif isinstance(node, (ast.If, ast.Try)):  # names defined under `if TYPE_CHECKING:` / try-imports
            names |= defined_names(ast.Module(body=[n for part in (node.body, getattr(node, "orelse", []),
                                                                   *[h.body for h in getattr(node, "handlers", [])])
                                                      for n in part], type_ignores=[]))
    return names


def class_methods(tree: ast.Module, cls: str) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} | {
                t.id for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    return set()


def api(torch_dir: Path) -> set[str]:
    """Dotted names: torch.<module path>.<name> for every module, torch.<name> for the top level, and
    torch.Tensor.<method>."""
    modules: dict[str, ast.Module] = {}
    for path in sorted(torch_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        parts = path.relative_to(torch_dir.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        if name in modules:  # a .py and its .pyi: the union
            tree = ast.Module(body=modules[name].body + tree.body, type_ignores=[])
        modules[name] = tree
    out = {name for name in modules}
    for name, tree in modules.items():
        out |= {f"{name}.{n}" for n in defined_names(tree)}
    for source in TOP_LEVEL_SOURCES:
        if f"torch.{source}" in modules:
            out |= {f"torch.{n}" for n in defined_names(modules[f"torch.{source}"])}
    for module, cls in TENSOR_CLASSES:
        if f"torch.{module}" in modules:
            out |= {f"torch.Tensor.{n}" for n in class_methods(modules[f"torch.{module}"], cls)}
    return out


def version(torch_dir: Path) -> str:
    tree = ast.parse((torch_dir / "version.py").read_text())
    return next(n.value.value for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign)) and
                any(getattr(t, "id", None) == "__version__" for t in getattr(n, "targets", [getattr(n, "target", None)])))


def main() -> int:
    old, new = (Path(a) for a in sys.argv[1:3])
    added = api(new) - api(old)
    print(f"# Dotted names torch {version(new)} defines and torch {version(old)} (the GPU image's torch) does not, read\n"
          "# from both source trees by scripts/torch_api_names.py; code that runs on the GPU machine must not use them\n"
          "# (tests/test_torch_api_floor.py). Private names below torch's top level are left out; the top level's are\n"
          "# kept (torch._grouped_mm is one we use, present in both).")
    # private names other than torch's own top level (torch._grouped_mm and the like) are nobody's API
    keep = sorted(n for n in added if not any(p.startswith("_") for p in n.split(".")[2:])
                  and not any(p.startswith("_") and p != "_C" for p in n.split(".")[1:-1]))
    print("\n".join(keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU machine has torch 2.11 (CI has 2.13): code that runs there must not call a torch API added after 2.11.
tests/torch_names_after_2_11.txt lists them, derived by scripts/torch_api_names.py from both versions' sources
(its header says how); this scans the code for any use of them, through every import alias, with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What runs on the GPU machine: the package, and the tests scripts/gpu_check.sh runs with their helpers.
SCANNED = ("backends", "runtime", "configs", "tests", "scripts")


def forbidden() -> set[str]:
    lines = (ROOT / "tests" / "torch_names_after_2_11.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def torch_uses(source: str) -> set[str]:
    """Dotted torch names a module refers to: `torch.a.b` chains through `import torch[.x] [as y]` and
    `from torch[.x] import y [as z]` aliases, the imported names themselves, and `.name` attributes of any value
    as `torch.Tensor.name` (a method call on a tensor cannot be told apart from others without types)."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}
    uses: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    alias[a.asname or "torch"] = a.name if a.asname else "torch"
                    uses.add(a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch" and not node.level:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
                uses.add(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            uses.add(f"torch.Tensor.{node.attr}")
            parts = []
            inner = node
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in alias:
                uses.add(".".join([alias[inner.id], *reversed(parts)]))
    return uses


def flagged(uses: set[str], names: set[str]) -> set[str]:
    """Uses that are, or reach through, a forbidden name (torch.new_module.f is flagged via torch.new_module)."""
    return {u for u in uses if any(".".join(u.split(".")[:i]) in names for i in range(2, u.count(".") + 2))}


def test_no_torch_api_newer_than_the_gpu_image():
    names = forbidden()
    hits = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            for use in sorted(flagged(torch_uses(path.read_text()), names)):
                hits.append(f"{path.relative_to(ROOT)}: {use}")
    assert hits == [], "torch APIs the GPU image's torch 2.11 lacks:\n" + "\n".join(hits)


def test_the_scan_sees_through_aliases():
    names = forbidden()
    code = ("import torch\nimport torch.nn.functional as F\nfrom torch.nn.functional import linear_cross_entropy as lce\n"
            "def f(x):\n    F.linear_cross_entropy(x)\n    lce(x)\n    torch.nn.functional.linear_cross_entropy(x)\n"
            "    torch.thread_safe_generator()\n    return F.linear(x, x), torch._grouped_mm(x, x)\n")
    assert flagged(torch_uses(code), names) == {"torch.nn.functional.linear_cross_entropy", "torch.thread_safe_generator"}


def test_the_list_names_new_apis_and_not_old_ones():
    """Spot checks (grep in both source trees): linear_cross_entropy and thread_safe_generator are absent from 2.11;
    what the backends call (torch._grouped_mm, float8_e4m3fn, inference_mode, CUDA graphs) is in 2.11."""
    names = forbidden()
    assert {"torch.nn.functional.linear_cross_entropy", "torch.thread_safe_generator"} <= names
    assert not {"torch._grouped_mm", "torch.float8_e4m3fn", "torch.inference_mode", "torch.cuda.CUDAGraph",
                "torch.cuda.graph", "torch.Tensor.normal_", "torch.set_num_threads"} & names

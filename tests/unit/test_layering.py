"""The layering of the package, checked on the source (ruff on the repository: tests/e2e/test_ruff.py).

Layers import one way: ``models`` (plain PyTorch) <- ``parallel`` <- ``train``, and ``data`` stays
apart from ``parallel`` and ``train``. Every import statement counts, inside functions too, with
relative imports resolved to absolute names.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ucfvit"

# Layer -> modules it must not import (a name or any of its submodules). Every subpackage of
# ucfvit must be listed, so a new layer has to state its rule.
FORBIDDEN = {
    "ucfvit.models": ("torch.distributed", "ucfvit.parallel", "ucfvit.train", "ucfvit.data"),
    "ucfvit.parallel": ("ucfvit.train", "ucfvit.data"),
    "ucfvit.data": ("ucfvit.train", "ucfvit.parallel"),
    "ucfvit.eval": ("torch.distributed", "ucfvit.parallel", "ucfvit.train"),
    "ucfvit.interop": ("torch.distributed", "ucfvit.parallel", "ucfvit.train", "ucfvit.data"),
    "ucfvit.train": (),  # the top layer: may use all others
    "ucfvit.files": (
        "torch",
        "ucfvit.models",
        "ucfvit.parallel",
        "ucfvit.data",
        "ucfvit.eval",
        "ucfvit.interop",
        "ucfvit.train",
    ),
}
WHY = {
    "ucfvit.models": "model code is plain PyTorch: DESIGN.md, principle 1",
    "ucfvit.parallel": "parallel/ works for any model and knows nothing of training or data",
    "ucfvit.data": "data/ knows nothing of training or of parallel/",
    "ucfvit.eval": "metrics and inference are plain PyTorch; their reduction over ranks lives in train/",
    "ucfvit.interop": "weight conversion knows the models' names only: plain PyTorch like models/",
    "ucfvit.files": "bounded reads of small files serve every layer, so they depend on none",
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str, list[str]]]:
    """``(line, statement, absolute names)`` for every import in ``source`` of ``module``.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a submodule, as in
    ``from torch import distributed``); relative imports are resolved against ``module``.
    """
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        else:
            continue
        out.append((node.lineno, ast.unparse(node), names))
    return sorted(out)


def violations(source: str, module: str, is_package: bool, where: str) -> list[str]:
    layer = next((lay for lay in FORBIDDEN if module == lay or module.startswith(lay + ".")), None)
    if layer is None:
        return []
    found = []
    for line, statement, names in imported_names(source, module, is_package):
        for name in names:
            # Importing the root package runs ucfvit/__init__.py, which imports every layer.
            bad = [f for f in FORBIDDEN[layer] if name == f or name.startswith(f + ".")]
            bad += ["ucfvit (the root package imports every layer)"] if name == "ucfvit" else []
            if bad:
                why = WHY.get(layer, "")
                found.append(f"{where}:{line}: `{statement}` imports {bad[0]}, which {layer} must not ({why})")
                break
    return found


def test_every_subpackage_has_a_layer_rule():
    subpackages = {f"ucfvit.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages <= set(FORBIDDEN), f"add a rule to FORBIDDEN for {sorted(subpackages - set(FORBIDDEN))}"
    # nested packages (ucfvit.data.readers, ...) follow the rule of the layer they lie in
    nested = {module_name(p) for p in PACKAGE.rglob("__init__.py")} - subpackages - {"ucfvit"}
    assert nested and all(any(n.startswith(layer + ".") for layer in FORBIDDEN) for n in nested), nested


def test_layers_import_one_way():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        found += violations(path.read_text(), module_name(path), path.name == "__init__.py", where)
    assert not found, "layering violations:\n" + "\n".join(found)


def test_layer_check_sees_relative_nested_and_submodule_imports():
    source = (
        "import torch\n"
        "from . import rng\n"
        "from ..parallel import mesh\n"
        "from torch import distributed as dist\n"
        "def f():\n"
        "    import torch.distributed.tensor\n"
        "    from .. import train\n"
        "from ucfvit import build_model\n"
    )
    found = violations(source, "ucfvit.models.sap", False, "ucfvit/models/sap.py")
    assert [f.split(":")[1] for f in found] == ["3", "4", "6", "7", "8"], found
    assert found[0].startswith("ucfvit/models/sap.py:3: `from ..parallel import mesh` imports ucfvit.parallel, which")
    assert imported_names("from .mesh import MESH_DIMS", "ucfvit.parallel", True)[0][2] == [
        "ucfvit.parallel.mesh",
        "ucfvit.parallel.mesh.MESH_DIMS",
    ]
    assert violations("from ucfvit.models.rng import SampleRNG", "ucfvit.parallel.samples", False, "x") == []

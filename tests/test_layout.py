"""The product apart from the laboratory: ``training/``, ``ffcv_pipeline/``, ``model/`` and
``app/`` never import ``bench/`` (the lab imports them). Read from the source, so an import
hidden inside a function counts too."""
from __future__ import annotations

import ast

from conftest import ROOT

PRODUCT = ('training', 'ffcv_pipeline', 'model', 'app')


def imported_modules(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_the_product_never_imports_the_lab():
    """Catches a ``from bench... import`` (or ``import bench``) anywhere in the product's packages,
    and a lab module moved back into ``training/``."""
    offenders = [f'{p.relative_to(ROOT)}: {m}' for pkg in PRODUCT for p in sorted((ROOT / pkg).rglob('*.py'))
                 for m in imported_modules(p) if m == 'bench' or m.startswith('bench.')]
    assert not offenders, offenders
    assert not {'benchmark.py', 'benchmark_report.py', 'speedrun.py', 'sweep.py'} & \
        {p.name for p in (ROOT / 'training').glob('*.py')}
    lab = set().union(*(imported_modules(p) for p in (ROOT / 'bench').glob('*.py')))
    assert {'training.config', 'ffcv_pipeline.data'} <= lab  # the lab measures the product itself


def test_patches_of_other_packages_live_in_one_module_and_still_fit_torch():
    """The torch patch (patch 6: no torch._dynamo import in an eager run) lives with the ffcv
    ones, and what it relies on still holds in the installed torch (no ffcv needed). Catches a
    torch upgrade that moves ``_disable_dynamo``'s cache or the optimizers' step wrappers, and the
    patch (or the typed-dict one) written back outside ``ffcv_patches``."""
    from ffcv_pipeline import ffcv_patches
    assert ffcv_patches.check_torch() == []
    for pkg in PRODUCT:
        for p in (ROOT / pkg).rglob('*.py'):
            if p.name != 'ffcv_patches.py':
                text = p.read_text()
                assert '__dynamo_disable' not in text and 'numba.typed.Dict =' not in text, p

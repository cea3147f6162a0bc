"""The corpus split rule: disjoint, complete, by module, and what the shipped manifest recorded."""

import json

from svdsparse_jax.assets import CORPUS
from scripts.bundled_model.corpus import SPLITS, list_modules, module_name, split_of, stdlib_dir


def test_split_is_disjoint_and_complete():
    modules = list_modules()
    names = {s: {m for m, _ in modules[s]} for s in SPLITS}
    assert not names["train"] & names["calib"] and not names["train"] & names["heldout"]
    assert not names["calib"] & names["heldout"]
    files = [p for p in stdlib_dir().rglob("*.py") if "site-packages" not in p.parts and "__pycache__" not in p.parts]
    assert sum(len(v) for v in modules.values()) == len(files)
    assert all(split_of(m) == s for s in SPLITS for m in names[s])


def test_shipped_manifest_follows_the_rule():
    manifest = json.loads((CORPUS / "manifest.json").read_text())
    seen = set()
    for split, info in manifest["splits"].items():
        for module in info["files"]:
            assert split_of(module) == split and module not in seen
            seen.add(module)
    assert manifest["splits"]["heldout"]["modules"] > 0 and manifest["splits"]["calib"]["modules"] > 0


def test_module_names():
    root = stdlib_dir()
    assert module_name(root, root / "email" / "mime" / "text.py") == "email.mime.text"
    assert module_name(root, root / "email" / "__init__.py") == "email"

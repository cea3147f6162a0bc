"""The offline corpus: the source files of the running interpreter's standard library, split by module.

Split rule (fixed; the held-out files are never trained on): each `.py` file is one module, named by its
dotted path under the stdlib directory (`email/mime/text.py` -> `email.mime.text`). Its split is decided by
the first 8 hex digits of sha256(module name) modulo 100: 0-89 train, 90-94 calibration, 95-99 held-out.
`site-packages` and `__pycache__` are skipped. The rule depends on names only, so a file keeps its split
across Python versions.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

SPLITS = ("train", "calib", "heldout")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts) or "__init__"


def split_of(module: str) -> str:
    bucket = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "calib" if bucket < 95 else "heldout"


def list_modules(root: Path | None = None) -> dict[str, list[tuple[str, Path]]]:
    """{split: [(module name, file path), ...]} sorted by module name."""
    root = root or stdlib_dir()
    out: dict[str, list[tuple[str, Path]]] = {s: [] for s in SPLITS}
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "__pycache__" in path.parts:
            continue
        name = module_name(root, path)
        out[split_of(name)].append((name, path))
    return out


def read_source(path: Path) -> str:
    """A file's text; the few stdlib files that are not valid UTF-8 (test data) are decoded with replacement."""
    return path.read_bytes().decode("utf-8", errors="replace")


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (the `tokenizers` library) trained on texts, wrapped so that
    `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it. Special tokens: <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

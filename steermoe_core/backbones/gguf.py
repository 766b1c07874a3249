"""LLMs from llama.cpp's .gguf files, as plain dense HF modules.

transformers dequantises GGUF on load but leaves a GGUF quantizer attached, which refuses
``save_pretrained``. We rebuild the model from its config without ``quantization_config``, load the
dequantised state, and cache the result as an ordinary HF folder: the second load takes a second
instead of a dequantisation pass.

A GGUF published as raw byte-parts (``weights.split_parts``) is concatenated only while that cache
folder is being built, inside its temporary folder: the join is as atomic as the conversion, and
only the dense folder stays. Its length is checked against the extent its own header describes, so
a missing or truncated part is an error here rather than a reshape failure inside transformers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from steermoe_core.atomic import atomic_dir
from steermoe_core.backbones.weights import cache_root, file_key, foreign_output_wanted
from steermoe_core.errors import BackboneError


def _cache_name(parts: list[Path]) -> str:
    """One file keeps its historical name; parts are keyed by every part's version, in order."""
    if len(parts) == 1:
        return f"{parts[0].stem}-{file_key(parts[0])}"
    key = hashlib.sha256("".join(file_key(p) for p in parts).encode()).hexdigest()[:16]
    return f"{parts[0].stem}-{len(parts)}parts-{key}"


def join_parts(parts: list[Path], out: Path) -> Path:
    """Concatenate byte-parts into ``out`` and check it is one whole GGUF, naming what is wrong."""
    import gguf

    with parts[0].open("rb") as f:
        if f.read(4) != b"GGUF":
            raise BackboneError(f"{parts[0]}: part 1 of {len(parts)} does not start a GGUF file (wrong part or order?)")
    with out.open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst, 16 << 20)
    size = out.stat().st_size
    try:
        reader = gguf.GGUFReader(out)
        need, align = max(t.data_offset + t.n_bytes for t in reader.tensors), reader.alignment
        del reader  # its memmap (within a conversion `_read_once` keeps it for transformers' reads)
    except (ValueError, IndexError):  # the reader fails on tensors that run past the end
        need, align = None, 0
    if need is None or not need <= size < need + align:
        # Splitters cut equal slices: a part (not the last) of another size is the likely culprit.
        odd = next((p for p in parts[1:-1] if p.stat().st_size != parts[0].stat().st_size), None)
        blame = f"{odd} differs in size from part 1" if odd else "a part is missing, truncated or repeated"
        described = "more" if need is None else f"{need:,}"
        raise BackboneError(
            f"{parts[0]} + {len(parts) - 1} more: the parts total {size:,} bytes but the GGUF header "
            f"describes {described}: {blame}"
        )
    return out


@contextlib.contextmanager
def _read_once() -> Iterator[None]:
    """One conversion reads the GGUF up to five times (our length check, then transformers for the tokenizer,
    the config and the tensors), and transformers asks gguf for the tensor-name map once per module (about
    800 times). With a 150k-token vocabulary each read costs about 18 s and the maps 11 s on 2 CPU cores.
    For the length of the conversion, each file is read once and each (architecture, layers) map built once."""
    import gguf

    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode: str = "r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_cls(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_cls, name_map
        readers.clear()


@contextlib.contextmanager
def _quiet_conversion() -> Iterator[None]:
    """Two foreign outputs a conversion would print between steermoe's own lines: transformers'
    GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors", which
    transformers' progress-bar switch does not reach), and ``save_pretrained`` imports DeepSpeed
    through accelerate when it is installed, whose accelerator probe warns "Setting accelerator to
    CPU" on a machine without a GPU. Both are hidden unless ``--verbose``."""

    if foreign_output_wanted():
        yield
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when DeepSpeed is first imported
    try:
        import transformers.modeling_gguf_pytorch_utils as reader_module
    except ImportError:  # a transformers without GGUF support fails in from_pretrained, with its own message
        yield
        return
    bar = getattr(reader_module, "tqdm", None)
    if bar is not None:
        reader_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            reader_module.tqdm = bar


def gguf_to_hf_folder(parts: list[Path]) -> Path:
    """Convert once into ``$STEERMOE_CACHE/gguf/<name>-<key>/`` and return that folder.

    ``parts`` is one .gguf file, or the byte-parts of one in order.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache_root() / "gguf" / _cache_name(parts)
    if (out / "config.json").exists():
        return out
    with atomic_dir(out, keep_existing=True) as tmp, _read_once(), _quiet_conversion():
        path = parts[0] if len(parts) == 1 else join_parts(parts, tmp / "joined.gguf")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # the loaded model's config, not AutoConfig on the file: every parse of a GGUF with a 150k-token
        # vocabulary costs about 20 s on a 2-core CPU
        config = copy.deepcopy(quantised.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):  # no random init of weights that are overwritten at once (seconds at 0.5B)
            dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        dense.load_state_dict(quantised.state_dict(), strict=True, assign=True)
        # non-persistent buffers (rotary frequencies) stay on "meta": save_pretrained never writes them,
        # and every load rebuilds them; a parameter left there would be a bug
        assert not any(p.is_meta for p in dense.parameters())
        dense.generation_config = quantised.generation_config
        del quantised
        if len(parts) > 1:
            path.unlink()
        dense.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def load_gguf_llm(parts: list[Path], dtype: torch.dtype, attn_implementation: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_to_hf_folder(parts)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    return model, tok

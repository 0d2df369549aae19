"""The cache of dequantized GGUF models: one plain fp32 Hugging Face directory per GGUF file, written whole or not at
all, checked before every use (its weights' size and CRC-32), made by one process at a time.

    tmp = write_entry(model, tokenizer, out)   # a folder of this process beside ``out``
    publish(tmp, out)                          # moved into place atomically; a damaged ``out`` replaced
    entry_ok(out)                              # whole and unaltered since it was written
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from medusa_export.runtime.errors import ModelError, first_line
from medusa_export.runtime.whole_file import readable_as_made, write_whole

WEIGHTS = "model.safetensors"  # of a dequantized GGUF in the cache


def write_entry(model, tok, out: Path) -> Path:
    """The model as a plain fp32 directory in a temporary folder of this process beside ``out`` (two processes
    never write into one); ModelError (one line) when the cache cannot be written."""
    import shutil

    from safetensors.torch import save_model

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{os.urandom(3).hex()}")
    try:
        tmp.mkdir(parents=True)
        # save_pretrained refuses GGUF-loaded models; the state dict (tied weights handled) and config suffice.
        save_model(model, str(tmp / WEIGHTS))
        readable_as_made(tmp / WEIGHTS)  # a machine's cache may be shared by its users
        # A plain fp32 directory now: drop the GGUF quantization record (other tools would refuse the weights) and
        # name the architecture (the GGUF loader leaves it empty).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = model.config.architectures or [type(model).__name__]
        model.config.to_json_file(tmp / "config.json")
        tok.save_pretrained(tmp)
        normalize_byte_level_tokenizer(tmp / "tokenizer.json")
        weights = tmp / WEIGHTS
        record = {"weights": WEIGHTS, "bytes": weights.stat().st_size, "crc32": _crc32(weights)}
        (tmp / "complete").write_text(json.dumps(record) + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"cannot write the dequantized model under {out.parent} ({type(e).__name__}: "
                         f"{first_line(e, 120)}): make it writable, or set MEDUSA_EXPORT_CACHE to a writable "
                         f"directory") from None
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move the finished entry ``tmp`` to ``out`` atomically; a valid entry already there is kept (ours dropped), a
    damaged one is moved aside and removed."""
    import shutil

    for _ in range(3):
        try:
            os.rename(tmp, out)  # fails while ``out`` is a directory with files in it
            return
        except OSError:
            if entry_ok(out):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            aside = out.with_name(f"{out.name}.old-{os.getpid()}-{os.urandom(3).hex()}")
            try:
                os.rename(out, aside)
            except FileNotFoundError:  # gone meanwhile: the next rename may take its place
                pass
            except OSError:  # not ours to move (another user's entry in a shared cache): the error below
                break
            shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise ModelError(f"cannot replace the damaged cache entry {out}: delete it and run again")


@contextlib.contextmanager
def entry_lock(out: Path):
    """Held while this process makes ``out``: a second process dequantising the same file waits for it, then finds
    the entry made (also held while `model_loading.remember_location` rewrites its record of model locations). Without locks (a read-only cache, no fcntl) it goes on unlocked: temporary folders still keep
    writers apart. Yields whether the lock is held: then no other process is writing ``out``, and the temporary
    folders of killed writers (a whole fp32 model each) are removed."""
    try:
        import fcntl

        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(out.with_name(out.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:  # a file system without locks (some NFS, FUSE): unlocked, as above
            locked = False
        if locked:
            _remove_temporaries(out)
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _remove_temporaries(out: Path) -> None:
    """The temporary folders `write_entry` left beside ``out`` (their writers were killed: the caller holds the lock
    every writer takes)."""
    import glob
    import shutil

    for tmp in out.parent.glob(glob.escape(out.name) + ".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def entry_ok(out: Path) -> bool:
    """Whether ``out`` is a whole cache entry: marked complete, its files there, and its weights the size and CRC-32
    recorded when it was written (an entry of older releases, which recorded neither: weights whose safetensors
    header accounts for every byte)."""
    try:
        marker = (out / "complete").read_text()
        if not all((out / f).is_file() for f in ("config.json", "tokenizer.json", WEIGHTS)):
            return False
        if marker.strip() == "ok":
            return _safetensors_whole(out / WEIGHTS)
        record = json.loads(marker)
        weights = out / record["weights"]
        return weights.stat().st_size == record["bytes"] and _crc32(weights) == record["crc32"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _safetensors_whole(path: Path) -> bool:
    """Whether the safetensors file's header is readable and its tensors end exactly where the file does."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(path.stat().st_size - 8, 100 << 20):
            return False
        header = json.loads(f.read(n))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0) == path.stat().st_size


def _crc32(path: Path) -> int:
    """CRC-32 of the whole file (~0.3 s for the default model's 540 MB)."""
    import zlib

    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def normalize_byte_level_tokenizer(path: Path) -> bool:
    """Make a byte-level BPE tokenizer converted from GGUF what the model's own tokenizer.json is: no unknown token,
    no byte fallback, the plain byte-level decoder. True if the file changed.

    Some transformers releases (5.17) convert a GGUF ``gpt2`` tokenizer with ``unk_token`` set to the end-of-text
    token and a SentencePiece-style decoder: a character outside the vocabulary (a control character such as
    U+0013) then encodes to end-of-text, and a literal U+2581 decodes to a space, while later releases drop the
    character and keep the text. Normalising gives the same ids and text whichever release made the directory.
    """
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the tokenizer's own loading says what is wrong with the file
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        return False
    # A decoder sequence around a byte-level step: keep that step alone.
    byte_level = next((d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"), None) \
        if decoder.get("type") == "Sequence" else None
    if model.get("unk_token") is None and not model.get("byte_fallback") and not model.get("fuse_unk") \
            and byte_level is None:
        return False
    model.update(unk_token=None, byte_fallback=False, fuse_unk=False)
    if byte_level is not None:
        spec["decoder"] = byte_level
    try:  # whole, through a per-process name: two processes loading at once write apart
        write_whole(path, lambda f: f.write(json.dumps(spec, ensure_ascii=False).encode("utf-8")))
    except OSError:  # a read-only cache: load it as it is
        return False
    return True

"""Reading and writing checkpoint files. Reading never runs code stored in a file.

Torch files are read with ``weights_only=True``: tensors, numbers, strings and plain containers come
back, and anything that would need a class imported or a function called to unpickle it is refused
before it runs. ``.safetensors`` files hold tensors alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.errors import CheckpointError


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path names no file."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled objects whose loading would run code; it was not loaded."""


SAFETENSORS = ".safetensors"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A torch checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`) as a dict, or a `.safetensors` file as
    ``{"state_dict": tensors}``. Raises a one-line `CheckpointError` for a missing, empty, truncated
    or foreign file, and `UnsafeCheckpointError` for one that needs arbitrary unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"Checkpoint {path} does not exist.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes): a write that never finished? Use an earlier checkpoint.")
    if path.suffix == SAFETENSORS:
        return {"state_dict": read_safetensors(path)}
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if re.search(r"Unsupported global|Unsupported operand", str(err)) and _looks_like_torch_file(path):
            raise UnsafeCheckpointError(
                f"{path} holds Python objects that only running its code could load ({_unsafe_global(err)}); "
                "ldm never runs code from a file. If you trust it, convert it once to .safetensors in a "
                "separate Python session (torch.load(..., weights_only=False), then safetensors.torch.save_file "
                "of its tensors) and pass that file instead."
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): {_first_line(err)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): {_first_line(err)}"
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict.")
    return loaded


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {_first_line(err)}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: its `state_dict` entry if it has one, else the file itself."""
    ckpt = read_checkpoint(path)
    state = ckpt.get("state_dict", ckpt)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle stream (the legacy one), by their first bytes."""
    with open(path, "rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _unsafe_global(err: BaseException) -> str:
    """The global torch's weights-only unpickler refused, e.g. "GLOBAL builtins.exec"."""
    match = re.search(r"Unsupported global: (GLOBAL \S+)", str(err))
    return match.group(1) if match else "pickle operations other than tensors and plain containers"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def temp_path_for(path: Path) -> Path:
    """Where a checkpoint is written before it is renamed into place (same folder, so same filesystem)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def previous_path_for(path: Path) -> Path:
    """Where `atomic_save(..., keep_previous=True)` keeps the file it replaces: `last.ckpt` -> `last.previous.ckpt`."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raises `CheckpointError` unless `path` reads back as a checkpoint. Memory-mapped and weights-only:
    the tensors' bytes are not read, so this is cheap even for a multi-GB file."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to read back means the file is not usable
        raise CheckpointError(f"{path} does not read back as a checkpoint: {_first_line(err)}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict.")


def atomic_save(obj: Any, path: str | os.PathLike, keep_previous: bool = False) -> None:
    """`torch.save` to a temporary file in the target's folder, fsync, rename over the target.

    `os.replace` is atomic on POSIX filesystems, so a process killed while writing (SIGKILL, node
    failure, the end of a SLURM time limit) leaves the previous file whole and a stray temporary
    file, never a truncated checkpoint that the next resume would pick. With `keep_previous`, the new
    file is read back first, and the file it replaces is kept as `previous_path_for(path)`: damage done
    to the newest file later (a full disk, a copy cut short) still leaves an intact one to resume from.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        with open(temp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous:
            verify_checkpoint(temp)
            if path.is_file():
                os.replace(path, previous_path_for(path))
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):  # a failed cleanup must not hide why the write failed
            temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Makes the rename itself durable (a power loss right after it keeps the new name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sub_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix stripped."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes and bytes, in name order): the same for the
    same weights however they were loaded, different after any change. Identifies which encoders made a
    latent cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

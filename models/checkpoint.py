"""Checkpoints: the model in safetensors, the training state (optimizer, schedule, RNG) in a torch file.

    OUT/last.safetensors    model weights; metadata says how to rebuild the model (model name, kwargs,
                            data, image size) and which epoch it is
    OUT/last_state.pt       optimizer, scheduler, epoch, RNG states, metrics so far (for --resume)
    OUT/best.safetensors    the weights with the best validation top-1 so far

Every file is written to a temporary file in the same folder and renamed over the old one, so a kill
in the middle of a write leaves the previous good file in place; last.safetensors and last_state.pt are
both written before either is renamed (atomic_write_many), so they stay one checkpoint.
"""
import io
import json
import os
import random
import tempfile
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

FORMAT = "sola_vision.checkpoint.v1"
MODEL_FILE, STATE_FILE, BEST_FILE = "last.safetensors", "last_state.pt", "best.safetensors"


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    atomic_write_many([(path, data)])


def atomic_write_many(files) -> None:
    """Write each (path, data) to a temporary file next to it, then rename them all: the renames follow each
    other at once, so a kill leaves either every old file or (all but a few microseconds) every new one. The
    files get the usual permissions (mkstemp's temporary files are owner-only)."""
    temporaries, mode = [], 0o666 & ~_umask()
    try:
        for path, data in files:
            folder = os.path.dirname(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
            os.close(fd)
            temporaries.append(tmp)
            os.chmod(tmp, mode)
            _write_file(tmp, data)
        for (path, _), tmp in zip(files, temporaries):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def remove_stale_temporaries(folder: str, names) -> None:
    """Deletes the temporary files (atomic_write's `<name>.<random>.tmp`) that a killed run left behind in its
    output folder for the files `names`."""
    for entry in os.listdir(folder):
        if entry.endswith(".tmp") and any(entry.startswith(name + ".") for name in names):
            os.remove(os.path.join(folder, entry))


def model_bytes(model: torch.nn.Module, info: Dict[str, Any]) -> bytes:
    """Model weights plus `info` (JSON-serialisable: how to rebuild the model) as safetensors metadata."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return save_safetensors_bytes(tensors, metadata={"format": FORMAT, "info": json.dumps(info)})


def save_model(path: str, model: torch.nn.Module, info: Dict[str, Any]) -> None:
    atomic_write(path, model_bytes(model, info))


def load_model_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict, info) of a checkpoint written by save_model; a clear error for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load_safetensors_bytes(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"checkpoint {path!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} was not written by sola_vision.train (metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    return tensors, json.loads(metadata["info"])


def load_trained_model(path: str, attn_impl: str = "sola") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """(model, info): the model a sola_vision.train run saved, rebuilt with timm.create_model from the
    checkpoint's metadata and its weights loaded, in eval mode (BatchNorm on its running statistics; call
    .train() to fine-tune). path: a checkpoint file or a run folder (best.safetensors)."""
    from .engine import create_model  # timm, only where a model is built

    weights, info = load_model_file(resolve_checkpoint(path, BEST_FILE))
    model = create_model(info["model"], num_classes=info["num_classes"], in_chans=info["in_chans"],
                         attn_impl=attn_impl, layer_pattern=info["layer_pattern"])
    model.load_state_dict(weights)
    return model.eval(), info


def _safetensors_metadata(data: bytes) -> Dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len]).get("__metadata__", {})


def train_state_bytes(state: Dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_train_state(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training state {path!r} does not exist (needed by --resume)")
    try:
        # weights_only=False: the state holds RNG states and plain Python metrics written by us.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"training state {path!r} is not readable (truncated or corrupt?): {e}") from e


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_checkpoint(path: str, name: Optional[str] = None) -> str:
    """A checkpoint file, or a training output folder (then its `name`, default last.safetensors)."""
    if os.path.isdir(path):
        return os.path.join(path, name or MODEL_FILE)
    return path

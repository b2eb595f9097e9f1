"""``checkpoint.pt``: a file that holds only data, carries a checksum, and keeps its predecessor.

Format: a ``torch.save`` of a dict of tensors and plain containers only (dict, list, tuple, str,
int, float, bool, None), so it is read with ``torch.load(..., weights_only=True)``: loading it
never runs code; a file holding any other Python object (e.g. a pickled ``os.system`` call) is
refused before anything in it is built. The dict holds ``format`` (:data:`FORMAT`),
``version``, ``checksum`` (:func:`checksum`: SHA-256 over every other entry, tensor bytes
included), ``iteration``, ``config`` (the run's config dict), the model / optimizer state dicts
and the RNG states (tensors; Python's ``random`` state as a tuple of ints).

Writes (:func:`write_checkpoint`): the new file is written and fsynced under a temporary name;
then ``checkpoint.pt`` becomes ``checkpoint.prev.pt`` and the new file becomes
``checkpoint.pt``. Reads (:func:`read_run_checkpoint`): ``checkpoint.pt`` is checked (readable,
this format, checksum); if it is missing, torn or corrupt, ``checkpoint.prev.pt`` is used with a
warning naming the cause. Every failure is a :class:`CheckpointError` naming the file and the
cause, one line.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings

import torch

from .fields import flag_of
from .runfiles import TMP_PREFIX, RunFileError, atomic_write

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
DAMAGED = "checkpoint.damaged.pt"  # a damaged checkpoint.pt set aside by a resume
FORMAT = "steppo_fast.checkpoint"
VERSION = 1
# fields of the config that fix the shapes and the set of models in a checkpoint
_STRUCTURE = ("algo", "model", "critic")
_TINY_STRUCTURE = ("arch", "hidden_size", "num_layers", "num_heads")


# what torch's weights-only unpickler says when a file names a global outside its allow-list
# (a function to call or a class to build): the file is refused, never "damaged"
_REFUSED = (
    "Unsupported global",
    "whose module",
    "Trying to call reduce",
    "Can only create new object",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the cause.
    ``corrupt`` is True for damage (empty, torn, checksum mismatch), where the previous
    checkpoint may be used instead."""

    def __init__(self, message: str, corrupt: bool = False):
        super().__init__(message)
        self.corrupt = corrupt


# ---------------------------------------------------------------------- checksum
def _feed(h, obj) -> None:
    """Hash ``obj`` into ``h`` in a canonical form: a type tag, then the content (dict entries
    in insertion order, which ``torch.save`` / ``torch.load`` keep)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the tensor's own bytes, no copy
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, str)):
        h.update(f"{type(obj).__name__[0]}{len(repr(obj))}:{obj!r}".encode())
    elif isinstance(obj, float):
        h.update(f"f{obj.hex()}".encode())
    else:
        raise TypeError(f"checkpoint: {type(obj).__name__} is not a tensor or plain value")


def checksum(state: dict) -> str:
    """SHA-256 (hex) of every entry of ``state`` except ``checksum`` itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


# ---------------------------------------------------------------------- write
def write_checkpoint(state: dict, run_dir: str) -> str:
    """Write ``state`` (tensors and plain containers) as ``run_dir/checkpoint.pt`` with
    format, version and checksum; the checkpoint it replaces becomes ``checkpoint.prev.pt``.
    A failed write (e.g. a full disk) raises :class:`~.runfiles.RunFileError` and leaves both
    earlier checkpoints as they were. Any other Python object in ``state`` is a ``TypeError``
    before anything is written (it could not be read back with ``weights_only=True``).
    Returns the path written."""
    state = {"format": FORMAT, "version": VERSION, **state}
    state.pop("checksum", None)
    state["checksum"] = checksum(state)
    path, prev = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, PREVIOUS)
    # the new file is complete (fsynced) before the old one moves; a crash between the two
    # renames leaves checkpoint.prev.pt only, which read_run_checkpoint then uses; a crash
    # before leaves a .tmp-* file that clean_orphans removes
    staged = os.path.join(run_dir, TMP_PREFIX + "staged-" + CHECKPOINT)
    atomic_write(staged, lambda f: torch.save(state, f), label=path)
    try:
        if os.path.isfile(path):
            os.replace(path, prev)
        os.replace(staged, path)
    except OSError as e:
        if os.path.exists(staged):
            os.unlink(staged)
        raise RunFileError(e.errno, f"{path}: could not be put in place: {e.strerror}") from e
    return path


# ---------------------------------------------------------------------- read
def read_checkpoint(path: str) -> dict:
    """The verified state of one checkpoint file; :class:`CheckpointError` naming ``path``
    and the cause otherwise. Never runs code from the file (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file", corrupt=True)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (a write was cut short)", corrupt=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if any(m in str(e) for m in _REFUSED):
            raise CheckpointError(
                f"{path}: refused: it holds Python objects other than tensors and plain values "
                "(loading them could run code; nothing was loaded)"
            ) from None
        cause = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: unreadable, truncated or damaged (UnpicklingError: {cause})", corrupt=True
        ) from None
    except Exception as e:  # torn zip, garbage bytes, a damaged pickle stream: all data damage
        raise CheckpointError(
            f"{path}: unreadable, truncated or damaged ({_first(e)})", corrupt=True
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        if isinstance(state, dict) and {"iteration", "policy", "config"} <= set(state):
            warnings.warn(
                f"{path}: written by an earlier steppo_fast without a checksum; not verified",
                stacklevel=2,
            )
            return state
        raise CheckpointError(f"{path}: not a steppo_fast checkpoint (no {FORMAT!r} format tag)")
    if not isinstance(state.get("version"), int) or state["version"] > VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')!r} is newer than this "
            f"steppo_fast reads ({VERSION}); upgrade steppo_fast"
        )
    try:
        ok = state.get("checksum") == checksum(state)
    except TypeError as e:
        raise CheckpointError(f"{path}: damaged ({e})", corrupt=True) from None
    if not ok:
        raise CheckpointError(f"{path}: checksum mismatch: the file is corrupt", corrupt=True)
    return state


def _first(e: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's messages run over several lines)."""
    text = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {text}".rstrip(": ")


def has_checkpoint(run_dir: str) -> bool:
    """True when ``run_dir`` holds ``checkpoint.pt`` or ``checkpoint.prev.pt``."""
    return any(os.path.isfile(os.path.join(run_dir, n)) for n in (CHECKPOINT, PREVIOUS))


def read_run_checkpoint(run_dir: str, warn=None) -> tuple[dict, str]:
    """``(state, path)`` of the run's newest good checkpoint: ``checkpoint.pt``, or
    ``checkpoint.prev.pt`` when ``checkpoint.pt`` is missing or damaged (``warn(message)`` is
    called with the cause; default: ``warnings.warn``). Damage to both, or a refused file, is
    a :class:`CheckpointError`."""
    warn = warn or (lambda m: warnings.warn(m, stacklevel=3))
    path, prev = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, PREVIOUS)
    try:
        return read_checkpoint(path), path
    except CheckpointError as e:
        if not e.corrupt or not os.path.isfile(prev):
            raise
        first = e
    try:
        state = read_checkpoint(prev)
    except CheckpointError as e:
        raise CheckpointError(f"{first}; the previous one is unusable too: {e}") from None
    warn(f"{first}; using {prev} (iteration {state.get('iteration')}) instead")
    return state, prev


def checkpoint_iteration(run_dir: str) -> int:
    """Iterations done by the run's newest good checkpoint; -1 without a checkpoint."""
    if not has_checkpoint(run_dir):
        return -1
    return int(read_run_checkpoint(run_dir)[0]["iteration"])


# ---------------------------------------------------------------------- compatibility
def check_compatible(state: dict, config: dict, path: str) -> None:
    """:class:`CheckpointError` unless the checkpoint at ``path`` was written by a run with the
    same models as ``config`` (algorithm, model, critic, tiny-model size, reference model)."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: holds no run config")
    keys = _STRUCTURE + (_TINY_STRUCTURE if config.get("model") == "tiny" else ())
    for key in keys:
        if key in saved and saved[key] != config.get(key):
            raise CheckpointError(
                f"{path}: written by a run with {flag_of(key)} {saved[key]}, this run has "
                f"{flag_of(key)} {config.get(key)} (a checkpoint continues only the same models)"
            )
    has_ref = state.get("reference") is not None
    if has_ref != (config.get("kl_coef", 0) != 0):
        said = "a reference model" if has_ref else "no reference model"
        raise CheckpointError(
            f"{path}: holds {said} but this run has --kl-coef {config.get('kl_coef')}"
        )


def load_into(module: torch.nn.Module, sd, path: str, what: str) -> None:
    """``module.load_state_dict(sd)``; a mismatch is a :class:`CheckpointError` naming the file."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: has no {what} weights")
    try:
        module.load_state_dict(sd)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: {what} weights do not fit this run ({_first(e)})") from None


def restore_generator(
    gen: torch.Generator, saved: torch.Tensor, saved_device_type: str, *, reseed: int
) -> bool:
    """Restore a checkpointed generator state into ``gen``; True when restored exactly.

    CPU and CUDA generator states are both uint8 tensors but of different layouts, so a state
    saved on another device type cannot be set: ``gen`` is then seeded with ``reseed`` instead
    (deterministic, but not the stream of an uninterrupted run) and a warning is printed."""
    if saved_device_type == gen.device.type:
        gen.set_state(saved)
        return True
    warnings.warn(
        f"resume: the sampling generator was saved on {saved_device_type} and this run samples "
        f"on {gen.device.type}; it is reseeded, so sampling differs from an uninterrupted run",
        stacklevel=2,
    )
    gen.manual_seed(reseed)
    return False


def load_states(models, state: dict, path: str = CHECKPOINT) -> None:
    """Load a checkpoint's ``policy`` / ``critic`` / ``reference`` state dicts into ``models``
    (a :class:`~.update.Models`; a critic or reference that is ``None`` there is skipped; a
    mismatch is a ``CheckpointError`` naming ``path``)."""
    load_into(models.policy, state.get("policy"), path, "policy")
    if models.critic is not None:
        load_into(models.critic, state.get("critic"), path, "critic")
    if models.reference is not None:
        load_into(models.reference, state.get("reference"), path, "reference")

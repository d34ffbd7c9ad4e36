"""Pretrained weights: where they live, how they are found and how they are loaded.

Layout of the weights directory (see ``docs/weights.md`` for every encoder and how to obtain the
files)::

    <weights_dir>/<model name>/<file>        e.g. <weights_dir>/uni/pytorch_model.bin

``<weights_dir>`` is the ``weights_dir`` argument, else ``$HESCAPE_WEIGHTS_DIR``, else
``~/.cache/hescape/weights``. A file not found there is fetched from the model's Hugging Face
repository (into the ordinary Hugging Face cache) unless ``HF_HUB_OFFLINE`` is set; offline, only the
Hugging Face cache is consulted. Anything else is a :class:`~hescape.errors.ConfigError` that says
which file to put where, and that ``pretrained: false`` skips weights.

Checkpoints are read with ``torch.load(..., weights_only=True)`` (or ``safetensors``) and loaded with
``strict=True``: a checkpoint with a missing or an extra key is an error, never a partial load (the
reference code's silent ``strict=False`` was defect 11 of PROTOCOL.md section 5).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from hescape.errors import ConfigError

log = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "HESCAPE_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/hescape/weights")
_TRUE = {"1", "true", "yes", "on"}


def weights_root(weights_dir: str | os.PathLike | None = None) -> Path:
    """The weights directory: ``weights_dir``, else ``$HESCAPE_WEIGHTS_DIR``, else ``~/.cache/hescape/weights``."""
    if weights_dir is not None and str(weights_dir) != "":
        return Path(weights_dir).expanduser()
    env = os.environ.get(ENV_WEIGHTS_DIR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_WEIGHTS_DIR.expanduser()


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids network access (read at call time, not import time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def expected_paths(model: str, filenames: Sequence[str], weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the files of ``model`` are looked for, in order of preference."""
    root = weights_root(weights_dir)
    return [root / model / name for name in filenames]


def _missing_message(model: str, filenames: Sequence[str], weights_dir, hub_repo: str | None,
                     reason: str | None, how_to_get: str | None, gated: bool) -> str:
    paths = expected_paths(model, filenames, weights_dir)
    lines = [f"pretrained weights for {model!r} not found."]
    lines.append("Place " + " or ".join(str(p) for p in paths) + ".")
    if reason:
        lines.append(reason)
    if how_to_get:
        lines.append(how_to_get)
    if hub_repo:
        lines.append(f"Source: https://huggingface.co/{hub_repo} (file {filenames[0]}).")
        if gated:
            lines.append("That repository is gated: accept its licence there while logged in, then download the "
                         "file or provide a token (HF_TOKEN or `hf auth login`) for the automatic download.")
    lines.append(f"Set the weights directory with weights_dir / ${ENV_WEIGHTS_DIR}; see docs/weights.md.")
    lines.append("Or set `pretrained: false` to build the architecture with random weights.")
    return " ".join(lines)


def _hub_failure_reason(repo: str, exc: Exception) -> str:
    """Turn a huggingface_hub exception into words a user can act on."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        return (f"The Hugging Face repository {repo} is gated: accept its licence on https://huggingface.co/{repo} "
                "while logged in, then provide a token (HF_TOKEN or `hf auth login`).")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (f"The Hugging Face repository {repo} was not found or needs authentication (gated repositories "
                "answer 'not found' without a token: set HF_TOKEN after accepting the licence).")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return f"The hub could not be reached and the Hugging Face cache has no copy ({exc.__class__.__name__})."
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return f"The repository {repo} has no such file."
    return f"Download from {repo} failed: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def find_weights(model: str, filenames: Sequence[str], *, weights_dir: str | os.PathLike | None = None,
                 hub_repo: str | None = None, gated: bool = False, how_to_get: str | None = None) -> Path:
    """Return the path of the first available weights file of ``model``.

    Parameters
    ----------
    model
        Registry name; also the sub-directory of the weights directory.
    filenames
        Accepted file names, preferred first (``.safetensors`` or anything ``torch.load`` reads).
    weights_dir
        Weights directory (default: ``$HESCAPE_WEIGHTS_DIR`` or ``~/.cache/hescape/weights``).
    hub_repo
        Hugging Face repository to download from when the file is not local; ``None``: local only.
    gated
        Whether ``hub_repo`` needs an accepted licence (said in the error message).
    how_to_get
        Extra sentence for the error message (e.g. where a non-hub checkpoint is published).

    Raises
    ------
    ConfigError
        No local file, and the hub is offline, unreachable, gated without a token or lacks the file.
    """
    for path in expected_paths(model, filenames, weights_dir):
        if path.is_file():
            return path
    reason = None
    if hub_repo is None:
        reason = "This model is not downloaded automatically."
    else:
        offline = hub_offline()
        try:
            from huggingface_hub import errors as hf_errors
            from huggingface_hub import hf_hub_download
        except ImportError:  # pragma: no cover - huggingface_hub ships with timm
            hf_hub_download = None
            reason = "huggingface_hub is not installed, so the hub cannot be tried."
        failures = []
        if hf_hub_download is not None:
            for name in filenames:
                # Offline, only the local Hugging Face cache is consulted (no network at all). Hub
                # failures (gated, missing repo or file, offline, network) are OSError or
                # EntryNotFoundError subclasses, a malformed repo id a ValueError; all become one
                # actionable ConfigError below.
                try:
                    path = hf_hub_download(hub_repo, name, local_files_only=offline)
                except (OSError, hf_errors.EntryNotFoundError, ValueError) as exc:
                    failures.append(exc)
                    remote_file_missing = isinstance(exc, hf_errors.EntryNotFoundError) and not isinstance(
                        exc, hf_errors.LocalEntryNotFoundError)
                    if offline or remote_file_missing:
                        continue  # the next accepted file name may exist
                    break  # gated, no repo or no network: other file names fare no better (and retries are slow)
                log.info("weights for %s: %s (from %s)", model, path, hub_repo)
                return Path(path)
            # Report the most informative failure: a gate or missing repo beats "this file is absent".
            failures.sort(key=lambda e: not isinstance(e, (hf_errors.GatedRepoError,
                                                            hf_errors.RepositoryNotFoundError)))
            if offline:
                reason = (f"HF_HUB_OFFLINE is set, so {hub_repo} was not contacted and the Hugging Face cache "
                          "has no copy.")
            else:
                reason = _hub_failure_reason(hub_repo, failures[0])
    raise ConfigError(_missing_message(model, filenames, weights_dir, hub_repo, reason, how_to_get, gated))


def read_state_dict(path: str | os.PathLike, *, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely into a flat ``{name: tensor}`` mapping.

    ``.safetensors`` files are read with ``safetensors``; anything else with
    ``torch.load(weights_only=True)``, which refuses pickled code. ``checkpoint_key`` selects a
    nested entry (e.g. ``"model"`` in the CTransPath file).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read weights file {path}: {exc.__class__.__name__}: {exc}") from exc
    if checkpoint_key is not None and isinstance(state, Mapping) and checkpoint_key in state:
        state = state[checkpoint_key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} does not hold a flat state_dict of tensors"
                          + (f" (looked under key {checkpoint_key!r})" if checkpoint_key else ""))
    return dict(state)


def select_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep the keys that start with ``prefix`` and strip it (e.g. ``visual.trunk.`` of CONCH)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def drop_prefixes(state: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Remove keys under any of ``prefixes`` (e.g. an ImageNet classifier ``fc.`` the trunk has no place for)."""
    return {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes)}


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str | os.PathLike) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names the file and the keys.

    Raises
    ------
    ConfigError
        Missing keys, unexpected keys or shape mismatches (nothing is loaded partially).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {unexpected[:5]}")
        if shapes:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in shapes[:5]))
        raise ConfigError(f"weights file {source} does not match the architecture (strict loading): "
                          + "; ".join(parts))
    module.load_state_dict(state, strict=True)

"""The q/k/v capture file: what ``capture_qkv`` writes and ``rainfusion evaluate --qkv`` reads.

A capture is one ``torch.save`` dict: ``q``, ``k``, ``v`` (BNSD, model order, on the CPU),
``layout`` (the ``VideoLayout`` fields) and ``meta`` (free keywords such as ``layer`` and
``step``). Writes are atomic: a failed write leaves an earlier capture at the path intact.
"""
from __future__ import annotations

import dataclasses
import errno

import torch

from ._checks import describe
from .files import atomic_file
from .layout import VideoLayout


def save_qkv(path, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: VideoLayout, **meta) -> None:
    """Save BNSD activations and their layout for ``rainfusion evaluate --qkv FILE``."""
    data = {"q": q.detach().cpu(), "k": k.detach().cpu(), "v": v.detach().cpu(),
            "layout": dataclasses.asdict(layout), "meta": meta}
    try:
        with atomic_file(path) as handle:  # a failed write leaves an earlier capture at path intact
            torch.save(data, handle)
    except RuntimeError as exc:  # torch.save wraps the failed write (a full disk, a size limit)
        cause = exc.__context__ if isinstance(exc.__context__, OSError) else None
        why = cause.strerror if cause is not None else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OSError(cause.errno if cause is not None else errno.EIO,
                      f"writing the capture {path} failed ({why}); what was there is unchanged") from exc


def load_qkv(path):
    """``(q, k, v, layout, meta)`` from a file written by :func:`save_qkv`."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # not a torch.save file or truncated: torch's unpickler raises many kinds
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a rainfusion q/k/v capture (torch.load failed: {type(exc).__name__} "
                         f"{first})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a rainfusion q/k/v capture (it holds {describe(data)}, not a dict)")
    missing = {"q", "k", "v", "layout"} - set(data)
    if missing:
        raise ValueError(f"{path}: not a rainfusion q/k/v capture (missing {sorted(missing)})")
    for name in ("q", "k", "v"):
        if not isinstance(data[name], torch.Tensor):
            raise ValueError(f"{path}: not a rainfusion q/k/v capture ({name} is {describe(data[name])}, not a tensor)")
    if not isinstance(data["layout"], dict):
        raise ValueError(f"{path}: not a rainfusion q/k/v capture (layout is {describe(data['layout'])}, not the "
                         "dict save_qkv writes)")
    try:
        layout = VideoLayout(**data["layout"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a rainfusion q/k/v capture (its layout: {exc})") from None
    meta = data.get("meta", {})
    return data["q"], data["k"], data["v"], layout, meta if isinstance(meta, dict) else {}

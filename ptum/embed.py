"""Kept for `ptum.cli`: the embed command's function lives in `ptum.serving.embed` (no torch)."""

from ptum.serving.embed import embed

__all__ = ["embed"]

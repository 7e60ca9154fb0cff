"""Kept for `ptum.cli`: the export stage's function lives in `ptum.serving.export`."""

from ptum.serving.export import export

__all__ = ["export"]

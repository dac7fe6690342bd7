"""routing kernels: fp32 softmax top-k router and the stable grouping into packed segments."""
from __future__ import annotations

from .routing import RoutingResult, gather_rows, route_and_group, route_topk

__all__ = ["RoutingResult", "gather_rows", "route_and_group", "route_topk"]

"""Kernel entry points. Each fused op has a pure-PyTorch ``_ref`` twin that fixes its arithmetic."""

from vmq.ops.scan import bidirectional_scan_ref, selective_scan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref", "bidirectional_scan_ref"]

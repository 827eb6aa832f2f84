"""Data: records → Sample → Features → Batch (see docs/data.md)."""

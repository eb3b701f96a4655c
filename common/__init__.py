"""Shared pieces of the four RLHF stage scripts (see DESIGN.md)."""

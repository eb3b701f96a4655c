"""Shared pieces of the RLHF stage scripts (see docs/design.md, "The common/ package")."""

"""Moved to `eupe.models.heads` (state saved with a model); this alias stays for one release."""

from ..models.heads import HEADS_FILE, AdapterHead, TeacherHeads

__all__ = ["HEADS_FILE", "AdapterHead", "TeacherHeads"]

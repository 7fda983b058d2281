"""The one base class shared by download and archive errors.

Kept in its own module so ``download`` and ``archive`` need not import each other, and a
caller can turn any failure to fetch a model into one answer with a single ``except``.
"""

from __future__ import annotations


class ModelFetchError(Exception):
    """Fetching or unpacking a model archive failed; messages never carry secrets."""

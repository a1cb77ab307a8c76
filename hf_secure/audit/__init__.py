"""``hf-secure audit``: measure what each protocol's servers could learn from the user's text.

Reading order: :mod:`.probe` (where the audit looks inside a model), :mod:`.attacks` (vocabulary
matching, arXiv 2505.18332, and key recovery from weights), :mod:`.run` (the views each protocol's
parties get, the attacks on them, the report).
"""

from .run import AUDITED, AuditReport, audit

__all__ = ["AUDITED", "AuditReport", "audit"]

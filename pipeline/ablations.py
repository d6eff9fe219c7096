"""Fusion ablations that ``evaluate`` recomputes from the stored stream maps (DESIGN 1.6).

Variant name -> update of the ``score`` section. A module of its own, free of numpy and
scipy, so the report stage can name the variants without importing the scoring code, and
both stages can list it as a DVC dependency.
"""

ABLATIONS: dict[str, dict[str, str]] = {
    "2d_only": {"modalities": "2d"},
    "3d_only": {"modalities": "3d"},
    "real_only": {"streams": "real"},
    "estimated_only": {"streams": "estimated"},
    "sum": {"fusion": "sum"},
    "max": {"fusion": "max"},
    "product": {"fusion": "product"},
}

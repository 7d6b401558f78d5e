"""HTTP serving of registered ensembles: ``create_app`` (FastAPI app factory), routes, schemas.

Run it with ``ensemble serve``; see ``ensemble_service.api.app`` for settings and limits.
"""
from ensemble_service.api.app import Settings, create_app

__all__ = ["Settings", "create_app"]

"""Live dashboard over the run store: FastAPI JSON API + a static page (uPlot charts, no build step)."""

from deploy.dashboard.app import create_app

__all__ = ["create_app"]

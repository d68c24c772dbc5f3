"""Dashboard settings: flags of `blip3o-rl dashboard`, or `BLIP3O_RL_DASHBOARD_*` environment variables
(the reward API's style, rewards/app/settings.py)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class DashboardSettings(BaseSettings):
    """Everything the dashboard is started with; read once at startup."""

    model_config = SettingsConfigDict(env_prefix="BLIP3O_RL_DASHBOARD_", extra="forbid", use_attribute_docstrings=True)

    runs_dir: str = "runs"
    """Directory holding runs.db (read only)."""
    host: str = "127.0.0.1"
    """Interface to bind; loopback unless told otherwise."""
    port: int = 8266
    """TCP port (Ray's own dashboard is 8265)."""
    token: SecretStr | None = None
    """Bearer token required on /api and the page (none = open). A browser enters it once on the
    page; it then holds a session cookie derived from it (deploy/dashboard/auth.py)."""

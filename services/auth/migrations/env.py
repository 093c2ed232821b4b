from sqlmodel import SQLModel

import auth.models  # noqa: F401  (registers the tables)
from auth.config import get_settings
from svckit.migrate import run_migrations

run_migrations(SQLModel.metadata, get_settings().database_url)

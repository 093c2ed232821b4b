from sqlmodel import SQLModel

import wallet.models  # noqa: F401  (registers the tables)
from svckit.migrate import run_migrations
from wallet.config import get_settings

run_migrations(SQLModel.metadata, get_settings().database_url)

from auth.config import get_settings
from auth.models import Base
from svckit.migrate import run_migrations

run_migrations(Base.metadata, get_settings().database_url)

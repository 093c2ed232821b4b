from svckit.migrate import run_migrations
from wallet.config import get_settings
from wallet.models import Base

run_migrations(Base.metadata, get_settings().database_url)

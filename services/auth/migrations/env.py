from auth.config import get_settings
from auth.models import GRANTS, Base
from svckit.migrate import run_migrations

run_migrations(Base.metadata, get_settings(), GRANTS)

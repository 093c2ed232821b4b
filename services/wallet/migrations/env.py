from svckit.migrate import run_migrations
from wallet.config import get_settings
from wallet.models import FUNCTIONS, GRANTS, Base

run_migrations(Base.metadata, get_settings(), GRANTS, FUNCTIONS)

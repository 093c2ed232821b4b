"""`auth-migrations wait`: the initContainer that holds a new image back until the
database is at its migration head (see svckit.schema_wait, which decides what "ahead" means).

The migrations themselves run as the owner role: `alembic -c services/auth/alembic.ini
upgrade head` (the migration Job); this waits with the service's own URL (the app role).
"""

from __future__ import annotations

import sys

from svckit import schema_wait

INI = "services/auth/alembic.ini"  # relative to the image's WORKDIR (/app) and to the repository


def main(argv: list[str] | None = None) -> None:
    from auth.config import get_settings

    sys.exit(schema_wait.main(argv, prog="auth-migrations", ini=INI, database_url=lambda: get_settings().database_url))

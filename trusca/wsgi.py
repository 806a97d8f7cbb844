import logging
import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "trusca.settings")
application = get_wsgi_application()


def _sweep() -> None:
    # A web server that starts finishes what a killed restore left (its journal keeps the portal
    # in maintenance mode until then), like every command and the worker do.
    from trusca.backups.operations import sweep

    log = logging.getLogger("trusca.backups")
    try:
        for line in sweep():
            log.warning("%s", line)
    except Exception:
        log.exception("the start-up sweep failed; the portal starts anyway")


_sweep()

"""``python -m labelstudio_backend [--host 127.0.0.1] [--port 9090]``: start the ML backend with uvicorn.

``python -m labelstudio_backend preannotate --project ID`` pre-annotates a whole
project instead (``preannotate.py``).

Everything else is configured through environment variables (see ``config.py``).
One process serves all requests: the model lives once in (GPU) memory and
model work is serialised per device inside it, so uvicorn runs one worker.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence

from .config import settings_or_report

# Loopback by default: the backend holds a Label Studio token, so listening on every
# interface is a deliberate choice (the container image passes --host 0.0.0.0).
DEFAULT_HOST = "127.0.0.1"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "preannotate":
        from .preannotate import main as preannotate

        return preannotate(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m labelstudio_backend",
        description="Open-Vocabulary SAM ML backend for Label Studio (configured by environment variables). "
        "`python -m labelstudio_backend preannotate --help`: pre-annotate a whole project from the command line.",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("HOST", DEFAULT_HOST),
        help=f"bind address (default {DEFAULT_HOST}, this machine only; env HOST). Use --host 0.0.0.0 to listen on "
        "all interfaces, e.g. in a container or for a Label Studio on another machine, and then set "
        "BASIC_AUTH_USER/BASIC_AUTH_PASS",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9090")), help="port (default 9090)")
    args = parser.parse_args(argv)
    settings = settings_or_report()
    if settings is None:
        return 2

    import uvicorn  # deferred so that --help answers at once

    from .metrics_log import configure_logging
    from .server import create_app

    configure_logging(settings.log_level)
    if settings.basic_auth is None and not _is_loopback(args.host):
        logging.getLogger("labelstudio_backend").warning(
            "listening on %s without BASIC_AUTH_USER/BASIC_AUTH_PASS: anyone who can reach port %d can use the "
            "backend and call /setup; set basic auth, or bind to 127.0.0.1 (--host)", args.host, args.port,
        )
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # our logging set-up (metrics_log.configure_logging) formats uvicorn's loggers too
        timeout_graceful_shutdown=5,
    )
    return 0


def _is_loopback(host: str) -> bool:
    """True for a bind address only this machine can reach."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


if __name__ == "__main__":
    sys.exit(main())

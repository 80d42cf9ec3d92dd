"""``anomaly serve``: run the service with uvicorn, one worker per process."""

from __future__ import annotations

import argparse

from anomaly.errors import ConfigError, expected


def serve(args: argparse.Namespace) -> int:
    """Start the server with the flags mapped onto :class:`~service.settings.Settings`."""
    from service.settings import load_settings

    settings = load_settings(models_dir=args.models, host=args.host, port=args.port,
                             workers=args.workers)
    if not settings.models_dir.is_dir():
        raise expected("a models directory (--models or ANOMALY_MODELS_DIR)",
                       f"{settings.models_dir} (not found)", cls=ConfigError)
    import uvicorn

    from service.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, access_log=settings.access_log,
                timeout_graceful_shutdown=settings.graceful_shutdown_seconds)
    return 0

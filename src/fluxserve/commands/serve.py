"""``fluxserve serve``: the API, the job store and the GPU workers in one process."""

from __future__ import annotations

import argparse
import sys

from fluxserve.commands.common import (
    add_model_flags,
    add_random_weights_flag,
    random_weights_note,
    random_weights_refusal,
    settings_from_args,
)
from fluxserve.commands.keys import keys_note


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the fal, OpenAI and Replicate APIs",
                                   description="Serve the fal, OpenAI Images and Replicate APIs with a durable queue.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; beyond loopback an API key is required)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--db", help="job store URL: sqlite:///path.db or postgresql://... (default: SQLite in "
                        "the data directory)")
    parser.add_argument("--storage", help="file storage: a directory or s3://bucket/prefix")
    parser.add_argument("--ssl-certfile", help="serve https with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    parser.add_argument("--workers-per-device", type=int, help="worker threads per device (default 1)")
    parser.add_argument("--no-workers", action="store_true",
                        help="API only: leave the jobs to `fluxserve worker` processes sharing the database")
    parser.add_argument("--retention-hours", type=float,
                        help="delete requests, their inputs and outputs, and uploaded files this many hours after "
                        "they were made (default: FLUXSERVE_RETENTION_HOURS, or 0: keep everything)")
    parser.add_argument("--access-log", action="store_true",
                        help="log every HTTP request (off by default: a line per status poll is costly)")
    parser.add_argument("--preload", nargs="*", metavar="MODEL",
                        help="load these catalogue models (or 'all') before accepting requests; with --demo the demo "
                        "models are always built first")
    parser.add_argument("--max-body-mb", type=int,
                        help="largest request body in MiB, uploads aside (default 32; FLUXSERVE_MAX_BODY_MB)")
    parser.add_argument("--max-prompt-chars", type=int,
                        help="longest prompt in characters (default 8192; FLUXSERVE_MAX_PROMPT_CHARS)")
    parser.add_argument("--http-header-timeout", type=float,
                        help="seconds a connection has to send a complete request head (default 10; "
                        "FLUXSERVE_HTTP_HEADER_TIMEOUT)")
    parser.add_argument("--http-keep-alive-timeout", type=float,
                        help="seconds an idle keep-alive connection stays open (default 5; "
                        "FLUXSERVE_HTTP_KEEP_ALIVE_TIMEOUT)")
    parser.add_argument("--http-max-connections", type=int,
                        help="open client connections (default 1000; FLUXSERVE_HTTP_MAX_CONNECTIONS)")
    parser.add_argument("--http-max-header-kb", type=int,
                        help="KiB of one request head (default 64; FLUXSERVE_HTTP_MAX_HEADER_KB)")
    add_model_flags(parser)
    add_random_weights_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from fluxserve.api.app import create_app
    from fluxserve.api.auth import is_loopback
    from fluxserve.api.connections import ConnectionLimits

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("error: --ssl-certfile and --ssl-keyfile go together", file=sys.stderr)
        return 2
    settings = settings_from_args(args, db=args.db, storage=args.storage, workers_per_device=args.workers_per_device,
                                  retention_hours=args.retention_hours, max_body_mb=args.max_body_mb,
                                  max_prompt_chars=args.max_prompt_chars,
                                  http_header_timeout=args.http_header_timeout,
                                  http_keep_alive_timeout=args.http_keep_alive_timeout,
                                  http_max_connections=args.http_max_connections,
                                  http_max_header_kb=args.http_max_header_kb)
    limits = ConnectionLimits.from_settings(settings)
    try:
        limits.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if refusal := random_weights_refusal(settings):
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    app = create_app(settings, start_workers=not args.no_workers)
    if not is_loopback(args.host):
        if not app.state.store.has_keys():
            print(
                f"error: refusing to listen on {args.host} without an API key.\n"
                "Create one first:  fluxserve keys create --name my-team\n"
                "(clients send it as 'Authorization: Key <key>', or FAL_KEY=<key> with the fal clients)",
                file=sys.stderr,
            )
            return 2
        app.state.auth.required = True
    elif note := keys_note(app.state.store):
        print(f"note: {note}", file=sys.stderr)
    preload(app.state.engines, settings, args.preload or [])
    scheme = "https" if args.ssl_certfile else "http"
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"fluxserve: {scheme}://{shown_host}:{args.port}  (data: {settings.data_dir}, db: {settings.db_url_shown})")
    if note := random_weights_note(settings):
        print(f"  {note}")
    if scheme == "https":
        print(f"  fal clients: FAL_RUN_HOST={shown_host}:{args.port}/run "
              f"FAL_QUEUE_RUN_HOST={shown_host}:{args.port}/queue SSL_CERT_FILE={args.ssl_certfile}")
    else:
        print(f"  fal clients: fluxserve.compat.fal.use('{scheme}://{shown_host}:{args.port}')")
    if args.access_log:
        from fluxserve.api.logs import redact_access_log

        redact_access_log()
    limits, note = limits.fit_descriptors()
    if note:
        print(f"  warning: {note}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                log_level="info", access_log=args.access_log, timeout_graceful_shutdown=30,
                **limits.uvicorn_options())
    return 0


def preload(engines, settings, models: list[str]) -> None:
    """Build the demo weights (with --demo) and make the named models resident on every device before serving."""
    if settings.demo:
        from fluxserve.engine.demo import ensure_demo_weights

        ensure_demo_weights(settings.demo_dir)
    known = engines[0].catalog.models
    keys = list(known) if models == ["all"] else models
    for key in keys:
        if key not in known:
            raise SystemExit(f"error: --preload: unknown model {key!r}; known: {', '.join(known)}")
        for engine in engines:
            print(f"loading {key} on {engine.device} ...", flush=True)
            engine.load(key)

"""``fluxserve usage``: billed images and megapixels, engine time and cost of finished jobs, per endpoint, key or
day, with totals; read from the job store (as ``GET /api/usage`` answers an admin key)."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

from fluxserve.commands.common import settings_from_args

UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``7d``, ``12h``, ``30m``, ``2w`` (that long ago) or an ISO 8601 date or time (UTC unless it says so)."""
    match = re.fullmatch(r"(\d+)\s*([mhdw])", value.strip().lower())
    try:
        if match:
            return (now or datetime.now(UTC)) - timedelta(**{UNITS[match[2]]: int(match[1])})
        parsed = datetime.fromisoformat(value)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a duration (7d, 12h, 30m, 2w) nor an ISO 8601 date") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("usage", help="usage by the megapixel: per endpoint, key or day, with totals",
                                   description=__doc__)
    parser.add_argument("--key", metavar="ID", help="only this API key's jobs (its id, see fluxserve keys list)")
    parser.add_argument("--since", type=parse_since, metavar="WHEN",
                        help="jobs finished since: 7d, 12h, 30m, 2w or an ISO 8601 date (default: all)")
    parser.add_argument("--by", choices=["endpoint", "key", "day", "provider"], default="endpoint",
                        help="one row per endpoint (default), API key, day (UTC) or provider (local, or the "
                        "gateway's upstream that served it)")
    parser.add_argument("--db", help="job store URL (default: SQLite in the data directory)")
    parser.add_argument("--data-dir", help="where the database lives")
    parser.add_argument("--catalog", help="catalogue TOML whose [prices] give the cost (default: the packaged one)")
    parser.set_defaults(func=run)


def _number(value: float) -> str:
    return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fluxserve.catalog import Catalog
    from fluxserve.jobs import ledger
    from fluxserve.jobs.store import JobStore

    settings = settings_from_args(args, db=args.db)
    catalog = Catalog.load(settings.catalog or None)
    store = JobStore(settings.db_url)
    try:
        groups, total = ledger.report(store, group_by=args.by, since=args.since, owner=args.key,
                                      prices=catalog.prices)
        names = {key.id: key.name for key in store.list_keys()} if args.by == "key" else {}
    finally:
        store.close()
    priced = bool(catalog.prices)
    scope = (f"since {args.since:%Y-%m-%d %H:%M} UTC" if args.since else "all time") + \
        (f", key {args.key}" if args.key else "")
    table = Table(title=f"Usage by {args.by} ({scope})", show_footer=True)
    headers = [args.by, "jobs", "done", "failed", "cancel", "out img", "ref img", "ref MP", "out MP", "MP",
               "GPU s", "steps"] + ([f"cost {catalog.currency}".strip()] if priced else [])

    def cells(totals: ledger.Totals) -> list[str]:
        row = [totals.jobs, totals.completed, totals.failed, totals.cancelled, totals.output_images,
               totals.input_images, totals.input_megapixels, totals.output_megapixels, totals.megapixels,
               round(totals.gpu_seconds, 2), totals.steps]
        text = [_number(value) for value in row]
        if priced:
            text.append("-" if totals.cost is None else f"{totals.cost:,.4f}")
        return text

    for index, header in enumerate(headers):
        footer = (["total", *cells(total)])[index]
        table.add_column(header, footer=footer, justify="left" if index == 0 else "right")
    for totals in groups:
        label = totals.group or ("(no key)" if args.by == "key" else "-")
        if names.get(totals.group):
            label += f" ({names[totals.group]})"
        table.add_row(label, *cells(totals))
    console = Console()
    console.print(table)
    if priced and total.unpriced_megapixels:
        console.print(f"{total.unpriced_megapixels:,} MP were billed on endpoints without a price in {catalog.source}")
    return 0

"""``fluxserve keys``: create, list, limit and revoke the API keys clients must send (``Authorization: Key
<key>``, ``Bearer <key>``, or ``FAL_KEY`` with the fal clients). A key's quotas (docs/quotas.md): requests at
once (``--max-concurrent``), requests per minute (``--rpm``), megapixels per 24 hours (``--mp-per-day``).

Once a key has been created the server needs keys, on loopback too, also after every key is revoked; ``keyless``
(only when no key is active) lets a loopback server run without keys again, where every caller sees everything."""

from __future__ import annotations

import argparse
import sys

from fluxserve.commands.common import settings_from_args
from fluxserve.jobs.quotas import LIMITS, Limits

_FLAGS = {"max_concurrent": ("--max-concurrent", "queued + running requests at once"),
          "rpm": ("--rpm", "requests accepted per minute"),
          "mp_per_day": ("--mp-per-day", "billed megapixels per 24 hours")}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("keys", help="manage API keys", description=__doc__)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key and print its secret (shown only once)")
    create.add_argument("--name", default="", help="a label to recognise the key by")
    create.add_argument("--admin", action="store_true",
                        help="an admin key: sees every key's requests, history and files; never limited")
    for name, (flag, what) in _FLAGS.items():
        create.add_argument(flag, dest=name, type=_limit, default=None, metavar="N",
                            help=f"at most N {what} (default: no limit)")
    update = actions.add_parser("update", help="change a key's limits (0 or none removes one)")
    update.add_argument("key_id", metavar="ID", help="the key's id, e.g. key_0123456789abcdef")
    for name, (flag, what) in _FLAGS.items():
        update.add_argument(flag, dest=name, type=_limit, default=argparse.SUPPRESS, metavar="N",
                            help=f"at most N {what}; 0 or none: no limit")
    actions.add_parser("list", help="list keys and their limits (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key; clients using it are refused at once")
    revoke.add_argument("key_id", metavar="ID", help="the key's id, e.g. key_0123456789abcdef")
    keyless = actions.add_parser(
        "keyless", help="let a loopback server run without keys again (every key revoked first); callers without "
        "a key then see every key's requests")
    for sub in (create, update, actions.choices["list"], revoke, keyless):
        sub.add_argument("--db", help="job store URL (default: SQLite in the data directory)")
        sub.add_argument("--data-dir", help="where the database lives")
        sub.set_defaults(func=run)


def _limit(value: str) -> int | None:
    """A limit flag's value: a whole number; ``0`` or ``none`` is no limit (as ``FLUXSERVE_MAX_QUEUED_PER_KEY=0``)."""
    if value.strip().lower() == "none":
        return None
    if not (value.strip().isascii() and value.strip().isdigit()):  # '²'.isdigit() is true, int('²') fails
        raise argparse.ArgumentTypeError(f"a whole number, or 0 or none for no limit, not {value!r}")
    return int(value) or None


def keys_note(store) -> str | None:
    """A line on how a loopback server stands when no key is active, or None."""
    counts = store.key_counts()
    if counts.active:
        return None
    if counts.keyed:
        return ("no active key: every request is refused until you create a key (fluxserve keys create), or make a "
                "loopback server keyless again (fluxserve keys keyless)")
    if counts.created:
        return "keyless: a loopback server needs no key (fluxserve keys keyless was run)"
    return None


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


def run(args: argparse.Namespace) -> int:
    from fluxserve.jobs.store import JobStore

    settings = settings_from_args(args, db=args.db)
    store = JobStore(settings.db_url)
    try:
        if args.action == "create":
            limits = Limits(*(getattr(args, name) for name in LIMITS))
            if args.admin and limits.any:
                print("error: admin keys are never limited; create the key without --admin to limit it",
                      file=sys.stderr)
                return 2
            key_id, secret = store.create_key(args.name, admin=args.admin, limits=limits)
            print(f"created {'admin key ' if args.admin else ''}{key_id}" + (f" ({args.name})" if args.name else "")
                  + (f", limits: {limits.describe()}" if limits.any else ""), file=sys.stderr)
            print("the secret is shown only now; keep it safe:", file=sys.stderr)
            print(secret)
            return 0
        if args.action == "list":
            keys = store.list_keys()
            if not keys:
                print("no API keys (create one with: fluxserve keys create --name NAME)", file=sys.stderr)
                return 0
            print(f"{'ID':<22} {'NAME':<20} {'CREATED':<24} {'LAST USED':<24} {'LIMITS':<38} STATUS")
            for key in keys:
                status = ("active" if key.active else f"revoked {_when(key.revoked_at)}") + (" admin" if key.admin else "")
                print(f"{key.id:<22} {key.name[:20]:<20} {_when(key.created_at):<24} {_when(key.last_used_at):<24} "
                      f"{key.limits.describe():<38} {status}")
            if note := keys_note(store):
                print(note, file=sys.stderr)
            return 0
        if args.action == "keyless":
            if store.has_keys():
                print("error: a key is still active; revoke every key first (fluxserve keys list)", file=sys.stderr)
                return 1
            released = store.release_revoked_keys()
            print(f"keyless: a loopback server needs no key now; every caller sees every request ({released} revoked "
                  "key(s) released; creating a key makes keys needed again)")
            return 0
        if args.action == "update":
            changes = {name: getattr(args, name) for name in LIMITS if hasattr(args, name)}
            if not changes:
                print("error: give at least one of " + ", ".join(flag for flag, _ in _FLAGS.values()), file=sys.stderr)
                return 2
            key = store.set_limits(args.key_id, **changes)
            if key is None:
                print(f"error: no key {args.key_id!r} (see: fluxserve keys list)", file=sys.stderr)
                return 1
            print(f"{key.id} limits: {key.limits.describe()}")
            if key.admin:
                print("note: this is an admin key; admin keys are never limited", file=sys.stderr)
            return 0
        if store.revoke_key(args.key_id):
            print(f"revoked {args.key_id}")
            return 0
        print(f"error: no active key {args.key_id!r} (see: fluxserve keys list)", file=sys.stderr)
        return 1
    finally:
        store.close()

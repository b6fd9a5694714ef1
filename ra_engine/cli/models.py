"""`ra models list|import|remove|path`: the model registry (a user folder of model directories, found by name)."""
from __future__ import annotations

import sys

from ra_engine import api


def add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="list, import and remove registered models",
                       description="Registered models live in a user folder (`ra models path`; set RA_MODELS_DIR to "
                                   "use another) and are found by name wherever a command takes --model.")
    commands = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    commands.add_parser("list", help="the registered models, one a line").set_defaults(run=cmd_list)

    imp = commands.add_parser(
        "import", help="register a model from a folder, a .zip, or a URL",
        description="Register a model directory, a .zip of one, or the http(s)/file URL of such a .zip. The weights "
                    "must match the sha256 in the model card; with --sha256, the archive must match it too. Nothing "
                    "is registered unless every check passes.")
    imp.add_argument("source", metavar="SOURCE", help="model directory, .zip file, or URL of a .zip")
    imp.add_argument("--name", default=None, help="registry name (default: the name in the model card)")
    imp.add_argument("--sha256", default=None, help="expected sha256 of the .zip or download, as published with it")
    imp.add_argument("--overwrite", action="store_true", help="replace a registered model of the same name")
    imp.add_argument("--quiet", action="store_true", help="no download progress bar")
    imp.set_defaults(run=cmd_import)

    rm = commands.add_parser("remove", help="delete a registered model")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(run=cmd_remove)

    commands.add_parser("path", help="print the registry folder").set_defaults(run=cmd_path)


def cmd_list(args) -> int:
    models = api.list_models()
    if not models:
        print(f"no models registered in {api.models_dir()}; add one with `ra models import SOURCE`", file=sys.stderr)
        return 0
    rows = [("NAME", "PRESET", "SIZE", "PARAMETERS", "LPIPS", "CALIBRATED", "CREATED", "WHERE")]
    for m in (m for m in models if "problem" not in m):
        rows.append((m["name"], m["preset"] or "?", f"{m['image_size']}px" if m["image_size"] else "?",
                     f"{m['parameters']:,}" if m["parameters"] else "?", m["lpips"] or "?",
                     "yes" if m["calibrated"] else "no", m["created"] or "?",
                     "bundled" if m["bundled"] else "registered"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for m in (m for m in models if "problem" in m):
        print(f"{m['name']}: unreadable: {m['problem']}", file=sys.stderr)
    print(f"in {api.models_dir()}", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        def progress(done: int, total: int | None) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, desc="downloading")
            bar.update(done - bar.n)
    try:
        path = api.import_model(args.source, name=args.name, sha256=args.sha256, overwrite=args.overwrite,
                            progress=None if args.quiet else progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"imported {path.name} into {path}", file=sys.stderr)
    return 0


def cmd_remove(args) -> int:
    print(f"removed {api.remove_model(args.name)}", file=sys.stderr)
    return 0


def cmd_path(args) -> int:
    print(api.models_dir())
    return 0

"""Command line of the data package.

    python -m fbn_fast.data import <corpus> ROOT --out M.npz [--drop-bad] [corpus options]
    python -m fbn_fast.data info M.npz [--drop-bad] [--json] [--check-files [--data-root DIR] [--sample N]]
    python -m fbn_fast.data concat A.npz B.npz ... --out M.npz [--data-root DIR] [--drop-bad]
    python -m fbn_fast.data synth ...            (SynthFace; see ``python -m fbn_fast.data synth --help``)

``import`` reads one corpus in its published layout (``import --help`` lists the corpora), validates the rows
and writes the manifest, which records the folder its paths are relative to (the corpus folder; with
``--prefix NAME``, the folder holding the corpus as ``NAME/``); ``info`` prints rows per dataset, split and
task, and with ``--check-files`` which images are missing under that root; ``concat`` joins manifests,
rebasing the paths of corpora imported from different folders onto their common folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .manifest import Manifest, load_manifest

log = logging.getLogger("fbn_fast.data")


def _parser() -> argparse.ArgumentParser:
    from .importers import IMPORTERS

    p = argparse.ArgumentParser(prog="python -m fbn_fast.data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="import a corpus from its published layout")
    corpora = imp.add_subparsers(dest="corpus", required=True, metavar="CORPUS")
    for name, importer in IMPORTERS.items():
        c = corpora.add_parser(name, help=importer.help, description=importer.help)
        c.add_argument("root", type=Path, help="the corpus folder")
        c.add_argument("--out", type=Path, required=True, help="manifest file to write (.npz)")
        c.add_argument("--drop-bad", action="store_true", help="drop rows that fail validation instead of failing")
        importer.add_arguments(c)

    info = sub.add_parser("info", help="rows per dataset, split and task of a manifest")
    info.add_argument("manifest", type=Path)
    info.add_argument("--drop-bad", action="store_true", help="drop rows that fail validation instead of failing")
    info.add_argument("--json", action="store_true", help="print the counts and the import records as JSON")
    info.add_argument("--check-files", action="store_true",
                      help="look for every image under the root; exit status 1 when some are missing")
    info.add_argument("--data-root", "--root", dest="root", type=Path, default=None,
                      help="with --check-files: the image folder, as train's --data-root (default: the root the "
                           "manifest records)")
    info.add_argument("--sample", type=int, default=None, help="with --check-files: look at N random rows only")

    cat = sub.add_parser("concat", help="join manifests (datasets merged by name)")
    cat.add_argument("manifests", type=Path, nargs="+")
    cat.add_argument("--out", type=Path, required=True)
    cat.add_argument("--data-root", "--root", dest="root", type=Path, default=None,
                     help="folder the joined paths are relative to, train's --data-root for the result (default: "
                          "the manifests' common folder)")
    cat.add_argument("--drop-bad", action="store_true", help="drop rows that fail validation instead of failing")

    sub.add_parser("synth", help="SynthFace, the offline labelled benchmark (its own options follow)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:
        from .synthface import cli  # lazy: SynthFace pulls in the renderer only when asked for

        return cli(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "import":
            from .importers import IMPORTERS

            importer = IMPORTERS[args.corpus]
            m = importer.run(args.root, **importer.options(args))
            m = m.checked(drop_bad=args.drop_bad, source=f"{args.corpus} import of {args.root}")
            m.save(args.out)
            log.info("wrote %s: %r", args.out, m)
            log.info("image root: %s", m.root or "not recorded (give training --data-root)")
        elif args.command == "info":
            m = load_manifest(args.manifest, drop_bad=args.drop_bad)
            if (args.root is not None or args.sample is not None) and not args.check_files:
                raise ValueError("--data-root and --sample go with --check-files")
            check = m.check_files(args.root, sample=args.sample) if args.check_files else None
            if args.json:
                out = {"rows": len(m), "root": m.root, "counts": m.counts(), "meta": m.meta}
                if check is not None:
                    out["check_files"] = dataclasses.asdict(check)
                print(json.dumps(out, indent=2, default=str))
            else:
                print(f"{args.manifest}: {m.summary()}")
                print(f"image root: {m.root or 'not recorded'}")
                if check is not None:
                    print(f"check files: {check}")
            if check is not None and check.missing:
                return 1
        elif args.command == "concat":
            parts = [load_manifest(p, drop_bad=args.drop_bad) for p in args.manifests]
            m = Manifest.concat(parts, root=args.root, names=[str(p) for p in args.manifests])
            m = m.checked(drop_bad=args.drop_bad, source="concat")
            m.save(args.out)
            log.info("wrote %s: %r, image root %s", args.out, m, m.root or "not recorded")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

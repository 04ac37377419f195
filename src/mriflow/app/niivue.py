"""Where NiiVue's browser bundle is: installed by npm (`npm ci` in the repository root), served by the app itself.

Looked for in $MRIFLOW_NIIVUE (the file niivue.umd.js or a folder holding it), then in
node_modules/@niivue/niivue/dist/ of the repository this package sits in and of the current folder.
It is never fetched from the internet at run time and never copied into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLE = "niivue.umd.js"
DIST = Path("node_modules") / "@niivue" / "niivue" / "dist"
MISSING = ("NiiVue (the browser viewer) is not installed: run `npm ci` once in the mriflow repository root "
           "(or set MRIFLOW_NIIVUE to the path of niivue.umd.js)")


class NiivueMissing(FileNotFoundError):
    pass


def candidates() -> list[Path]:
    """Where the bundle may be: only $MRIFLOW_NIIVUE when it is set, else the npm install folders."""
    env = os.environ.get("MRIFLOW_NIIVUE")
    if env:
        path = Path(env).expanduser()
        return [path / BUNDLE if path.is_dir() else path]
    repository = Path(__file__).resolve().parents[3]  # src/mriflow/app/niivue.py -> the repository root
    return [repository / DIST / BUNDLE, Path.cwd() / DIST / BUNDLE]


def locate_niivue() -> Path:
    """The path of niivue.umd.js; NiivueMissing (one line saying to run `npm ci`) when there is none."""
    for path in candidates():
        if path.is_file():
            return path.resolve()
    if os.environ.get("MRIFLOW_NIIVUE"):
        raise NiivueMissing(f"MRIFLOW_NIIVUE={os.environ['MRIFLOW_NIIVUE']}: no {BUNDLE} there; " + MISSING)
    raise NiivueMissing(MISSING)

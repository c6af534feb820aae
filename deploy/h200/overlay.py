"""Which overlay dists (ones the image also has) to install: only where the image's version fails a
requirement of what we install and ours meets it. Run with the image's python, without PYTHONPATH."""

import email
import importlib.metadata as md
import pathlib
import shutil
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

root = pathlib.Path(sys.argv[1])
site = root / "site"
env = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def meta(d):
    return email.message_from_string((d / "METADATA").read_text(errors="replace"))


reqs = {}
for d in (
    list(site.glob("*.dist-info"))
    + list(root.glob("overlay/*/*.dist-info"))
    + list(root.glob("models/*.dist-info"))
):
    who = canon(meta(d)["Name"])
    for line in meta(d).get_all("Requires-Dist") or []:
        r = Requirement(line)
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        reqs.setdefault(canon(r.name), []).append((who, r.specifier))
ours = {}
for d in root.glob("overlay/*/*.dist-info"):
    ours[canon(meta(d)["Name"])] = (meta(d)["Version"], d.parent)
moved, kept, conflicts = [], [], []
for name, (ver, folder) in sorted(ours.items()):
    try:
        img = md.version(name)
    except md.PackageNotFoundError:
        img = None
    specs = reqs.get(name, [])
    img_ok = img is not None and all(s.contains(img, prereleases=True) for _, s in specs)
    if img_ok:
        kept.append(f"{name}=={img}")
        continue
    bad = [f"{w}: {s}" for w, s in specs if not s.contains(ver, prereleases=True)]
    if bad:
        conflicts.append(f"{name}: image {img}, ours {ver}, unmet by ours: {bad}")
    shutil.copytree(folder, site, dirs_exist_ok=True)
    moved.append(f"{name}=={ver} (image {img})")
print("overlay installed:", ", ".join(moved) or "none")
print("image kept:", ", ".join(kept))
for c in conflicts:
    print("CONFLICT", c)

"""What the Python test clients in this directory share: a loud check for the modules
they need, and the failure they raise.

Imported by the scripts next to it (a script's own directory is on sys.path).
"""

import importlib
import sys


def require(script, modules):
    """Exits 2 with the pip command when a module is missing; `modules` maps an import
    name to its pip package (the test running the script fails, it never skips)."""
    missing = []
    for name, package in modules.items():
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(package)
    if missing:
        sys.stderr.write(
            f"{script}: missing python modules {', '.join(missing)}; run "
            f"`python3 -m pip install {' '.join(missing)}` (scripts/test.sh does)\n"
        )
        sys.exit(2)


class Fail(Exception):
    """A check that did not hold."""


def expect(cond, what):
    if not cond:
        raise Fail(what)

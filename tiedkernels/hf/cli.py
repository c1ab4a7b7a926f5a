"""``python -m tiedkernels inspect PATH``: the tie report of a saved Hugging Face model folder."""

import argparse
import sys

from tiedkernels import __main__ as _main

HELP = "tie report of a saved Hugging Face model folder (config + safetensors, built on the meta device)"


def inspect_command(args):
    p = argparse.ArgumentParser(prog="python -m tiedkernels inspect", description=HELP)
    p.add_argument("path", help="a folder written by save_pretrained")
    ns = p.parse_args(getattr(args, "rest", args))
    try:
        from ._ties import inspect_saved
    except ImportError as e:
        print(f"inspect needs transformers and safetensors (pip install -r requirements/hf.txt): {e}",
              file=sys.stderr)
        return 2
    import os

    if not os.path.isfile(os.path.join(ns.path, "config.json")):
        print(f"inspect: {ns.path} is not a saved model folder (no config.json there)", file=sys.stderr)
        return 2
    report = inspect_saved(ns.path, verbose=True)
    return 1 if report.broken else 0


# `python -m tiedkernels` runs tiedkernels/__main__.py as the module "__main__", a different module
# object from "tiedkernels.__main__": register with both so the command is seen either way.
for _mod in {id(m): m for m in (_main, sys.modules.get("__main__")) if getattr(m, "COMMANDS", None) is not None
             and callable(getattr(m, "command", None))}.values():
    _mod.command("inspect", HELP)(inspect_command)

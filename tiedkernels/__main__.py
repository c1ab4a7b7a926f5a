"""``python -m tiedkernels <command>``: info, demo (and whatever other modules register)."""

import argparse
import importlib.metadata
import os
import platform
import sys

COMMANDS = {}


def command(name, help):
    def deco(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return deco


@command("info", "what is built and which backends can run here")
def info(args):
    import torch

    import tiedkernels
    from tiedkernels import _ext, backends

    from tiedkernels import _versions

    print(f"tiedkernels {tiedkernels.__version__} from {os.path.dirname(tiedkernels.__file__)}")
    # One line per dependency: its version and whether it lies in the tested range (README, install section).
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    outside = []
    for name, version in found.items():
        if version is None:
            print(f"{name} not installed (tested: {_versions.describe(name)})")
            continue
        ok, text = _versions.check(name, version)
        extra = f", CUDA build: {torch.version.cuda or 'no'}" if name == "torch" else ""
        print(f"{name} {version} ({text}{extra})")
        outside += [] if ok else [name]
    print("versions: " + ("all inside the tested range" if not outside else "outside the tested range: " + ", ".join(outside)))
    bi = _ext.build_info()
    if bi is None:
        print(f"compiled extension: not loaded ({_ext.error()})")
    else:
        where = "built at install" if _ext.origin() == "package" else f"built on first use, cached in {_ext.origin()}"
        print(f"compiled extension: CPU kernels yes, CUDA kernels {'yes' if bi['cuda'] else 'no'}; "
              f"built against torch {bi['torch']} with {bi['compiler']}, OpenMP {bi['openmp']} ({where})")
    gpu = torch.cuda.is_available()
    print(f"GPU: {torch.cuda.get_device_name(0) if gpu else 'none present'}")
    print("backends:")
    for name, reason in backends.report().items():
        print(f"  {name:<7} {'available' if reason is None else 'off: ' + reason}")
    return 0


@command("demo", "train a tiny causal LM with TiedEmbeddingHead beside the stock modules")
def demo(args):
    from tiedkernels import demo as demo_mod

    return demo_mod.main(args.rest)


@command("gpu-report", "the GPU kernels' launches, flops, bytes, resources and H100 roofline (no GPU needed)")
def gpu_report(args):
    from tiedkernels import gpu_report as report

    return report.main(args.rest)


def main(argv=None):
    _load_plugins()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argparse.Namespace(cmd=argv[0], rest=argv[1:])) or 0
    parser = argparse.ArgumentParser(prog="python -m tiedkernels",
                                     epilog="\n".join(f"  {n:<10} {h}" for n, (_, h) in COMMANDS.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), help="one of the commands below")
    parser.parse_args(argv)
    return 2


def _load_plugins():
    """Subcommands that live with their feature (e.g. ``inspect`` in the Hugging Face module)."""
    for mod in ("tiedkernels.hf.cli",):
        try:
            __import__(mod)
        except ImportError:
            pass


if __name__ == "__main__":
    sys.exit(main())

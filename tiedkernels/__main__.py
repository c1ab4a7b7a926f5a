"""``python -m tiedkernels <command>``: info, demo (and whatever other modules register)."""

import argparse
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

    print(f"tiedkernels {tiedkernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception:
        print("triton: not installed")
    bi = _ext.build_info()
    if bi is None:
        print(f"compiled extension: not loaded ({_ext.error()})")
    else:
        print(f"compiled extension: CPU kernels yes, CUDA kernels {'yes' if bi['cuda'] else 'no'}; "
              f"built against torch {bi['torch']} with {bi['compiler']}, OpenMP {bi['openmp']}")
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


def main(argv=None):
    _load_plugins()
    parser = argparse.ArgumentParser(prog="python -m tiedkernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (_, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return COMMANDS[args.cmd][0](args) or 0


def _load_plugins():
    """Subcommands that live with their feature (e.g. ``inspect`` in the Hugging Face module)."""
    for mod in ("tiedkernels.hf.cli",):
        try:
            __import__(mod)
        except ImportError:
            pass


if __name__ == "__main__":
    sys.exit(main())

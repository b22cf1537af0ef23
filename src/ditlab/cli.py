"""`ditlab` command line: one subcommand per job, each a module of `ditlab.commands`.

A command module (in `ditlab.commands`, or `ditlab.experiments` for the findings suite) defines `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their command runs, so `ditlab --help` stays fast; this is the one place in ditlab
that imports its own modules lazily. A `DitlabError` anywhere becomes one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ditlab.errors import DitlabError

# name -> (module under ditlab, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("commands.quickstart", "train a class-conditional MNIST model in ~10 CPU minutes, then sample"),
    "train": ("commands.train", "train a model from a YAML config with key=value overrides"),
    "sample": ("commands.sample", "sample a checkpoint (ditlab or official DiT) to a PNG grid and/or .npz"),
    "eval": ("commands.eval", "FID/IS/precision-recall and MNIST classifier metrics of samples or a checkpoint"),
    "extract-latents": ("commands.extract_latents", "encode a dataset once with a VAE into sharded latent files"),
    "train-classifier": ("commands.train_classifier", "train the MNIST/Fashion-MNIST evaluator CNN"),
    "train-tokenizer": ("commands.train_tokenizer", "train a conv autoencoder tokenizer and report PSNR"),
    "flops": ("commands.flops", "Gflops and parameter counts of model configs"),
    "scaling": ("commands.scaling", "fit and plot power laws (FID or loss vs compute)"),
    "convert": ("commands.convert", "convert weights between ditlab/official DiT and diffusers"),
    "lm": ("commands.lm", "byte-level language models: train, eval (bits per byte, memory, passkey), generate"),
    "reproduce": ("experiments.reproduce", "run the research notes' findings: arms x seeds, verdicts, report pages"),
    "report": ("experiments.report", "write the findings' pages and REPORT.md from a suite's results"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command '{argv[0]}' (see ditlab --help)", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(f"ditlab.{module_name}")
    parser = argparse.ArgumentParser(prog=f"ditlab {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, in the handler below, not at interpreter exit
        return code
    except DitlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`ditlab reproduce --plan | head`): stop quietly, as shell tools do;
        # stdout goes to /dev/null so that Python's flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

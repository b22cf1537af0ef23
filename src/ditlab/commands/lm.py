"""`ditlab lm train | eval | generate`: byte-level language models.

    ditlab lm train [CONFIG] [key=value ...] [--resume]     (CONFIG defaults to the packaged lm_gcide.yaml)
    ditlab lm eval --ckpt runs/lm_gcide --split val [--max-bytes N] [--by-position] [--passkey] [--out r.json]
    ditlab lm generate --ckpt runs/lm_gcide --prompt "The " [--max-new 200 --temperature 0.8 --top-k 40 --seed 0]

`lm train` is `ditlab train` for a byte-LM config (the same Trainer, checkpoints and resume).
`eval` and `generate` load the run with `ditlab.runs.load_run` (EMA weights unless --no-ema),
score it with `ditlab.eval.lm` and sample it with `ditlab.sampling.generate_text`.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import torch

from ditlab.commands import train as train_command
from ditlab.config import LM_MODEL, is_language_model, load_config, split_config_args
from ditlab.data.text import ByteCorpus
from ditlab.errors import DitlabError
from ditlab.eval.lm import bits_per_byte, memory_use, passkey_accuracy, passkey_sequences
from ditlab.io import write_atomic
from ditlab.runs import Run, load_run, resolve_device
from ditlab.sampling import generate_text


def packaged_config() -> Path:
    return Path(str(resources.files("ditlab") / "configs" / "lm_gcide.yaml"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lm_command", metavar="{train,eval,generate}", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    p = sub.add_parser("train", help="train a byte LM (ditlab train with a byte-LM config)")
    p.add_argument("config", nargs="?", help="YAML config (default: the packaged lm_gcide.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.lm_attention=infini")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue the run in train.out_dir from its latest checkpoint (or from CKPT)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    p = sub.add_parser("eval", help="bits per byte over a whole split; memory by position; passkey retrieval")
    p.add_argument("--ckpt", required=True, help="run dir, step dir or weights file of a byte-LM run")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--data", help="corpus file (default: the run's data.path, else $DITLAB_DATA/text/gcide.txt.gz)")
    p.add_argument("--max-bytes", type=int, help="evaluate only the first N bytes of the split")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's lm_seq_len; an Infini model may "
                                               "read longer windows, a vanilla one at most its context)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--by-position", action="store_true",
                   help="bits per byte by position in the window (per segment, memory on vs reset, for Infini)")
    p.add_argument("--passkey", action="store_true", help="passkey retrieval accuracy against distance in segments")
    p.add_argument("--passkey-segments", type=int,
                   help="segments per passkey sequence (default: window / segment_len for Infini; "
                        "for vanilla, lm_seq_len // 128 segments that fill the context)")
    p.add_argument("--passkey-trials", type=int, default=32, help="sequences per distance")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default=device, help="cpu | cuda | cuda:N")

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("--ckpt", required=True, help="run dir, step dir or weights file of a byte-LM run")
    p.add_argument("--prompt", required=True, help="text to continue (encoded as UTF-8)")
    p.add_argument("--max-new", type=int, help="bytes to generate (default: the run's sample.max_new_bytes)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the run's sample.temperature)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely bytes; 0 = all (default: sample.top_k)")
    p.add_argument("--seed", type=int, help="random seed (default: the run's sample.seed)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default=device, help="cpu | cuda | cuda:N")


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "eval": _eval, "generate": _generate}[args.lm_command](args)


def _train(args: argparse.Namespace) -> int:
    config, overrides = split_config_args(args.config, list(args.overrides))
    config = config or str(packaged_config())
    if not is_language_model(load_config(config, overrides)):
        raise DitlabError(f"{config} describes an image model, not a byte LM (model.name={LM_MODEL}); "
                          "train it with `ditlab train`")
    return train_command.run(argparse.Namespace(config=config, overrides=overrides, resume=args.resume,
                                                device=args.device))


def _load(args: argparse.Namespace) -> Run:
    run = load_run(args.ckpt, ema=not args.no_ema, device=resolve_device(args.device))
    if not run.is_language_model:
        raise DitlabError(f"{args.ckpt} is an image-model run ({run.cfg.model.name}); "
                          "`ditlab lm` needs a byte-LM run (use ditlab sample / ditlab eval)")
    return run


def _describe(run: Run) -> str:
    m, n = run.cfg.model, sum(p.numel() for p in run.model.parameters())
    kind = f"Infini ({m.lm_memory_update} memory)" if m.lm_attention == "infini" else "vanilla"
    which = "raw" if run.weights and run.weights.name == "model.safetensors" else "EMA"
    return f"{run.weights} (step {run.step}, {which} weights): {kind} byte LM, {n / 1e6:.2f}M parameters"


def _protocol(seq_len: int, segment_len: int | None) -> list[str]:
    lines = [f"protocol: non-overlapping windows of {seq_len} bytes from the start of the split; each byte is "
             f"predicted from the bytes before it in its own window only (1..{seq_len} bytes of context, "
             f"{(seq_len + 1) / 2:g} on average), never across windows; every byte but the first is predicted once"]
    if segment_len:
        lines.append(f"          Infini: a window is {-(-seq_len // segment_len)} segment(s) of {segment_len} bytes, "
                     "local attention inside a segment, the compressive memory carries the window's earlier "
                     "segments and starts empty at every window")
    return lines


def _eval(args: argparse.Namespace) -> int:
    for name in ("max_bytes", "seq_len", "batch_size", "passkey_segments", "passkey_trials"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DitlabError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    run = _load(args)
    model, m = run.model, run.cfg.model
    segment_len = m.lm_segment_len if m.lm_attention == "infini" else None  # None: vanilla
    seq_len = args.seq_len or m.lm_seq_len
    if segment_len is None and seq_len > m.lm_seq_len:
        raise DitlabError(f"--seq-len {seq_len} is longer than this vanilla model's context ({m.lm_seq_len} bytes)")
    if args.by_position and args.max_bytes is not None and args.max_bytes < seq_len + 1:
        raise DitlabError(f"--by-position needs at least one whole window: --max-bytes >= {seq_len + 1}")
    if args.passkey:
        _passkey_layout(seq_len, args, segment_len)
    corpus = ByteCorpus(args.data or run.cfg.data.path, args.split)
    used = len(corpus) if args.max_bytes is None else min(args.max_bytes, len(corpus))
    print(f"run: {_describe(run)}")
    print(f"data: {corpus.path}, {args.split} split of {len(corpus):,} bytes"
          + (f", the first {used:,} evaluated" if used < len(corpus) else ""))
    for line in _protocol(seq_len, segment_len):
        print(line)
    bpb = bits_per_byte(model, corpus, seq_len, args.batch_size, args.max_bytes)
    print(f"bits per byte ({args.split}): {bpb:.4f} over {used - 1:,} predicted bytes")
    result = {"ckpt": str(run.weights), "step": run.step, "split": args.split, "data": str(corpus.path),
              "bytes": used, "seq_len": seq_len, "segment_len": segment_len,
              "attention": m.lm_attention, "bits_per_byte": bpb}
    if args.by_position:
        result["by_position"] = _by_position(model, corpus, seq_len, args, segment_len)
    if args.passkey:
        result["passkey"] = _passkey(model, seq_len, args, segment_len)
    if args.out:
        write_atomic(args.out, (json.dumps(result, indent=2) + "\n").encode())
        print(f"wrote {args.out}")
    return 0


def _by_position(model: torch.nn.Module, corpus: ByteCorpus, seq_len: int, args: argparse.Namespace,
                 segment_len: int | None) -> dict:
    """Bits per byte by position, averaged per segment (Infini) or over 8 spans of the window (vanilla)."""
    max_windows = None if args.max_bytes is None else (args.max_bytes - 1) // seq_len
    result = memory_use(model, corpus, seq_len, args.batch_size, segment_len, max_windows)
    print("bits per byte by position in the window" + (" (memory on | memory reset every segment | gain)"
                                                       if segment_len else " (vanilla: no memory to reset)"))
    for row in result["spans"]:
        (a, b), text = row["positions"], f"{row['memory']:.4f}"
        if "reset" in row:
            text += f" | {row['reset']:.4f} | {row['reset'] - row['memory']:+.4f}"
        print(f"  bytes {a:>6}-{b - 1:<6} {text}")
    return result


def _passkey_layout(seq_len: int, args: argparse.Namespace, segment_len: int | None) -> tuple[int, int, list[int]]:
    """(segments, segment length, distances that fit) of the passkey sequences, checked before any
    evaluation runs. Distance 0 needs the key sentence and the question in one segment, so short
    segments start at distance 1; when no distance fits, passkey_sequences' one-line error stands."""
    if segment_len is not None:
        n_segments = args.passkey_segments or max(1, seq_len // segment_len)
    else:
        n_segments = args.passkey_segments or max(1, seq_len // 128)
        segment_len = seq_len // n_segments  # the sequence fills the vanilla context
    distances = []
    for d in reversed(range(n_segments)):
        try:
            passkey_sequences(d, n_segments, segment_len, n_trials=1)
            distances.insert(0, d)
        except DitlabError:
            if not distances and d == 0:
                raise
    return n_segments, segment_len, distances


def _passkey(model: torch.nn.Module, seq_len: int, args: argparse.Namespace, segment_len: int | None) -> dict:
    """Passkey accuracy for every distance (in segments) that fits; Infini also with its memory reset."""
    infini = segment_len is not None
    n_segments, segment_len, distances = _passkey_layout(seq_len, args, segment_len)
    kw = dict(n_segments=n_segments, segment_len=segment_len, n_trials=args.passkey_trials, batch_size=args.batch_size)
    on = passkey_accuracy(model, distances, **kw)
    off = passkey_accuracy(model, distances, memory=False, **kw) if infini else None
    print(f"passkey retrieval: {args.passkey_trials} sequences of {n_segments} x {segment_len} bytes per distance, "
          "5-digit keys (exact = every digit right, digit = per digit)")
    if distances[0] > 0:
        print(f"  distance 0 left out: the key sentence and the question do not fit in one {segment_len}-byte segment")
    table = {}
    for d in distances:
        table[d] = {"exact": on[d]["exact"], "digit": on[d]["digit"]}
        text = f"  distance {d} segment(s): exact {on[d]['exact']:.3f}  digit {on[d]['digit']:.3f}"
        if off is not None:
            table[d]["reset"] = off[d]
            text += f"   (memory reset: exact {off[d]['exact']:.3f}  digit {off[d]['digit']:.3f})"
        print(text)
    return {"n_segments": n_segments, "segment_len": segment_len, "trials": args.passkey_trials, "by_distance": table}


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise DitlabError("--prompt must not be empty")
    run = _load(args)
    prompt = args.prompt.encode()
    text = generate_text(run, prompt, max_new=args.max_new, temperature=args.temperature, top_k=args.top_k,
                         seed=args.seed)
    print((prompt + text).decode("utf-8", errors="replace"))
    return 0
